"""Which training images a trainer's ``--prefill`` embeds into the memory, and how ranks share them.

Both trainers fill a memory of ``rows`` rows with the current model's embeddings of ``rows`` distinct
training images before the first step that uses the memory (:func:`xbn_queue.prefill` writes them).
The images are a fixed random choice (a function of the run's seed only: a memory of half the
training set then holds about half of every class's images, not the first classes in file order).
Under ``torchrun`` every rank embeds its own share and the queue all-gathers each call, so every rank
must make the same number of calls: :func:`prefill_batches` gives each rank that many non-empty
batches, and the ranks' shares together are the chosen images, each once.
"""

from __future__ import annotations

import math
from typing import List

import numpy as np

__all__ = ["prefill_batches"]

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
