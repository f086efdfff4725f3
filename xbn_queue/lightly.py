"""Drop-in adaptive memory bank for lightly's losses (e.g. ``NTXentLoss`` in MoCo).

Example:
    >>> from lightly.loss import NTXentLoss
    >>> from xbn_queue.lightly import AdaptiveMemoryBank
    >>> criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
    >>> criterion.memory_bank = AdaptiveMemoryBank(size=(4096, 128), adaptation="xbn")
    >>> loss = criterion(query, key)  # key's statistics adapt the bank, then key is enqueued

lightly's ``NTXentLoss`` calls ``self.memory_bank.forward(out1, update=out0.requires_grad)`` and uses
the returned bank (D, n) as negatives without normalizing them.

With ``adaptation="none"`` and the other arguments at their defaults the bank is lightly's
``MemoryBankModule``: same size checks and messages, ``size=0`` disables it, it starts with random
unit rows drawn as lightly draws them, returns the rows as stored, and writes a batch the way
lightly does (the rows that fit before the end of the ring; the rest of that batch is dropped and
the pointer goes back to row 0). Where the defaults depend on the adaptation:

* ``init``: ``"random"`` (lightly's N random unit rows) for ``"none"``; ``"empty"`` for ``"xbn"`` /
  ``"axbn"``, because XBN moves the stored rows to the batch's moments using the moments of the
  memory, and random rows mixed with real keys would make those moments wrong. An empty bank
  returns only the rows enqueued so far, (D, 0) on the very first call.
* ``normalize``: ``False`` for ``"none"`` (rows as stored, as lightly); ``True`` for ``"xbn"`` /
  ``"axbn"``: the moment matching moves rows off the unit sphere and ``NTXentLoss`` does not
  normalize the negatives it receives, so adapted rows are returned L2-normalized (the stored rows
  stay as adapted).

Same-sample negatives: lightly's ``NTXentLoss`` cannot be told which bank rows are older keys of
the query's own image (MoCo's open issue). :class:`AdaptiveNTXentLoss` is lightly's ``NTXentLoss``
with an :class:`AdaptiveMemoryBank` whose ``forward`` also takes sample ids: the bank stores them
and, with ``mask_same_ids=True``, those rows are left out of that query's negatives::

    criterion = AdaptiveNTXentLoss(temperature=0.2, memory_bank_size=(4096, 128), mask_same_ids=True)
    loss = criterion(query, key, ids=sample_ids)

Labels (supervised contrastive learning with a memory, lightly #1554): ``forward(output, labels=y,
update=True)`` stores ``y`` beside the rows and returns ``(output, bank, bank_labels)``, the labels of
the returned rows; a loss such as PML's ``SupConLoss`` then takes the bank's rows with the same label
as positives::

    bank = AdaptiveMemoryBank(size=(4096, 128), adaptation="xbn", feature_dim_first=False)
    key, memory, memory_labels = bank(key, labels=y, update=True)   # memory (n, D), memory_labels (n,)
    loss = SupConLoss(temperature=0.1)(query, y, ref_emb=torch.cat([key, memory]),
                                       ref_labels=torch.cat([y, memory_labels]))  # PML's SupConLoss

Without ``labels`` the call is lightly's (a 2-tuple). Labels are all or nothing: once the steps store
labels every later step must pass them, and rows stored without labels refuse labels, until
``reset()``. Labels must be >= 0: lightly's random initial rows carry label -1 (no class), so they
are negatives of every query.

Inside ``with bank.deferred_enqueue():`` (:class:`~xbn_queue.queue.DeferredEnqueue`) a ``forward`` with
``update=True`` adapts and returns the bank as usual, and the batch is written when the block ends
without an exception (dropped when it raises), so a loss can be checked before its keys are stored.

Unlike lightly's bank (non-persistent buffers) all state is in registered, persistent buffers of
``queue``, so ``state_dict()`` checkpoints the bank. A lightly checkpoint, which has no bank keys,
still loads with ``strict=True``: the bank then starts fresh, with a warning.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Module

try:
    from lightly.loss import NTXentLoss
    from lightly.models.modules.memory_bank import MemoryBankModule
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("xbn_queue.lightly needs lightly: pip install 'xbn-queue[lightly]'") from e

from . import distributed as xdist
from ._compat import follow_device
from .adaptation import build_adaptation
from .queue import AdaptiveQueue, DeferredEnqueue

__all__ = ["AdaptiveMemoryBank", "AdaptiveNTXentLoss"]

_INITS = ("random", "empty")
_NO_CLASS = -1  # label of lightly's random initial rows: a negative of every query
_UNLABELLED = -2  # label_memory mark of rows written without labels while the bank has none (see _check_labels)


def _check_size(size: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    """lightly's size rules: ``0`` (disabled) or ``(num_features, dim)`` of non-negative ints.

    Raises:
        ValueError: with the message lightly's own ``MemoryBankModule`` gives for that size (it is
            asked, so the text follows the installed lightly), or ours where lightly would accept a
            size we cannot use (a bare positive int on older lightly, a zero feature dimension).
    """
    try:
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
    except TypeError:
        raise ValueError(f"Illegal memory bank size {size!r}, expected a (num_features, dim) tuple or 0") from None
    ints = all(isinstance(s, int) and not isinstance(s, bool) for s in size_tuple)
    if ints and (size_tuple == (0,) or (len(size_tuple) == 2 and min(size_tuple) >= 0)):
        if size_tuple == (0,) or size_tuple[0] == 0 or size_tuple[1] > 0:
            return size_tuple
    if ints:
        try:  # lightly checks sizes before it allocates anything: reuse its exact message
            MemoryBankModule(size=size)
        except ValueError as e:
            raise ValueError(str(e)) from None
    raise ValueError(
        f"Illegal memory bank size {size!r}, expected a (num_features, dim) tuple of ints with dim > 0, "
        "or 'size=0' to disable the memory bank."
    )


class AdaptiveMemoryBank(DeferredEnqueue, MemoryBankModule):
    """A lightly ``MemoryBankModule`` backed by an :class:`~xbn_queue.AdaptiveQueue` (XBM / XBN / AXBN).

    It subclasses lightly's ``MemoryBankModule`` (without allocating lightly's bank) so that it is
    accepted wherever lightly expects a memory bank; all state lives in ``self.queue``.

    Args:
        size: ``(N, D)``: number of stored rows and their dimension; ``0`` (or ``(0, D)``) disables
            the bank, which then returns ``(output, None)`` as lightly's does.
        adaptation: ``"xbn"`` (Eq. 6, the default), ``"axbn"`` (Eq. 18-23) or ``"none"`` (lightly's
            plain memory bank).
        gather_distributed: all-gather the batch across ranks before the statistics and the enqueue
            (as lightly's bank does before its enqueue); a no-op without a process group.
        feature_dim_first: return the bank as (D, n) (lightly's default) instead of (n, D).
        normalize: L2-normalize the returned rows (the stored rows are left as they are). ``None``:
            ``True`` when the adaptation changes rows (``"xbn"``, ``"axbn"``), ``False`` for ``"none"``.
        init: ``"random"``: start with N random unit rows (lightly's start, drawn from torch's global
            generator as lightly does); ``"empty"``: start empty and return only the rows enqueued.
            ``None``: ``"random"`` for ``"none"``, ``"empty"`` for an adapting bank.
        mask_same_ids: when ``forward`` is given sample ids, compute :attr:`negative_mask`, the bank
            rows holding older keys of each query's sample, for the loss to leave out
            (:class:`AdaptiveNTXentLoss` does). Off by default.
        **queue_kwargs: further :class:`~xbn_queue.AdaptiveQueue` arguments (``eps``, ``kalman_*``,
            ``warmup_steps``, ``warmup_rows``, ...). During the warm-up (``queue.in_warmup`` after
            the step) the bank still adapts and fills but ``forward`` returns ``(output, None)``, so
            lightly's ``NTXentLoss`` computes its loss without a memory bank (the other samples of
            the batch as negatives). Random initial rows count as stored rows: use
            ``init="empty"`` with ``warmup_rows``.

    Attributes:
        negative_mask: ``(B, n)`` bool from the last ``forward`` with ids and ``mask_same_ids``: row
            ``j`` of the returned bank holds an older key of the sample of query ``i``; else ``None``.

    Raises:
        ValueError: on a size lightly refuses (with lightly's message), a zero feature dimension, an
            unknown ``init`` or adaptation.
    """

    def __init__(
        self,
        size: Union[int, Sequence[int]],
        adaptation: str = "xbn",
        gather_distributed: bool = False,
        feature_dim_first: bool = True,
        normalize: Optional[bool] = None,
        init: Optional[str] = None,
        mask_same_ids: bool = False,
        **queue_kwargs: Any,
    ) -> None:
        # Skip MemoryBankModule.__init__: it allocates lightly's own (N, D) bank.
        Module.__init__(self)
        self.mask_same_ids = bool(mask_same_ids)
        self.negative_mask: Optional[Tensor] = None
        self.size = _check_size(size)
        if init is not None and init not in _INITS:
            raise ValueError(f"init must be one of {', '.join(_INITS)} or None, got {init!r}")
        self.gather_distributed = bool(gather_distributed)
        self.feature_dim_first = bool(feature_dim_first)
        self.adaptation = adaptation
        self.queue: Optional[AdaptiveQueue] = None
        if self.size[0] == 0:  # disabled, as lightly's size 0
            active = build_adaptation(adaptation, 1).active  # still refuse an unknown name
        else:
            # The bank gathers across ranks itself (once per step, for both the statistics and the
            # enqueue), so its queue does not gather again.
            self.queue = AdaptiveQueue(size=self.size[0], dim=self.size[1], adaptation=adaptation, **queue_kwargs)
            active = self.queue.adaptation.active
        self.normalize = active if normalize is None else bool(normalize)
        self.init = init if init is not None else ("empty" if active else "random")
        # Host-side copy of the write pointer (lightly's write rule needs it on the host; reading the
        # queue's buffer would wait for the device). None: unknown, read once from the buffer.
        self._ptr: Optional[int] = 0
        self._fill_initial()
        self.register_load_state_dict_post_hook(_forget_host_ptr)

    # ------------------------------------------------------------------ lightly's interface
    def forward(
        self,
        output: Tensor,
        labels: Optional[Tensor] = None,
        update: bool = False,
        ids: Optional[Tensor] = None,
    ) -> Union[Tuple[Tensor, Optional[Tensor]], Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]:
        """Return the (adapted) bank, then enqueue ``output`` (with its labels and ids) if ``update``.

        Args:
            output: (B, D) embeddings of this batch (e.g. the keys), returned unchanged.
            labels: optional (B,) integer class labels (>= 0) of ``output``'s rows (lightly's signature,
                where they are ignored). Given, they are stored beside the rows (when ``update``) and the
                labels of the returned bank come back as a third element. All or nothing: once a step
                (``update=True``) stored labels, every later step must pass them; rows stored without
                labels refuse them; ``reset()`` starts over. Labels stored only by :meth:`enqueue` (a
                prefill) before the first step are dropped if that step has none (lightly ignores them).
            update: adapt the stored rows to ``output``'s statistics, return them, then enqueue
                ``output`` as lightly does: the rows that fit before the end of the ring (all of them
                when ``ptr + B < N``), after which the pointer is back at row 0. Without ``update`` the
                bank is returned as it is and nothing changes.
            ids: optional (B,) integer sample ids of ``output``'s rows, stored beside them (rows
                written without ids, e.g. the random initial ones, carry id -1). With
                ``mask_same_ids`` they also set :attr:`negative_mask` for the returned bank.

        Returns:
            ``(output, bank)`` with ``bank`` (D, n) if ``feature_dim_first`` else (n, D), float32,
            detached, a copy (never the live memory), L2-normalized rows if ``normalize``; n = N for a
            randomly initialised bank, the number of rows enqueued so far (up to N) for an empty start.
            ``(output, None)`` for a disabled bank (size 0) and during the warm-up. With ``labels``:
            ``(output, bank, bank_labels)``, ``bank_labels`` (n,) int64 in the order of the bank's rows
            (-1 for random initial rows), ``None`` where ``bank`` is ``None``.

        Raises:
            ValueError: if ``output`` is not (B, D) with finite values, ``ids`` or ``labels`` not (B,)
                integers, or labels given on some steps and not on others (before anything changes).
        """
        self.negative_mask = None
        with_labels = labels is not None
        if self.queue is None:
            return (output, None, None) if with_labels else (output, None)
        if update:
            self._check_can_hold()
        self._check_output(output, ids)
        follow_device(self.queue, self.queue.memory, output.device)
        batch_labels, drop_labels = self._check_labels(labels, output.shape[0], write=update, step=update)
        with torch.no_grad():
            if update:
                batch, batch_ids, batch_labels = self._adapt_to_batch(output, ids, batch_labels, drop_labels)
            bank = self._snapshot()  # (n, D), a copy
            bank_labels = self.queue.valid_labels().clone() if with_labels else None  # (n,), the rows of bank
            if ids is not None and self.mask_same_ids:
                self.negative_mask = self.queue.same_id_mask(ids)  # (B, n): the bank returned, before the write
            in_warmup = self._enqueue_step(batch, batch_ids, batch_labels) if update else self.queue.in_warmup
        if in_warmup:  # the memory stays out of the loss: lightly's loss without a bank
            self.negative_mask = None
            return (output, None, None) if with_labels else (output, None)
        if self.feature_dim_first:
            bank = bank.t()  # (D, n)
        return (output, bank, bank_labels) if with_labels else (output, bank)

    def _check_output(self, output: Tensor, ids: Optional[Tensor]) -> None:
        """The shape checks of :meth:`forward` (the values are checked by the queue, on the device)."""
        if ids is not None and (not isinstance(ids, Tensor) or tuple(ids.shape) != (output.shape[0],)):
            raise ValueError(f"ids must be (B={output.shape[0]},), got {tuple(getattr(ids, 'shape', ()))}")
        if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[1] != self.size[1]:
            raise ValueError(f"output must be (B, D={self.size[1]}), got {tuple(getattr(output, 'shape', ()))}")

    def _adapt_to_batch(
        self, output: Tensor, ids: Optional[Tensor], labels: Optional[Tensor], drop_labels: bool
    ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Adapt the stored rows to this step's batch (gathered over ranks with ``gather_distributed``).

        Returns:
            ``(batch (B', D), ids (B',) or None, labels (B',) or None)``: checked once (shape, dtype,
            finiteness per the queue's ``validate``) for both the adaptation and the write, no second
            check, no host read on CUDA; ``B' = B * world`` when gathered, in rank order.
        """
        batch = self.queue._check_embeddings(output.detach(), "output")
        batch_ids = None if ids is None else self.queue._check_index(ids, output.shape[0], "ids")
        if drop_labels:
            self._drop_labels()
        if self.gather_distributed and xdist.is_distributed():
            batch = xdist.all_gather_cat(batch)  # (B * world, D), rank order
            batch_ids = None if batch_ids is None else xdist.all_gather_cat(batch_ids)
            labels = None if labels is None else xdist.all_gather_cat(labels)
        self.queue._adapt(batch)  # to the statistics of the whole (gathered) batch
        return batch, batch_ids, labels

    def _enqueue_step(self, batch: Tensor, ids: Optional[Tensor], labels: Optional[Tensor]) -> bool:
        """Write a step's (checked, gathered) batch now, or hold it until the ``deferred_enqueue()`` block ends.

        Returns:
            Whether the memory is in its warm-up once the batch is written (a Python bool: no host read).
        """
        if self._deferring:  # written when the deferred_enqueue() block ends
            self._hold((batch, ids, labels))
            return self.queue._in_warmup(min(len(self.queue) + self._rows_written(batch.shape[0]), self.size[0]))
        self._write(batch, checked=True, ids=ids, labels=labels)
        return self.queue.in_warmup

    @property
    def bank(self) -> Tensor:  # type: ignore[override]
        """(n, D) float32 copy of the stored rows as stored (lightly's attribute; not normalized)."""
        if self.queue is None:
            return torch.empty(self.size, dtype=torch.float32)
        return self.queue.embeddings  # already a float32 copy

    @property
    def bank_ptr(self) -> Tensor:  # type: ignore[override]
        """(1,) long tensor with the write pointer (lightly's attribute), on the bank's device."""
        if self.queue is None:
            return torch.zeros(1, dtype=torch.long)
        return self.queue.ptr.reshape(1).clone()

    @torch.no_grad()
    def _init_memory_bank(self, size: Tuple[int, ...]) -> None:
        """Back to the initial state (lightly's method name): random unit rows or empty, per ``init``."""
        self.reset()

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch: Tensor) -> None:
        """Enqueue ``batch`` (B, D) without adapting, with lightly's write rule (lightly's method name)."""
        if self.queue is None:
            return
        batch = batch.detach()
        follow_device(self.queue, self.queue.memory, batch.device)
        self._check_labels(None, batch.shape[0], write=True, step=False)  # raises if the rows carry labels
        if self.gather_distributed and xdist.is_distributed():
            batch = xdist.all_gather_cat(batch)
        self._write(batch)

    # ------------------------------------------------------------------ ours
    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Optional[Tensor] = None, ids: Optional[Tensor] = None) -> None:
        """Store ``embeddings`` (B, D) without adapting, every row (e.g. for :func:`xbn_queue.prefill`):
        rows that reach the end of the ring continue at row 0 (lightly's write rule, used by
        ``forward``, drops them); ``labels`` and ``ids`` are kept. Labels stored here before the first
        step are dropped if that step passes none (see :meth:`forward`).

        Raises:
            ValueError: on a disabled bank, what the queue refuses (shapes, non-finite values), or
                labels given inconsistently with the rows already stored.
        """
        if self.queue is None:
            raise ValueError("enqueue: the memory bank is disabled (size 0)")
        embeddings = embeddings.detach()
        follow_device(self.queue, self.queue.memory, embeddings.device)
        batch = self.queue._check_embeddings(embeddings, "embeddings")
        batch_ids = None if ids is None else self.queue._check_index(ids, batch.shape[0], "ids")
        batch_labels, _ = self._check_labels(labels, batch.shape[0], write=True, step=False)
        if self.gather_distributed and xdist.is_distributed():
            batch = xdist.all_gather_cat(batch)
            batch_ids = None if batch_ids is None else xdist.all_gather_cat(batch_ids)
            batch_labels = None if batch_labels is None else xdist.all_gather_cat(batch_labels)
        done = 0
        while done < batch.shape[0]:  # in pieces that end at the ring's end: lightly's rule keeps each whole
            ptr = self._ptr if self._ptr is not None else int(self.queue.ptr)  # a sync only after a load
            k = min(batch.shape[0] - done, self.size[0] - ptr)
            self._write(batch[done : done + k], checked=True,
                        ids=None if batch_ids is None else batch_ids[done : done + k],
                        labels=None if batch_labels is None else batch_labels[done : done + k])
            done += k

    def reset(self) -> None:
        """Back to the initial state: the adaptation state forgotten, the rows random or empty per ``init``."""
        if self.queue is None:
            return
        self.queue.reset()
        self._ptr = 0
        self._fill_initial()

    def _fill_initial(self) -> None:
        """Fill the queue with lightly's initial bank when ``init == "random"``.

        lightly draws ``torch.randn(N, D)`` from the global generator and L2-normalizes the rows; the
        same draw here gives the same bank for the same seed.
        """
        if self.queue is None or self.init != "random":
            return
        with torch.no_grad():
            rows = torch.nn.functional.normalize(torch.randn(self.size), dim=-1)  # (N, D), as lightly
            dev = self.queue.memory.device
            no_ids = torch.full((self.size[0],), -1, dtype=torch.long, device=dev)  # no sample: id -1
            self.queue.enqueue(rows.to(dev), ids=no_ids)  # all N rows: the pointer is back at 0
            self.queue.label_memory.fill_(_NO_CLASS)  # no class (labels stay off until a step gives some)
        self._ptr = 0

    def _rows_written(self, b: int) -> int:
        """How many of ``b`` rows lightly's write rule stores now (those that fit before the end of the ring)."""
        ptr = self._ptr if self._ptr is not None else int(self.queue.ptr)  # a sync only after a load
        return min(b, self.size[0] - ptr)

    @torch.no_grad()
    def _write_held(self, held: Tuple[Tensor, Optional[Tensor], Optional[Tensor]]) -> None:
        """End of a ``deferred_enqueue()`` block: write the held batch (checked and gathered) as ``forward`` would."""
        batch, batch_ids, batch_labels = held
        self._write(batch, checked=True, ids=batch_ids, labels=batch_labels)

    def _check_labels(
        self, labels: Optional[Tensor], b: int, write: bool, step: bool
    ) -> Tuple[Optional[Tensor], bool]:
        """Check ``labels`` (B,) against the rows stored; changes nothing.

        All or nothing: rows with labels and rows without never mix. ``write``: this call stores a
        batch; ``step``: it is a training step (``forward(update=True)``), whose missing labels drop
        the labels a prefill stored before the first step.

        Returns:
            ``(labels, drop)``: the labels as (B,) int64 on the bank's device (or ``None``), and whether
            the stored labels are to be dropped (:meth:`_drop_labels`) before the write.

        Raises:
            ValueError: ``labels`` not (B,) integers; labels missing while the rows carry labels; labels
                given while rows stored without labels are held.
        """
        q = self.queue
        if labels is None:
            if write and q._has_labels:
                if step and q.num_steps == 0:  # labels only from enqueue (a prefill): lightly ignores them
                    return None, True
                raise ValueError(
                    "labels missing: the memory bank's rows carry labels (an earlier step stored them); "
                    "pass labels to every forward with update=True, or reset() the bank"
                )
            return None, False
        labels = q._check_index(labels, b, "labels")  # (B,) int64 on the bank's device
        if not q._has_labels and len(q) > 0:
            # Rows without labels: any row of an empty start, or a row marked _UNLABELLED after lightly's
            # random rows (a host read, only until the first labelled write).
            if self.init == "empty" or bool((q.valid_labels() != _NO_CLASS).any()):
                raise ValueError(
                    "labels given, but the memory bank holds rows stored without labels (an earlier step "
                    "had none); pass labels to every forward with update=True, or reset() the bank"
                )
        return labels, False

    @torch.no_grad()
    def _drop_labels(self) -> None:
        """Forget the stored labels (the rows stay): they came from a prefill and the steps have none."""
        q = self.queue
        q.label_memory.masked_fill_(q.label_memory != _NO_CLASS, _UNLABELLED)  # lightly's random rows keep -1
        q.has_labels.fill_(False)
        q._has_labels = False

    def _write(
        self, batch: Tensor, checked: bool = False, ids: Optional[Tensor] = None, labels: Optional[Tensor] = None
    ) -> None:
        """lightly's write rule: rows ``ptr .. min(ptr + B, N) - 1`` get the first rows of ``batch`` (B, D).

        The pointer is kept on the host (``_ptr``) by the bank's own writes, reset and loads; write through
        the bank (``forward`` / ``_dequeue_and_enqueue``), not through ``self.queue``, to keep it right.
        ``checked``: ``batch`` already passed the queue's input check (float32, on its device).
        """
        ptr = self._ptr if self._ptr is not None else int(self.queue.ptr)  # a sync only after a load
        k = min(batch.shape[0], self.size[0] - ptr)  # rows that fit before the end of the ring
        rows = batch if k == batch.shape[0] else batch[:k]  # (k, D)
        if ids is None and self.queue._has_ids:  # rows without a sample: id -1
            ids = self.queue._cached(("no_ids", k, batch.device), lambda: torch.full((k,), -1, device=batch.device))
        elif ids is not None:
            if len(self.queue) > 0 and not self.queue._has_ids:
                raise ValueError("ids given, but the bank's rows were stored without ids; call reset() first")
            ids = ids if k == ids.shape[0] else ids[:k]  # (k,)
        if labels is not None:
            labels = labels if k == labels.shape[0] else labels[:k]  # (k,)
        if checked:
            self.queue._enqueue(rows, labels, ids)
        else:
            self.queue.enqueue(rows, labels=labels, ids=ids)
        if labels is None and self.init == "random":
            self.queue.label_memory[ptr : ptr + k].fill_(_UNLABELLED)  # no longer one of lightly's random rows
        self._ptr = (ptr + k) % self.size[0]

    def _snapshot(self) -> Tensor:
        """(n, D) float32 copy of the stored rows, L2-normalized if ``normalize``."""
        rows = self.queue.valid_memory()  # (n, D): a live view, or new rows for a fixed-frame queue
        live = rows.untyped_storage().data_ptr() == self.queue.memory.untyped_storage().data_ptr()
        if self.normalize and not live:  # rows materialised just now: normalise them in place
            return rows.div_(torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min_(1e-12))
        if self.normalize:
            return torch.nn.functional.normalize(rows.float(), dim=1)  # new tensor, never the buffer
        return rows.to(self.queue.read_dtype, copy=live)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        """A state dict without any bank key (lightly's bank is not saved) loads as a fresh bank.

        lightly marks its bank buffers non-persistent, so a checkpoint of lightly's ``NTXentLoss`` has
        no key for them; once our bank replaces lightly's, ``load_state_dict(..., strict=True)`` of such
        a checkpoint would fail on the missing ``queue.*`` keys. Here the bank is reset to its initial
        state (as lightly's bank is when a run is resumed) and its keys are supplied, with a warning.
        """
        if self.queue is not None and not any(k.startswith(prefix + "queue.") for k in state_dict):
            warnings.warn(
                f"no memory bank state under '{prefix}queue.' in the checkpoint (lightly does not save its "
                f"bank): the AdaptiveMemoryBank starts fresh ({self.init} rows)",
                UserWarning,
                stacklevel=2,
            )
            self.reset()
            fresh = copy.deepcopy(self.queue).state_dict()  # tensors detached from the live buffers
            for key, value in fresh.items():
                state_dict[prefix + "queue." + key] = value
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, adaptation={self.adaptation!r}, init={self.init!r}, "
            f"gather_distributed={self.gather_distributed}, feature_dim_first={self.feature_dim_first}, "
            f"normalize={self.normalize}"
        )


