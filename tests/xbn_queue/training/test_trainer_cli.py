"""Both trainers as command-line programs: a table of bad inputs.

Every case must exit with status 2, print exactly one line to stderr naming the option or file, print
no traceback, and leave its folder (and everything else under the test's tmp folder) unchanged. The
table runs in this process (``tests/inprocess.py``: ``main(argv)`` as the console script calls it), in a
few seconds; the real entry points (``python -m metric`` / ``python -m selfsup``) run once per trainer in
fresh interpreters. A refused case returns before any data or model work: the ones about the data itself
and about the memory's rows (turned into rows and checked once, right after the data is loaded:
``xbn_queue.training.memory.MemoryOptions.rows``) load the data but build no model; only a checkpoint that cannot be read is found after the model is
built (the run loop reads ``last.pt`` into the built model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from tests.inprocess import run_inprocess

ROOT = Path(__file__).resolve().parents[3]

METRIC_TINY = ["--dataset", "digits", "--split", "instance", "--train-fraction", "0.1", "--epochs", "1",
               "--warmup-epochs", "1", "--batch-size", "16", "--embedding-dim", "32", "--memory-size", "64",
               "--threads", "1", "--no-progress", "--device", "cpu"]
SELFSUP_TINY = ["--dataset", "digits", "--image-size", "16", "--train-subset", "320", "--test-subset", "100",
                "--width", "8", "--batch-size", "32", "--split-bn", "2", "--queue-size", "96", "--epochs", "1",
                "--knn-k", "10", "--device", "cpu", "--threads", "1", "--workers", "0", "--no-progress"]


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return env


def snapshot(root: Path) -> Dict[str, bytes]:
    """Every file and folder under ``root`` with its content (folders map to ``b"<dir>"``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = b"<dir>" if p.is_dir() else p.read_bytes()
    return out


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 255 - value, value // 2)).save(path)


def _fixtures(tmp: Path) -> Dict[str, Path]:
    """Shared inputs: a folder holding a (fake) run, corrupt and truncated checkpoints, a one-class
    data set, a malformed YAML file, a plain file."""
    f: Dict[str, Path] = {}
    run = tmp / "held_run"
    run.mkdir()
    (run / "config.yaml").write_text("dataset: digits\n")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    f["held_run"] = run
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "last.pt").write_bytes(b"this is not a checkpoint\n" * 10)
    f["corrupt"] = corrupt
    truncated = tmp / "truncated"
    truncated.mkdir()
    torch.save({"config": {"dataset": "digits"}, "model": {"w": torch.randn(64, 64)}}, truncated / "last.pt")
    data = (truncated / "last.pt").read_bytes()
    (truncated / "last.pt").write_bytes(data[: len(data) // 2])
    f["truncated"] = truncated
    one = tmp / "one_class"
    for i in range(6):
        _png(one / "train" / "cat" / f"{i:04d}.png", 40 * i)
        _png(one / "test" / "cat" / f"{i:04d}.png", 30 * i)
        _png(one / "test" / "dog" / f"{i:04d}.png", 20 * i + 5)
    f["one_class"] = one
    two = tmp / "two_class"
    for i in range(4):
        for j, c in enumerate(("ant", "bee", "cat", "dog")):
            _png(two / c / f"{i:04d}.png", 50 * j + 10 * i)
    f["two_class"] = two
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("epochs: [1, 2\nlr: 0.1\n")
    f["bad_yaml"] = bad_yaml
    a_file = tmp / "a_file"
    a_file.write_text("not a folder\n")
    f["a_file"] = a_file
    return f


def _cases(f: Dict[str, Path], tmp: Path) -> List[Tuple[str, str, List[str], str]]:
    """``(id, module, argv, text the error line must contain)``."""
    new = str(tmp / "never_created")
    cases: List[Tuple[str, str, List[str], str]] = []
    for mod, tiny, mem in (("metric", METRIC_TINY, "--memory-size"), ("selfsup", SELFSUP_TINY, "--queue-size")):
        cases += [
            (f"{mod}-output-dir-is-a-file", mod, [*tiny, "--output-dir", str(f["a_file"])], "--output-dir"),
            (f"{mod}-output-dir-under-a-file", mod, [*tiny, "--output-dir", str(f["a_file"] / "run")], "is a file"),
            (f"{mod}-memory-cannot-be-allocated", mod, [*tiny, mem, "10000000000", "--output-dir", new], f"{mem} 10000000000"),
            (f"{mod}-batch-size-0", mod, [*tiny, "--batch-size", "0", "--output-dir", new], "--batch-size 0"),
            (f"{mod}-batch-size-negative", mod, [*tiny, "--batch-size", "-4", "--output-dir", new], "--batch-size -4"),
            (f"{mod}-threads-negative", mod, [*tiny, "--threads", "-1", "--output-dir", new], "--threads -1"),
            (f"{mod}-epochs-negative", mod, [*tiny, "--epochs", "-1", "--output-dir", new], "--epochs -1"),
            (f"{mod}-lr-zero", mod, [*tiny, "--lr", "0", "--output-dir", new], "--lr 0"),
            (f"{mod}-not-a-number", mod, [*tiny, "--batch-size", "many", "--output-dir", new], "--batch-size"),
            (f"{mod}-malformed-yaml", mod, ["--config", str(f["bad_yaml"]), *tiny, "--output-dir", new], "bad.yaml"),
            (f"{mod}-corrupt-checkpoint", mod, [*tiny, "--output-dir", str(f["corrupt"]), "--resume"],
             f"{f['corrupt'] / 'last.pt'} is not a readable xbn-{mod if mod == 'metric' else 'selfsup'} checkpoint ("),
            (f"{mod}-truncated-checkpoint", mod, [*tiny, "--output-dir", str(f["truncated"]), "--resume"],
             f"{f['truncated'] / 'last.pt'} is not a readable xbn-{mod if mod == 'metric' else 'selfsup'} checkpoint ("),
            (f"{mod}-folder-holds-a-run", mod, [*tiny, "--output-dir", str(f["held_run"])], "--resume"),
            (f"{mod}-resume-and-overwrite", mod, [*tiny, "--output-dir", str(f["held_run"]), "--resume", "--overwrite"], "--overwrite"),
            (f"{mod}-bare-resume-without-output-dir", mod, [*tiny, "--resume"], "--output-dir"),
            (f"{mod}-compare-seeds-0", mod, ["compare", *tiny, "--seeds", "0", "--output-dir", new], "--seeds 0"),
            (f"{mod}-compare-folder-holds-a-run", mod, ["compare", *tiny, "--seeds", "1", "--output-dir", str(f["held_run"])], "--resume"),
        ]
    one = ["--dataset", "folder", "--data-root", str(f["one_class"]), "--output-dir", new]
    cases += [
        # a memory larger than the training set is allowed since 0.4 (older copies of an image), but not
        # with --prefill, which fills one distinct image per row
        ("metric-prefill-memory-larger-than-training-set", "metric", [*METRIC_TINY, "--memory-size", "1000000", "--prefill", "--output-dir", new], "--prefill"),
        ("metric-memory-size-0", "metric", [*METRIC_TINY, "--memory-size", "0", "--output-dir", new], "--memory-size 0"),
        ("metric-m-per-class-0", "metric", [*METRIC_TINY, "--m-per-class", "0", "--output-dir", new], "--m-per-class 0"),
        ("metric-m-per-class-above-class-size", "metric", [*METRIC_TINY, "--m-per-class", "50", "--batch-size", "100", "--output-dir", new], "--m-per-class 50"),
        ("metric-kalman-r-word", "metric", [*METRIC_TINY, "--kalman-r", "often", "--output-dir", new], "--kalman-r often"),
        ("metric-head-none-other-embedding-dim", "metric", [*METRIC_TINY, "--backbone", "conv4", "--head", "none", "--warmup-epochs", "0", "--output-dir", new], "--embedding-dim 32"),
        ("metric-head-none-with-warmup", "metric", [*METRIC_TINY, "--backbone", "conv4", "--head", "none", "--output-dir", new], "--warmup-epochs 1"),
        ("metric-head-unknown", "metric", [*METRIC_TINY, "--head", "mlp", "--output-dir", new], "--head"),
        ("metric-conv4-pretrained", "metric", [*METRIC_TINY, "--backbone", "conv4", "--pretrained", "--output-dir", new], "'conv4' has no pretrained weights"),
        ("metric-compare-unknown-method", "metric", ["compare", *METRIC_TINY, "--methods", "xbm,bogus", "--output-dir", new], "bogus"),
        ("metric-single-class-training-data", "metric", [*METRIC_TINY, *one, "--batch-size", "4", "--m-per-class", "2"], "at least 2"),
        ("metric-tensor-cache-max-mb-negative", "metric", [*METRIC_TINY, "--tensor-cache-max-mb", "-1", "--output-dir", new], "--tensor-cache-max-mb -1"),
        ("metric-tensor-cache-max-mb-not-a-number", "metric", [*METRIC_TINY, "--tensor-cache-max-mb", "lots", "--output-dir", new], "--tensor-cache-max-mb"),
        ("metric-tensor-cache-dir-is-a-file", "metric", [*METRIC_TINY, "--tensor-cache-dir", str(f["a_file"]), "--output-dir", new], "--tensor-cache-dir"),
        ("metric-tensor-cache-on-above-max-mb", "metric", [*METRIC_TINY, "--dataset", "folder", "--data-root", str(f["two_class"]),
                                                           "--split", "class", "--train-fraction", "0.5", "--batch-size", "4", "--m-per-class", "2",
                                                           "--tensor-cache", "on", "--tensor-cache-max-mb", "0", "--output-dir", new],
         "--tensor-cache-max-mb 0"),
        ("selfsup-queue-larger-than-training-set", "selfsup", [*SELFSUP_TINY, "--queue-size", "100000", "--output-dir", new], "--queue-size 100000"),
        ("selfsup-split-bn-not-dividing", "selfsup", [*SELFSUP_TINY, "--split-bn", "5", "--output-dir", new], "--split-bn 5"),
        ("selfsup-compare-unknown-adaptation", "selfsup", ["compare", *SELFSUP_TINY, "--adaptations", "xbn,bogus", "--output-dir", new], "bogus"),
        ("selfsup-single-class-training-data", "selfsup", [*SELFSUP_TINY, *one, "--image-size", "8", "--batch-size", "4",
                                                           "--queue-size", "4", "--train-subset", "0", "--test-subset", "0"], "at least 2"),
    ]
    return cases


def _run(mod: str, argv: List[str]) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGV`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", mod, *argv], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _run_many(cases: List[Tuple[str, List[str]]], tmp: Path) -> List[Tuple[int, str, str]]:
    """Each ``(module, argv)`` in its own forked process (see ``_cli_forker.py``): ``(exit status, stdout, stderr)``.

    Costs an interpreter importing everything plus a fork per case: prefer ``tests.inprocess.run_inprocess``
    unless each case needs a process of its own."""
    spec, result = tmp / "cases.json", tmp / "results.json"
    spec.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_cli_forker.py")), str(spec), str(result)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [tuple(r) for r in json.loads(result.read_text())]
    spec.unlink()
    result.unlink()
    return out  # type: ignore[return-value]


def _check(cid: str, mod: str, needle: str, code: int, stdout: str, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    ok = (code == 2 and len(lines) == 1 and "Traceback" not in stderr + stdout and needle in lines[0]
          and lines[0].startswith(f"xbn-{mod}"))
    return "" if ok else f"{cid}: exit {code}, stderr {stderr[-600:]!r}"


#: Cases about the data itself or the memory's rows: they load the (tiny) data set, and must still refuse before
#: building a model.
DATA_CASES = {"metric-prefill-memory-larger-than-training-set", "metric-m-per-class-above-class-size",
              "metric-tensor-cache-on-above-max-mb",
              "metric-single-class-training-data", "selfsup-queue-larger-than-training-set",
              "selfsup-single-class-training-data", "metric-memory-cannot-be-allocated",
              "selfsup-memory-cannot-be-allocated"}
#: ``--resume``'s checkpoint is read right after the checks, before the build: these may load data, never build.
CHECKPOINT_CASES = {f"{mod}-{what}-checkpoint" for mod in ("metric", "selfsup") for what in ("corrupt", "truncated")}


@pytest.fixture
def work_done(monkeypatch):
    """Records each data load and model build the trainers start (``[(trainer, "data" | "model")]``)."""
    import metric.train
    import selfsup.train

    calls: List[Tuple[str, str]] = []

    def spy(module, name, what):
        real = getattr(module, name)

        def recorded(*args, **kwargs):
            calls.append((module.__name__.split(".")[0], what))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)

    spy(metric.train, "load_dataset", "data")
    spy(metric.train, "build_model", "model")
    spy(selfsup.train, "load_dataset", "data")
    spy(selfsup.train, "MoCoEncoder", "model")
    return calls


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, work_done):
    f = _fixtures(tmp_path)
    cases = _cases(f, tmp_path)
    before = snapshot(tmp_path)
    failures = []
    for cid, mod, argv, needle in cases:
        work_done.clear()
        res = run_inprocess(mod, argv)
        failures.append(_check(cid, mod, needle, res.returncode, res.stdout, res.stderr))
        allowed = {"data"} if cid in DATA_CASES | CHECKPOINT_CASES else set()
        if {what for _, what in work_done} - allowed:
            failures.append(f"{cid}: refused only after {work_done} (allowed: {sorted(allowed) or 'nothing'})")
    # the real entry points, once per trainer, in fresh interpreters (two cases, run side by side)
    direct = [c for c in cases if c[0] in ("metric-batch-size-negative", "selfsup-truncated-checkpoint")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for (cid, mod, argv, needle), res in zip(direct, pool.map(lambda c: _run(c[1], c[2]), direct)):
            failures.append(_check(cid + " (python -m)", mod, needle, res.returncode, res.stdout, res.stderr))
    failures = [x for x in failures if x]
    assert not failures, "\n".join(failures)
    assert snapshot(tmp_path) == before  # no case created, changed or removed anything
    assert len(cases) >= 40


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into a read-only folder")
def test_read_only_output_dir_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for mod, tiny in (("metric", METRIC_TINY), ("selfsup", SELFSUP_TINY)):
            res = run_inprocess(mod, [*tiny, "--output-dir", str(ro / "run")])
            assert res.returncode == 2 and "not writable" in res.stderr and "Traceback" not in res.stderr
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_help_lists_commands_defaults_once_and_ranges():
    m, c, s, sc = (run_inprocess(mod, argv) for mod, argv in (
        ("metric", ["--help"]), ("metric", ["compare", "--help"]), ("selfsup", ["--help"]), ("selfsup", ["compare", "--help"])))
    assert m.returncode == c.returncode == s.returncode == sc.returncode == 0
    text = " ".join(m.stdout.split())
    assert "xbn-metric compare [options]" in text and "exit status" in text
    assert "--batch-size BATCH_SIZE batch size per process (default 64; digits 32) [valid: >= 2]" in text
    assert "(default: None)" not in text and "--crop-min-scale" in text and "--crop-scale-min" not in text
    ctext = " ".join(c.stdout.split())
    assert "--methods" in ctext and "--seeds" in ctext and "passed through to each run" in ctext
    assert "compare" in s.stdout and "exit status" in s.stdout
    stext = " ".join(sc.stdout.split())
    assert "--adaptations" in stext and "passed through to each run" in stext and "--run-name" not in stext
