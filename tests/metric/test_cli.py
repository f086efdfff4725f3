"""Command line, compare table, YAML config, pretrained weights handling, memory size parsing."""

import json
import statistics

import pytest
import torch

from metric.cli import main
from metric.config import MetricConfig, memory_rows
from metric.model import PretrainedWeightsError, build_model
from xbn_queue.training.config import parse_config

from .helpers import tiny_argv


def test_compare_prints_and_writes_mean_std_table(tmp_path, capsys):
    assert main(["compare", *tiny_argv(tmp_path), "--methods", "none,xbn", "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| No-XBM |" in printed and "| XBN |" in printed and "R@1" in printed and "MAP@R" in printed
    result = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [("none", 0), ("none", 1), ("xbn", 0), ("xbn", 1)]
    for method in ("none", "xbn"):
        vals = [r["recall@1"] for r in result["runs"] if r["method"] == method]
        s = result["summary"][method]["recall@1"]
        assert s["mean"] == pytest.approx(statistics.fmean(vals)) and s["std"] == pytest.approx(statistics.stdev(vals))
        # each run's score is its best evaluation, read back from its own metrics.jsonl
        for r in (r for r in result["runs"] if r["method"] == method):
            recs = [json.loads(line) for line in (tmp_path / f"{method}-seed{r['seed']}" / "metrics.jsonl").read_text().splitlines()]
            assert r["recall@1"] == max(x["recall@1"] for x in recs)
    table = (tmp_path / "compare.md").read_text()
    cell = f"{100 * result['summary']['xbn']['recall@1']['mean']:.2f} ± {100 * result['summary']['xbn']['recall@1']['std']:.2f}"
    assert cell in table
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_train_subcommand_and_errors(tmp_path, capsys):
    assert main(["train", *tiny_argv(tmp_path / "a", max_steps=3)]) == 0
    assert "best (epoch 1)" in capsys.readouterr().out
    assert main(["--dataset", "sop", "--data-root", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["compare", "--methods", "xbm,bogus"]) == 2
    assert "unknown bogus" in capsys.readouterr().err


def test_yaml_config_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: xbm\nmemory-size: '32'\nepochs: 3\nkalman_r: auto\n")
    cfg = parse_config(MetricConfig, ["--config", str(f), "--method", "axbn"])
    assert (cfg.method, cfg.memory_size, cfg.epochs, cfg.kalman_r) == ("axbn", 32, 3, "auto")
    f.write_text("memory_sise: 3\n")
    with pytest.raises(ValueError, match="memory_sise"):
        parse_config(MetricConfig, ["--config", str(f)])


def test_memory_rows():
    assert memory_rows("0.5", 1001) == 500 and memory_rows("1.0", 7) == 7 and memory_rows("4096", 5000) == 4096
    assert memory_rows("5e-1", 10) == 5 and memory_rows(0.5, 1001) == 500 and memory_rows(64, 64) == 64
    for bad, match in (("1.5", r"in \(0, 1\]"), ("0", ">= 1"), ("half", "row count or a fraction"),
                       (4096.0, r"write the integer"), (11, "more rows than the 10 training images; use at most 10")):
        with pytest.raises(ValueError, match=match):
            memory_rows(bad, 10)


def test_unavailable_pretrained_weights_explain_the_alternatives(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise RuntimeError("Hub is unreachable (offline)")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedWeightsError, match=r"--pretrained-path FILE.*--no-pretrained"):
        build_model("resnet10t", 8, pretrained=True)
    with pytest.raises(PretrainedWeightsError, match="--no-pretrained"):
        build_model("tinycnn", 8, pretrained=True)


def test_pretrained_path_loads_a_local_state_dict(tmp_path):
    import timm

    src = timm.create_model("resnet10t", pretrained=False)  # with its 1000-class fc, ignored on load
    torch.save(src.state_dict(), tmp_path / "w.pth")
    m = build_model("resnet10t", 8, pretrained=True, pretrained_path=str(tmp_path / "w.pth"))
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    torch.save({"conv1.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="shapes differ"):
        build_model("resnet10t", 8, pretrained_path=str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("resnet10t", 8, pretrained_path=str(tmp_path / "nope.pth"))


def test_default_workers_never_exceed_the_cores(monkeypatch):
    import metric.config as mc
    from metric.config import resolve_config

    folder = dict(dataset="folder", data_root="/nowhere")
    monkeypatch.setattr(mc, "available_cores", lambda: 2)
    assert resolve_config(MetricConfig(**folder)).workers == 2  # the paper's default 4, capped
    assert resolve_config(MetricConfig(**folder, workers=8)).workers == 8  # a value the user gives is kept
    assert resolve_config(MetricConfig(dataset="digits")).workers == 0
    monkeypatch.setattr(mc, "available_cores", lambda: 16)
    assert resolve_config(MetricConfig(**folder)).workers == 4


def test_available_cores_falls_back_to_cpu_count(monkeypatch):
    import os

    from xbn_queue.training.cli import available_cores

    assert available_cores() == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert available_cores() == 3
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert available_cores() == 1
