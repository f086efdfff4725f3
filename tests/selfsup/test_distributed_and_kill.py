"""Real processes: a 2-process gloo DDP run (the ``two_process_runs`` launch of ``conftest.py``), and SIGTERM /
SIGKILL followed by exact resume."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfsup.train import Trainer, train
from xbn_queue.training.config import config_to_argv
from tests.inprocess import run_inprocess
from tests.selfsup.conftest import REPO, TWO_PROCESS_RUNS, subprocess_env, tiny_config

TIMING_KEYS = {"epoch_time_s", "images_per_s"}


def cli_args(cfg):
    """The command line equivalent of a config (every field that differs from the defaults)."""
    return config_to_argv(cfg, only_changed=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_two_process_gloo_run_has_identical_queues_and_rank0_writes(tmp_path, two_process_runs):
    out = two_process_runs["plain"]  # TWO_PROCESS_RUNS["plain"] (conftest.py): batch 16, 128 images, one epoch, XBN
    r0 = torch.load(out / "queue_rank0.pt", weights_only=True)
    r1 = torch.load(out / "queue_rank1.pt", weights_only=True)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["queue"].keys() == r1["queue"].keys()
    for key in r0["queue"]:
        assert torch.equal(r0["queue"][key], r1["queue"][key]), key
    # 4 steps x 2 ranks x 16 keys gathered into a 96-row queue
    assert int(r0["queue"]["num_filled"]) == 96
    records = read_jsonl(out / "metrics.jsonl")  # rank 0 only: one record per step, one epoch record
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4]
    knn = records[-1]["knn_acc"]
    assert 0.0 <= knn <= 1.0 and r0["summary"]["knn_acc"] == r1["summary"]["knn_acc"] == knn
    # the gathered k-NN features give what one process computes from the same checkpoint
    single = Trainer(tiny_config(tmp_path / "single", **TWO_PROCESS_RUNS["plain"], resume=str(out / "last.pt")))
    single.restore(out / "last.pt")
    assert single.knn_eval() == pytest.approx(knn, abs=1e-6)


def _wait_for_checkpoint(proc, path, min_step, timeout=180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return None
        if path.is_file():
            try:
                step = torch.load(path, map_location="cpu", weights_only=True)["state"]["global_step"]
            except Exception:  # being replaced right now
                step = -1
            if step >= min_step:
                return step
        time.sleep(0.01)
    return None


def test_sigterm_then_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    kw = dict(adaptation="axbn", kalman_gain_every=2, train_subset=192, epochs=2, checkpoint_every=1)
    reference = train(tiny_config(tmp_path / "ref", **kw))  # 12 steps in this process
    out = tmp_path / "run"
    args = [sys.executable, "-m", "selfsup", "train"] + cli_args(tiny_config(out, **kw))
    env = subprocess_env()
    ckpt = out / "last.pt"

    # 1) SIGTERM: checkpoint after the current step and a clean exit
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    step = _wait_for_checkpoint(proc, ckpt, 2)
    assert step is not None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]  # 143, after the checkpoint
    assert "stopped by a signal" in err and "[xbn-selfsup] to resume: python -m selfsup train " in err
    stopped_at = torch.load(ckpt, weights_only=True)["state"]["global_step"]
    assert 2 <= stopped_at < 12

    # 2) resume, then SIGKILL once a later checkpoint exists
    proc = subprocess.Popen(args + ["--resume"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_after = _wait_for_checkpoint(proc, ckpt, stopped_at + 2)
    assert killed_after is not None, "the resumed run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # 3) resume to the end (in this process)
    res = run_inprocess("selfsup", args[3:] + ["--resume", "auto"])
    assert res.returncode == 0, res.stderr[-2000:]

    final = torch.load(ckpt, weights_only=True)
    ref = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    assert final["state"]["global_step"] == ref["state"]["global_step"] == reference["global_step"] == 12
    for part in ("criterion", "encoder_q", "encoder_k"):
        for key in ref[part]:
            assert torch.equal(final[part][key], ref[part][key]), (part, key)
    assert strip_timing(read_jsonl(out / "metrics.jsonl")) == strip_timing(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))


def test_sigint_during_compare_stops_everything_and_resume_writes_the_full_table(tmp_path):
    out = tmp_path / "cmp"
    cfg = tiny_config(out, train_subset=192, epochs=1, checkpoint_every=1)
    args = [sys.executable, "-m", "selfsup", "compare", *cli_args(cfg), "--adaptations", "none,xbn", "--seeds", "1"]
    proc = subprocess.Popen(args, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    step = _wait_for_checkpoint(proc, out / "none-seed0" / "last.pt", 2)
    assert step is not None, "the first run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "k-NN acc" not in stdout  # no table printed as if complete
    assert "finish with: python -m selfsup compare" in err and err.rstrip().endswith("--resume")
    md = (out / "compare.md").read_text()
    assert md.startswith("INCOMPLETE: 2 run(s) did not finish and are not counted: none-seed0, xbn-seed0")
    saved = json.loads((out / "compare.json").read_text())
    assert saved["run_complete"] == {"none-seed0": False, "xbn-seed0": False} and saved["complete"] is False
    assert saved["summary"] == {"none": {}, "xbn": {}} and not (out / "xbn-seed0").exists()
    stopped_at = torch.load(out / "none-seed0" / "last.pt", weights_only=True)["state"]["global_step"]
    assert 2 <= stopped_at < 6

    res = run_inprocess("selfsup", args[3:] + ["--resume"])  # in this process
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {out / 'none-seed0' / 'last.pt'} at epoch 1, step {stopped_at}" in res.stderr
    saved = json.loads((out / "compare.json").read_text())
    assert saved["complete"] is True and all(saved["run_complete"].values())
    assert set(saved["summary"]) == {"none", "xbn"} and all(saved["summary"][a]["1"]["n"] == 1 for a in ("none", "xbn"))
    assert "+-" not in res.stdout and "(n=1)" in res.stdout  # one seed: the value alone
    for a in ("none", "xbn"):
        assert torch.load(out / f"{a}-seed0" / "last.pt", weights_only=True)["state"]["global_step"] == 6
