"""W&B runs of ``xbn-metric compare`` / ``sweep``: group, job type, tags, config, summary and best.pt, read back offline."""

import base64
import dataclasses
import hashlib
from pathlib import Path

import pytest
import yaml

from metric.cli import main
from metric.config import MetricConfig
from xbn_queue.training.config import config_to_argv, parse_config
from xbn_queue.training.tracking import read_metrics

from tests.wandb_history import offline_wandb, read_wandb_run

from .conftest import make_folder
from .helpers import tiny_argv

#: The tiny setting of the other compare tests on a folder of 6 classes x 8 generated images, half of each class
#: trained, one epoch without warm-up.
SMALL = dict(dataset="folder", split="instance", train_fraction=0.5, warmup_epochs=0, image_size=16, backbone="tinycnn",
             pretrained=False, memory_size="16", staleness_samples=16, auto_augment="none", re_prob=0.0, workers=0)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    offline_wandb(monkeypatch, tmp_path)


def first_best(evals, key):
    best = evals[0]
    for r in evals[1:]:
        if r[key] > best[key]:
            best = r
    return best


def test_compare_runs_are_grouped_tagged_summarised_and_log_best_pt(tmp_path, offline, monkeypatch):
    import metric.experiments.compare as mc

    monkeypatch.setattr(mc, "baselines_for", lambda *a, **k: {})  # not what this test is about (test_baselines.py)
    root = make_folder(tmp_path / "folder", per_class=8)
    out = tmp_path / "xbn-series"
    argv = tiny_argv(out, data_root=str(root), wandb_mode="offline", wandb_log_model=True, **SMALL)
    assert main(["compare", *argv, "--methods", "xbn", "--seeds", "2"]) == 0
    for seed in (0, 1):
        run = out / f"xbn-seed{seed}"
        (wandb_dir,) = sorted((run / "wandb").glob("offline-run-*"))
        got = read_wandb_run(wandb_dir)
        assert (got["group"], got["job_type"], got["name"]) == ("xbn-series", "xbn", f"folder-xbn-seed{seed}")
        assert got["tags"] == ["method=xbn", f"seed={seed}", "dataset=folder"]
        assert got["config"] == yaml.safe_load((run / "config.yaml").read_text())  # the resolved config
        evals = [r for r in read_metrics(run / "metrics.jsonl") if "recall@1" in r]
        best, last = first_best(evals, "recall@1"), evals[-1]
        want = {"best/recall@1": best["recall@1"], "best/map@r": best["map@r"], "best/epoch": best["epoch"],
                "last/recall@1": last["recall@1"], "last/map@r": last["map@r"], "last/epoch": last["epoch"]}
        assert {k: v for k, v in got["summary"].items() if "/" in k} == want
        (artifact,) = got["artifacts"]
        assert artifact["type"] == "model" and artifact["name"].startswith(f"model-folder-xbn-seed{seed}-")
        assert artifact["files"] == {"best.pt": base64.b64encode(hashlib.md5((run / "best.pt").read_bytes()).digest()).decode()}
        assert artifact["metadata"] == {"method": "xbn", "dataset": "folder", "group": "xbn-series", "file": "best.pt",
                                        "epoch": best["epoch"], "metrics": {"recall@1": best["recall@1"], "map@r": best["map@r"]}}


def test_log_model_without_wandb_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compare", *tiny_argv(out), "--wandb-log-model", "--methods", "xbn", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["xbn-metric: error: --wandb-log-model: logs the checkpoint to W&B, which is off; "
                   "add --wandb-mode offline or online"]
    assert not out.exists()


def test_sweep_runs_carry_the_group_and_their_swept_values_in_process_and_as_commands(tmp_path, monkeypatch):
    import metric.experiments.compare as mc
    import metric.train as mt

    seen = []

    def fake_train(cfg):  # the real sweep path up to training
        seen.append(cfg)
        return {"stopped": None, "best": {}, "output_dir": cfg.output_dir}

    monkeypatch.setattr(mt, "train", fake_train)
    monkeypatch.setattr(mc, "baselines_for", lambda *a, **k: {})
    out = tmp_path / "s"
    argv = [*tiny_argv(out, wandb_mode="offline"), "--wandb-group", "lr-study", "--wandb-tags", "mine",
            "--methods", "xbm,xbn", "--seeds", "1", "--vary", "lr=0.001,0.003"]
    assert main(["sweep", *argv]) == 0
    assert sorted((c.method, c.lr, c.wandb_group, tuple(c.wandb_tags)) for c in seen) == [
        ("xbm", 0.001, "lr-study", ("mine", "lr=0.001")), ("xbm", 0.003, "lr-study", ("mine", "lr=0.003")),
        ("xbn", 0.001, "lr-study", ("mine", "lr=0.001")), ("xbn", 0.003, "lr-study", ("mine", "lr=0.003"))]
    for cfg in seen:  # with --jobs N each run is a process started with config_to_argv of the same config
        again = parse_config(MetricConfig, config_to_argv(cfg, only_changed=True), prog="xbn-metric")
        assert (again.wandb_group, again.wandb_tags) == (cfg.wandb_group, cfg.wandb_tags)
    seen.clear()
    monkeypatch.setattr(mc, "baselines_for", lambda *a, **k: {})
    assert main(["sweep", *tiny_argv(tmp_path / "plain"), "--methods", "xbn", "--seeds", "1", "--vary", "lr=0.001"]) == 0
    assert [(c.wandb_group, c.wandb_tags) for c in seen] == [(None, None)]  # W&B off: the runs' configs unchanged
