"""Command line, compare table, YAML config, pretrained weights handling, memory size parsing."""

import json
import statistics

import pytest
import torch

from metric.cli import main
from metric.config import MetricConfig
from xbn_queue.training.memory import memory_rows
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
            assert r["last_recall@1"] == recs[-1]["recall@1"] and r["last_map@r"] == recs[-1]["map@r"]
            assert r.get("staleness_cosine") == recs[-1].get("staleness_cosine")  # no memory, no staleness
            assert ("staleness_cosine" in r) == (method == "xbn")
            assert r["early_epoch"] == 2 and r["early_recall@1"] == recs[1]["recall@1"]  # first epoch after the warm-up
    text = (tmp_path / "compare.md").read_text()
    table, gains = text.split("\n\nPaired gains", 1)  # the method table, then the paired-gain table
    xbn_row = next(line for line in table.splitlines() if line.startswith("| XBN |"))
    for key in ("recall@1", "last_recall@1", "early_recall@1", "map@r", "last_map@r"):
        s = result["summary"]["xbn"][key]
        assert f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" in xbn_row, key
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")]
    assert rows == ["| Method", "| Raw pixels", "| Untrained net", "| No-XBM", "| XBN"]
    # the paired gain: XBN minus No-XBM of the same seed, mean and sample std of the per-seed differences
    best = {(r["method"], r["seed"]): r["recall@1"] for r in result["runs"]}
    diffs = [100 * (best[("xbn", s)] - best[("none", s)]) for s in (0, 1)]
    gain_row = next(line for line in gains.splitlines() if line.startswith("| XBN − No-XBM |"))
    assert f"{statistics.fmean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} |" in gain_row
    assert "| Method | R@1 ep 2 | R@1 best | R@1 last | MAP@R best | MAP@R last | R-Prec best | R-Prec last |" in table
    raw = result["baselines"]["summary"]["raw-pixels"]
    assert f"| Raw pixels | {100 * raw['recall@1']['mean']:.2f} | {100 * raw['recall@1']['mean']:.2f} |" in table
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # running the finished comparison again trains nothing and prints the same table
    assert main(["compare", *tiny_argv(tmp_path), "--methods", "none,xbn", "--seeds", "2", "--resume"]) == 0
    assert capsys.readouterr().out == printed and (tmp_path / "compare.md").read_text() == text


def test_run_scores_best_last_and_early_against_plain_records():
    from metric.experiments.compare import run_scores

    recs = [{"epoch": 1, "phase": "warmup", "recall@1": 0.5, "map@r": 0.1},
            {"epoch": 2, "recall@1": 0.8, "map@r": 0.3, "staleness_cosine": 0.9},
            {"step": 7, "loss": 1.0},  # not an evaluation
            {"epoch": 4, "recall@1": 0.8, "map@r": 0.4},  # a tie: the first best stays
            {"epoch": 6, "recall@1": 0.7, "map@r": 0.35, "staleness_cosine": 0.75}]
    got = run_scores(recs, early_epoch=3)
    assert got == {"best_epoch": 2, "recall@1": 0.8, "map@r": 0.3, "last_epoch": 6, "last_recall@1": 0.7,
                   "last_map@r": 0.35, "staleness_cosine": 0.75, "early_epoch": 4, "early_recall@1": 0.8}
    assert run_scores(recs, early_epoch=1)["early_recall@1"] == 0.5
    assert "early_epoch" not in run_scores(recs, early_epoch=7)
    assert run_scores([{"step": 3, "loss": 1.0}]) == {}


@pytest.mark.parametrize("extra,match", [
    (["--early-epoch", "3"], "--early-epoch 3: expected an epoch in [1, 2] (--warmup-epochs 1 + --epochs 1)"),
    (["--early-epoch", "0"], "--early-epoch 0: expected an epoch in [1, 2]"),
    (["--jobs", "0"], "--jobs 0: expected an integer >= 1"),
    (["--jobs", "2", "WORLD_SIZE=2"], "--jobs 2: runs side by side are not for torchrun"),
])
def test_compare_bad_early_epoch_or_jobs_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, extra, match):
    for e in [e for e in extra if "=" in e]:
        monkeypatch.setenv(*e.split("="))
        extra = [x for x in extra if x != e]
    assert main(["compare", *tiny_argv(tmp_path / "c"), "--methods", "xbn", "--seeds", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


@pytest.mark.parametrize("value", ["sometimes", "0", "-1"])
def test_bad_kalman_r_is_one_line_and_writes_nothing(tmp_path, capsys, value):
    assert main(["train", *tiny_argv(tmp_path / "a", max_steps=3), "--method", "axbn", "--kalman-r", value]) == 2
    err = capsys.readouterr().err
    assert f"--kalman-r {value}" in err and ": expected a number > 0, 'auto' or 'sampling'" in err  # 0 reads as 0.0
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a").exists()


def test_kalman_q_default_follows_the_noise_model():
    from metric.config import resolve_config

    for r, q in (("0.01", 1.0), ("auto", 1.0), ("sampling", 0.01)):
        cfg = resolve_config(parse_config(MetricConfig, ["--method", "axbn", "--kalman-r", r]))
        assert cfg.kalman_q == q
    cfg = resolve_config(parse_config(MetricConfig, ["--method", "axbn", "--kalman-r", "sampling", "--kalman-q", "0.1"]))
    assert cfg.kalman_q == 0.1


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
    # more than an epoch: a multiple of the training set, or a count above it
    assert memory_rows("2.0", 1001) == 2002 and memory_rows(1.5, 10) == 15 and memory_rows(0.25, 10) == 2
    assert memory_rows(11, 10) == 11 and memory_rows("4096", 10) == 4096 and memory_rows(2.0, None) == 0
    for bad, match in (("0", ">= 1"), (-3, ">= 1"), ("half", "row count >= 1 or a fraction"), (0.0, "finite number > 0"),
                       ("-0.5", "finite number > 0"), ("nan", "finite number > 0"), ("inf", "finite number > 0"),
                       (True, "row count >= 1")):
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


@pytest.mark.parametrize("content, message", [
    (b"dataset: omniglot\n", "not a readable PyTorch state dict"),  # a YAML file, not a torch file
    (b"\x00" * 10, "not a readable PyTorch state dict"),
    (torch.zeros(3), "expected a state dict .a dict of tensors., got Tensor"),
    ({"conv1.0.weight": 1}, "got dict with non-tensor values"),
])
def test_pretrained_path_that_is_not_a_state_dict_is_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        build_model("tinycnn", 8, pretrained_path=str(path))


def test_cli_refuses_a_pretrained_path_that_is_not_a_state_dict(tmp_path, capsys):
    (tmp_path / "w.pth").write_text("dataset: omniglot\n")
    code = main(["--dataset", "digits", "--backbone", "tinycnn", "--pretrained-path", str(tmp_path / "w.pth"),
                 "--epochs", "1", "--max-steps", "1", "--no-progress", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("xbn-metric: error: --pretrained-path") and "not a readable PyTorch state dict" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


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
