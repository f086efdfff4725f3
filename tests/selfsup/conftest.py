"""Shared fixtures of the selfsup tests: one CPU thread per test, tiny run configurations."""

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are fastest (and bit-reproducible) on one thread, also on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(out_dir, **overrides):
    """A run of a few seconds on digits: 16 px, width-8 ResNet-18, batch 32, queue 96."""
    from selfsup.config import SelfSupConfig

    cfg = SelfSupConfig(
        dataset="digits",
        image_size=16,
        train_subset=320,
        test_subset=100,
        width=8,
        batch_size=32,
        split_bn=2,
        queue_size=96,
        epochs=2,
        knn_k=10,
        knn_batch_size=256,
        log_every=1,
        device="cpu",
        output_dir=str(out_dir),
        progress=False,
        threads=1,
        workers=0,
    )
    return replace(cfg, **overrides)


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("WANDB_MODE", "disabled")
    return env
