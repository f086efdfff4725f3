"""Drop-in replacement for pytorch-metric-learning's ``CrossBatchMemory`` with an adaptive memory.

Example:
    >>> from pytorch_metric_learning import losses, miners
    >>> from xbn_queue.pml import AdaptiveCrossBatchMemory
    >>> loss_fn = AdaptiveCrossBatchMemory(losses.SupConLoss(), embedding_size=512, memory_size=30000,
    ...                                    miner=miners.PairMarginMiner(), adaptation="xbn")
    >>> loss = loss_fn(embeddings, labels)  # adapt memory -> enqueue batch -> loss against memory

Per call, in the order of the paper (Sec. 3.1): the stored rows are adapted to the statistics of the
rows being enqueued (Eq. 6 for ``"xbn"``, Eq. 23 for ``"axbn"``, nothing for ``"none"``), those rows
are enqueued, and the loss is computed against the whole memory exactly as PML's ``CrossBatchMemory``
does it (miner on the memory or all pairs, self-comparisons removed at the written row positions,
``enqueue_mask`` split, input ``indices_tuple`` combined). With ``adaptation="none"`` the losses are
those of PML's ``CrossBatchMemory`` on any sequence of batches.

The class subclasses PML's ``CrossBatchMemory`` (without allocating its buffers) so that PML code
that checks ``isinstance(loss, CrossBatchMemory)`` (e.g. ``DistributedLossWrapper``) accepts it and
the index bookkeeping (``create_indices_tuple``, ``supported_losses``) is PML's own.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

try:
    from pytorch_metric_learning.losses import CrossBatchMemory
    from pytorch_metric_learning.utils import common_functions as c_f
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "xbn_queue.pml needs pytorch-metric-learning: pip install 'xbn-queue[pml]'"
    ) from e

from . import distributed as xdist
from .queue import AdaptiveQueue

__all__ = ["AdaptiveCrossBatchMemory"]


class AdaptiveCrossBatchMemory(CrossBatchMemory):
    """PML ``CrossBatchMemory`` whose memory is an :class:`~xbn_queue.AdaptiveQueue` (XBM / XBN / AXBN).

    Args:
        loss: a PML loss supported by ``CrossBatchMemory`` (``CrossBatchMemory.supported_losses()``).
        embedding_size: D, the embedding dimension.
        memory_size: M, the number of stored rows.
        miner: optional PML miner, called as ``miner(embeddings, labels, memory, memory_labels)``.
        adaptation: ``"none"`` (plain XBM), ``"xbn"`` (Eq. 6) or ``"axbn"`` (Kalman, Eq. 18-23).
        add_batch_loss: also add the plain loss on the batch itself (the paper's XBM*): the miner
            (if any) is applied to the batch and ``loss(embeddings, labels, batch_indices)`` is added.
        **queue_kwargs: passed to :class:`~xbn_queue.AdaptiveQueue` (``eps``, ``kalman_*``,
            ``gather_distributed``, ``dtype``, ...). With ``gather_distributed=True`` every rank
            enqueues the batches of all ranks and computes the loss of its own rows against that
            shared memory (do not also wrap it in PML's ``DistributedLossWrapper``, which gathers
            the batch itself and is meant for ``gather_distributed=False``).

    Attributes:
        queue: the :class:`~xbn_queue.AdaptiveQueue` holding the memory.
        loss, miner, embedding_size, memory_size: as given.
        curr_batch_idx: (B,) memory rows written by this rank's batch in the last call.

    Raises:
        ValueError: if the loss is not supported by ``CrossBatchMemory``.
    """

    def __init__(
        self,
        loss: torch.nn.Module,
        embedding_size: int,
        memory_size: int = 1024,
        miner: Optional[torch.nn.Module] = None,
        adaptation: str = "xbn",
        add_batch_loss: bool = False,
        **queue_kwargs: Any,
    ) -> None:
        # Skip CrossBatchMemory.__init__ (it allocates PML's own memory buffers); BaseLossWrapper
        # checks the loss, ModuleWithRecords sets up the records.
        super(CrossBatchMemory, self).__init__(loss=loss)
        self.loss = loss
        self.miner = miner
        self.embedding_size = int(embedding_size)
        self.memory_size = int(memory_size)
        self.adaptation = adaptation
        self.add_batch_loss = bool(add_batch_loss)
        self.queue = AdaptiveQueue(
            size=self.memory_size, dim=self.embedding_size, adaptation=adaptation, **queue_kwargs
        )
        self.curr_batch_idx = torch.zeros(0, dtype=torch.long)
        self.add_to_recordable_attributes(
            list_of_names=["embedding_size", "memory_size", "queue_idx"], is_stat=False
        )

    @classmethod
    def check_loss_support(cls, loss_name: str) -> None:
        """Raise unless PML's ``CrossBatchMemory`` supports the loss class ``loss_name``.

        Raises:
            ValueError: naming the loss and the supported ones.
        """
        if loss_name not in cls.supported_losses():
            raise ValueError(
                f"AdaptiveCrossBatchMemory does not support {loss_name}; supported losses (as for "
                f"PML's CrossBatchMemory): {', '.join(cls.supported_losses())}"
            )

    @property
    def queue_idx(self) -> int:
        """The write pointer (PML's name): the row the next enqueued embedding goes to."""
        return int(self.queue.ptr)

    @property
    def has_been_filled(self) -> bool:
        """Whether the memory has been filled once (PML's name)."""
        return bool(self.queue.is_full)

    def reset_queue(self) -> None:
        """Empty the memory (rows, labels, pointer and adaptation state)."""
        self.queue.reset()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: Optional[Tuple[Tensor, ...]] = None,
        enqueue_mask: Optional[Tensor] = None,
        ids: Optional[Tensor] = None,
    ) -> Tensor:
        """Adapt the memory, enqueue, and compute the loss against the memory.

        Args:
            embeddings: (B, D) embeddings (any float dtype; the memory is passed to the loss in this dtype).
            labels: (B,) integer labels.
            indices_tuple: optional PML indices tuple (3 or 4 tensors) combined with the mined ones, as
                in PML. Mutually exclusive with ``enqueue_mask``.
            enqueue_mask: optional (B,) bool mask: rows with True are (adapted to, then) enqueued and
                only the other rows are the loss's anchors (no self-comparison removal), as in PML.
            ids: optional (B,) integer sample ids, stored beside the enqueued rows (an extension of PML's
                signature) so that :func:`xbn_queue.drift.queue_staleness` can compare the memory with fresh
                embeddings; once given, pass them on every call (until ``reset_queue()``).

        Returns:
            Scalar loss (plus the plain batch loss when ``add_batch_loss``).

        Raises:
            ValueError: on ``indices_tuple`` together with ``enqueue_mask``, embeddings that are not
                (B, embedding_size), labels, mask or ids of another length, or more rows to enqueue than
                ``memory_size``.
        """
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be (B, embedding_size={self.embedding_size}), "
                f"got {tuple(getattr(embeddings, 'shape', ()))}"
            )
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must be (B={embeddings.shape[0]},), got {tuple(getattr(labels, 'shape', ()))}"
            )
        if ids is not None and (not isinstance(ids, Tensor) or ids.shape != (embeddings.shape[0],)):
            raise ValueError(f"ids must be (B={embeddings.shape[0]},), got {tuple(getattr(ids, 'shape', ()))}")
        self.reset_stats()
        device = embeddings.device
        labels = c_f.to_device(labels, device=device)

        if enqueue_mask is not None:
            if enqueue_mask.shape != (embeddings.shape[0],):
                raise ValueError(
                    f"enqueue_mask must be (B={embeddings.shape[0]},), got {tuple(enqueue_mask.shape)}"
                )
            enqueue_mask = enqueue_mask.to(device=device, dtype=torch.bool)
            emb_for_queue = embeddings[enqueue_mask]  # (Bq, D)
            labels_for_queue = labels[enqueue_mask]  # (Bq,)
            ids_for_queue = ids[enqueue_mask.to(ids.device)] if ids is not None else None
            embeddings = embeddings[~enqueue_mask]  # (Ba, D) anchors
            labels = labels[~enqueue_mask]
            do_remove_self_comparisons = False
        else:
            emb_for_queue = embeddings
            labels_for_queue = labels
            ids_for_queue = ids
            do_remove_self_comparisons = True
        if emb_for_queue.shape[0] > self.memory_size:
            raise ValueError(
                f"cannot enqueue {emb_for_queue.shape[0]} rows into a memory of memory_size={self.memory_size}"
            )

        self.curr_batch_idx = self._adapt_and_enqueue(emb_for_queue, labels_for_queue, ids_for_queue)  # (Bq,)

        # Like PML, the loss reads the memory in place (a live view, cast to the loss dtype; a copy only
        # when the dtypes differ): PML's supported losses never modify their reference embeddings.
        E_mem = self.queue.valid_memory().to(device=device, dtype=embeddings.dtype)  # (n, D)
        L_mem = self.queue.valid_labels().to(device=device, dtype=labels.dtype)  # (n,)
        do_remove_self_comparisons = do_remove_self_comparisons and self.curr_batch_idx.numel() > 0
        mem_indices = self.create_indices_tuple(
            embeddings, labels, E_mem, L_mem, indices_tuple, do_remove_self_comparisons
        )
        loss = self.loss(embeddings, labels, mem_indices, E_mem, L_mem)
        if self.add_batch_loss:
            loss = loss + self._batch_loss(embeddings, labels, indices_tuple)
        return loss

    def _batch_loss(
        self, embeddings: Tensor, labels: Tensor, input_indices_tuple: Optional[Tuple[Tensor, ...]]
    ) -> Tensor:
        """The plain loss on the batch (XBM*): miner on the batch, combined with an input tuple as PML does."""
        batch_indices = self.miner(embeddings, labels) if self.miner is not None else None
        if input_indices_tuple is not None:
            if batch_indices is None:
                batch_indices = input_indices_tuple
            else:
                batch_indices = self._combine_indices(batch_indices, input_indices_tuple, labels)
        return self.loss(embeddings, labels, batch_indices)

    @staticmethod
    def _combine_indices(
        indices_tuple: Tuple[Tensor, ...], input_indices_tuple: Tuple[Tensor, ...], labels: Tensor
    ) -> Tuple[Tensor, ...]:
        from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

        if len(input_indices_tuple) == 3 and len(indices_tuple) == 4:
            input_indices_tuple = lmu.convert_to_pairs(input_indices_tuple, labels)
        elif len(input_indices_tuple) == 4 and len(indices_tuple) == 3:
            input_indices_tuple = lmu.convert_to_triplets(input_indices_tuple, labels)
        return c_f.concatenate_indices_tuples(indices_tuple, input_indices_tuple)

    @torch.no_grad()
    def _adapt_and_enqueue(
        self, emb_for_queue: Tensor, labels_for_queue: Tensor, ids_for_queue: Optional[Tensor] = None
    ) -> Tensor:
        """Adapt the memory to ``emb_for_queue``'s statistics, enqueue it, return this rank's rows.

        Args:
            emb_for_queue: (Bq, D) rows to enqueue (this rank's).
            labels_for_queue: (Bq,) their labels.
            ids_for_queue: optional (Bq,) sample ids.

        Returns:
            (Bq,) long memory positions written by this rank's rows. With ``gather_distributed`` the
            queue writes the gathered batch of all ranks in rank order, so this rank's rows follow
            those of the lower ranks.
        """
        positions = self.queue.update(emb_for_queue, labels_for_queue, ids=ids_for_queue)  # (B_total,)
        if not (self.queue.gather_distributed and xdist.is_distributed()):
            return positions
        sizes = xdist.all_gather_sizes(emb_for_queue.shape[0], emb_for_queue.device)  # one per rank
        offset = sum(sizes[: xdist.get_rank()])
        return positions[offset : offset + emb_for_queue.shape[0]]

    def add_to_memory(self, embeddings: Tensor, labels: Tensor, batch_size: Optional[int] = None) -> None:
        """PML's method: store rows without adapting (sets ``curr_batch_idx``).

        Args:
            embeddings: (B, D) rows.
            labels: (B,) labels.
            batch_size: ignored (PML passes ``len(embeddings)``).
        """
        with torch.no_grad():
            self.curr_batch_idx = self.queue.enqueue(embeddings, labels)
