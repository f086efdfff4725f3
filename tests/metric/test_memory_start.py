"""``--memory-warmup-steps`` and ``--prefill`` of the metric trainer: the warm-up loss is the batch loss,
the prefill writes the model's embeddings of the right images, resume stays exact, bad values exit 2."""

import os
import signal

import numpy as np
import pytest
import torch

import metric.train as mt
from metric.cli import main
from metric.config import resolve_config
from metric.data import ImageDataset, load_dataset
from metric.fastdata import TensorCache
from metric.model import build_model
from metric.train import build_transforms, train
from xbn_queue.training.checkpoint import load_checkpoint
from xbn_queue.training.prefill import prefill_batches
from xbn_queue.training.tracking import read_metrics

from .helpers import tiny_argv, tiny_cfg
from .test_resume import assert_same_run

SPE = 179 // 16  # steps per epoch of the tiny digits run (179 training images, batch 16): 11


def _model_state(out):
    return load_checkpoint(out / "last.pt")["model"]


def test_memory_warmup_loss_is_the_batch_loss_then_the_memory_loss(tmp_path):
    # the whole training epoch in warm-up: the same losses and the same model as --method none, bit for bit
    train(tiny_cfg(tmp_path / "none", method="none"))
    train(tiny_cfg(tmp_path / "warm", method="xbm", memory_warmup_steps=SPE))
    none, warm = read_metrics(tmp_path / "none" / "metrics.jsonl"), read_metrics(tmp_path / "warm" / "metrics.jsonl")
    assert [r["loss"] for r in warm] == [r["loss"] for r in none]
    a, b = _model_state(tmp_path / "none"), _model_state(tmp_path / "warm")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the memory filled meanwhile (64 rows) and counted its steps in the checkpoint
    ck = load_checkpoint(tmp_path / "warm" / "last.pt")
    assert warm[-1]["memory_rows"] == 64 and int(ck["memory"]["queue.steps"]) == SPE
    # a shorter warm-up: the memory enters the loss after 5 steps, and the run differs
    train(tiny_cfg(tmp_path / "short", method="xbm", memory_warmup_steps=5))
    short = read_metrics(tmp_path / "short" / "metrics.jsonl")
    assert short[0]["loss"] == none[0]["loss"] and short[1]["loss"] != none[1]["loss"]


@pytest.fixture
def prefill_spy(monkeypatch):
    """Wraps the trainer's prefill call: records the model, the memory and the step count right after it."""
    calls = []
    original = mt.prefill_memory

    def spy(q, model, *args, **kwargs):
        steps_before = q.num_steps
        done = original(q, model, *args, **kwargs)
        calls.append({"model": {k: v.clone() for k, v in model.state_dict().items()}, "rows": len(q),
                      "memory": q.embeddings.clone(), "labels": q.labels.clone(), "ids": q.ids.clone(),
                      "steps_before": steps_before, "training": model.training})
        return done

    monkeypatch.setattr(mt, "prefill_memory", spy)
    return calls


@pytest.mark.parametrize("augment", ["timm", "mild"])  # per-image evaluation transform; the tensor cache
def test_prefill_writes_the_models_embeddings_of_distinct_training_images(tmp_path, prefill_spy, augment):
    cfg = tiny_cfg(tmp_path, method="xbm", prefill=True, memory_warmup_steps=2, max_steps=SPE + 4, augment=augment)
    train(cfg)
    assert len(prefill_spy) == 1
    call = prefill_spy[0]
    assert call["steps_before"] == 2 and call["training"]  # after the head warm-up and the memory warm-up
    assert call["rows"] == 64
    ids = call["ids"]
    assert len(set(ids.tolist())) == 64
    # a plain re-embedding of those images, one at a time, by a fresh model with the prefill-time weights
    rc = resolve_config(cfg)
    data = load_dataset(rc.dataset, rc.data_root, rc.split, rc.train_fraction, rc.split_seed)
    chosen = np.concatenate(prefill_batches(len(data.train), 64, cfg.seed, cfg.eval_batch_size))
    assert sorted(ids.tolist()) == sorted(chosen.tolist())
    assert torch.equal(call["labels"], torch.as_tensor(np.asarray(data.train.labels)[ids.numpy()]))
    if augment == "mild":
        images = TensorCache.build(data, rc.image_size, torch.device("cpu")).train_eval.batch(ids)
    else:
        ds = ImageDataset(data.train, build_transforms(rc)[1])
        images = torch.stack([ds[int(i)][0] for i in ids])
    model = build_model(rc.backbone, rc.embedding_dim, rc.embedding_norm, False, None, rc.width, rc.image_size, rc.head)
    model.load_state_dict(call["model"])
    model.eval()
    with torch.no_grad():
        ref = torch.cat([model(x[None]) for x in images]).double()  # (64, D)
    torch.testing.assert_close(call["memory"].double(), ref, atol=1e-5, rtol=1e-5)
    # the model of that moment: the one a run without --prefill has after the same 11 + 2 steps
    train(tiny_cfg(tmp_path / "stopped", method="xbm", memory_warmup_steps=2, max_steps=SPE + 2, augment=augment))
    stopped = _model_state(tmp_path / "stopped")
    assert all(torch.equal(stopped[k], call["model"][k]) for k in stopped)


