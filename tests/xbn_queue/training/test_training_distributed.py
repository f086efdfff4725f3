"""Tests of xbn_queue.training.distributed: world size 1 no-ops and a real 2-process gloo group."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from pathlib import Path

import pytest
import torch

from ._training_dist_worker import run_rank
from xbn_queue.training import distributed as D


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = D.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.is_distributed) == (0, 1, 0, True, False)
    assert ctx.device == torch.device("cpu") and ctx.backend is None
    x = torch.randn(5, 3, requires_grad=True)
    g = ctx.gather_features(x)
    torch.testing.assert_close(g, x.detach())
    assert not g.requires_grad
    assert ctx.gather_features(x, keep_local_grad=True) is x
    assert ctx.all_reduce_mean(2.5) == 2.5
    assert ctx.all_gather_object({"a": 1}) == [{"a": 1}]
    assert ctx.broadcast_object("x") == "x"
    t = torch.tensor([1.0, 3.0])
    m = ctx.all_reduce_mean(t)
    torch.testing.assert_close(m, t)
    assert m is not t
    ctx.barrier()
    ctx.cleanup()
    assert (D.get_rank(), D.get_world_size(), D.is_main_process()) == (0, 1, True)
    with pytest.raises(ValueError, match="at least one dimension"):
        D.gather_features(torch.tensor(1.0))


def test_inconsistent_env_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5, WORLD_SIZE=2"):
        D.init_distributed("cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x'"):
        D.init_distributed("cpu")


def _run_group(out: Path, world: int) -> list[int]:
    """Fork one process per rank running the worker; return their exit codes."""
    port = _free_port()
    ctx = mp.get_context("fork")  # children inherit the imported torch: the whole check takes ~1 s
    procs = [ctx.Process(target=run_rank, args=(str(out), r, world, port)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [p.exitcode for p in procs]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one process per rank")
def test_two_process_gloo_group(tmp_path: Path) -> None:
    world = 2
    for attempt in range(2):  # the free port can be taken between probing and binding: retry once
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        codes = _run_group(out, world)
        errors = [(out / f"error{r}.txt").read_text() for r in range(world) if (out / f"error{r}.txt").exists()]
        if codes == [0] * world or not any("address already in use" in e.lower() for e in errors):
            break
    assert codes == [0] * world, "\n".join(errors) or f"exit codes {codes}"
    tmp_path = out

    # Reference: rank r holds r + 2 rows, row i = [0, 1, 2] + 100 r + 10 i; concatenation in rank order.
    ref_feats = torch.cat([
        torch.stack([torch.arange(3, dtype=torch.float32) + 100 * r + 10 * i for i in range(r + 2)])
        for r in range(world)
    ])  # (2 + 3, 3)
    ref_labels = torch.cat([torch.arange(r + 2) + 1000 * r for r in range(world)])
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert (res["rank"], res["world_size"], res["local_rank"]) == (r, world, r)
        assert res["is_main"] == (r == 0)
        assert res["backend"] == "gloo" and res["device"] == "cpu"
        assert res["module_rank"] == (r, world, r == 0)
        assert res["objects"] == [{"rank": 0, "name": "r0"}, {"rank": 1, "name": "r1"}]
        assert res["broadcast"] == "from rank 1"
        torch.testing.assert_close(res["feats"], ref_feats, rtol=0, atol=0)
        assert res["labels"].dtype == torch.int64
        assert torch.equal(res["labels"], ref_labels)
        assert res["empty"].shape == (2, 4)
        assert torch.equal(res["flags"], torch.tensor([True, False, True, True]))
        torch.testing.assert_close(res["grad"], torch.ones(r + 2, 3))  # only local rows carry gradient
        assert res["mean_float"] == pytest.approx(1.5)
        torch.testing.assert_close(res["mean_tensor"], torch.tensor([1.0, 4.0]))
        torch.testing.assert_close(res["mean_int_tensor"], torch.tensor([0.5], dtype=torch.float64))
        assert torch.load(tmp_path / f"after{r}.pt") == 1  # cleanup destroyed the group
