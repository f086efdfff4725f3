"""A trainer's ``--prefill``: which training images it embeds into the memory, how ranks share them, and how.

Both trainers fill a memory of ``rows`` rows with the current model's embeddings of ``rows`` distinct
training images before the first step that uses the memory (:func:`xbn_queue.prefill` writes them).
The images are a fixed random choice (a function of the run's seed only: a memory of half the
training set then holds about half of every class's images, not the first classes in file order).
Under ``torchrun`` every rank embeds its own share and the queue all-gathers each call, so every rank
must make the same number of calls: :func:`prefill_batches` gives each rank that many non-empty
batches, and the ranks' shares together are the chosen images, each once. :func:`prefill_memory` is
the whole prefill; a trainer supplies only how it reads a batch of chosen images::

    def read(batches):                        # this rank's arrays of training-set indices
        for idx in batches:
            i = torch.from_numpy(idx)
            yield images[i], labels[i], i     # (x, labels or None, sample ids or None)

    prefill_memory(queue, model, read, num_train=len(images), seed=cfg.seed, batch_size=256, ctx=ctx,
                   device=device, amp=cfg.amp)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xbn_queue.prefill import memory_size, prefill

from .distributed import DistContext
from .precision import autocast

__all__ = ["prefill_batches", "prefill_memory"]

#: Stream tag of the choice (so that it never coincides with another generator seeded by the run's seed).
_STREAM = 0x70726566


def prefill_batches(num_train: int, rows: int, seed: int, batch_size: int, rank: int = 0,
                    world_size: int = 1) -> List[np.ndarray]:
    """This rank's batches of training-set indices for a prefill of ``rows`` rows.

    Args:
        num_train: N, images in the training set.
        rows: memory rows to fill, ``world_size <= rows <= N`` (a trainer's memory holds at least
            one global batch and at most the training set).
        seed: the run's seed (the choice depends on it alone, not on the global RNG: exact resume).
        batch_size: images per batch and rank (at most; one more only where ``batch_size`` is 1 and
            the ranks' shares differ in size).
        rank, world_size: this process and the number of processes.

    Returns:
        ``min(ceil(rows / (batch_size * world_size)), rows // world_size)`` int64 arrays, none empty,
        the same count on every rank; over all ranks, ``rows`` distinct indices in ``[0, N)``.

    Raises:
        ValueError: ``rows`` outside ``[world_size, N]``, ``batch_size < 1`` or a bad ``rank``.
    """
    if not world_size <= rows <= num_train:
        raise ValueError(f"prefill: rows must be in [{world_size}, {num_train}] (processes, training images), got {rows}")
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"prefill: batch_size {batch_size} must be >= 1 and rank {rank} in [0, {world_size})")
    chosen = np.random.default_rng([seed & 0xFFFFFFFF, _STREAM]).permutation(num_train)[:rows]  # (rows,)
    share = np.array_split(chosen, world_size)[rank]  # (rows // world or one more,)
    calls = min(math.ceil(rows / (batch_size * world_size)), rows // world_size)  # <= len(share): none empty
    return [b.astype(np.int64) for b in np.array_split(share, calls)]


def prefill_memory(memory: Any, model: nn.Module,
                   read: Callable[[List[np.ndarray]], Iterable[Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]],
                   *, num_train: int, seed: int, batch_size: int, ctx: DistContext, device: torch.device, amp: bool,
                   normalize: bool = False, progress: Optional[bool] = None) -> bool:
    """Fill ``memory`` with ``model``'s embeddings of :func:`prefill_batches`' choice of training images.

    Embedded in eval mode without gradients (BatchNorm statistics untouched, every submodule's mode
    restored) under the training step's autocast rule, and written with :func:`xbn_queue.prefill`
    (no adaptation, no step counted). No random generator is consumed.

    Args:
        memory: an :class:`~xbn_queue.AdaptiveQueue` or a drop-in's memory (``AdaptiveMemoryBank``); all
            of its rows are filled.
        model: the network (not a DDP wrapper: no collective in the forward pass).
        read: this rank's batches of training-set indices -> ``(x, labels or None, ids or None)`` per
            batch, ``x`` the model's input without augmentation (unreadable images may be left out).
        num_train: N, images in the training set.
        seed: the run's seed (fixes the choice).
        batch_size: images per batch and rank.
        ctx: the process group; every rank embeds its share and the queue gathers them.
        device: the training device.
        amp: ``--amp`` (autocast as in the training step).
        normalize: store L2-normalised embeddings (lightly's bank of unit keys).
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        ``True`` (for the run state: the prefill is done and must not run again on resume).
    """
    rows = memory_size(memory)
    batches = prefill_batches(num_train, rows, seed, batch_size, ctx.rank, ctx.world_size)

    def embed(m: nn.Module, x: Tensor) -> Tensor:
        with autocast(amp, device):
            z = m(x).float()  # (b, D)
        return F.normalize(z, dim=1) if normalize else z

    prefill(memory, model, read(batches), rows=rows, device=device, embed=embed, progress=progress)
    return True
