"""MoCo loss on raw (un-normalised) keys, as in the paper's Appendix B setup (``--adapt-keys raw``).

The paper follows pytorch-metric-learning's MoCo CIFAR-10 example, which trains with::

    loss_fn = CrossBatchMemory(NTXentLoss(temperature=0.1), embedding_size=128, memory_size=4096)
    all_enc = cat([query, key]); labels = cat([ids, ids])     # query i and key i share a fresh label
    loss = loss_fn(all_enc, labels, enqueue_mask=[False] * B + [True] * B)

so, per step:

1. the keys are stored **as the key encoder outputs them** (no L2 normalisation), and XBN adapts
   those raw rows to the raw keys' statistics (the paper's wrapper adapts the memory before
   ``CrossBatchMemory`` enqueues);
2. the keys are enqueued *before* the loss, so the memory the queries are compared with holds the
   current batch's keys too: for query i the positive is key i, and every other stored row (the
   other B - 1 keys of this batch and the older, adapted keys) is a negative;
3. the loss normalises: PML's ``NTXentLoss`` uses cosine similarity, i.e.
   ``-log(exp(s_ii / t) / sum_j exp(s_ij / t))`` over all rows j of the memory, averaged over the
   queries. With one positive per query this is a cross-entropy over the memory's rows.

lightly's ``NTXentLoss`` (``--adapt-keys normalized``) differs on all three points: it normalises the
keys before the bank (so XBN adapts unit vectors), returns the bank *before* enqueuing (the current
batch's other keys are not negatives), and puts the positive in a separate first column.

:func:`raw_key_ntxent` is the math; :class:`RawKeyMoCoLoss` owns the queue.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xbn_queue import distributed as xdist
from xbn_queue.queue import AdaptiveQueue, DeferredEnqueue, PendingWrite

__all__ = ["RawKeyMoCoLoss", "raw_key_ntxent"]


def raw_key_ntxent(
    queries: Tensor,
    memory: Tensor,
    positives: Tensor,
    temperature: float,
    exclude: Optional[Tensor] = None,
) -> Tensor:
    """NT-Xent of queries against every stored row, cosine similarity (PML's ``NTXentLoss`` with unique labels).

    Args:
        queries: ``(B, D)`` query embeddings (any scale; normalised here).
        memory: ``(n, D)`` stored keys (any scale; normalised here), including the positives.
        positives: ``(B,)`` int64 row of ``memory`` holding each query's positive key.
        temperature: softmax temperature ``t``.
        exclude: optional ``(B, n)`` bool: rows left out of query i's negatives (never its positive).

    Returns:
        Scalar: ``mean_i [ -s_{i,p(i)} / t + logsumexp_j (s_ij / t) ]`` with ``s`` the cosine similarity;
        every row other than ``p(i)`` (and the excluded ones) is a negative of query i.
    """
    q = F.normalize(queries, dim=1)  # (B, D)
    m = F.normalize(memory.to(q.dtype), dim=1)  # (n, D), a new tensor (never the queue's buffer)
    logits = q @ m.t() / temperature  # (B, n)
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))  # exp(-inf) = 0: out of the denominator
    return F.cross_entropy(logits, positives)


class RawKeyMoCoLoss(DeferredEnqueue, nn.Module):
    """MoCo loss whose queue stores and adapts raw key-encoder outputs (PML ``CrossBatchMemory`` order).

    ``loss = criterion(query, key)``: the stored keys are adapted to ``key``'s statistics (XBN /
    AXBN; nothing for ``"none"``), ``key`` is enqueued, and :func:`raw_key_ntxent` compares the
    queries with every stored row (this batch's keys included, the own key being the positive).
    Inside ``with criterion.deferred_enqueue():`` the loss is the same, computed against the memory
    as it will be, and the keys are written when the block ends without an exception
    (:class:`~xbn_queue.queue.DeferredEnqueue`).

    Args:
        queue_size: N, stored keys (the current batch included, as in PML's ``memory_size``).
        dim: D, the embedding dimension.
        temperature: of the NT-Xent loss.
        adaptation: ``"none"``, ``"xbn"`` or ``"axbn"``.
        gather_distributed: all-gather the keys of every rank before adapting and enqueuing (every
            rank then holds the same queue); each rank's queries take their own keys as positives.
        warmup_steps, warmup_rows: (in ``queue_kwargs``) keep the memory out of the loss for the
            first steps / until it holds that many keys (it still fills and adapts): the loss is then
            that of PML's ``CrossBatchMemory`` with a memory holding only this step's keys (the
            other keys of the batch are the negatives).
        mask_same_ids: leave out of each query's negatives the stored keys of the same sample (older
            keys of that image, enqueued in earlier steps), found by the sample ids given to
            ``forward``. Off by default (the paper's and PML's loss).
        **queue_kwargs: further :class:`~xbn_queue.AdaptiveQueue` arguments (``kalman_*``, ``eps``).

    Attributes:
        queue: the :class:`~xbn_queue.AdaptiveQueue` (its buffers are in ``state_dict()``).
        same_id_negatives: 0-d int64 tensor (on the queue's device, never read on the host here):
            in the last call with ids, how many (query, stored key) pairs were negatives of the same
            sample (counted whether or not they were masked); ``None`` before such a call.
    """

    def __init__(
        self,
        queue_size: int,
        dim: int,
        temperature: float = 0.1,
        adaptation: str = "xbn",
        gather_distributed: bool = False,
        mask_same_ids: bool = False,
        **queue_kwargs: Any,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = bool(gather_distributed)
        self.mask_same_ids = bool(mask_same_ids)
        self.same_id_negatives: Optional[Tensor] = None
        self.queue = AdaptiveQueue(
            size=queue_size, dim=dim, adaptation=adaptation, gather_distributed=gather_distributed, **queue_kwargs
        )

    def forward(self, query: Tensor, key: Tensor, ids: Optional[Tensor] = None) -> Tensor:
        """Adapt the queue to ``key``, enqueue ``key``, return the loss of ``query`` against the queue.

        Args:
            query: ``(B, D)`` query-encoder outputs (with gradient).
            key: ``(B, D)`` key-encoder outputs, raw (no gradient reaches the queue).
            ids: optional ``(B,)`` integer sample ids (query i and key i are views of sample ``ids[i]``),
                stored beside the keys; once given, pass them on every call. Needed for ``mask_same_ids``.

        Returns:
            Scalar loss (mean over the B queries).

        Raises:
            ValueError: on mismatched shapes, non-finite keys, more keys than rows, ids of another
                length, or ``mask_same_ids`` without ids (nothing changes then).
        """
        if query.dim() != 2 or query.shape != key.shape:
            raise ValueError(f"query and key must both be (B, D), got {tuple(query.shape)} and {tuple(key.shape)}")
        if self.mask_same_ids and ids is None:
            raise ValueError("ids are required with mask_same_ids=True: pass forward(query, key, ids=sample_ids)")
        self._check_can_hold()
        with torch.no_grad():
            pending = None
            if self._deferring:  # the keys are held until the block ends: the loss reads the memory as it will be
                pending = self.queue.stage(key.detach(), ids=ids)
                self._hold(pending)
                written, warmup = pending.positions, pending.in_warmup  # (B * world,)
                memory = self.queue.preview(pending)[0]  # (n, D) a new tensor, the keys at their rows
            else:
                written = self.queue.update(key.detach(), ids=ids)  # (B * world,) rows, gathered batch in rank order
                warmup = self.queue.in_warmup
                memory = self.queue.valid_memory()  # (n, D) live view, read once right here
            pos, offset = written, 0
            if self.gather_distributed and xdist.is_distributed():  # this rank's keys follow the lower ranks'
                offset = sum(xdist.all_gather_sizes(key.shape[0], key.device)[: xdist.get_rank()])
                pos = pos[offset : offset + key.shape[0]]  # (B,)
            same = None
            if warmup:  # the memory stays out: this step's keys are the only references
                keys = memory.index_select(0, written)  # (B * world, D)
                own = torch.arange(offset, offset + key.shape[0], device=query.device)  # (B,) positives
                self.same_id_negatives = None
            elif ids is not None:  # older keys of the same samples; this step's keys are positives, not older copies
                same = self.queue.same_id_mask(ids, exclude=written, pending=pending)  # (B, n)
                self.same_id_negatives = same.sum()
        if warmup:  # outside no_grad: the queries' gradient flows
            return raw_key_ntxent(query, keys.to(query.device), own, self.temperature)
        exclude = same.to(query.device) if self.mask_same_ids else None
        return raw_key_ntxent(query, memory, pos.to(query.device), self.temperature, exclude)

    @torch.no_grad()
    def _write_held(self, pending: PendingWrite) -> None:
        """End of a ``deferred_enqueue()`` block: write the held keys."""
        self.queue.commit(pending)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, gather_distributed={self.gather_distributed}, "
            f"mask_same_ids={self.mask_same_ids}"
        )
