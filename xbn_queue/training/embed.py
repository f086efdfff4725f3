"""One sharded embedding pass for both trainers' evaluations: each rank embeds its share, all ranks get the whole.

``metric``'s retrieval evaluation (query and gallery splits) and ``selfsup``'s k-NN monitor (bank and test
set) embed a split the same way: rank ``r`` of ``W`` takes the images ``r, r + W, r + 2W, ...``
(:func:`shard_indices`), embeds them in eval mode without gradients under the run's autocast rule
(:func:`xbn_queue.training.precision.autocast`), and the shares are all-gathered and put back in the split's
order by their indices, so every rank holds the same ``(N, D)`` features as one process would::

    idx = shard_indices(len(ds), ctx.rank, ctx.world_size)
    batches = ((x, i, y) for x, y, i in my_loader(idx))           # (x, index, *columns) per batch
    feats, index, labels = embed_sharded(model, batches, dim=D, ctx=ctx, device=device, amp=cfg.amp,
                                         columns=(torch.long,))
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .distributed import DistContext
from .precision import autocast

__all__ = ["shard_indices", "embed_sharded"]


def shard_indices(n: int, rank: int, world_size: int) -> List[int]:
    """This rank's share of ``n`` items: ``rank, rank + world_size, ...`` (every item on exactly one rank)."""
    return list(range(rank, n, world_size))


@torch.no_grad()
def embed_sharded(model: nn.Module, batches: Iterable[Sequence[Tensor]], *, dim: int, ctx: DistContext,
                  device: torch.device, amp: bool, encode: Optional[Callable[[Tensor], Tensor]] = None,
                  columns: Sequence[torch.dtype] = (),
                  memory_format: torch.memory_format = torch.preserve_format) -> Tuple[Tensor, ...]:
    """Embed this rank's batches in eval mode; gather every rank's rows, in the order of their indices.

    Args:
        model: put in eval mode for the pass; every submodule's mode is restored afterwards.
        batches: this rank's share (e.g. of :func:`shard_indices`), ``(x, index, *cols)`` per batch: the
            model's input ``(b, ...)``, the items' indices in the split ``(b,)`` int64 (distinct over all
            ranks), and one ``(b,)`` tensor per entry of ``columns`` (labels, readable flags, ...).
        dim: D, the features' width (an empty share still takes part in the gather).
        ctx: the process group (one process: nothing is gathered).
        device: where the inputs go and the outputs are.
        amp: ``--amp`` (mixed precision on CUDA, the training step's rule).
        encode: ``encode(x) -> (b, D)`` instead of ``model(x)``.
        columns: the dtypes of the per-row tensors after the index in each batch.
        memory_format: of the inputs on ``device`` (``torch.channels_last`` with ``--channels-last``).

    Returns:
        ``(features (N, D) float32, index (N,) int64, *cols (N,))`` on ``device``, sorted by index; ``N``
        rows of all ranks together.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    encode = model if encode is None else encode
    parts: List[List[Tensor]] = [[] for _ in range(2 + len(columns))]
    try:
        for x, index, *cols in batches:
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            with autocast(amp, device):
                z = encode(x)  # (b, D)
            for part, t in zip(parts, (z.float(), index, *cols)):
                part.append(t.to(device))
    finally:
        for m, mode in modes:
            m.training = mode
    empty = [torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)] + [torch.zeros(0, dtype=d) for d in columns]
    out = [torch.cat(p) if p else e.to(device) for p, e in zip(parts, empty)]
    if ctx.is_distributed:
        out = [ctx.gather_features(t) for t in out]
    order = torch.argsort(out[1])  # (N,) the split's order
    return tuple(t[order] for t in out)
