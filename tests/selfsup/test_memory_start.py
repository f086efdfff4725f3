"""``--memory-warmup-steps``, ``--prefill`` and ``--mask-same-ids`` of the MoCo trainer (digits, seconds each)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import selfsup.train as st
from selfsup.augment import normalize_uint8
from selfsup.cli import main
from selfsup.data import EpochBatches, load_dataset
from selfsup.model import MoCoEncoder
from selfsup.train import train
from tests.selfsup.conftest import tiny_config
from xbn_queue.training.prefill import prefill_batches

SMALL = dict(train_subset=128, epochs=2)  # 4 steps of 32 per epoch, queue 96


def records(out):
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_losses(out):
    return [r["loss"] for r in records(out) if "step_loss" in r]


def encoder_k(out):
    return torch.load(Path(out) / "last.pt", map_location="cpu", weights_only=True)["encoder_k"]


def test_warmup_loss_is_the_loss_with_only_this_steps_keys(tmp_path):
    # upstream equivalent: PML's CrossBatchMemory holding one batch, i.e. a queue of exactly B = 32 keys
    one_batch = train(tiny_config(tmp_path / "one", queue_size=32, **SMALL))
    warm = train(tiny_config(tmp_path / "warm", memory_warmup_steps=8, **SMALL))
    assert one_batch["global_step"] == warm["global_step"] == 8
    assert step_losses(tmp_path / "warm") == step_losses(tmp_path / "one")
    a, b = encoder_k(tmp_path / "one"), encoder_k(tmp_path / "warm")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a warm-up of 3 steps: the same first 3 losses, then the queue's 96 keys are the negatives
    train(tiny_config(tmp_path / "short", memory_warmup_steps=3, **SMALL))
    short = step_losses(tmp_path / "short")
    assert short[:3] == step_losses(tmp_path / "one")[:3] and short[3] != step_losses(tmp_path / "one")[3]


@pytest.fixture
def prefill_spy(monkeypatch):
    """Wraps the trainer's prefill call: records the key encoder, the queue and the step count right after it."""
    calls = []
    original = st.prefill_memory

    def spy(memory, encoder, *args, **kwargs):
        queue = getattr(memory, "queue", memory)  # lightly's bank or the raw loss's queue
        steps_before = queue.num_steps
        done = original(memory, encoder, *args, **kwargs)
        calls.append({"encoder": {k: v.clone() for k, v in encoder.state_dict().items()}, "rows": len(queue),
                      "memory": queue.embeddings.clone(), "ids": None if queue.ids is None else queue.ids.clone(),
                      "steps_before": steps_before, "training": encoder.training})
        return done

    monkeypatch.setattr(st, "prefill_memory", spy)
    return calls


@pytest.mark.parametrize("adapt_keys,mask", [("raw", False), ("normalized", True)])
def test_prefill_writes_the_key_encoders_keys_of_distinct_training_images(tmp_path, prefill_spy, adapt_keys, mask):
    cfg = tiny_config(tmp_path, prefill=True, memory_warmup_steps=2, max_steps=3, adapt_keys=adapt_keys,
                      mask_same_ids=mask, **SMALL)
    train(cfg)
    assert len(prefill_spy) == 1
    call = prefill_spy[0]
    assert call["steps_before"] == 2 and call["training"] and call["rows"] == 96
    chosen = np.concatenate(prefill_batches(128, 96, cfg.seed, cfg.knn_batch_size))  # (96,)
    ids = call["ids"]  # (96,) in storage order; raw: always stored; normalized: with the mask
    assert len(set(chosen.tolist())) == 96 and sorted(ids.tolist()) == sorted(chosen.tolist())
    # a plain re-embedding, one image at a time, by a fresh encoder with the key encoder's weights at that moment
    data = load_dataset(cfg.dataset, cfg.data_root, image_size=cfg.image_size, train_subset=cfg.train_subset,
                        test_subset=cfg.test_subset)
    images = normalize_uint8(torch.from_numpy(data.train_images[ids.numpy()]).permute(0, 3, 1, 2).contiguous())
    enc = MoCoEncoder(cfg.backbone, cfg.head, cfg.embedding_dim, cfg.width, cfg.split_bn)
    enc.load_state_dict(call["encoder"])
    enc.eval()
    with torch.no_grad():
        ref = torch.cat([enc(x[None]) for x in images]).double()  # (96, D)
    if adapt_keys == "normalized":
        ref = F.normalize(ref, dim=1)
    torch.testing.assert_close(call["memory"].double(), ref, atol=1e-5, rtol=1e-5)
    # the key encoder of that moment: the one a run without --prefill has after the same 2 steps
    train(replace(cfg, output_dir=str(tmp_path / "stopped"), prefill=False, max_steps=2))
    stopped = encoder_k(tmp_path / "stopped")
    assert all(torch.equal(stopped[k], call["encoder"][k]) for k in stopped)