@pytest.fixture(scope="module")
def prefill_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefill_reference")
    train(tiny_cfg(out, method="xbn", prefill=True, epochs=2))
    return out


def test_prefill_resume_from_the_end_of_the_head_warmup_prefills_once(tmp_path, prefill_reference, prefill_spy):
    train(tiny_cfg(tmp_path, method="xbn", prefill=True, epochs=2, max_steps=SPE))  # stops before the prefill
    assert len(prefill_spy) == 0 and load_checkpoint(tmp_path / "last.pt")["state"]["prefilled"] is False
    train(tiny_cfg(tmp_path, method="xbn", prefill=True, epochs=2, resume="auto"))
    assert len(prefill_spy) == 1
    assert_same_run(prefill_reference, tmp_path)


def test_prefill_resume_after_the_prefill_never_prefills_again(tmp_path, prefill_reference, prefill_spy, monkeypatch):
    spy = mt.prefill_memory

    def prefill_then_sigterm(*args, **kwargs):  # the run stops (checkpoint, exit) after the step of the prefill
        done = spy(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return done

    monkeypatch.setattr(mt, "prefill_memory", prefill_then_sigterm)
    res = train(tiny_cfg(tmp_path, method="xbn", prefill=True, epochs=2))
    ck = load_checkpoint(tmp_path / "last.pt")
    assert res["stopped"] == "signal" and ck["state"]["global_step"] == SPE + 1 and ck["state"]["prefilled"] is True
    train(tiny_cfg(tmp_path, method="xbn", prefill=True, epochs=2, resume="auto"))
    assert len(prefill_spy) == 1  # once per run, across the resume
    assert_same_run(prefill_reference, tmp_path)


def test_prefill_changes_the_run(tmp_path, prefill_reference):
    train(tiny_cfg(tmp_path, method="xbn", epochs=2))
    assert read_metrics(tmp_path / "metrics.jsonl")[1]["loss"] != read_metrics(prefill_reference / "metrics.jsonl")[1]["loss"]


@pytest.mark.parametrize("argv,match", [
    (["--memory-warmup-steps", "-1"], "--memory-warmup-steps -1: expected"),
    (["--method", "none", "--prefill"], "--prefill: --method none has no memory"),
    (["--method", "none", "--memory-warmup-steps", "3"], "--memory-warmup-steps 3: --method none has no memory"),
])
def test_bad_values_are_one_line_and_exit_2(tmp_path, capsys, argv, match):
    assert main(["train", *tiny_argv(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_compare_refuses_prefill_for_the_method_without_memory_before_any_run(tmp_path, capsys):
    assert main(["compare", *tiny_argv(tmp_path / "c"), "--methods", "xbm,none", "--seeds", "1", "--prefill"]) == 2
    err = capsys.readouterr().err
    assert "--prefill: --method none has no memory" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_resume_with_other_memory_start_options_is_refused(tmp_path):
    train(tiny_cfg(tmp_path, method="xbm", max_steps=3))
    with pytest.raises(ValueError, match=r"memory_warmup_steps: saved 0, now 5; prefill: saved False, now True"):
        train(tiny_cfg(tmp_path, method="xbm", memory_warmup_steps=5, prefill=True, resume="auto"))


def test_two_process_prefill_fills_one_shared_memory_with_each_chosen_image_once(tmp_path):
    import subprocess
    import sys

    from .helpers import ROOT, env
    from .test_resume import HOOKED, _free_port

    dump, out = tmp_path / "dump", tmp_path / "run"
    # 5 global steps of 2 x 16 per epoch: a head epoch, then 4 memory warm-up steps, the prefill
    # (64 rows: 32 chosen images per rank, gathered), and 1 step that overwrites rows 0-31
    argv = tiny_argv(out, method="xbm", device="cpu", memory_warmup_steps=4, prefill=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), HOOKED[1], "--dump-memory", str(dump), "--", *argv]
    res = subprocess.run(cmd, cwd=ROOT, env=env(OMP_NUM_THREADS=1), capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = torch.load(dump / "queue_rank0.pt"), torch.load(dump / "queue_rank1.pt")
    assert torch.equal(r0["memory"], r1["memory"]) and torch.equal(r0["ids"], r1["ids"])
    chosen = set(np.concatenate([b for r in range(2) for b in prefill_batches(179, 64, 0, 512, r, 2)]).tolist())
    assert len(chosen) == 64
    kept = r0["ids"][32:].tolist()  # rows 32-63 still hold the prefill: rank 1's share, each image once
    assert len(set(kept)) == 32 and set(kept) <= chosen
    assert set(kept) == set(np.concatenate(prefill_batches(179, 64, 0, 512, 1, 2)).tolist())
