"""A non-finite loss stops the run before the batch reaches the memory (the live queue and last.pt's)."""

import pytest
import torch

from metric.cli import main

from .helpers import tiny_argv, tiny_cfg
from .test_train import memory_of


@pytest.mark.parametrize("method", ["xbm", "xbn"])
def test_a_nan_loss_with_finite_embeddings_never_reaches_the_memory(tmp_path, monkeypatch, capsys, method):
    import metric.train as mt

    real = mt.build_losses
    seen = {}

    def poisoned_losses(cfg, rows, distributed):
        batch_loss, mem = real(cfg, rows, distributed)
        forward = mem.forward
        calls = {"n": 0}

        def nan_at_third(emb, *args, **kwargs):  # the third memory step: finite embeddings, a NaN loss
            calls["n"] += 1
            loss = forward(emb, *args, **kwargs)
            if calls["n"] != 3:
                return loss
            seen.update(batch=emb.detach().clone(), queue=mem.queue)
            return loss * float("nan")

        mem.forward = nan_at_third
        return batch_loss, mem

    monkeypatch.setattr(mt, "build_losses", poisoned_losses)
    assert main(["train", *tiny_argv(tmp_path, method=method, checkpoint_every=1)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("xbn-metric: error: non-finite loss at step 14 (epoch 2) on at least one "
                                           "rank; stopped before the optimiser step and before the batch reached")
    assert "Traceback" not in err
    live, bad = seen["queue"], seen["batch"]  # (64, 32) memory of the stopped run, (16, 32) the bad step's rows
    saved, ck = memory_of(tmp_path, tiny_cfg(tmp_path, method=method, checkpoint_every=1))
    assert ck["state"]["global_step"] == 13  # 11 warm-up steps, then two memory steps
    assert len(live) == len(saved) == 2 * 16
    for name in ("ptr", "num_filled", "label_memory", "id_memory"):  # nothing of the bad step was written
        assert torch.equal(getattr(live, name), getattr(saved, name)), name
    assert torch.isfinite(live.memory).all() and torch.isfinite(saved.memory).all()
    assert not (live.memory[:, None, :] == bad[None]).all(-1).any()  # no row of the bad batch
    if method == "xbm":  # no adaptation either: the memory is last.pt's, bit for bit
        assert torch.equal(live.memory, saved.memory)


def test_holding_the_batch_back_changes_no_number_of_a_normal_run(tmp_path, monkeypatch):
    import contextlib

    from metric.train import train
    from xbn_queue.pml import AdaptiveCrossBatchMemory
    from xbn_queue.training.tracking import read_metrics

    def run(name):
        cfg = tiny_cfg(tmp_path / name, method="xbn", max_steps=16, drift_every=0)
        train(cfg)
        records = [{k: v for k, v in r.items() if not k.endswith(("_s", "time"))} for r in read_metrics(tmp_path / name / "metrics.jsonl")]
        return records, memory_of(tmp_path / name, cfg)[0].state_dict()

    held = run("held")
    monkeypatch.setattr(AdaptiveCrossBatchMemory, "deferred_enqueue", lambda self: contextlib.nullcontext())
    plain = run("plain")  # the old order: the batch written inside the forward, the loss checked after
    assert held[0] == plain[0]  # every loss and metric, bit for bit
    assert held[1].keys() == plain[1].keys()
    for key in held[1]:
        assert torch.equal(held[1][key], plain[1][key]), key
