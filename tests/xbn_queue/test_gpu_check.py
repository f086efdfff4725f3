"""``benchmarks/gpu_check.py``: its CPU dry run passes, and it fails loudly on any error or bad argument."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
#: The CIFAR-10 JPEG archive of ``../shared/data`` (beside the checkout, or beside its worktree folder).
DATA = next((p for p in (ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
                         ROOT.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz") if p.is_file()), None)


@pytest.fixture()
def gpu_check(monkeypatch):
    pytest.importorskip("pytorch_metric_learning")
    pytest.importorskip("lightly")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for name in ("common", "queue_overhead", "lightly_bank", "moco_pipeline", "recall_eval", "gpu_check"):
        sys.modules.pop(name, None)
    return importlib.import_module("gpu_check")


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(gpu_check, tmp_path, capsys):
    """Every step runs on tiny sizes (the data-dependent ones on a few real CIFAR-10 JPEGs when
    ``../shared/data`` is here, otherwise they are reported as skipped); targets are not judged.
    About a minute of CPU time (three subprocesses: pytest and both trainers)."""
    argv = ["--device", "cpu", "--quick", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
            "--work-dir", str(tmp_path / "work")]
    if DATA is not None:
        argv += ["--data", str(DATA)]
    assert gpu_check.main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert list(status) == ["cuda_tests", "queue_overhead", "lightly_bank", "moco_pipeline", "recall_eval",
                            "metric_1epoch", "selfsup_1epoch"]
    data_steps = {"moco_pipeline", "metric_1epoch", "selfsup_1epoch"}
    for name, st in status.items():
        assert st == ("skipped" if DATA is None and name in data_steps else "ok"), (name, report["steps"])
    assert report["passed"] and all(s["target_met"] is None for s in report["steps"])
    qo = next(s for s in report["steps"] if s["name"] == "queue_overhead")
    assert qo["results"]["rows"] and all(r["ratio"] > 0 for r in qo["results"]["rows"])
    md = (tmp_path / "r.md").read_text()
    assert "| queue_overhead | ok |" in md and "Verdict: **PASS**" in md


def test_a_failing_step_fails_the_run_loudly(gpu_check, tmp_path, capsys, monkeypatch):
    import recall_eval

    def broken(argv):
        raise MemoryError("out of memory in the evaluation")

    monkeypatch.setattr(recall_eval, "main", broken)
    rc = gpu_check.main(["--device", "cpu", "--quick", "--steps", "recall_eval", "--json", str(tmp_path / "r.json"),
                         "--markdown", str(tmp_path / "r.md"), "--work-dir", str(tmp_path / "w")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "GPU CHECK FAILED: recall_eval: MemoryError: out of memory in the evaluation" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["passed"] and report["steps"][4]["status"] == "failed"
    assert "Verdict: **FAIL**" in (tmp_path / "r.md").read_text()


def test_missed_target_fails_a_real_run(gpu_check, tmp_path, capsys, monkeypatch):
    """Outside --quick a step that runs but misses its target fails the run (judged on CPU here)."""
    import recall_eval

    monkeypatch.setattr(recall_eval, "main", lambda argv: {"seconds": 3.5, "n": 60502, "peak_extra_mb": 1.0})
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda i=0: "fake GPU")
    (tmp_path / "train").mkdir()
    rc = gpu_check.main(["--steps", "recall_eval", "--json", str(tmp_path / "r.json"),
                         "--markdown", str(tmp_path / "r.md"), "--work-dir", str(tmp_path / "w"),
                         "--data", str(tmp_path)])
    assert rc == 1
    assert "recall_eval: target <= 2 s at SOP scale missed (3.50 s" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "nope"], "--steps: unknown step(s) nope"),
        (["--data", "/nonexistent/cifar.tar.gz"], "--data /nonexistent/cifar.tar.gz: no such file or folder"),
        (["--json", "/nonexistent/dir/r.json"], "folder /nonexistent/dir does not exist"),
        (["--data", "/"], "--data /: no train/ folder inside"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(gpu_check, tmp_path, capsys, argv, message):
    base = {"--json": str(tmp_path / "r.json"), "--markdown": str(tmp_path / "r.md")}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    full = ["--device", "cpu", "--quick"] + [x for kv in base.items() for x in kv]
    assert gpu_check.main(full) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_a_gpu(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
