"""Deterministic m-per-class batches, shardable across processes and resumable mid-epoch.

The algorithm is pytorch-metric-learning's ``MPerClassSampler`` (per batch: shuffle the classes, take
``batch_size / m`` of them, draw ``m`` images of each without replacement, or with replacement when
a class has fewer than ``m``), but its random numbers come from a generator seeded by
``(seed, epoch)`` instead of the global NumPy state. So the batches of an epoch are a pure function of
``(seed, epoch)``: a resumed run skips the batches it already consumed and sees the same rest, and
under DDP rank ``r`` of ``world`` takes global batches ``r, r + world, r + 2 world, ...``.

Each batch entry is ``(index, augmentation_seed)``; :class:`metric.data.ImageDataset` seeds the
augmentation with it, so augmentations are also independent of worker processes and restarts.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import numpy as np

__all__ = ["MPerClassBatches"]


class MPerClassBatches:
    """The per-rank batches of one epoch, as a batch sampler for ``DataLoader(batch_sampler=...)``.

    Args:
        labels: (N,) training labels.
        batch_size: images per batch per process.
        m: images per class per batch.
        seed: run seed.
        epoch: epoch index (0-based, warm-up included).
        rank: this process's rank.
        world_size: number of processes.
        start: skip this many of this rank's batches (resume within the epoch).

    Raises:
        ValueError: ``batch_size`` not a multiple of ``m`` or more classes per batch than exist.
    """

    def __init__(self, labels: Sequence[int], batch_size: int, m: int, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if batch_size % m != 0:
            raise ValueError(f"batch_size {batch_size} must be a multiple of m_per_class {m}")
        self.classes = np.unique(labels)
        self.per_batch = batch_size // m
        if self.per_batch > len(self.classes):
            raise ValueError(
                f"a batch of {batch_size} with {m} images per class needs {self.per_batch} classes, "
                f"the training set has {len(self.classes)}: lower --batch-size or raise --m-per-class"
            )
        self.by_class = {int(c): np.flatnonzero(labels == c) for c in self.classes}
        self.batch_size, self.m = batch_size, m
        self.seed, self.epoch, self.rank, self.world_size, self.start = seed, epoch, rank, world_size, start
        # As PML with length_before_new_iter = len(dataset): N // batch_size global batches per epoch,
        # rounded down to a multiple of the world size (at least one per rank).
        self.steps_per_epoch = steps_per_epoch(len(labels), batch_size, world_size)

    def global_batches(self) -> List[List[Tuple[int, int]]]:
        """All ranks' batches of the epoch, each a list of ``(index, augmentation_seed)``."""
        rng = np.random.default_rng([self.seed, self.epoch, 0x6D706373])
        out = []
        classes = self.classes.copy()
        for _ in range(self.steps_per_epoch * self.world_size):
            rng.shuffle(classes)
            batch: List[int] = []
            for c in classes[: self.per_batch]:
                pool = self.by_class[int(c)]
                batch.extend(rng.choice(pool, size=self.m, replace=len(pool) < self.m).tolist())
            seeds = rng.integers(0, 2**62, size=len(batch)).tolist()
            out.append(list(zip(batch, seeds)))
        return out

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        batches = self.global_batches()[self.rank :: self.world_size]
        return iter(batches[self.start :])

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start)


def steps_per_epoch(num_train: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps per epoch per process: ``max(1, num_train // (batch_size * world_size))``."""
    return max(1, num_train // (batch_size * world_size))
