"""embed_sharded: one sharded evaluation embedding for both trainers (one process and a 2-process gloo group)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

from xbn_queue.training import distributed as D
from xbn_queue.training.distributed import DistContext
from xbn_queue.training.embed import embed_sharded, shard_indices

N, DIN, DIM = 11, 5, 3


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIN, generator=g)  # (N, DIN) the split's inputs
    labels = torch.randint(0, 4, (N,), generator=g)  # (N,)
    readable = torch.rand(N, generator=g) > 0.3  # (N,)
    return x, labels, readable


def _model() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(DIN, 4), nn.BatchNorm1d(4), nn.Linear(4, DIM))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return model


def _batches(indices, batch_size):
    x, labels, readable = _data()
    for s in range(0, len(indices), batch_size):
        i = torch.tensor(indices[s : s + batch_size], dtype=torch.long)  # (b,)
        yield x[i], i, labels[i], readable[i]


def _reference(model: nn.Module) -> torch.Tensor:
    """(N, DIM) float64 embeddings of the split, one row at a time, with the eval-mode model."""
    ref = _model()
    ref.load_state_dict(model.state_dict())
    ref = ref.double().eval()
    x, _, _ = _data()
    with torch.no_grad():
        return torch.cat([ref(row[None].double()) for row in x])


def test_shard_indices_cover_the_split_once():
    for n, world in [(11, 1), (11, 2), (11, 3), (1, 2), (0, 2)]:
        shares = [shard_indices(n, r, world) for r in range(world)]
        assert sorted(i for share in shares for i in share) == list(range(n))
        assert all(len(share) in (n // world, n // world + 1) for share in shares)


def test_one_process_in_split_order_with_the_columns_and_the_modes_restored():
    model = _model()
    model.train()
    model[2].eval()  # a submodule in its own mode (a frozen part): restored as it was
    bn_before = {k: v.clone() for k, v in model[1].state_dict().items()}
    order = [7, 2, 10, 0, 5, 1, 9, 3, 8, 6, 4]  # batches out of order: the result comes back in the split's order
    f, index, labels, readable = embed_sharded(model, _batches(order, 4), dim=DIM, ctx=DistContext(),
                                               device=torch.device("cpu"), amp=True, columns=(torch.long, torch.bool))
    _, ref_labels, ref_readable = _data()
    assert f.dtype == torch.float32 and f.shape == (N, DIM)
    torch.testing.assert_close(f.double(), _reference(model), rtol=1e-5, atol=1e-6)  # eval mode: running statistics
    assert torch.equal(index, torch.arange(N)) and torch.equal(labels, ref_labels)
    assert torch.equal(readable, ref_readable)
    assert model.training and model[1].training and not model[2].training
    assert all(torch.equal(bn_before[k], v) for k, v in model[1].state_dict().items())  # statistics untouched


def test_encode_replaces_the_forward_and_an_empty_share_has_the_declared_shapes():
    model = _model()
    f, index = embed_sharded(model, _batches(list(range(N)), 5), dim=2 * DIM, ctx=DistContext(),
                             device=torch.device("cpu"), amp=False,
                             encode=lambda x: torch.cat([model(x), -model(x)], dim=1))[:2]
    torch.testing.assert_close(f[:, DIM:], -f[:, :DIM], rtol=0, atol=0)
    torch.testing.assert_close(f[:, :DIM].double(), _reference(model), rtol=1e-5, atol=1e-6)
    empty = embed_sharded(model, iter(()), dim=DIM, ctx=DistContext(), device=torch.device("cpu"), amp=False,
                          columns=(torch.long, torch.bool))
    assert [(tuple(t.shape), t.dtype) for t in empty] == [((0, DIM), torch.float32), ((0,), torch.long),
                                                         ((0,), torch.long), ((0,), torch.bool)]


def _rank(out: str, rank: int, world: int, port: int, n: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        ctx = D.init_distributed("cpu", timeout=datetime.timedelta(seconds=60))
        model = _model()
        share = shard_indices(n, ctx.rank, ctx.world_size)  # n = 1: rank 1 has nothing to embed
        res = embed_sharded(model, _batches(share, 2), dim=DIM, ctx=ctx, device=torch.device("cpu"), amp=False,
                            columns=(torch.long, torch.bool))
        torch.save(res, Path(out) / f"rank{rank}.pt")
        ctx.cleanup()
    except BaseException:
        (Path(out) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one process per rank")
@pytest.mark.parametrize("n", [N, 1])
def test_two_ranks_hold_what_one_process_embeds(tmp_path, n):
    port = _free_port()
    procs = [mp.get_context("fork").Process(target=_rank, args=(str(tmp_path), r, 2, port, n)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in tmp_path.glob("error*.txt")]
    assert [p.exitcode for p in procs] == [0, 0], "\n".join(errors)
    one = embed_sharded(_model(), _batches(list(range(n)), 2), dim=DIM, ctx=DistContext(), device=torch.device("cpu"),
                        amp=False, columns=(torch.long, torch.bool))
    for r in range(2):
        f, index, labels, readable = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.equal(index, torch.arange(n)) and torch.equal(labels, one[2]) and torch.equal(readable, one[3])
        torch.testing.assert_close(f, one[0], rtol=1e-6, atol=1e-7)  # other batches: another reduction order
