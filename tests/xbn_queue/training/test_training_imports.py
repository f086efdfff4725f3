"""The training modules import with torch alone; optional packages are needed only when used."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULES = ["config", "checkpoint", "distributed", "rng", "seeding", "signals", "tracking", "progress", "loop", "images"]
OPTIONAL = ["yaml", "wandb", "matplotlib", "tqdm"]


def test_import_without_optional_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import xbn_queue
    import xbn_queue.training

    monkeypatch.setattr(xbn_queue, "training", xbn_queue.training)  # re-import below rebinds it; undo after
    for name in list(sys.modules):
        if name.split(".")[0] in OPTIONAL or name.startswith("xbn_queue.training"):
            monkeypatch.delitem(sys.modules, name)  # restored after the test
    for name in OPTIONAL:
        monkeypatch.setitem(sys.modules, name, None)  # "import name" now raises ImportError
    for mod in MODULES:
        importlib.import_module(f"xbn_queue.training.{mod}")
    assert not any(name.split(".")[0] in OPTIONAL and sys.modules[name] is not None for name in sys.modules)

    # Core paths work without them ...
    from xbn_queue.training.config import parse_config
    from xbn_queue.training.progress import progress
    from xbn_queue.training.tracking import RunLogger, plot_history

    @dataclass
    class C:
        lr: float = 0.1

    assert parse_config(C, ["--lr", "0.5"]).lr == 0.5
    assert list(progress(range(2))) == [0, 1]
    with RunLogger(tmp_path, {}) as logger:
        logger.log({"epoch": 1, "x": 1.0}, step=1)
    # ... and the optional ones say which extra to install.
    with pytest.raises(ImportError, match=r"'matplotlib'.*pip install \"xbn-queue\[train\]\""):
        plot_history(tmp_path / "metrics.jsonl", tmp_path / "p.png", panels=[("x",)])
    with pytest.raises(ImportError, match=r"'wandb'.*pip install \"xbn-queue\[wandb\]\""):
        RunLogger(tmp_path / "w", {}, mode="online")


def test_package_exports_lazily() -> None:
    import xbn_queue.training as training
    from xbn_queue.training.checkpoint import atomic_save
    from xbn_queue.training.config import parse_config

    assert training.parse_config is parse_config
    assert training.atomic_save is atomic_save
    assert "GracefulExit" in dir(training)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        training.nope  # noqa: B018
