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


#: The 2-process runs (``tests/selfsup/_ddp_driver.py``): ``{case: options of tiny_config}``. ``plain`` is a normal
#: run; ``embedding`` / ``loss`` put a NaN into rank 1's keys / loss at step 3.
TWO_PROCESS_RUNS = {
    "plain": dict(batch_size=16, train_subset=128, epochs=1, adaptation="xbn"),
    "embedding": dict(batch_size=16, train_subset=128, epochs=1, adaptation="xbn", checkpoint_every=1, knn_every=0),
    "loss": dict(batch_size=16, train_subset=128, epochs=1, adaptation="xbn", checkpoint_every=1, knn_every=0),
}


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory):
    """Every run of :data:`TWO_PROCESS_RUNS` in one ``torchrun`` launch of 2 gloo processes: ``{case: run folder}``.

    One launch (two interpreters importing torch) serves the DDP test and both NaN tests; the runs are
    trained one after the other in the launch's process group.
    """
    import json
    import socket
    import subprocess
    import sys

    from xbn_queue.training.config import config_to_argv

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path_factory.mktemp("two-process")
    folders = {case: root / case for case in TWO_PROCESS_RUNS}
    spec = root / "spec.json"
    spec.write_text(json.dumps([[case, config_to_argv(tiny_config(folders[case], **kw), only_changed=True)]
                                for case, kw in TWO_PROCESS_RUNS.items()]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "tests" / "selfsup" / "_ddp_driver.py"), str(spec)]
    # a rank that stopped alone leaves the other waiting in the keys' all-gather: the timeout catches that hang
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folders
