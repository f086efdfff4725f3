"""``FolderLock``: one writer per folder; a lock whose process died (SIGKILL) or forked workers do not block."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from xbn_queue.training.cli import LOCK_FILE, FolderLock, UsageError

ROOT = Path(__file__).resolve().parents[3]

HOLDER = textwrap.dedent("""
    import os, sys, time
    from xbn_queue.training.cli import FolderLock
    lock = FolderLock(sys.argv[1], "--output-dir", what="a test holder").acquire()
    if sys.argv[2] == "fork":  # a child (like a DataLoader worker) outlives its parent, which dies at once
        if os.fork() == 0:
            print("child", os.getpid(), flush=True)
            time.sleep(60)
            os._exit(0)
        time.sleep(0.5)
        os._exit(0)
    print("locked", flush=True)
    time.sleep(60)
""")


def _holder(folder, mode="hold"):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), mode], env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, line.split()


def test_a_folder_held_by_a_live_process_is_refused_naming_it_and_free_after_sigkill(tmp_path):
    folder = tmp_path / "run"
    proc, line = _holder(folder)
    try:
        assert line == ["locked"]
        with pytest.raises(UsageError, match=rf"^--output-dir {folder}: in use by a test holder \(pid {proc.pid} on "
                                             rf"{socket.gethostname()}, since .* UTC\); wait until it has finished"):
            FolderLock(folder).acquire()
        assert (folder / LOCK_FILE).exists()  # the refused one removed nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (folder / LOCK_FILE).exists()  # left behind by the crash: stale, not binding
    lock = FolderLock(folder, what="the next run").acquire()
    assert "the next run (pid %d " % os.getpid() in (folder / LOCK_FILE).read_text()
    lock.release()
    assert not (folder / LOCK_FILE).exists() and folder.is_dir()


def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path):
    folder = tmp_path / "run"
    proc, line = _holder(folder, "fork")
    child = int(line[1])
    try:
        proc.wait(timeout=30)  # the parent is gone, its child still runs
        os.kill(child, 0)
        with FolderLock(folder):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_one_holder_per_folder_even_in_one_process_and_release_is_idempotent(tmp_path):
    first = FolderLock(tmp_path / "a" / "b", "--out", what="an embed").acquire()
    assert (tmp_path / "a" / "b").is_dir() and first.held
    with pytest.raises(UsageError, match=r"^--out .*b: in use by an embed \(pid "):
        FolderLock(tmp_path / "a" / "b", "--out").acquire()
    with FolderLock(tmp_path / "a"):  # another folder: its own lock
        pass
    first.release()
    first.release()
    with first:  # acquired again by the context manager, released at its end
        assert first.held
    assert not first.held and not (tmp_path / "a" / "b" / LOCK_FILE).exists()
