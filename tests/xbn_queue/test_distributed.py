"""gather_distributed with a real 2-process gloo group on CPU."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xbn_queue import AdaptiveQueue
from xbn_queue.distributed import all_gather_cat, get_rank, get_world_size

WORLD = 2
STEPS = 6
ADAPTATIONS = ("xbn", "axbn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    b = 3 + 2 * rank  # uneven batch sizes across ranks
    x = torch.randn(b, 4, generator=g) * (1 + step) + step
    return x, torch.randint(0, 9, (b,), generator=g), torch.arange(b) + 1000 * rank + 10 * step


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        assert get_rank() == rank and get_world_size() == WORLD
        gathered = all_gather_cat(torch.full((rank + 1, 2), float(rank)))
        assert gathered.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        for adaptation in ADAPTATIONS:
            q = AdaptiveQueue(size=11, dim=4, adaptation=adaptation, kalman_r=1.0, gather_distributed=True)
            for step in range(STEPS):
                x, y, i = _batch(rank, step)
                if step % 2:
                    q.adapt(x)
                    q.enqueue(x, y, ids=i)
                else:
                    q.update(x, y, ids=i)
            torch.save(q.state_dict(), os.path.join(out_dir, f"{adaptation}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("adaptation", ADAPTATIONS)
def test_gather_distributed_gives_every_rank_the_same_memory(spawned, adaptation):
    s0 = torch.load(spawned / f"{adaptation}-rank0.pt")
    s1 = torch.load(spawned / f"{adaptation}-rank1.pt")
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    # Equal to one process fed the rank-ordered concatenation of the batches.
    single = AdaptiveQueue(size=11, dim=4, adaptation=adaptation, kalman_r=1.0)
    for step in range(STEPS):
        parts = [_batch(r, step) for r in range(WORLD)]
        single.update(*(torch.cat([p[j] for p in parts]) for j in range(2)), ids=torch.cat([p[2] for p in parts]))
    for k, v in single.state_dict().items():
        torch.testing.assert_close(s0[k], v, msg=k)
