"""Guarded ``torch.distributed`` helpers: every function works, as a no-op, without a process group.

The one place the package gathers tensors across ranks: the queue gathers every rank's batch with
:func:`all_gather_cat`, and the trainers' :func:`xbn_queue.training.distributed.gather_features` is the
same gather with an optional gradient path to this rank's rows.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["has_process_group", "is_distributed", "comm_device", "get_rank", "get_world_size", "all_gather_sizes",
           "all_gather_list", "all_gather_cat"]


def has_process_group() -> bool:
    """True when a default process group is initialised (of any size)."""
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True when a process group is initialised (and has more than one rank)."""
    return has_process_group() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if has_process_group() else 0


def get_world_size() -> int:
    """Number of ranks, 1 without a process group."""
    return dist.get_world_size() if has_process_group() else 1


def comm_device(device: torch.device) -> torch.device:
    """Where a collective on a tensor of ``device`` must run for the current backend (NCCL: CUDA, gloo: CPU)."""
    if dist.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if device.type == "cuda" else device


def all_gather_sizes(n: int, device: torch.device) -> List[int]:
    """First-dimension size of every rank's tensor, in rank order."""
    if not is_distributed():
        return [int(n)]
    size = torch.tensor([n], dtype=torch.long, device=comm_device(device))
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


@torch.no_grad()
def all_gather_list(t: Tensor) -> List[Tensor]:
    """Every rank's ``t``, in rank order, on ``t``'s device; ``[t]`` without a process group.

    Ranks may hold different first-dimension sizes (the tensors are padded for the collective and
    trimmed afterwards); bool tensors are sent as uint8 (not every backend gathers bool). No gradient
    flows through the result.

    Args:
        t: ``(N_r, ...)`` on this rank; the same trailing shape and dtype on every rank.

    Returns:
        ``[(N_0, ...), (N_1, ...), ...]``.
    """
    if not is_distributed():
        return [t]
    local = t.detach().to(comm_device(t.device)).contiguous()
    is_bool = local.dtype == torch.bool
    if is_bool:
        local = local.to(torch.uint8)
    sizes = all_gather_sizes(local.shape[0], local.device)
    longest = max(sizes)
    if local.shape[0] < longest:
        local = torch.cat([local, local.new_zeros((longest - local.shape[0], *local.shape[1:]))], dim=0)  # (longest, ...)
    chunks = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(chunks, local)
    parts = [c[:n].to(t.device) for c, n in zip(chunks, sizes)]  # trim the padding
    return [p.bool() for p in parts] if is_bool else parts


@torch.no_grad()
def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks along dim 0, in rank order; ``t`` itself without a process group.

    Args:
        t: ``(N_r, ...)`` on this rank (see :func:`all_gather_list`).

    Returns:
        ``(sum_r N_r, ...)``.
    """
    if not is_distributed():
        return t
    return torch.cat(all_gather_list(t), dim=0)
