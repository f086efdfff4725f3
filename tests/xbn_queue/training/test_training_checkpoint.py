"""Tests of xbn_queue.training.checkpoint: atomic writes, resume resolution, compatibility checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from xbn_queue.training import checkpoint
from xbn_queue.training.checkpoint import atomic_save, check_compatible, load_checkpoint, resolve_resume
from xbn_queue.training.rng import get_rng_state


def test_atomic_save_round_trip_weights_only(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    state = {
        "model": model.state_dict(),
        "epoch": 3,
        "config": {"memory_size": "0.5", "lr": 1e-4, "ks": [1, 10], "wandb_project": None},
        "rng": get_rng_state(),
    }
    path = atomic_save(state, tmp_path / "sub" / "last.pt")
    assert path == tmp_path / "sub" / "last.pt"
    loaded = load_checkpoint(path)  # weights_only=True must accept all of it
    assert loaded["epoch"] == 3 and loaded["config"] == state["config"]
    torch.testing.assert_close(loaded["model"]["weight"], model.weight.detach())
    torch.testing.assert_close(loaded["rng"]["torch"], state["rng"]["torch"])
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary permissions, not mkstemp's 0600


def test_atomic_save_fsyncs_before_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        calls.append("replace")
        assert Path(src).parent == Path(dst).parent  # same directory, so the rename is atomic
        assert Path(src).stat().st_size > 0  # data written before the rename
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    atomic_save({"x": torch.arange(4)}, tmp_path / "c.pt")
    assert calls[:2] == ["fsync", "replace"]


def test_failed_save_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)
    with pytest.raises(Exception):
        atomic_save({"step": 2, "bad": lambda: None}, path)  # lambdas cannot be pickled
    assert load_checkpoint(path) == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    torn = tmp_path / "torn.pt"
    torn.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot load checkpoint .*torn.pt"):
        load_checkpoint(torn)


def test_resolve_resume(tmp_path: Path) -> None:
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume(False, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing there yet: fresh run
    last = atomic_save({}, tmp_path / "last.pt")
    assert resolve_resume("auto", tmp_path) == last
    assert resolve_resume(True, tmp_path) == last
    other = atomic_save({}, tmp_path / "other" / "epoch3.pt")
    assert resolve_resume(str(other), tmp_path) == other
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == last  # a directory -> its last.pt
    best = atomic_save({}, tmp_path / "best.pt")
    assert resolve_resume("best.pt", tmp_path) == best  # relative names are also looked up in output_dir
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        resolve_resume(str(tmp_path / "nope.pt"), tmp_path)
    with pytest.raises(FileNotFoundError, match="without last.pt"):
        resolve_resume(str(other.parent), tmp_path)


def test_check_compatible_lists_every_difference() -> None:
    saved = {"memory_size": 1024, "method": "xbm", "embedding_dim": 512, "lr": 0.1, "amp": True}
    now = {"memory_size": 2048, "method": "xbn", "embedding_dim": 512, "lr": 0.2, "amp": 1}
    check_compatible(saved, now, ["embedding_dim"])
    with pytest.raises(ValueError) as info:
        check_compatible(saved, now, ["memory_size", "method", "embedding_dim", "amp", "absent"], source="r/last.pt")
    # Every differing key, in the order asked; equal keys (and keys absent on both sides) are not listed.
    assert str(info.value) == (
        "checkpoint 'r/last.pt' is incompatible with the current configuration; differs: "
        "memory_size: saved 1024, now 2048; method: saved 'xbm', now 'xbn'; amp: saved True, now 1"
    )


def test_check_compatible_accepts_kebab_keys_and_equal_numbers() -> None:
    check_compatible({"memory_size": 1024}, {"memory_size": 1024.0}, ["memory-size"])
    with pytest.raises(ValueError, match=r"memory_size: saved 1024, now '1024'"):
        check_compatible({"memory_size": 1024}, {"memory_size": "1024"}, ["memory-size"])
    with pytest.raises(ValueError, match=r"method: saved <missing>, now 'xbn'"):
        check_compatible({}, {"method": "xbn"}, ["method"])
