"""W&B runs of ``xbn-selfsup compare``: group, job type (the adaptation), tags, summary of the k-NN accuracy, last.pt."""

import base64
import hashlib

import pytest

from selfsup.compare import compare
from selfsup.data import load_dataset
from tests.selfsup.conftest import tiny_config
from tests.wandb_history import offline_wandb, read_wandb_run
from xbn_queue.training.tracking import read_metrics


def test_compare_runs_are_grouped_by_series_and_summarise_knn(tmp_path, monkeypatch):
    offline_wandb(monkeypatch, tmp_path)
    out = tmp_path / "moco-series"
    cfg = tiny_config(out, train_subset=128, epochs=2, wandb_mode="offline", wandb_log_model=True, wandb_tags=["mine"])
    data = load_dataset("digits", "", image_size=16, train_subset=128, test_subset=40)
    assert compare(cfg, ["xbn"], seeds=1, data=data)["exit_code"] == 0  # one run: the series code is metric's (test_wandb_compare)
    for adaptation in ("xbn",):
        run = out / f"{adaptation}-seed0"
        (wandb_dir,) = sorted((run / "wandb").glob("offline-run-*"))
        got = read_wandb_run(wandb_dir)
        assert (got["group"], got["job_type"]) == ("moco-series", adaptation)
        assert got["tags"] == [f"method={adaptation}", "seed=0", "dataset=digits", "mine"]
        evals = [r for r in read_metrics(run / "metrics.jsonl") if "knn_acc" in r]
        assert [r["epoch"] for r in evals] == [1.0, 2.0]
        best = evals[1] if evals[1]["knn_acc"] > evals[0]["knn_acc"] else evals[0]
        assert {k: v for k, v in got["summary"].items() if "/" in k} == {
            "best/knn_acc": best["knn_acc"], "best/epoch": best["epoch"], "last/knn_acc": evals[1]["knn_acc"], "last/epoch": 2.0}
        (artifact,) = got["artifacts"]
        assert artifact["type"] == "model" and set(artifact["aliases"]) == {"last", "latest"}
        assert artifact["files"] == {"last.pt": base64.b64encode(hashlib.md5((run / "last.pt").read_bytes()).digest()).decode()}
        assert artifact["metadata"] == {"method": adaptation, "dataset": "digits", "group": "moco-series", "file": "last.pt",
                                        "epoch": 2.0, "metrics": {"knn_acc": evals[1]["knn_acc"]}}
