"""Guarded ``torch.distributed`` helpers: every function works, as a no-op, without a process group."""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "get_rank", "get_world_size", "all_gather_sizes", "all_gather_cat"]


def is_distributed() -> bool:
    """True when a process group is initialised (and has more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_sizes(n: int, device: torch.device) -> List[int]:
    """First-dimension size of every rank's tensor, in rank order."""
    if not is_distributed():
        return [int(n)]
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


@torch.no_grad()
def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks along dim 0, in rank order; ``t`` itself without a process group.

    Ranks may hold different first-dimension sizes (the tensors are padded for the collective and
    trimmed afterwards). No gradient flows through the result.

    Args:
        t: ``(N_r, ...)`` on this rank.

    Returns:
        ``(sum_r N_r, ...)``.
    """
    if not is_distributed():
        return t
    t = t.contiguous()
    sizes = all_gather_sizes(t.shape[0], t.device)
    max_n = max(sizes)
    if t.shape[0] < max_n:
        pad = t.new_zeros((max_n - t.shape[0],) + tuple(t.shape[1:]))
        t = torch.cat([t, pad], dim=0)
    out = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(out, t)
    return torch.cat([o[:n] for o, n in zip(out, sizes)], dim=0)
