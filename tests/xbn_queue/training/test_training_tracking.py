"""Tests of xbn_queue.training.tracking: metrics.jsonl, offline W&B read back, resume, plots."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from xbn_queue.training.tracking import (
    RunLogger,
    curve_stats,
    plot_compare,
    plot_history,
    read_metrics,
    to_plain,
)

from tests.wandb_history import read_wandb_history


def test_to_plain_converts_tensors_and_numpy() -> None:
    value = {"a": torch.tensor(0.25), "b": np.float32(1.5), "c": np.int64(3), "d": torch.tensor([1, 2]),
             "e": [np.bool_(True), Path("p")], "f": torch.tensor([[2.0]], requires_grad=True)}
    plain = to_plain(value)
    assert plain == {"a": 0.25, "b": 1.5, "c": 3, "d": [1, 2], "e": [True, "p"], "f": 2.0}
    assert type(plain["b"]) is float and type(plain["c"]) is int and type(plain["e"][0]) is bool
    with pytest.raises(TypeError, match="cannot log"):
        to_plain(object())


def test_jsonl_lines_are_written_and_flushed(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, {"lr": 0.1})
    logger.log({"epoch": 1, "loss": torch.tensor(0.5), "recall@1": np.float64(0.75)}, step=10)
    # Flushed immediately: readable before finish().
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 10, "epoch": 1, "loss": 0.5, "recall@1": 0.75}]
    logger.log({"epoch": 2, "loss": 0.25, "step": 20}, step=20)
    with pytest.raises(ValueError, match="differs from step=30"):
        logger.log({"step": 31}, step=30)
    logger.finish()
    logger.finish()  # idempotent
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"step": 10, "epoch": 1, "loss": 0.5, "recall@1": 0.75},
        {"step": 20, "epoch": 2, "loss": 0.25},
    ]
    with pytest.raises(RuntimeError, match="after finish"):
        logger.log({"a": 1}, step=40)


def test_disabled_logger_is_a_noop(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path / "rank1", {"lr": 0.1}, mode="offline", enabled=False)
    logger.log({"loss": 1.0}, step=1)
    logger.finish()
    assert not (tmp_path / "rank1").exists()
    assert logger.wandb_run is None


def test_fresh_run_replaces_and_resume_truncates(tmp_path: Path) -> None:
    with RunLogger(tmp_path, {}) as logger:
        for step in (1, 2, 3, 4):
            logger.log({"loss": float(step)}, step=step)
    # A run resumed from the checkpoint at step 2 drops what the killed run logged after it.
    with RunLogger(tmp_path, {}, resume_step=2) as logger:
        logger.log({"loss": 30.0}, step=3)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    with RunLogger(tmp_path, {}) as logger:  # a fresh run starts a new file
        logger.log({"loss": 9.0}, step=1)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 9.0}]


def test_bad_mode_and_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown W&B mode 'offlne'"):
        RunLogger(tmp_path, {}, mode="offlne")
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        read_metrics(bad)


def test_missing_wandb_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r'pip install "xbn-queue\[wandb\]"'):
        RunLogger(tmp_path, {}, mode="offline")


def test_offline_wandb_run_logs_same_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    logged = [
        ({"epoch": 0, "loss": torch.tensor(1.25), "recall@1": 0.5}, 5),
        ({"epoch": 1, "loss": np.float32(0.75), "recall@1": 0.625}, 10),
    ]
    out = tmp_path / "run"
    logger = RunLogger(out, {"lr": 1e-4, "method": "xbn"}, project="xbn-test", mode="offline", name="t1")
    run_dir = logger.wandb_run_dir
    assert run_dir is not None and run_dir.name.startswith("offline-run-")
    assert out in run_dir.parents  # the W&B files live in the run folder
    for metrics, step in logged:
        logger.log(metrics, step=step)
    logger.finish()
    rows = read_wandb_history(run_dir)
    got = [({k: v for k, v in row.items() if not k.startswith("_")}, row["_step"]) for row in rows]
    assert got == [({"epoch": 0, "loss": 1.25, "recall@1": 0.5}, 5), ({"epoch": 1, "loss": 0.75, "recall@1": 0.625}, 10)]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [5, 10]
    assert (out / "wandb-run-id.txt").read_text().strip() in run_dir.name


def _png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        kinds.append(kind)
        pos += 12 + length
    return kinds


def test_plot_history_writes_valid_png(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    with RunLogger(tmp_path, {}) as logger:
        for epoch in range(4):
            logger.log({"epoch": epoch, "recall@1": 0.1 * epoch, "drift_mean": 0.01 / (epoch + 1)}, step=epoch * 10)
        logger.log({"loss": 0.3}, step=50)  # no epoch: ignored for x="epoch"
    png = plot_history(metrics, tmp_path / "plots" / "history.png",
                       panels=[("recall@1",), ("drift_mean", "drift_max"), ("absent",)])
    data = png.read_bytes()
    assert len(data) > 1000
    kinds = _png_chunks(data)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    # Two panels drawn (the "absent" one is left out): 6 x 5.6 inches at 100 dpi.
    assert (width, height) == (600, 560)


def test_plot_history_errors_and_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics file .*nothing\.jsonl.* not found"):
        plot_history(tmp_path / "nothing.jsonl", tmp_path / "p.png")
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.warns(UserWarning, match="none of"):
        png = plot_history(metrics, tmp_path / "p.png", panels=[("recall@1",)])
    assert _png_chunks(png.read_bytes())[-1] == b"IEND"
    png = plot_history(metrics, tmp_path / "q.png", panels=["loss"], x="step")
    assert struct.unpack(">II", png.read_bytes()[16:24]) == (600, 280)


def test_curve_stats_against_numpy() -> None:
    runs = [{1: 0.2, 2: 0.4, 3: 0.5}, {1: 0.3, 2: 0.6}, {1: 0.1, 2: float("nan"), 3: 0.7}]
    stats = curve_stats(runs)
    assert [s[0] for s in stats] == [1, 2, 3]
    for x, mean, std, n in stats:
        ys = np.array([r[x] for r in runs if x in r and np.isfinite(r[x])])
        assert n == len(ys)
        assert mean == pytest.approx(ys.mean())
        assert std == pytest.approx(ys.std(ddof=1))


def test_plot_compare_writes_png_and_refuses_empty(tmp_path: Path) -> None:
    panels = [
        ("k-NN accuracy", {"none": [{1: 0.2, 2: 0.3}, {1: 0.25, 2: 0.32}], "xbn": [{1: 0.28, 2: 0.33}]}),
        ("drift", {"xbn": [{1: float("nan")}]}),  # nothing finite: the panel is left out
    ]
    png = plot_compare(panels, tmp_path / "c" / "compare.png", title="t")
    data = png.read_bytes()
    assert _png_chunks(data)[0] == b"IHDR" and _png_chunks(data)[-1] == b"IEND"
    assert struct.unpack(">II", data[16:24]) == (650, 300)  # one panel drawn
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_compare([("drift", {"xbn": [{}]})], tmp_path / "e.png")
