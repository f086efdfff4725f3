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
those of PML's ``CrossBatchMemory`` on any sequence of batches but one: after an ``enqueue_mask`` that
selects no rows while the memory is not yet full, PML marks its memory filled and compares against all
``memory_size`` rows (the never-written ones are zero vectors with label 0) until it is really full;
here only the rows written are compared against.

Inside ``with loss_fn.deferred_enqueue():`` (an extension, see :class:`~xbn_queue.queue.DeferredEnqueue`)
the loss is the same, computed against the memory as it will be, but the batch is written only when
the block ends without an exception: check the loss inside the block and a bad batch never reaches
the memory. Outside such a block a call writes at once, as PML's.

PML's attributes ``embedding_memory`` / ``label_memory`` (read-only copies), ``queue_idx``,
``has_been_filled`` and ``curr_batch_idx`` are provided, the memory follows the embeddings' device as
PML's does, and a PML state dict loads into this class (see ``_load_from_state_dict``).

The class subclasses PML's ``CrossBatchMemory`` (without allocating its buffers) so that PML code
that checks ``isinstance(loss, CrossBatchMemory)`` (e.g. ``DistributedLossWrapper``) accepts it and
the index bookkeeping (``create_indices_tuple``, ``supported_losses``) is PML's own.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, Optional, Tuple

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
from ._compat import follow_device
from .queue import AdaptiveQueue, DeferredEnqueue, PendingWrite

__all__ = ["AdaptiveCrossBatchMemory", "remove_same_id_pairs"]


def remove_same_id_pairs(indices_tuple: Tuple[Tensor, ...], same: Tensor) -> Tuple[Tensor, ...]:
    """Drop from a PML indices tuple every pair of an anchor and a reference row of the same sample.

    Args:
        indices_tuple: ``(a1, p, a2, n)`` pairs or ``(a, p, n)`` triplets; anchors index the batch,
            the others the reference rows (the memory).
        same: ``(B, n)`` bool, ``same[i, j]`` where anchor ``i`` and reference row ``j`` are one sample.

    Returns:
        The tuple without those pairs (a triplet goes when its positive or its negative is one);
        like PML's ``remove_self_comparisons``, boolean selection (a host synchronisation on a GPU).
    """
    if len(indices_tuple) == 4:
        a1, p, a2, n = indices_tuple
        keep_p, keep_n = ~same[a1, p], ~same[a2, n]  # (P,), (N,)
        return a1[keep_p], p[keep_p], a2[keep_n], n[keep_n]
    a, p, n = indices_tuple
    keep = ~(same[a, p] | same[a, n])  # (T,)
    return a[keep], p[keep], n[keep]