class AdaptiveNTXentLoss(NTXentLoss):
    """lightly's ``NTXentLoss`` with an :class:`AdaptiveMemoryBank` that can leave same-sample rows out.

    ``criterion(out0, out1)`` is lightly's loss with the adaptive bank (the bank of
    ``criterion.memory_bank = AdaptiveMemoryBank(...)``). ``criterion(out0, out1, ids=ids)`` also
    stores the sample ids with the keys ``out1`` and, with ``mask_same_ids=True``, leaves out of
    query ``i``'s negatives every bank row holding an older key of sample ``ids[i]``; the positive
    (``out1[i]``) is kept. Without a bank (``memory_bank_size=0``) ids are not needed and ignored:
    the negatives are then the other samples of the batch.

    Args:
        temperature, memory_bank_size, gather_distributed: as lightly's ``NTXentLoss``.
        adaptation: of the bank, ``"xbn"`` (default), ``"axbn"`` or ``"none"``.
        mask_same_ids: leave same-sample rows out of the negatives when ids are given.
        **bank_kwargs: further :class:`AdaptiveMemoryBank` arguments (``normalize``, ``init``, ...).

    Raises:
        ValueError: as lightly's ``NTXentLoss`` and :class:`AdaptiveMemoryBank`.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
        adaptation: str = "xbn",
        mask_same_ids: bool = False,
        **bank_kwargs: Any,
    ) -> None:
        super().__init__(temperature=temperature, memory_bank_size=0, gather_distributed=gather_distributed)
        self.memory_bank = AdaptiveMemoryBank(
            size=memory_bank_size,
            adaptation=adaptation,
            gather_distributed=gather_distributed,
            mask_same_ids=mask_same_ids,
            **bank_kwargs,
        )

    def forward(self, out0: Tensor, out1: Tensor, ids: Optional[Tensor] = None) -> Tensor:
        """The loss of ``out0`` against ``out1`` (positives) and the bank (negatives).

        Args:
            out0: (B, D) queries (with gradient).
            out1: (B, D) keys; enqueued when ``out0`` requires a gradient (lightly's rule).
            ids: optional (B,) integer sample ids of the pairs.

        Returns:
            Scalar loss.
        """
        if ids is None or self.memory_bank.queue is None:
            return super().forward(out0, out1)  # lightly's computation
        given0, given1 = out0, out1
        out0 = torch.nn.functional.normalize(out0, dim=1)  # (B, D)
        out1 = torch.nn.functional.normalize(out1, dim=1)  # (B, D)
        out1, negatives = self.memory_bank(out1, update=out0.requires_grad, ids=ids)  # negatives: (D, n)
        if negatives is None:  # warm-up (the keys are stored): lightly's loss without a bank
            return self._loss_without_bank(given0, given1)
        sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)  # (B, 1)
        sim_neg = torch.einsum("nc,ck->nk", out0, negatives.to(out0.device, out0.dtype))  # (B, n)
        mask = self.memory_bank.negative_mask
        if mask is not None:
            sim_neg = sim_neg.masked_fill(mask.to(sim_neg.device), float("-inf"))  # (B, n)
        logits = torch.cat([sim_pos, sim_neg], dim=1) / self.temperature  # (B, 1 + n)
        labels = torch.zeros(logits.shape[0], device=out0.device, dtype=torch.long)  # the positive is column 0
        return self.cross_entropy(logits, labels)


    def _loss_without_bank(self, out0: Tensor, out1: Tensor) -> Tensor:
        """lightly's loss with the other samples of the batch as negatives (its branch for no bank)."""
        bank = self.memory_bank
        self._modules["memory_bank"] = _NoBank()  # lightly asks its bank once; this one answers "none"
        try:
            return super().forward(out0, out1)
        finally:
            self._modules["memory_bank"] = bank


class _NoBank(torch.nn.Module):
    """A bank that returns the batch and no negatives, as lightly's bank of size 0 does."""

    def forward(self, output: Tensor, update: bool = False) -> Tuple[Tensor, None]:
        return output, None


def _forget_host_ptr(module: AdaptiveMemoryBank, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: the host copy of the pointer is read again from the loaded buffer."""
    module._ptr = None
