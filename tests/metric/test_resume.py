"""Exact resume after SIGKILL / SIGTERM (real subprocesses) and a 2-process gloo DDP run."""

import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from metric.train import DUMP_ENV, HANG_ENV, train
from xbn_queue.training.checkpoint import load_checkpoint
from xbn_queue.training.tracking import read_metrics

from .helpers import ROOT, env, run_cli, tiny_argv, tiny_cfg

RUN = dict(method="axbn", epochs=2, checkpoint_every=3)  # 11 steps per epoch, 33 in all; AXBN: Kalman state too


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    train(tiny_cfg(out, **RUN))
    return out


def start_and_wait_for_hang(out, step, extra=(), timeout=120):
    proc = subprocess.Popen([sys.executable, "-m", "metric", *tiny_argv(out, **RUN), *extra], cwd=ROOT,
                            env=env(**{HANG_ENV: step}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "test hook: checkpoint of step" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("run never reached the hook:\n" + "".join(lines))


def assert_same_run(a, b):
    assert read_metrics(a / "metrics.jsonl") == read_metrics(b / "metrics.jsonl")
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["state"] == cb["state"]
    for part in ("model", "memory", "optimizer"):
        ta = ca[part] if part != "optimizer" else ca[part]["state"]
        tb = cb[part] if part != "optimizer" else cb[part]["state"]
        flat_a = {k: v for k, v in _flatten(ta)}
        flat_b = {k: v for k, v in _flatten(tb)}
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            if isinstance(flat_a[k], torch.Tensor):
                assert torch.equal(flat_a[k], flat_b[k]), (part, k)  # bit-identical
            else:
                assert flat_a[k] == flat_b[k], (part, k)


def _flatten(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix, d


def test_sigkill_and_sigterm_then_resume_is_bit_identical(tmp_path, reference):
    # 1) killed hard right after the checkpoint of step 15 (inside the second epoch)
    proc = start_and_wait_for_hang(tmp_path, step=15)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["state"]["global_step"] == 15 and ck["state"]["epoch"] == 1 and ck["state"]["step_in_epoch"] == 4
    # 2) resumed (bare --resume), then stopped by SIGTERM at step 21: checkpoint + clean exit
    proc = start_and_wait_for_hang(tmp_path, step=21, extra=["--resume"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by signal after step 21" in err
    assert load_checkpoint(tmp_path / "last.pt")["state"]["global_step"] == 21
    # 3) resumed from an explicit path to the end: identical to the uninterrupted run, bit for bit
    res = run_cli(tiny_argv(tmp_path, **RUN) + ["--resume", str(tmp_path / "last.pt")])
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stderr
    assert_same_run(reference, tmp_path)


def test_resume_from_the_end_of_the_warmup_in_process(tmp_path, reference):
    res = train(tiny_cfg(tmp_path, max_steps=11, **RUN))  # stops at the last step of the warm-up epoch
    assert res["stopped"] == "max_steps"
    ck = load_checkpoint(tmp_path / "last.pt")
    assert (ck["state"]["epoch"], ck["state"]["step_in_epoch"], ck["optimizer_phase"]) == (1, 0, "warmup")
    train(tiny_cfg(tmp_path, resume="auto", **RUN))
    assert_same_run(reference, tmp_path)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_shares_the_memory(tmp_path):
    dump = tmp_path / "dump"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "metric", *tiny_argv(out, method="xbn", device="cpu")]
    res = subprocess.run(cmd, cwd=ROOT, env=env(**{DUMP_ENV: dump, "OMP_NUM_THREADS": 1}), capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = torch.load(dump / "queue_rank0.pt"), torch.load(dump / "queue_rank1.pt")
    assert torch.equal(r0["memory"], r1["memory"]) and torch.equal(r0["labels"], r1["labels"])
    assert torch.equal(r0["ids"], r1["ids"])
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    # both ranks' batches went into the memory: 2 x 16 distinct samples per step
    steps_per_epoch = 180 // (16 * 2)
    recs = read_metrics(out / "metrics.jsonl")  # written by rank 0 only
    assert [r["step"] for r in recs] == [steps_per_epoch, 2 * steps_per_epoch]
    assert recs[-1]["memory_rows"] == 64 and 0.0 <= recs[-1]["recall@1"] <= 1.0
    assert (r0["ids"] >= 0).all() and len(set(r0["ids"][-32:].tolist())) > 16
    ck = load_checkpoint(out / "last.pt")
    assert ck["meta"]["world_size"] == 2
