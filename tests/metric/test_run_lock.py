"""Two processes never write into one folder: runs, ``compare`` series and ``embed`` stores are locked; a lock
left by a killed run does not block its ``--resume``.

The holder of a lock is another process where the contract needs one (a run killed while it holds its folder,
two runs forked at the same moment); a refused command runs in this process (``tests/inprocess.py``): the lock
is an ``fcntl.flock`` on its own open file, which a second open in the same process cannot take either."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from xbn_queue.training.cli import LOCK_FILE, FolderLock

from tests.inprocess import run_inprocess
from tests.xbn_queue.training.test_trainer_cli import snapshot

from .helpers import ROOT, env, tiny_argv
from .test_resume import RUN, start_and_wait_for_hang

FORKER = ROOT / "tests" / "xbn_queue" / "training" / "_cli_forker.py"


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def _in_use(option: str, folder: Path, what: str, pid: int) -> str:
    return (rf"^xbn-metric: error: {option} {re.escape(str(folder))}: in use by {what} \(pid {pid} on "
            rf"{re.escape(socket.gethostname())}, since [0-9-]+ [0-9:]+ UTC\); wait until it has finished, or choose "
            r"another folder$")


def test_a_run_into_a_folder_in_use_exits_2_and_a_killed_run_resumes(tmp_path):
    proc = start_and_wait_for_hang(tmp_path, step=3)  # holds the folder; last.pt of step 3 written
    try:
        before = snapshot(tmp_path)
        # --overwrite passes the early check (the folder holds a run) and would delete the live run's files
        res = run_inprocess("metric", tiny_argv(tmp_path, method="xbm", max_steps=2) + ["--overwrite"])
        assert res.returncode == 2, res.stderr
        assert re.match(_in_use("--output-dir", tmp_path, "an xbn-metric run", proc.pid), _one_error_line(res.stderr))
        assert snapshot(tmp_path) == before  # nothing written, nothing removed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (tmp_path / LOCK_FILE).exists()  # the killed run's lock: stale
    res = run_inprocess("metric", tiny_argv(tmp_path, **RUN) + ["--resume"])
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stderr and not (tmp_path / LOCK_FILE).exists()


def test_two_runs_started_at_once_into_one_folder_one_exits_2(tmp_path):
    """Both forked at the same moment (imports done once before): one trains, the other writes nothing, exit 2."""
    out = tmp_path / "run"
    cases = [["metric", tiny_argv(out, method=m, max_steps=4)] for m in ("xbn", "xbm")]
    spec, result = tmp_path / "cases.json", tmp_path / "results.json"
    spec.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(FORKER), str(spec), str(result), "--together"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = [r[0] for r in json.loads(result.read_text())]
    assert sorted(codes) == [0, 2], json.loads(result.read_text())
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    line = _one_error_line(json.loads(result.read_text())[loser][2])
    # the loser found the folder locked, or (if the winner had already finished) holding the winner's run
    assert (re.match(r"^xbn-metric: error: --output-dir .*: in use by an xbn-metric run \(pid \d+ ", line)
            or re.match(r"^xbn-metric: error: --output-dir .* already holds a run: continue it with --resume", line)), line
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == ("xbn", "xbm")[winner]
    assert not (out / LOCK_FILE).exists()


def test_a_series_folder_and_a_store_in_use_are_refused(tmp_path, trained_run):
    series = tmp_path / "cmp"
    with FolderLock(series, what="an xbn-metric compare"):
        before = snapshot(series)
        res = run_inprocess("metric", ["compare", *tiny_argv(series, max_steps=1), "--methods", "none", "--seeds", "1"])
        assert res.returncode == 2, res.stderr
        assert re.match(_in_use("--output-dir", series, "an xbn-metric compare", os.getpid()),
                        _one_error_line(res.stderr))
        assert snapshot(series) == before
    store = tmp_path / "store"
    with FolderLock(store, "--out", what="an xbn-metric embed"):
        res = run_inprocess("metric", ["embed", str(trained_run[0]), "--out", str(store)])
        assert res.returncode == 2, res.stderr
        assert re.match(_in_use("--out", store, "an xbn-metric embed", os.getpid()),
                        _one_error_line(res.stderr))
        assert sorted(p.name for p in store.iterdir()) == [LOCK_FILE]
