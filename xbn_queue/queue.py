"""The adaptive cross-batch memory: a ring buffer of embeddings (and labels, ids) with a pluggable adaptation."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional as F
from ._compile import Fused, compile_enabled
from .adaptation import Adaptation, build_adaptation
from .distributed import all_gather_cat

__all__ = ["AdaptiveQueue", "PendingWrite", "DeferredEnqueue"]

#: Storage dtypes kept in a fixed frame: raw rows, rounded once when written, plus a per-dimension
#: affine map composed in float64 (re-rounding low-precision rows at every step would accumulate error).
_FIXED_FRAME_DTYPES = (torch.bfloat16, torch.float16)
#: A dimension whose variance from the running sums is below this fraction of its sum of squared
#: deviations is at the rounding floor (e.g. a column that became constant): re-synchronise exactly.
_SUSPICIOUS_VARIANCE = 1e-9
#: Fixed frame: the frame is re-based (rows rewritten once, centered and scaled to unit spread) when
#: a column's raw mean strays more than this many raw standard deviations from 0 (low-precision
#: rows lose relative precision with their offset) ...
_FRAME_MAX_OFFSET = 2.0
#: ... when a raw standard deviation leaves [1 / limit, limit], or when a frame scale becomes 0.
_FRAME_SPREAD_LIMIT = 2.0**16
#: Fixed frame: smallest per-step scale composed into the frame (a constant batch column would
#: otherwise make a frame scale 0); such a column reads the target mean within this fraction of its spread.
_FRAME_MIN_SCALE = 2.0**-60
#: Fixed frame: a column read with a standard deviation below ``eps`` times this is constant (Eq. 6
#: would scale its spread by at most ``2**-20`` of the target's).
_FRAME_FLAT = 2.0**-20
#: ``validate=`` values (see the class docstring).
_VALIDATE = ("auto", "sync", "device", "off")

_XBN_STEP = Fused(F.xbn_step_)
_FRAME_STEP = Fused(F.frame_step_)


class PendingWrite(NamedTuple):
    """A batch :meth:`AdaptiveQueue.stage` checked, gathered, adapted the memory to and placed, not yet written.

    Attributes:
        embeddings: ``(B', D)`` rows in the queue's read dtype, on the memory's device (``B'`` = B
            times the world size when gathering).
        labels: ``(B',)`` int64 labels, or ``None``.
        ids: ``(B',)`` int64 sample ids, or ``None``.
        positions: ``(B',)`` int64 memory rows :meth:`AdaptiveQueue.commit` writes them to.
        num_filled: rows valid once written.
        in_warmup: :attr:`AdaptiveQueue.in_warmup` as it reads once written.
        version: the queue's change count when staged (a commit after another change is refused).
    """

    embeddings: Tensor
    labels: Optional[Tensor]
    ids: Optional[Tensor]
    positions: Tensor
    num_filled: int
    in_warmup: bool
    version: int


class DeferredEnqueue:
    """Mixin of the memory losses: ``with loss_fn.deferred_enqueue():`` holds the batch back from the memory.

    Inside the block, a forward adapts the memory and computes its loss exactly as without the block
    (against the memory as it will be once the batch is written, where the loss reads the batch from
    the memory), but does not write the batch. When the block ends without an exception the held
    batch is written; when it raises (e.g. a non-finite loss found by a check inside the block) the
    batch is dropped and the memory never holds it::

        with loss_fn.deferred_enqueue():
            loss = loss_fn(embeddings, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss")   # nothing of this batch reaches the memory
        loss.backward()

    One forward per block. Outside a block a forward writes at once (the upstream behaviour).
    """

    _deferring: bool = False
    _held: Any = None

    @contextlib.contextmanager
    def deferred_enqueue(self) -> Iterator[None]:
        """Hold the batch of the forward inside the block; write it when the block ends without an exception.

        Raises:
            RuntimeError: on a block inside another block of the same module.
        """
        if self._deferring:
            raise RuntimeError("deferred_enqueue() blocks of one module do not nest")
        self._deferring, self._held = True, None
        try:
            yield
            held = self._held
        finally:
            self._deferring, self._held = False, None
        if held is not None:
            self._write_held(held)

    def _check_can_hold(self) -> None:
        """Before a forward changes anything: inside a block, no batch may be held already."""
        if self._deferring and self._held is not None:
            raise RuntimeError("one forward per deferred_enqueue() block: the batch of the first is still held")

    def _hold(self, held: Any) -> None:
        self._held = held

    def _write_held(self, held: Any) -> None:  # pragma: no cover - every user overrides it
        raise NotImplementedError


def _check_arguments(size: int, dim: int, dtype: torch.dtype, stats_resync_every: int, validate: str,
                     warmup_steps: int, warmup_rows: int) -> None:
    """:class:`AdaptiveQueue`'s own argument checks (a library class refuses bad input whoever calls it).

    Raises:
        ValueError: naming the argument and the value.
    """
    if int(size) < 1 or int(dim) < 1:
        raise ValueError(f"size and dim must be positive, got size={size}, dim={dim}")
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if int(stats_resync_every) < 1:
        raise ValueError(f"stats_resync_every must be >= 1, got {stats_resync_every}")
    if validate not in _VALIDATE:
        raise ValueError(f"validate must be one of {', '.join(map(repr, _VALIDATE))}, got {validate!r}")
    if int(warmup_steps) < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0 <= int(warmup_rows) <= int(size):
        raise ValueError(f"warmup_rows must be in [0, size={size}], got {warmup_rows}")


class AdaptiveQueue(nn.Module):
    """Ring buffer of embeddings whose stored rows can be adapted to the current batch.

    ``adaptation="none"`` is plain XBM (Wang et al. 2020), ``"xbn"`` moves the stored rows to
    the mean and standard deviation of each batch (Eq. 6), ``"axbn"`` to Kalman-filtered
    estimates of the dataset statistics (Eq. 18-23). Statistics are per dimension over the
    valid rows only; standard deviations use Bessel's correction.

    Example::

        q = AdaptiveQueue(size=4096, dim=128, adaptation="xbn")
        q.adapt(batch)                # (B, 128): adapt the stored rows in place
        q.enqueue(batch, labels)      # store detached float32 copies
        ref, ref_labels = q.embeddings, q.labels

    Every piece of state is a registered buffer (rows, labels, ids, write pointer, fill count,
    the adaptation's filter state), so ``.to(device)``, ``state_dict()`` and DDP broadcast
    work, and a reloaded queue continues bit-identically. State-changing methods run under
    ``torch.no_grad()``; properties return copies, never the live buffers. Bad input raises
    ``ValueError`` before anything is changed.

    Fast path (see ``docs/performance.md``): the memory's per-dimension moments are not recomputed
    by a pass over the memory at every step. Float64 sums of the stored rows' deviations from a
    center (``stat_center``, ``stat_sum``, ``stat_sumsq``) are kept up to date on every enqueue
    (overwritten rows subtracted, new rows added) and moved exactly through every affine map, so
    the statistics cost O(B * dim); they are re-centered on the mean at every adaptation and
    re-synchronised exactly (one pass) every ``min(stats_resync_every, len(self))`` adaptations.
    A dimension at the rounding floor of the sums (e.g. a column that became constant) is treated
    as constant on the device. A float32 (or float64) memory is then rewritten by one fused
    in-place affine per step. A bfloat16 / float16 memory is kept in a fixed frame: ``memory``
    holds raw rows rounded once when written, the per-dimension map ``frame_scale`` /
    ``frame_shift`` (float64) is composed at every step and applied when the rows are read, so
    rounding errors never accumulate; the frame is re-based, where a column needs it, at the
    periodic re-synchronisation. Results equal the straightforward computation (moments by a
    pass over the rows, then Eq. 6) up to float rounding.

    No host synchronisation: the fill count, the flags and the step counters the host needs are
    Python ints mirrored into their buffers (``buffer.fill_(int)`` / ``add_``, which never wait
    for the device); the write pointer is advanced on the device. After the first steps,
    ``adapt`` / ``enqueue`` / ``update`` never read a device value on the host (with the
    ``validate`` mode the memory's device gets by default), so a step on CUDA never stalls the
    stream, and a steady-state ``update`` (full memory, fixed batch size) can be captured in a
    CUDA graph. The exception is ``adaptation="xbn-cov"``: its two ``torch.linalg.eigh`` per step
    synchronise a CUDA device with the host (:class:`~xbn_queue.adaptation.XBNCov`). The O(D) bookkeeping is compiled into a few fused kernels on CUDA (``compile``).

    Args:
        size: Number of rows the memory holds.
        dim: Embedding dimension.
        adaptation: ``"none"``, ``"xbn"``, ``"axbn"``, ``"xbn-cov"`` (full covariance,
            :class:`~xbn_queue.adaptation.XBNCov`), or an :class:`~xbn_queue.adaptation.Adaptation`.
        eps: Added to the memory's standard deviation before dividing (Eq. 6).
        kalman_p0: AXBN initial estimation variance.
        kalman_q: AXBN process noise (relative to the measurement noise when ``kalman_r="auto"``, to the
            population variance when ``"sampling"``); ``None``: 1, or 0.01 for ``"sampling"``.
        kalman_r: AXBN measurement noise for a batch of one (divided by ``B``), ``"auto"`` or ``"sampling"``
            (the sampling-variance model, gain below 1 for small batches; see :class:`~xbn_queue.adaptation.AXBN`).
        kalman_gain_every: AXBN recomputes the Kalman gain every this many steps.
        gather_distributed: All-gather batches across ranks before statistics and enqueue, so
            every rank holds the same memory. A no-op without a process group. Every rank must
            then call the state-changing methods in lockstep.
        dtype: Storage dtype of the rows (float32 by default). Values read back are float32.
            ``torch.float64`` keeps everything in float64: inputs are converted to float64 (not
            float32), the statistics, the affine map and the adaptation's state (e.g. the AXBN
            filters) are float64, and the rows are read back as float64.
            ``torch.bfloat16`` / ``torch.float16`` halve the memory; their statistics and map are
            float32 / float64, and the rows are read back as float32 (``valid_memory()`` then
            returns a materialised float32 tensor rather than a view).
        stats_resync_every: Recompute the memory's running sums exactly (one pass over the
            memory) at least every this many adaptations (and every ``len(self)`` adaptations
            when the memory holds fewer rows); 1 recomputes them at every step.
        validate: How non-finite input values (NaN / Inf) are caught. Shapes, dtypes and sizes
            are always checked on the host (they need no device value).

            * ``"sync"``: read the batch's sum on the host and raise ``ValueError`` before
              anything changes. One host synchronisation per call (on CPU just a memory read).
            * ``"device"``: ``torch._assert_async(isfinite(batch).all())``: no synchronisation.
              On CPU it raises ``RuntimeError`` at once, before anything changes; on CUDA a
              non-finite batch is a device-side assert that surfaces at the next synchronisation
              as ``RuntimeError: CUDA error: device-side assert triggered`` and leaves the CUDA
              context unusable (the process must restart), like any failed device assertion.
            * ``"off"``: no finiteness check (non-finite rows would then spread into the memory).
            * ``"auto"`` (default): ``"sync"`` for a memory on the CPU (a host read costs nothing
              there); otherwise ``"device"`` for an adapting memory and ``"off"`` for
              ``adaptation="none"``, whose rows are never mixed, so a non-finite row cannot spread
              (plain XBM then costs what an upstream memory costs, with no extra kernel).
        warmup_steps: Keep the memory out of the loss for the first this many steps (calls of
            :meth:`update` / :meth:`adapt`; the memory still fills and adapts meanwhile). The queue only counts; losses that use it (the
            drop-ins) read :attr:`in_warmup` and compute the plain batch loss meanwhile.
        warmup_rows: Keep the memory out of the loss while it holds fewer rows than this (at most
            ``size``). With both, the memory enters the loss once both are reached.
        compile: Run the O(D) bookkeeping of a steady-state step through ``torch.compile``
            (fused kernels). ``None`` (default): on for a CUDA memory, off on CPU; the
            environment variable ``XBN_QUEUE_COMPILE=0`` turns it off, ``=1`` on by default. A
            failed compilation warns and falls back to the eager kernels (same results).

    Raises:
        ValueError: On a non-positive size, dim or ``stats_resync_every``, a bad adaptation,
            an unknown ``validate``, a negative ``warmup_steps`` or a ``warmup_rows`` outside
            ``[0, size]``.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        adaptation: Union[str, Adaptation] = "xbn",
        eps: float = 1e-6,
        kalman_p0: float = 1.0,
        kalman_q: Optional[float] = None,
        kalman_r: Union[float, str] = 0.01,
        kalman_gain_every: int = 1,
        gather_distributed: bool = False,
        dtype: torch.dtype = torch.float32,
        stats_resync_every: int = 1000,
        validate: str = "auto",
        compile: Optional[bool] = None,
        warmup_steps: int = 0,
        warmup_rows: int = 0,
    ) -> None:
        super().__init__()
        _check_arguments(size, dim, dtype, stats_resync_every, validate, warmup_steps, warmup_rows)
        self.warmup_steps = int(warmup_steps)
        self.warmup_rows = int(warmup_rows)
        self.stats_resync_every = int(stats_resync_every)
        self.validate = validate
        self.compile_bookkeeping = compile
        self.size = int(size)
        self.dim = int(dim)
        self.eps = float(eps)
        self.gather_distributed = bool(gather_distributed)
        self.adaptation = build_adaptation(
            adaptation,
            self.dim,
            eps=self.eps,
            kalman_p0=kalman_p0,
            kalman_q=kalman_q,
            kalman_r=kalman_r,
            kalman_gain_every=kalman_gain_every,
        )
        if dtype == torch.float64:
            self.adaptation.to(torch.float64)  # filter state in float64 too
        if self.adaptation.full_covariance and dtype in _FIXED_FRAME_DTYPES:
            raise ValueError(
                f"adaptation={self.adaptation.name!r} needs float32 or float64 storage, got dtype={dtype} "
                "(a bfloat16 / float16 memory keeps a per-dimension frame)"
            )
        self._register_state(dtype)

    def _register_state(self, dtype: torch.dtype) -> None:
        """The queue's state: every piece a registered buffer, plus the host mirrors of the scalars the host reads."""
        self.register_buffer("memory", torch.zeros(self.size, self.dim, dtype=dtype))  # (M, D)
        self.register_buffer("label_memory", torch.zeros(self.size, dtype=torch.long))  # (M,)
        self.register_buffer("id_memory", torch.zeros(self.size, dtype=torch.long))  # (M,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next row to write
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))  # n = min(enqueued, size)
        self.register_buffer("has_labels", torch.zeros((), dtype=torch.bool))
        self.register_buffer("has_ids", torch.zeros((), dtype=torch.bool))
        # steps so far (warm-up), see num_steps; written from its host mirror when the state is saved
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # Running statistics of the stored rows (in the storage frame), see the class docstring.
        f64 = torch.float64
        self.register_buffer("stat_center", torch.zeros(self.dim, dtype=f64))  # (D,) c
        self.register_buffer("stat_sum", torch.zeros(self.dim, dtype=f64))  # (D,) sum (z - c)
        self.register_buffer("stat_sumsq", torch.zeros(self.dim, dtype=f64))  # (D,) sum (z - c)^2
        self.register_buffer("stat_age", torch.zeros((), dtype=torch.long))  # adaptations since exact sync
        self.register_buffer("stat_synced", torch.zeros((), dtype=torch.bool))  # sums describe the memory
        # Fixed frame (bfloat16 / float16 storage): row i reads memory[i] * frame_scale + frame_shift.
        self.register_buffer("frame_scale", torch.ones(self.dim, dtype=f64))  # (D,)
        self.register_buffer("frame_shift", torch.zeros(self.dim, dtype=f64))  # (D,)
        # Host mirrors of the scalar buffers the host decides with (kept equal on every write and
        # re-read on load): reading them never waits for the device. The pointer lives on the device.
        self._n = 0  # num_filled
        self._steps = 0  # steps
        self._has_labels = False
        self._has_ids = False
        self._age = 0  # stat_age
        self._synced = False  # stat_synced
        self._version = 0  # changes of the memory (host only): a staged write must be committed before the next
        self._cache: dict = {}  # small constant / scratch tensors per (shape, device), never state

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._n

    @property
    def in_warmup(self) -> bool:
        """Whether the memory is still to be kept out of the loss: at most ``warmup_steps`` steps
        done (:attr:`num_steps`), or fewer than ``warmup_rows`` rows stored. Read it after the step's :meth:`update`
        (the first ``warmup_steps`` steps are warm-up). A host-side check: no device read."""
        return self._in_warmup(self._n)

    def _in_warmup(self, n: int) -> bool:
        """:attr:`in_warmup` with ``n`` rows stored."""
        return self._steps <= self.warmup_steps and self.warmup_steps > 0 or n < self.warmup_rows

    @property
    def num_steps(self) -> int:
        """Steps since the start or the last :meth:`reset`: calls of :meth:`update` or :meth:`adapt`
        (whether or not they changed the memory); :meth:`enqueue` alone (e.g. a prefill) is not one."""
        return self._steps

    @property
    def is_full(self) -> bool:
        """Whether every row holds an enqueued embedding."""
        return len(self) == self.size

    @property
    def _fixed_frame(self) -> bool:
        return self.memory.dtype in _FIXED_FRAME_DTYPES

    @property
    def read_dtype(self) -> torch.dtype:
        """The dtype rows are read back in and inputs are converted to: float64 for a float64
        memory, float32 otherwise."""
        return torch.float64 if self.memory.dtype == torch.float64 else torch.float32

    def _materialize(self, n: int) -> Tensor:
        """``(n, dim)`` float32 rows of a fixed-frame memory: ``raw * frame_scale + frame_shift``."""
        raw = self.memory[:n]  # (n, D) bf16 / fp16
        return torch.addcmul(self.frame_shift.float(), raw, self.frame_scale.float())  # (n, D) float32, one pass

    @property
    def embeddings(self) -> Tensor:
        """``(n, dim)`` copy of the valid rows, in storage order, in :attr:`read_dtype`."""
        if self._fixed_frame:
            return self._materialize(len(self))
        return self.memory[: len(self)].to(self.read_dtype, copy=True)

    @property
    def labels(self) -> Optional[Tensor]:
        """``(n,)`` int64 labels of the valid rows, or ``None`` if labels were never given."""
        return self.label_memory[: len(self)].clone() if self._has_labels else None

    @property
    def ids(self) -> Optional[Tensor]:
        """``(n,)`` int64 sample ids of the valid rows, or ``None`` if ids were never given."""
        return self.id_memory[: len(self)].clone() if self._has_ids else None

    def valid_memory(self) -> Tensor:
        """``(n, dim)`` live view of the valid rows, in the storage dtype, without a copy.

        For integrations that only read the memory right away (e.g. to compute a loss), where a
        copy of a large memory would cost time. Do not modify it, and do not keep it across a
        state-changing call. A bfloat16 / float16 queue keeps raw rows in a fixed frame, so
        there this returns the rows materialised as a new float32 tensor.
        """
        if self._fixed_frame:
            return self._materialize(len(self))
        return self.memory if self._n == self.size else self.memory[: self._n]  # no slice op when full

    def valid_labels(self) -> Tensor:
        """``(n,)`` live view of the valid labels (zeros if labels were never given); see :meth:`valid_memory`."""
        return self.label_memory if self._n == self.size else self.label_memory[: self._n]

    def same_id_mask(
        self, ids: Tensor, exclude: Optional[Tensor] = None, pending: Optional[PendingWrite] = None
    ) -> Tensor:
        """``(B, n)`` bool: ``mask[i, j]`` is True where stored row ``j`` holds the sample ``ids[i]``.

        A sample's own older embeddings in the memory are not negatives of its new embedding; a loss
        leaves the masked rows out. Element-wise on the device: no host synchronisation.

        Args:
            ids: ``(B,)`` integer sample ids of the queries.
            exclude: optional ``(k,)`` int64 row positions never masked, e.g. the rows the current
                batch was just written to (:meth:`update`'s return), which hold the queries' own
                positives rather than older copies.
            pending: a staged batch (:meth:`stage`): the mask over the rows as they will be once it is
                written (as :meth:`preview` returns them), ``(B, pending.num_filled)``.

        Returns:
            ``(B, n)`` bool on the memory's device, columns in storage order (as :meth:`valid_memory`).

        Raises:
            ValueError: If the stored rows carry no ids, or ``ids`` is not ``(B,)`` integers.
        """
        if not isinstance(ids, Tensor) or ids.ndim != 1:
            raise ValueError(f"ids: expected a (B,) integer tensor, got {tuple(getattr(ids, 'shape', ()))}")
        ids = self._check_index(ids, ids.shape[0], "ids")
        if self._n > 0 and not self._has_ids:
            raise ValueError("same_id_mask: the stored rows carry no ids; pass ids to every enqueue")
        if pending is not None:
            self._check_pending(pending)
            if pending.ids is None:
                raise ValueError("same_id_mask: the staged rows carry no ids; pass ids to stage()")
            stored = self._preview_index(self.id_memory, pending.ids, pending)  # (n',)
        else:
            stored = self.id_memory if self._n == self.size else self.id_memory[: self._n]  # (n,)
        mask = ids[:, None] == stored[None, :]  # (B, n)
        if exclude is not None:
            mask.index_fill_(1, exclude.to(device=mask.device, dtype=torch.long), False)
        return mask

    # ------------------------------------------------------------------ checks
    def _validate_mode(self, device: Optional[torch.device] = None) -> str:
        """The validation mode in force (``device``: for a memory there, default its own)."""
        if self.validate != "auto":
            return self.validate
        device = self.memory.device if device is None else torch.device(device)
        if device.type == "cpu":
            return "sync"
        return "device" if self.adaptation.active else "off"

    def _check_embeddings(self, x: Tensor, what: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"{what}: expected a torch.Tensor of shape (B, {self.dim}), got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what}: expected shape (B, {self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{what}: expected a floating-point tensor, got {x.dtype}")
        mode = self._validate_mode()
        if mode == "sync":
            # A finite sum proves every entry finite (3 us instead of 60 for a 64 x 512 batch on CPU);
            # only a non-finite sum (NaN/Inf, or an overflow of large finite values) needs the full check.
            if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).any(dim=1).sum())
                raise ValueError(f"{what}: expected finite values, got NaN or Inf in {bad} of {x.shape[0]} rows")
        elif mode == "device":
            # The float64 sum of float32 values cannot overflow: it is finite iff every entry is,
            # and ``sum * 0 == 0`` exactly then (NaN otherwise). Four small kernels, no host read
            # (``torch.isfinite`` would be four too: it is a composite of abs / eq / mul / ne).
            ok = x.sum(dtype=torch.float64).mul_(0).eq_(0)
            torch._assert_async(ok, f"{what}: expected finite values, got NaN or Inf")
        return x.to(device=self.memory.device, dtype=self.read_dtype)

    def _check_index(self, x: Optional[Tensor], n: int, what: str) -> Optional[Tensor]:
        if x is None:
            return None
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x)
        if x.ndim != 1 or x.shape[0] != n:
            raise ValueError(f"{what}: expected shape ({n},) to match the {n} embeddings, got {tuple(x.shape)}")
        if x.is_floating_point() or x.is_complex():
            raise ValueError(f"{what}: expected an integer tensor, got {x.dtype}")
        return x.to(device=self.memory.device, dtype=torch.long)

    def _check_consistent(self, given: bool, stored: bool, what: str) -> None:
        if self._n > 0 and given != stored:
            if given:
                raise ValueError(f"{what} given, but the rows already stored have none; call reset() first")
            raise ValueError(f"{what} missing: the rows already stored have {what}; pass them to every enqueue")

    def _prepare(
        self, embeddings: Tensor, labels: Optional[Tensor], ids: Optional[Tensor]
    ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Validate (everything before any state changes) and gather across ranks."""
        emb = self._check_embeddings(embeddings, "embeddings")
        b = emb.shape[0]
        labels = self._check_index(labels, b, "labels")
        ids = self._check_index(ids, b, "ids")
        if b > self.size:
            raise ValueError(f"embeddings: batch of {b} rows is larger than the queue size {self.size}")
        self._check_consistent(labels is not None, self._has_labels, "labels")
        self._check_consistent(ids is not None, self._has_ids, "ids")
        if self.gather_distributed:
            emb = all_gather_cat(emb)
            labels = all_gather_cat(labels) if labels is not None else None
            ids = all_gather_cat(ids) if ids is not None else None
            if emb.shape[0] > self.size:
                raise ValueError(
                    f"embeddings: the batch gathered from all ranks has {emb.shape[0]} rows, "
                    f"more than the queue size {self.size}"
                )
        return emb, labels, ids

    # ------------------------------------------------------------------ writing
    @torch.no_grad()
    def adapt(self, batch: Tensor) -> None:
        """Adapt the stored rows, in place, to the statistics of ``batch`` (XBN) or to their estimate (AXBN).

        A no-op for ``adaptation="none"``, when the batch has fewer than 2 rows, or when fewer than
        2 rows are stored. The batch is all-gathered first when ``gather_distributed``.

        Args:
            batch: ``(B, dim)`` embeddings of the current iteration, any floating dtype.

        Raises:
            ValueError: Wrong shape, non-floating dtype or (``validate="sync"``) non-finite values.
        """
        b = self._check_embeddings(batch, "batch")
        if self.gather_distributed:
            b = all_gather_cat(b)
        self._adapt(b)

    def _compiled(self) -> bool:
        """Compile the bookkeeping now? Only in the steady state (full memory: static shapes)."""
        return self._n == self.size and compile_enabled(self.memory.device, self.compile_bookkeeping)

    def _adapt(self, batch: Tensor) -> None:
        self._version += 1
        self._steps += 1  # a training step (host only; written into ``steps`` when the state is saved)
        n = self._n
        if not self.adaptation.active or batch.shape[0] < 2 or n < 2:
            return
        if self.adaptation.full_covariance:
            self._adapt_covariance(batch, n)
            return
        batch_mean, batch_std = F.batch_moments(batch)  # (D,), (D,)
        target = self.adaptation.target(batch_mean, batch_std, batch.shape[0])
        if target is None:
            return
        if not self._synced or self._age >= self._resync_interval(n, batch.shape[0]):  # decided on the host
            self._resync(n)
        compiled = self._compiled()
        if self._fixed_frame:
            _FRAME_STEP(
                compiled, self.stat_center, self.stat_sum, self.stat_sumsq, n, target[0], target[1],
                self.frame_scale, self.frame_shift, self.eps, _SUSPICIOUS_VARIANCE,
                max(self.eps, 1e-12) * _FRAME_FLAT, _FRAME_MIN_SCALE,
            )
        else:
            mem = self.memory if n == self.size else self.memory[:n]  # (n, D), live
            dev, dt = mem.device, mem.dtype
            a = self._cached(("a", dev, dt), lambda: torch.empty(self.dim, dtype=dt, device=dev))  # (D,)
            b = self._cached(("b", dev, dt), lambda: torch.empty(self.dim, dtype=dt, device=dev))  # (D,)
            _XBN_STEP(
                compiled, self.stat_center, self.stat_sum, self.stat_sumsq, n, target[0], target[1],
                self.eps, _SUSPICIOUS_VARIANCE, a, b,
            )
            torch.addcmul(b, mem, a, out=mem)  # one fused pass over the memory
        self._age += 1
        self.stat_age.add_(1)

    def _adapt_covariance(self, batch: Tensor, n: int) -> None:
        """Full-covariance matching: memory moments by one float64 pass, then one ``(n, D) @ (D, D)`` map."""
        batch_mean, batch_cov = F.mean_cov(batch)  # (D,), (D, D) float64
        mem = self.memory if n == self.size else self.memory[:n]  # (n, D), live
        mem_mean, mem_cov = F.mean_cov(mem)  # (D,), (D, D) float64
        tgt_mean, tgt_cov = self.adaptation.target_covariance(
            batch_mean, batch_cov, batch.shape[0], memory_cov=mem_cov, memory_rows=n
        )
        a, b = F.covariance_matching_affine(mem_mean, mem_cov, tgt_mean, tgt_cov, self.eps)
        F.apply_linear_(mem, a, b)

    @property
    def _diagonal_sums(self) -> bool:
        """Whether the per-dimension running sums are kept (adapting, not full-covariance)."""
        return self.adaptation.active and not self.adaptation.full_covariance

    # ------------------------------------------------------------------ running statistics
    def _resync_interval(self, n: int, b: int) -> int:
        """Adaptations between exact re-synchronisations: ``min(stats_resync_every, n)``; a fixed
        frame also once per turnover of the memory (``ceil(n / b)``), when it is re-based where needed."""
        every = min(self.stats_resync_every, n)
        if self._fixed_frame:
            every = min(every, max(1, -(-n // b)))
        return every

    def _resync(self, n: int) -> None:
        """Exact re-synchronisation of the running sums (one pass; a fixed frame is re-based first where needed)."""
        if self._fixed_frame and self._synced:
            self._rebase(n)
        self._sync_stats(n)

    def _sync_stats(self, n: int) -> None:
        """Recompute the running sums exactly from the ``n`` stored rows (one pass)."""
        if n == 0:
            center = torch.zeros_like(self.stat_center)
            s1, s2 = torch.zeros_like(center), torch.zeros_like(center)
        else:
            raw = self.memory[:n]  # (n, D) storage frame
            center = raw[0].to(torch.float64)  # a stored row: exact zeros for constant columns
            s1, s2 = F.shifted_sums(raw, center)
        self.stat_center.copy_(center)
        self.stat_sum.copy_(s1)
        self.stat_sumsq.copy_(s2)
        self._age = 0
        self.stat_age.zero_()
        self._synced = True
        self.stat_synced.fill_(True)

    def _rebase(self, n: int) -> None:
        """Re-base the fixed frame where a column needs it, without reading the device on the host.

        A column is re-based (its raw rows rewritten so they have mean 0 and unit spread; the new
        frame is ``(std, mean)`` of the rows as read, scale 1 for a constant column) when its raw
        mean strays more than ``_FRAME_MAX_OFFSET`` raw standard deviations from 0 (low-precision
        rows lose relative precision with their offset) or its raw spread leaves
        ``[1 / _FRAME_SPREAD_LIMIT, _FRAME_SPREAD_LIMIT]``. Other columns are rewritten by the
        identity (exactly unchanged). Called before an exact sync of the sums.
        """
        raw_mean, raw_var = F.moments_from_sums(self.stat_center, self.stat_sum, self.stat_sumsq, n)  # (D,)
        raw_std = raw_var.clamp_min(0).sqrt()  # (D,)
        fa, fb = self.frame_scale, self.frame_shift
        ill = (raw_std > 0) & (
            (raw_mean.abs() > _FRAME_MAX_OFFSET * raw_std)
            | (raw_std > _FRAME_SPREAD_LIMIT)
            | (raw_std < 1.0 / _FRAME_SPREAD_LIMIT)
        )  # (D,)
        eff_mean = torch.addcmul(fb, raw_mean, fa)  # (D,)
        eff_std = raw_std * fa  # (D,)
        new_a = torch.where(ill, torch.where(eff_std > 0, eff_std, torch.ones_like(eff_std)), fa)  # (D,)
        new_b = torch.where(ill, eff_mean, fb)  # (D,)
        # raw' = (raw * A + B - B') / A': exactly raw * 1 + 0 for the columns left alone
        r = (fa / new_a).float()  # (D,)
        t = ((fb - new_b) / new_a).float()  # (D,)
        for start in range(0, n, F._CHUNK_ROWS):
            chunk = self.memory[start : min(start + F._CHUNK_ROWS, n)]  # (c, D), live
            chunk.copy_(torch.addcmul(t, chunk.float(), r))
        fa.copy_(new_a)
        fb.copy_(new_b)

    def _start_frame(self, emb: Tensor) -> None:
        """Fixed frame for the first rows of an empty memory: their mean and std, so raw rows are centered."""
        shift, scale = self._first_frame(emb)
        self.frame_shift.copy_(shift)
        self.frame_scale.copy_(scale)

    def _first_frame(self, emb: Tensor) -> Tuple[Tensor, Tensor]:
        """``(shift, scale)`` float64 ``(D,)``: the fixed frame the first rows ``emb`` of an empty memory start."""
        shift = emb.to(torch.float64).mean(dim=0)  # (D,)
        if emb.shape[0] >= 2:
            std = emb.to(torch.float64).std(dim=0)  # (D,)
            return shift, torch.where(std > 0, std, torch.ones_like(std))
        return shift, torch.ones_like(shift)

    def _cached(self, key: tuple, make) -> Tensor:
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = make()
        return t

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Optional[Tensor] = None, ids: Optional[Tensor] = None) -> Tensor:
        """Store detached copies of ``embeddings`` at rows ``(ptr + arange(B)) % size``.

        Args:
            embeddings: ``(B, dim)``, ``B <= size``, any floating dtype (stored as float32 unless
                the queue was built with another storage dtype).
            labels: ``(B,)`` integer labels, or ``None``. Once a queue holds labels, every
                enqueue must pass them (and vice versa) until :meth:`reset`.
            ids: ``(B,)`` integer sample indices, or ``None``; same rule as labels.

        Returns:
            ``(B',)`` int64 row positions written (``B' = B`` times the world size when gathering),
            on the memory's device.

        Raises:
            ValueError: Wrong shapes, (``validate="sync"``) non-finite values, a batch larger than
                the queue, or labels / ids given inconsistently. Nothing is changed then.
        """
        emb, labels, ids = self._prepare(embeddings, labels, ids)
        return self._enqueue(emb, labels, ids)

    def _enqueue(
        self, emb: Tensor, labels: Optional[Tensor], ids: Optional[Tensor], pos: Optional[Tensor] = None
    ) -> Tensor:
        b = emb.shape[0]
        n_old = self._n
        dev = self.memory.device
        self._version += 1
        if pos is None:
            ar = self._cached(("arange", b, dev), lambda: torch.arange(b, device=dev))  # (B,)
            pos = (self.ptr + ar).remainder_(self.size)  # (B,) on the device: no host read of the pointer
        if self._fixed_frame:
            if n_old == 0:
                self._start_frame(emb)
            rows = ((emb - self.frame_shift) / self.frame_scale).to(self.memory.dtype)  # (B, D) raw
        else:
            rows = emb.to(self.memory.dtype)  # (B, D)
        if self._diagonal_sums and n_old > 0 and self._synced:
            # Rows are written in order until the memory is full, so the valid rows are 0..n-1 and
            # the rows this batch overwrites are its last k positions.
            k = min(b, max(0, n_old + b - self.size))
            blocks = [rows]
            if k > 0:
                blocks.append(self.memory.index_select(0, pos if k == b else pos[b - k :]))  # (k, D)
            w = self._cached(
                ("signs", b, k, dev),
                lambda: torch.cat([torch.ones(b, dtype=torch.float64), -torch.ones(k, dtype=torch.float64)]).to(dev),
            )  # (B + k,)
            work = self._cached(("work", b + k, dev), lambda: torch.empty(self.dim, b + k, dtype=torch.float64, device=dev))
            work_t = self._cached(("work_t", b + k, dev), lambda: work.t())  # (B + k, D) view
            F.update_sums_(self.stat_sum, self.stat_sumsq, self.stat_center, blocks, w, work, work_t)
        self.memory.index_copy_(0, pos, rows)
        if labels is not None:
            self.label_memory.index_copy_(0, pos, labels)
            if not self._has_labels:
                self._has_labels = True
                self.has_labels.fill_(True)
        if ids is not None:
            self.id_memory.index_copy_(0, pos, ids)
            if not self._has_ids:
                self._has_ids = True
                self.has_ids.fill_(True)
        self.ptr.add_(b).remainder_(self.size)
        n_new = min(n_old + b, self.size)
        if n_new != n_old:
            self._n = n_new
            self.num_filled.fill_(n_new)
        if self._diagonal_sums and n_old == 0:
            self._sync_stats(b)  # the first rows: exact sums, about a stored row
        return pos

    @torch.no_grad()
    def replace_rows(self, rows: Tensor) -> None:
        """Overwrite every row of the memory (valid or not) with ``rows``, in the storage dtype.

        The fill count, labels, ids and pointer stay; the running statistics are recomputed exactly
        at the next adaptation. For integrations that expose the whole memory as an assignable
        attribute (PML's ``embedding_memory``).

        Args:
            rows: ``(size, dim)`` floating tensor, on any device (moved to the memory's).

        Raises:
            ValueError: Wrong shape or a non-floating dtype.
        """
        if not isinstance(rows, Tensor) or tuple(rows.shape) != (self.size, self.dim) or not rows.is_floating_point():
            got = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"rows: expected a floating tensor of shape ({self.size}, {self.dim}), got {got}")
        rows = rows.to(device=self.memory.device)
        self._version += 1
        if self._fixed_frame:
            rows = (rows.to(torch.float64) - self.frame_shift) / self.frame_scale  # (M, D) raw, in the frame
        self.memory.copy_(rows)
        self._synced = False
        self.stat_synced.fill_(False)

    @torch.no_grad()
    def replace_labels(self, labels: Tensor) -> None:
        """Overwrite every stored label with ``labels`` (``(size,)`` integers); see :meth:`replace_rows`.

        Raises:
            ValueError: Wrong shape or a non-integer dtype.
        """
        labels = self._check_index(labels, self.size, "labels")
        self._version += 1
        self.label_memory.copy_(labels)
        if self._n > 0 and not self._has_labels:
            self._has_labels = True
            self.has_labels.fill_(True)

    @torch.no_grad()
    def update(self, embeddings: Tensor, labels: Optional[Tensor] = None, ids: Optional[Tensor] = None) -> Tensor:
        """``adapt(embeddings)`` then ``enqueue(embeddings, labels, ids)``, gathering across ranks only once.

        The usual step: the stored rows are moved to the statistics of the rows being enqueued,
        then those rows are added. Validation happens before anything changes.

        Returns:
            ``(B',)`` int64 row positions written.
        """
        emb, labels, ids = self._prepare(embeddings, labels, ids)
        self._adapt(emb)
        return self._enqueue(emb, labels, ids)

    @torch.no_grad()
    def stage(self, embeddings: Tensor, labels: Optional[Tensor] = None, ids: Optional[Tensor] = None) -> PendingWrite:
        """:meth:`update` without the write: check, gather, adapt the stored rows to the batch; write nothing.

        ``commit(stage(x))`` changes the queue exactly as ``update(x)`` does (the same steps, in the
        same order, bit for bit). In between, :meth:`preview` reads the memory as it will be once the
        batch is written, without writing it, so a caller can compute a loss, check it, and only then
        :meth:`commit` (or drop the pending batch: the memory then never holds it; the stored rows
        stay adapted to it, as a step of the adaptation).

        Returns:
            The :class:`PendingWrite`.

        Raises:
            ValueError: as :meth:`update`, before anything changes.
        """
        emb, labels, ids = self._prepare(embeddings, labels, ids)
        self._adapt(emb)
        b = emb.shape[0]
        dev = self.memory.device
        ar = self._cached(("arange", b, dev), lambda: torch.arange(b, device=dev))  # (B,)
        pos = (self.ptr + ar).remainder_(self.size)  # (B,) as _enqueue computes it
        n = min(self._n + b, self.size)
        return PendingWrite(emb.detach(), labels, ids, pos, n, self._in_warmup(n), self._version)

    @torch.no_grad()
    def commit(self, pending: PendingWrite) -> Tensor:
        """Write a batch :meth:`stage` prepared (as :meth:`update` writes it).

        Returns:
            ``(B',)`` int64 row positions written (``pending.positions``).

        Raises:
            ValueError: the queue changed since the batch was staged (written, adapted, reset, loaded).
        """
        self._check_pending(pending)
        return self._enqueue(pending.embeddings, pending.labels, pending.ids, pending.positions)

    @torch.no_grad()
    def preview(self, pending: PendingWrite) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The valid rows, labels and ids as they will read once ``pending`` is committed; writes nothing.

        Rows are what :meth:`valid_memory` returns after :meth:`commit` (the same values, bit for
        bit), as a new tensor without gradient (the batch's rows are detached copies, as stored): one
        copy of the valid rows, the price of keeping the batch out of the memory until it is checked.

        Returns:
            ``(n', D)`` rows (storage dtype; float32 for a fixed-frame memory), ``(n',)`` int64 labels
            (zeros where none were given), ``(n',)`` int64 ids or ``None`` when the rows carry none.

        Raises:
            ValueError: the queue changed since the batch was staged.
        """
        self._check_pending(pending)
        n, pos = pending.num_filled, pending.positions
        if self._fixed_frame:
            shift, scale = (self.frame_shift, self.frame_scale) if self._n > 0 else self._first_frame(pending.embeddings)
            new = ((pending.embeddings - shift) / scale).to(self.memory.dtype)  # (B', D) raw, as _enqueue writes
            raw = self.memory[:n].index_copy(0, pos, new)  # (n', D)
            rows = torch.addcmul(shift.float(), raw, scale.float())  # (n', D) float32, as _materialize
        else:
            rows = self.memory[:n].index_copy(0, pos, pending.embeddings.to(self.memory.dtype))  # (n', D)
        labels = self._preview_index(self.label_memory, pending.labels, pending)  # (n',)
        has_ids = pending.ids is not None or (self._has_ids and self._n > 0)
        ids = self._preview_index(self.id_memory, pending.ids, pending) if has_ids else None
        return rows, labels, ids

    def _preview_index(self, buffer: Tensor, values: Optional[Tensor], pending: PendingWrite) -> Tensor:
        """``(n',)`` copy of ``buffer``'s valid entries once ``values`` are written at the pending positions."""
        head = buffer[: pending.num_filled]
        return head.clone() if values is None else head.index_copy(0, pending.positions, values)

    def _check_pending(self, pending: PendingWrite) -> None:
        if not isinstance(pending, PendingWrite) or pending.version != self._version:
            raise ValueError("the queue changed since this batch was staged: stage() and commit() it again")

    @torch.no_grad()
    def resync_stats(self) -> None:
        """Recompute the running sums exactly now (one pass over the memory).

        The queue does this by itself every ``min(stats_resync_every, len(self))`` adaptations;
        call it when steps ran where the host could not count them (replays of a captured CUDA
        graph, see ``docs/performance.md``). It also re-reads the device counters into their host
        mirrors.
        """
        self._read_mirrors()
        self.adaptation._refresh_host_state()
        if self._diagonal_sums and self._n > 0:
            self._resync(self._n)

    def _read_mirrors(self) -> None:
        """Re-read the scalar buffers into their host mirrors (a host read each: load time only)."""
        self._n = int(self.num_filled)
        self._has_labels = bool(self.has_labels)
        self._has_ids = bool(self.has_ids)
        self._age = int(self.stat_age)
        self._synced = bool(self.stat_synced)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if prefix + "steps" not in state_dict and prefix + "num_filled" in state_dict:
            # A checkpoint from before the step count: a memory holding rows counts as past warm-up.
            filled = bool(torch.as_tensor(state_dict[prefix + "num_filled"]).item() > 0)
            state_dict[prefix + "steps"] = torch.tensor(self.warmup_steps + 1 if filled else 0)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._read_mirrors()  # the adaptation (a child, loaded next) refreshes its own
        self._version += 1
        self._steps = int(self.steps)  # (only here: between saves the host count is the truth)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.steps.fill_(self._steps)  # a host int into the buffer: no device read
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the memory and forget the adaptation state."""
        self.memory.zero_()
        self.label_memory.zero_()
        self.id_memory.zero_()
        self.ptr.zero_()
        self.num_filled.zero_()
        self.has_labels.fill_(False)
        self.has_ids.fill_(False)
        self.steps.zero_()
        self._steps = 0
        self.stat_center.zero_()
        self.stat_sum.zero_()
        self.stat_sumsq.zero_()
        self.stat_age.zero_()
        self.stat_synced.fill_(False)
        self.frame_scale.fill_(1.0)
        self.frame_shift.zero_()
        self._n, self._has_labels, self._has_ids, self._age, self._synced = 0, False, False, 0, False
        self._version += 1
        self.adaptation.reset()

    _FLOAT64_BUFFERS = ("stat_center", "stat_sum", "stat_sumsq", "frame_scale", "frame_shift")

    def _apply(self, fn, recurse=True):
        """``.to()`` / ``.half()`` / ``.float()`` ...: the statistics and the frame stay float64, and a
        change of the storage dtype keeps the rows as read (a fixed-frame memory leaving bf16/fp16
        has its frame folded into the rows); the sums are then recomputed on the next adaptation."""
        was_fixed, old_dtype = self._fixed_frame, self.memory.dtype
        saved = {name: self._buffers[name] for name in self._FLOAT64_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new.dtype != torch.float64:  # precision is not optional here
                self._buffers[name] = old.to(device=new.device, dtype=torch.float64)
        if self.memory.dtype != old_dtype:
            with torch.no_grad():
                if was_fixed and not self._fixed_frame:
                    mem = self.memory[: len(self)]  # (n, D) raw rows, now in a wide dtype
                    mem.copy_(mem.to(torch.float64) * self.frame_scale + self.frame_shift)
                    self.frame_scale.fill_(1.0)
                    self.frame_shift.zero_()
                self._synced = False
                self.stat_synced.fill_(False)
        return self

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, dtype={self.memory.dtype}, "
            f"gather_distributed={self.gather_distributed}, stats_resync_every={self.stats_resync_every}"
            + (f", warmup_steps={self.warmup_steps}" if self.warmup_steps else "")
            + (f", warmup_rows={self.warmup_rows}" if self.warmup_rows else "")
        )
