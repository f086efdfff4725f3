"""The PML + Lightning example (examples/pml_lightning.py), run in this process: the callback's log, and it learns."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("pytorch_metric_learning")

ROOT = Path(__file__).resolve().parents[2]


def load_example():
    spec = importlib.util.spec_from_file_location("pml_lightning", ROOT / "examples" / "pml_lightning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore")
def test_example_logs_warmup_prefill_drift_and_staleness_and_learns_unseen_classes(tmp_path, capsys):
    ex = load_example()
    # 672 training samples, batches of 32: 21 steps an epoch; warm-up 4 steps, then the prefill
    result = ex.main(["--epochs", "2", "--warmup-steps", "4", "--log-every", "5", "--out", str(tmp_path)])
    assert result["steps"] == 42
    assert "Recall@1" in capsys.readouterr().out
    assert result["recall@1"] > result["recall@1_untrained"] + 0.3  # 0.67 vs 0.16 here (2026-12-06)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    prefill = [r for r in rows if r["memory/prefill_rows"]]
    assert [(int(r["step"]), float(r["memory/prefill_rows"])) for r in prefill] == [(4, 256.0)]  # before step 5
    drift = {int(r["step"]): r for r in rows if r["memory/drift_mean"]}
    assert sorted(drift) == list(range(1, 42, 5))  # measured over steps 0->1, 5->6, ..., 40->41
    assert float(drift[1]["memory/in_warmup"]) == 1.0 and float(drift[6]["memory/in_warmup"]) == 0.0
    assert float(drift[1]["memory/rows"]) == 32.0 and float(drift[6]["memory/rows"]) == 256.0
    for step, r in drift.items():
        assert float(r["memory/drift_max"]) >= float(r["memory/drift_mean"]) > 0
        assert float(r["memory/staleness_rows"]) == float(r["memory/rows"])  # every stored sample compared
        assert -1 <= float(r["memory/staleness_cosine"]) <= 1


def test_example_refuses_a_memory_larger_than_the_training_set(capsys):
    ex = load_example()
    with pytest.raises(SystemExit) as exc:
        ex.parse_args(["--memory-size", "700"])
    assert exc.value.code == 2
    assert "--memory-size must be at most the 672 training samples" in capsys.readouterr().err