def test_prefill_and_mask_resume_exactly_and_prefill_once(tmp_path, prefill_spy):
    run = dict(prefill=True, mask_same_ids=True, adaptation="axbn", kalman_gain_every=2, **SMALL)
    train(tiny_config(tmp_path / "a", **run))
    cfg = tiny_config(tmp_path / "b", max_steps=5, **run)
    train(cfg)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state"]["prefilled"] is True
    train(replace(cfg, max_steps=0, resume="auto"))
    assert len(prefill_spy) == 2  # the straight run and the first part; never on resume
    sa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for part in ("encoder_q", "encoder_k", "criterion"):
        assert sa[part].keys() == sb[part].keys()
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part
    timing = {"epoch_time_s", "images_per_s"}
    ra = [{k: v for k, v in r.items() if k not in timing} for r in records(tmp_path / "a") if "epoch_loss" in r]
    rb = [{k: v for k, v in r.items() if k not in timing} for r in records(tmp_path / "b") if "epoch_loss" in r]
    assert ra == [r for r in rb if r["epoch"] in (1.0, 2.0)] and all("same_id_negatives_frac" in r for r in ra)


def test_same_sample_negatives_are_counted_and_masked(tmp_path):
    # step 1 after a prefill of 96 rows: the 32 keys of this step overwrite rows 0-31, so each query's
    # same-sample negatives are the prefilled rows 32-95 of its image (its own new key is its positive)
    losses = {}
    for mask in (False, True):
        cfg = tiny_config(tmp_path / str(mask), prefill=True, mask_same_ids=mask, max_steps=1, **SMALL)
        train(cfg)
        chosen = np.concatenate(prefill_batches(128, 96, cfg.seed, cfg.knn_batch_size))
        batch = EpochBatches(128, 32, cfg.seed).batches(0)[0].numpy()
        same = sum(int(np.sum(chosen[32:] == i)) for i in batch)
        assert same > 0
        rec = records(tmp_path / str(mask))[-1]
        assert rec["same_id_negatives_frac"] == pytest.approx(same / (32 * 95), rel=1e-12)  # counted either way
        losses[mask] = rec["loss"]
    assert losses[True] < losses[False]  # the masked loss drops those negatives from each softmax


@pytest.mark.parametrize("argv,match", [
    (["--memory-warmup-steps", "-1"], "--memory-warmup-steps -1: expected"),
    (["--memory-warmup-steps", "two"], "--memory-warmup-steps: invalid int value: 'two'"),
])
def test_bad_values_are_one_line_and_exit_2(tmp_path, capsys, argv, match):
    try:
        code = main(["--dataset", "digits", "--output-dir", str(tmp_path / "r"), *argv])
    except SystemExit as stop:  # argparse's own type errors
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_resume_with_other_memory_options_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2, **SMALL)
    train(cfg)
    with pytest.raises(ValueError, match=r"memory_warmup_steps: saved 0, now 4; prefill: saved False, now True; "
                                         r"mask_same_ids: saved False, now True"):
        train(replace(cfg, memory_warmup_steps=4, prefill=True, mask_same_ids=True, max_steps=0, resume="auto"))


def test_a_checkpoint_whose_queue_holds_no_ids_resumes_without_them(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2, **SMALL)
    train(cfg)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert bool(ck["criterion"]["queue.has_ids"])  # raw keys: ids are stored with the keys
    ck["criterion"]["queue.has_ids"] = torch.tensor(False)  # as a checkpoint written before ids were passed
    torch.save(ck, tmp_path / "last.pt")
    assert train(replace(cfg, max_steps=0, resume="auto"))["global_step"] == 8
    assert not bool(torch.load(tmp_path / "last.pt", weights_only=True)["criterion"]["queue.has_ids"])
