"""W&B identity, summary and model artifact of a run (RunLogger with a WandbReport), read back from offline runs."""

from __future__ import annotations

import base64
import hashlib
import math
from pathlib import Path

import pytest

from xbn_queue.training.cli import UsageError
from xbn_queue.training.tracking import (RunLogger, WandbReport, check_wandb_options, read_metrics, score_summary,
                                         wandb_tag)

from tests.wandb_history import offline_wandb, read_wandb_run

REPORT = WandbReport("method", ("recall@1", "map@r"), model_file="best.pt", model_at="best")

#: Step records (no score), evaluations with a tie for the best at epochs 2 and 3, a NaN evaluation.
RECORDS = [
    {"step": 5, "epoch": 0.5, "loss": 2.0},
    {"step": 10, "epoch": 1, "recall@1": 0.5, "map@r": 0.25, "loss": 1.5},
    {"step": 20, "epoch": 2, "recall@1": 0.75, "map@r": 0.375, "loss": 1.0},
    {"step": 30, "epoch": 3, "recall@1": 0.75, "map@r": 0.5, "loss": 0.75},
    {"step": 40, "epoch": 4, "recall@1": float("nan"), "map@r": 0.0, "loss": 0.5},
    {"step": 50, "epoch": 5, "recall@1": 0.625, "map@r": 0.4375},
]
#: By hand: the best is the first of the tie (epoch 2, as best.pt), the NaN is no evaluation, the last is epoch 5.
SUMMARY = {"best/recall@1": 0.75, "best/map@r": 0.375, "best/epoch": 2,
           "last/recall@1": 0.625, "last/map@r": 0.4375, "last/epoch": 5}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    offline_wandb(monkeypatch, tmp_path, wandb_dir="")


def test_score_summary_by_hand():
    assert score_summary(RECORDS, ("recall@1", "map@r")) == SUMMARY
    assert score_summary(RECORDS[:1], ("recall@1",)) == {}
    knn = [{"epoch": 0.5, "loss": 1.0}, {"epoch": 1.0, "knn_acc": 0.25}, {"epoch": 2.0, "knn_acc": 0.5}, {"epoch": 3.0, "knn_acc": 0.375}]
    assert score_summary(knn, ("knn_acc",)) == {"best/knn_acc": 0.5, "best/epoch": 2.0, "last/knn_acc": 0.375, "last/epoch": 3.0}


def test_wandb_options_are_checked():
    class Cfg:
        wandb_mode, wandb_log_model, wandb_tags = "disabled", True, None

    with pytest.raises(UsageError, match=r"^--wandb-log-model: .*W&B, which is off; add --wandb-mode offline or online$"):
        check_wandb_options(Cfg)
    Cfg.wandb_mode = "offline"
    check_wandb_options(Cfg)
    Cfg.wandb_tags = ["ok", "x" * 65]
    with pytest.raises(UsageError, match=r"^--wandb-tags 'x{65}': expected a tag of 1 to 64 characters"):
        check_wandb_options(Cfg)
    assert wandb_tag("lr", 0.001) == "lr=0.001" and wandb_tag("loss_args", "m=" + "9" * 80) == "loss_args=m=" + "9" * 52


def _md5(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_offline_run_has_group_job_type_tags_summary_and_the_model(tmp_path, offline):
    out = tmp_path / "run"
    config = {"method": "xbn", "seed": 3, "dataset": "digits", "lr": 1e-3, "wandb_group": "series-a",
              "wandb_tags": ["lr=0.001", "mine"], "wandb_log_model": True}
    logger = RunLogger(out, config, project="xbn-test", mode="offline", name="digits-xbn-seed3", report=REPORT)
    for record in RECORDS:
        logger.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if record["step"] == 20:
            (out / "best.pt").write_bytes(b"weights of epoch 2")
    logger.finish()
    got = read_wandb_run(logger_dir(out))
    assert (got["group"], got["job_type"], got["name"]) == ("series-a", "xbn", "digits-xbn-seed3")
    assert got["tags"] == ["method=xbn", "seed=3", "dataset=digits", "lr=0.001", "mine"]
    assert got["config"] == config
    assert {k: got["summary"][k] for k in SUMMARY} == SUMMARY
    assert got["exit_code"] == 0
    (artifact,) = got["artifacts"]
    assert artifact["type"] == "model" and artifact["name"].startswith("model-digits-xbn-seed3-")
    assert set(artifact["aliases"]) == {"best", "latest"}
    assert artifact["metadata"] == {"method": "xbn", "dataset": "digits", "group": "series-a", "file": "best.pt",
                                    "epoch": 2, "metrics": {"recall@1": 0.75, "map@r": 0.375}}
    assert artifact["files"] == {"best.pt": _md5(out / "best.pt")}


def logger_dir(out: Path) -> Path:
    (run_dir,) = sorted((out / "wandb").glob("offline-run-*"))
    return run_dir


def test_no_model_without_the_option_nor_from_a_failed_run_and_resume_keeps_the_summary(tmp_path, offline):
    config = {"method": "axbn", "seed": 0, "dataset": "digits", "wandb_log_model": False}
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_bytes(b"weights")
    with RunLogger(out, config, mode="disabled", report=REPORT) as logger:  # a first run without W&B, killed after step 30
        for record in RECORDS:
            logger.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    # resumed from its step-20 checkpoint with W&B: the records after step 20 are dropped, two new ones follow
    logger = RunLogger(out, config, mode="offline", resume_step=20, report=REPORT)
    logger.log({"epoch": 3, "recall@1": 0.7, "map@r": 0.125}, step=30)
    logger.log({"epoch": 4, "recall@1": 0.625, "map@r": 0.5}, step=40)
    logger.finish()
    got = read_wandb_run(logger_dir(out))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [5, 10, 20, 30, 40]
    # the best is still the first run's epoch 2, which only the kept records hold
    assert {k: v for k, v in got["summary"].items() if "/" in k} == {
        "best/recall@1": 0.75, "best/map@r": 0.375, "best/epoch": 2, "last/recall@1": 0.625, "last/map@r": 0.5, "last/epoch": 4}
    assert (got["group"], got["job_type"], got["tags"]) == ("", "axbn", ["method=axbn", "seed=0", "dataset=digits"])
    assert got["artifacts"] == []

    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="boom"):
        with RunLogger(failed, dict(config, wandb_log_model=True), mode="offline", report=REPORT) as logger:
            logger.log({"epoch": 1, "recall@1": 0.5, "map@r": 0.25}, step=1)
            (failed / "best.pt").write_bytes(b"weights")
            raise RuntimeError("boom")
    got = read_wandb_run(logger_dir(failed))
    assert got["artifacts"] == [] and got["exit_code"] == 1
    assert got["summary"]["best/recall@1"] == 0.5 and not math.isnan(got["summary"]["best/map@r"])