class AdaptiveCrossBatchMemory(DeferredEnqueue, CrossBatchMemory):
    """PML ``CrossBatchMemory`` whose memory is an :class:`~xbn_queue.AdaptiveQueue` (XBM / XBN / AXBN).

    Args:
        loss: a PML loss supported by ``CrossBatchMemory`` (``CrossBatchMemory.supported_losses()``).
        embedding_size: D, the embedding dimension.
        memory_size: M, the number of stored rows.
        miner: optional PML miner, called as ``miner(embeddings, labels, memory, memory_labels)``.
        adaptation: ``"none"`` (plain XBM), ``"xbn"`` (Eq. 6) or ``"axbn"`` (Kalman, Eq. 18-23).
        add_batch_loss: also add the plain loss on the batch itself (the paper's XBM*): the miner
            (if any) is applied to the batch and ``loss(embeddings, labels, batch_indices)`` is added.
        mask_same_ids: remove from the (mined or all) pairs / triplets every pair of an anchor and a
            stored row of the same sample (an older embedding of it, enqueued in an earlier step),
            found by the ``ids`` given to ``forward``. The rows written by the current call are kept
            (PML's self-comparison removal already drops each row's own copy; with ``enqueue_mask``
            they are the anchors' positives). Off by default (PML's behaviour).
        **queue_kwargs: passed to :class:`~xbn_queue.AdaptiveQueue` (``eps``, ``kalman_*``,
            ``gather_distributed``, ``dtype``, ``warmup_steps``, ``warmup_rows``, ...). During the
            warm-up (``queue.in_warmup`` after the step's enqueue) the memory fills and adapts but
            the loss is what PML's ``CrossBatchMemory`` computes with a memory holding only this
            call's rows: ``loss(embeddings, labels, miner(embeddings, labels))`` (with the input
            ``indices_tuple`` combined); with ``enqueue_mask`` the anchors against the enqueued rows. With ``gather_distributed=True`` every rank
            enqueues the batches of all ranks and computes the loss of its own rows against that
            shared memory (do not also wrap it in PML's ``DistributedLossWrapper``, which gathers
            the batch itself and is meant for ``gather_distributed=False``).

    Attributes:
        queue: the :class:`~xbn_queue.AdaptiveQueue` holding the memory.
        loss, miner, embedding_size, memory_size: as given.
        curr_batch_idx: (B,) memory rows written by this rank's batch in the last call.
        embedding_memory, label_memory: (memory_size, embedding_size) and (memory_size,) read-only
            copies of the whole memory, in the dtypes of the last embeddings / labels given (as PML's).

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
        mask_same_ids: bool = False,
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
        self.mask_same_ids = bool(mask_same_ids)
        self.queue = AdaptiveQueue(
            size=self.memory_size, dim=self.embedding_size, adaptation=adaptation, **queue_kwargs
        )
        self.curr_batch_idx = torch.zeros(0, dtype=torch.long)
        # dtypes of the last embeddings / labels given: PML casts its memory to them at every call, so
        # ``embedding_memory`` / ``label_memory`` are read back in them (host-side state, no sync).
        self._memory_dtype: torch.dtype = torch.float32
        self._label_dtype: torch.dtype = torch.long
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

    @property
    def embedding_memory(self) -> Tensor:
        """(memory_size, embedding_size) copy of the whole memory, as PML's attribute of that name.

        Rows in storage order (row ``i`` is memory position ``i``); rows never written are zeros, as in
        PML. In the dtype of the last embeddings given (float32 before the first call), as PML casts its
        memory to the embeddings' dtype at every call, on the memory's device. A copy: writing into it
        does not change the memory; assigning to the attribute does (see the setter).
        """
        n = len(self.queue)
        out = torch.zeros(
            self.memory_size, self.embedding_size, dtype=self._memory_dtype, device=self.queue.memory.device
        )  # (M, D)
        out[:n] = self.queue.valid_memory()  # (n, D), cast on the copy
        return out

    @embedding_memory.setter
    def embedding_memory(self, value: Tensor) -> None:
        """``loss.embedding_memory = rows``: replace the stored rows, as PML users do to move or cast it.

        ``rows`` is (memory_size, embedding_size), any floating dtype; it is stored in the queue's
        storage dtype, the memory moves to its device, and later reads come back in its dtype (as
        PML's attribute would). The number of rows counted as filled does not change; the running
        statistics are recomputed at the next adaptation.

        Raises:
            ValueError: if ``rows`` is not a floating (memory_size, embedding_size) tensor.
        """
        shape = (self.memory_size, self.embedding_size)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape or not value.is_floating_point():
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"embedding_memory must be a floating tensor of shape {shape}, got {got}")
        self._follow_device(value.device)
        self.queue.replace_rows(value)
        self._memory_dtype = value.dtype

    @property
    def label_memory(self) -> Tensor:
        """(memory_size,) copy of the labels of the whole memory (zeros where never written), as PML's
        attribute of that name, in the dtype of the last labels given (int64 before the first call).
        Assigning an integer (memory_size,) tensor replaces the stored labels (``ValueError`` otherwise)."""
        return self.queue.label_memory.to(dtype=self._label_dtype, copy=True)

    @label_memory.setter
    def label_memory(self, value: Tensor) -> None:
        shape = (self.memory_size,)
        if (
            not isinstance(value, Tensor)
            or tuple(value.shape) != shape
            or value.is_floating_point()
            or value.is_complex()
        ):
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"label_memory must be an integer tensor of shape {shape}, got {got}")
        self._follow_device(value.device)
        self.queue.replace_labels(value)
        self._label_dtype = value.dtype

    def reset_queue(self) -> None:
        """Empty the memory (rows, labels, pointer and adaptation state)."""
        self.queue.reset()

    def _follow_device(self, device: torch.device) -> None:
        """Move the memory (and ``curr_batch_idx``) to ``device`` if it is elsewhere, as PML does.

        PML's ``CrossBatchMemory`` moves its memory to the embeddings' device at every call, so it works
        when only the model was moved to a GPU; this does the same, once (a host-side device check).
        """
        if follow_device(self.queue, self.queue.memory, device):
            self.curr_batch_idx = self.curr_batch_idx.to(device)

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
                embeddings, and ``mask_same_ids`` can find older rows of the same sample; once given, pass
                them on every call (until ``reset_queue()``). Required with ``mask_same_ids``.

        Returns:
            Scalar loss (plus the plain batch loss when ``add_batch_loss``).

        Raises:
            ValueError: on ``indices_tuple`` together with ``enqueue_mask``, embeddings that are not
                (B, embedding_size), labels, mask or ids of another length, more rows to enqueue than
                ``memory_size``, or ``mask_same_ids`` without ids.
        """
        self._check_inputs(embeddings, labels, indices_tuple, enqueue_mask, ids)
        self._check_can_hold()
        self.reset_stats()
        device = embeddings.device
        labels = c_f.to_device(labels, device=device)
        self._follow_device(device)
        (embeddings, labels, anchor_ids), (emb_for_queue, labels_for_queue, ids_for_queue) = _split_by_mask(
            embeddings, labels, ids, enqueue_mask)
        if emb_for_queue.shape[0] > self.memory_size:
            raise ValueError(f"cannot enqueue {emb_for_queue.shape[0]} rows into a memory of memory_size={self.memory_size}")
        pending = self._adapt_and_enqueue(emb_for_queue, labels_for_queue, ids_for_queue)  # held, or None: written
        self._memory_dtype, self._label_dtype = embeddings.dtype, labels.dtype

        if self.queue.in_warmup if pending is None else pending.in_warmup:
            return self._warmup_loss(embeddings, labels, emb_for_queue, labels_for_queue, indices_tuple, enqueue_mask)

        E_mem, L_mem = self._memory_for_loss(pending, embeddings, labels)  # (n, D), (n,)
        # with a mask the anchors are not in the memory: no self-comparison to remove (as in PML)
        do_remove_self_comparisons = enqueue_mask is None and self.curr_batch_idx.numel() > 0
        mem_indices = self.create_indices_tuple(embeddings, labels, E_mem, L_mem, indices_tuple, do_remove_self_comparisons)
        if self.mask_same_ids:
            same = self.queue.same_id_mask(anchor_ids, exclude=self.curr_batch_idx, pending=pending)  # (Ba, n)
            mem_indices = remove_same_id_pairs(mem_indices, same)
        loss = self.loss(embeddings, labels, mem_indices, E_mem, L_mem)
        if self.add_batch_loss:
            loss = loss + self._batch_loss(embeddings, labels, indices_tuple)
        return loss

    def _check_inputs(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: Optional[Tuple[Tensor, ...]],
        enqueue_mask: Optional[Tensor],
        ids: Optional[Tensor],
    ) -> None:
        """The argument checks of :meth:`forward` (shapes only: no device value is read)."""
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be (B, embedding_size={self.embedding_size}), "
                f"got {tuple(getattr(embeddings, 'shape', ()))}"
            )
        batch = embeddings.shape[0]
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != batch:
            raise ValueError(f"labels must be (B={batch},), got {tuple(getattr(labels, 'shape', ()))}")
        if ids is not None and (not isinstance(ids, Tensor) or ids.shape != (batch,)):
            raise ValueError(f"ids must be (B={batch},), got {tuple(getattr(ids, 'shape', ()))}")
        if self.mask_same_ids and ids is None:
            raise ValueError("ids are required with mask_same_ids=True: pass loss_fn(embeddings, labels, ids=sample_ids)")
        if enqueue_mask is not None and enqueue_mask.shape != (batch,):
            raise ValueError(f"enqueue_mask must be (B={batch},), got {tuple(enqueue_mask.shape)}")

    def _memory_for_loss(self, pending: Optional[PendingWrite], embeddings: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """The loss's reference rows ``(n, D)`` and labels ``(n,)``, in the dtypes and on the device of the batch.

        Like PML, the loss reads the memory in place (a live view, cast to the loss dtype; a copy only when the
        dtypes differ): PML's supported losses never modify their reference embeddings. With a batch held back
        (``pending``), the memory as it will be once that batch is written (the same values), the batch not in it.
        """
        if pending is None:
            rows, row_labels = self.queue.valid_memory(), self.queue.valid_labels()  # (n, D), (n,)
        else:
            rows, row_labels, _ = self.queue.preview(pending)  # (n, D), (n,)
        return (rows.to(device=embeddings.device, dtype=embeddings.dtype),
                row_labels.to(device=embeddings.device, dtype=labels.dtype))

    def _warmup_loss(
        self,
        embeddings: Tensor,
        labels: Tensor,
        emb_for_queue: Tensor,
        labels_for_queue: Tensor,
        indices_tuple: Optional[Tuple[Tensor, ...]],
        enqueue_mask: Optional[Tensor],
    ) -> Tensor:
        """The loss without the memory: PML's ``CrossBatchMemory`` with a memory holding only this call's rows.

        Without ``enqueue_mask`` that is the plain batch loss (a row's comparison with its own copy
        removed, the other rows of the batch as references). With it, the anchors (rows not enqueued)
        against the enqueued rows, detached as PML's memory is.
        """
        if enqueue_mask is None:
            return self._batch_loss(embeddings, labels, indices_tuple)
        ref, ref_labels = emb_for_queue.detach(), labels_for_queue  # (Bq, D), (Bq,)
        mem_indices = self.create_indices_tuple(embeddings, labels, ref, ref_labels, indices_tuple, False)
        return self.loss(embeddings, labels, mem_indices, ref, ref_labels)

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
    ) -> Optional[PendingWrite]:
        """Adapt the memory to ``emb_for_queue``'s statistics and enqueue it (inside :meth:`deferred_enqueue`:
        stage it, held until the block ends); set ``curr_batch_idx`` to this rank's rows.

        Args:
            emb_for_queue: (Bq, D) rows to enqueue (this rank's).
            labels_for_queue: (Bq,) their labels.
            ids_for_queue: optional (Bq,) sample ids.

        Returns:
            The held :class:`~xbn_queue.queue.PendingWrite` inside a ``deferred_enqueue()`` block, else
            ``None`` (written). ``curr_batch_idx``: (Bq,) long memory positions of this rank's rows. With
            ``gather_distributed`` the queue writes the gathered batch of all ranks in rank order, so
            this rank's rows follow those of the lower ranks.
        """
        pending = None
        if self._deferring:
            pending = self.queue.stage(emb_for_queue, labels_for_queue, ids=ids_for_queue)
            self._hold(pending)
            positions = pending.positions  # (B_total,)
        else:
            positions = self.queue.update(emb_for_queue, labels_for_queue, ids=ids_for_queue)  # (B_total,)
        if self.queue.gather_distributed and xdist.is_distributed():
            sizes = xdist.all_gather_sizes(emb_for_queue.shape[0], emb_for_queue.device)  # one per rank
            offset = sum(sizes[: xdist.get_rank()])
            positions = positions[offset : offset + emb_for_queue.shape[0]]
        self.curr_batch_idx = positions
        return pending

    @torch.no_grad()
    def _write_held(self, pending: PendingWrite) -> None:
        """End of a ``deferred_enqueue()`` block: write the held batch."""
        self.queue.commit(pending)

    def add_to_memory(self, embeddings: Tensor, labels: Tensor, batch_size: Optional[int] = None) -> None:
        """PML's method: store rows without adapting (sets ``curr_batch_idx``).

        Args:
            embeddings: (B, D) rows.
            labels: (B,) labels.
            batch_size: ignored (PML passes ``len(embeddings)``).
        """
        self._follow_device(embeddings.device)
        with torch.no_grad():
            self.curr_batch_idx = self.queue.enqueue(embeddings, labels)

    # ------------------------------------------------------------------ PML checkpoints
    def _load_from_state_dict(
        self,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        """Also load a state dict of PML's ``CrossBatchMemory`` (keys ``embedding_memory``, ``label_memory``).

        PML saves its rows and labels but not its write pointer ``queue_idx`` (a plain attribute). The
        PML keys are turned into this module's ``queue.*`` keys (nothing else changes, so a prefix such as
        Lightning's ``state_dict`` nesting works, and ``strict=True`` holds):

        * ``queue_idx`` (and ``has_been_filled``) are used when present (an int or a 0-d tensor, e.g.
          added by the user beside PML's keys); then the memory continues exactly as PML's would have.
        * Without ``queue_idx``, a memory not yet filled is recovered exactly: PML writes rows in order
          into a zero-initialised memory, so its rows are the leading non-zero ones and the pointer
          follows them. A full memory keeps all its rows, but the position of the oldest row is lost:
          writing resumes at row 0 (a warning says so). PML itself would restart at row 0 and ignore
          the loaded rows.

        The adaptation state starts fresh (PML has none) and the running statistics are recomputed
        from the loaded rows. A state dict of this class loads as usual.
        """
        emb_key, lab_key = prefix + "embedding_memory", prefix + "label_memory"
        if emb_key in state_dict and not any(k.startswith(prefix + "queue.") for k in state_dict):
            try:
                translated = self._queue_state_from_pml(
                    state_dict.pop(emb_key),
                    state_dict.pop(lab_key, None),
                    state_dict.pop(prefix + "queue_idx", None),
                    state_dict.pop(prefix + "has_been_filled", None),
                )
            except ValueError as e:
                error_msgs.append(f"{prefix}embedding_memory: {e}")
            else:
                for key, value in translated.items():
                    state_dict[prefix + "queue." + key] = value
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _queue_state_from_pml(
        self, emb: Tensor, lab: Optional[Tensor], queue_idx: Any, has_been_filled: Any
    ) -> Dict[str, Tensor]:
        """The ``queue`` state dict equivalent to PML's memory ``emb`` (M, D), labels ``lab`` (M,).

        Raises:
            ValueError: on shapes that do not match this memory.
        """
        m, d = self.memory_size, self.embedding_size
        if not isinstance(emb, Tensor) or tuple(emb.shape) != (m, d):
            raise ValueError(f"expected a PML memory of shape ({m}, {d}), got {tuple(getattr(emb, 'shape', ()))}")
        if not isinstance(lab, Tensor) or tuple(lab.shape) != (m,):
            got = tuple(getattr(lab, "shape", ()))
            raise ValueError(f"expected PML's label_memory of shape ({m},) beside it, got {got}")
        written = (emb != 0).any(dim=1)  # (M,) rows PML has written (it starts from zeros)
        if queue_idx is not None:
            ptr = int(queue_idx) % m
            if has_been_filled is not None:
                filled = bool(has_been_filled)
            else:
                filled = bool(written[ptr:].any()) if ptr > 0 else bool(written.any())
            n = m if filled else ptr
        elif not bool(written.all()):
            n = int(written.nonzero().max()) + 1 if bool(written.any()) else 0  # rows 0..n-1 were written
            ptr = n % m
        else:
            n, ptr = m, 0
            warnings.warn(
                "PML's CrossBatchMemory does not save queue_idx: the loaded memory is full and the position of "
                "its oldest row is unknown, so all rows are kept and writing resumes at row 0 (add "
                "'queue_idx' to the state dict to continue exactly)",
                UserWarning,
                stacklevel=4,
            )
        fresh = copy.deepcopy(self.queue)
        fresh.reset()
        if n > 0:
            fresh.enqueue(emb[:n].to(torch.float32), lab[:n].to(torch.long))  # rows 0..n-1, sums synced
        state = fresh.state_dict()
        state["ptr"] = torch.full_like(state["ptr"], ptr)
        return state


def _split_by_mask(
    embeddings: Tensor, labels: Tensor, ids: Optional[Tensor], enqueue_mask: Optional[Tensor]
) -> Tuple[Tuple[Tensor, Tensor, Optional[Tensor]], Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """``(anchors, labels, ids)`` and ``(rows to enqueue, labels, ids)`` of a batch: PML's ``enqueue_mask``
    (True: enqueued, False: an anchor); without a mask the whole batch is both."""
    if enqueue_mask is None:
        return (embeddings, labels, ids), (embeddings, labels, ids)
    mask = enqueue_mask.to(device=embeddings.device, dtype=torch.bool)  # (B,)
    mask_ids = mask.to(ids.device) if ids is not None else None
    anchors = (embeddings[~mask], labels[~mask], ids[~mask_ids] if ids is not None else None)  # (Ba, D), (Ba,)
    queued = (embeddings[mask], labels[mask], ids[mask_ids] if ids is not None else None)  # (Bq, D), (Bq,)
    return anchors, queued
