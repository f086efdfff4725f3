"""A non-finite loss stops the MoCo run before the keys reach the queue; a NaN on one rank stops every rank."""

import pytest
import torch

from selfsup.cli import main
from tests.selfsup.conftest import tiny_config
from tests.selfsup.test_distributed_and_kill import cli_args
from tests.selfsup.test_train import queue_of


@pytest.mark.parametrize("adapt_keys", ["normalized", "raw"])
def test_a_nan_loss_with_finite_keys_never_reaches_the_queue(tmp_path, monkeypatch, capsys, adapt_keys):
    import selfsup.train as st

    real = st.build_criterion
    seen = {}

    def poisoned_criterion(cfg, distributed=False):
        criterion = real(cfg, distributed)
        forward = criterion.forward
        calls = {"n": 0}

        def nan_at_third(q, k, *args, **kwargs):  # the third step: finite queries and keys, a NaN loss
            calls["n"] += 1
            loss = forward(q, k, *args, **kwargs)
            if calls["n"] != 3:
                return loss
            seen.update(keys=k.detach().clone(), queue=st.criterion_queue(criterion))
            return loss * float("nan")

        criterion.forward = nan_at_third
        return criterion

    monkeypatch.setattr(st, "build_criterion", poisoned_criterion)
    cfg = tiny_config(tmp_path, adaptation="none", adapt_keys=adapt_keys, checkpoint_every=1, knn_every=0)
    assert main(cli_args(cfg)) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("xbn-selfsup: error: non-finite loss at step 3 (epoch 1) on at least one "
                                           "rank; stopped before the optimiser step and before the batch reached")
    assert "Traceback" not in err
    live, saved = seen["queue"], queue_of(tmp_path / "last.pt")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["state"]["global_step"] == 2
    assert len(live) == 2 * 32 and int(saved["queue.num_filled"]) == 2 * 32
    for name in ("memory", "ptr", "num_filled", "id_memory"):  # adaptation none: last.pt's queue, bit for bit
        assert torch.equal(getattr(live, name), saved["queue." + name]), name
    assert torch.isfinite(live.memory).all() and not live.memory[64:].any()  # rows 64.. never written


@pytest.mark.parametrize("what", ["embedding", "loss"])
def test_a_nan_on_rank_1_only_stops_both_ranks_before_the_queue(two_process_runs, what):
    out = two_process_runs[what]  # TWO_PROCESS_RUNS[what] (conftest.py): 2 processes, batch 16, a NaN on rank 1 at step 3
    ranks = [torch.load(out / f"stopped_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert r["stopped"].startswith(f"non-finite {what} at step 3 (epoch 1) on at least one rank"), r["stopped"]
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert saved["state"]["global_step"] == 2
    q_saved = {k.rsplit("queue.", 1)[1]: v for k, v in saved["criterion"].items() if "queue." in k}
    for r in ranks:  # each rank's live queue: the keys of the two good steps of both ranks, not the third step's
        q = r["queue"]
        assert int(q["num_filled"]) == 2 * 2 * 16 and int(q["ptr"]) == 64
        assert torch.isfinite(q["memory"]).all() and not q["memory"][64:].any()  # rows 64.. never written
        if what == "embedding":  # stopped before the adaptation too: the memory of the last checkpoint
            assert torch.equal(q["memory"], q_saved["memory"])
    assert torch.equal(ranks[0]["queue"]["memory"], ranks[1]["queue"]["memory"])


@pytest.mark.parametrize("adapt_keys", ["normalized", "raw"])
def test_holding_the_keys_back_changes_no_number_of_a_normal_run(tmp_path, monkeypatch, adapt_keys):
    import contextlib

    from selfsup.loss import RawKeyMoCoLoss
    from selfsup.train import train
    from tests.selfsup.test_distributed_and_kill import read_jsonl, strip_timing
    from xbn_queue.lightly import AdaptiveMemoryBank

    def run(name):
        cfg = tiny_config(tmp_path / name, adaptation="xbn", adapt_keys=adapt_keys, train_subset=128, max_steps=6,
                          knn_every=0)
        train(cfg)
        return strip_timing(read_jsonl(tmp_path / name / "metrics.jsonl")), queue_of(tmp_path / name / "last.pt")

    held = run("held")
    for cls in (RawKeyMoCoLoss, AdaptiveMemoryBank):  # the old order: the keys written inside the forward
        monkeypatch.setattr(cls, "deferred_enqueue", lambda self: contextlib.nullcontext())
    plain = run("plain")
    assert held[0] == plain[0]  # every loss, bit for bit
    assert held[1].keys() == plain[1].keys()
    for key in held[1]:
        assert torch.equal(held[1][key], plain[1][key]), key
