"""The adaptive cross-batch memory: a ring buffer of embeddings (and labels, ids) with a pluggable adaptation."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional as F
from .adaptation import Adaptation, build_adaptation
from .distributed import all_gather_cat

__all__ = ["AdaptiveQueue"]

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
    re-synchronised exactly (one pass) every ``min(stats_resync_every, len(self))`` adaptations
    and whenever a dimension reaches the rounding floor (e.g. a column that became constant). A
    float32 (or float64) memory is then rewritten by one fused in-place affine per step. A bfloat16 / float16 memory is kept in a fixed frame: ``memory``
    holds raw rows rounded once when written, the per-dimension map ``frame_scale`` /
    ``frame_shift`` (float64) is composed at every step and applied when the rows are read, so
    rounding errors never accumulate. Results equal the straightforward computation (moments by a
    pass over the rows, then Eq. 6) up to float rounding.

    Args:
        size: Number of rows the memory holds.
        dim: Embedding dimension.
        adaptation: ``"none"``, ``"xbn"``, ``"axbn"``, or an :class:`~xbn_queue.adaptation.Adaptation`.
        eps: Added to the memory's standard deviation before dividing (Eq. 6).
        kalman_p0: AXBN initial estimation variance.
        kalman_q: AXBN process noise (relative to the measurement noise when ``kalman_r="auto"``).
        kalman_r: AXBN measurement noise for a batch of one (divided by ``B``), or ``"auto"``.
        kalman_gain_every: AXBN recomputes the Kalman gain every this many steps.
        gather_distributed: All-gather batches across ranks before statistics and enqueue, so
            every rank holds the same memory. A no-op without a process group. Every rank must
            then call the state-changing methods in lockstep.
        dtype: Storage dtype of the rows (float32 by default). Values read back are float32.
            ``torch.bfloat16`` / ``torch.float16`` halve the memory; their statistics and map are
            float32 / float64, and the rows are read back as float32 (``valid_memory()`` then
            returns a materialised float32 tensor rather than a view).
        stats_resync_every: Recompute the memory's running sums exactly (one pass over the
            memory) at least every this many adaptations (and every ``len(self)`` adaptations
            when the memory holds fewer rows); 1 recomputes them at every step.

    Raises:
        ValueError: On a non-positive size, dim or ``stats_resync_every``, or a bad adaptation.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        adaptation: Union[str, Adaptation] = "xbn",
        eps: float = 1e-6,
        kalman_p0: float = 1.0,
        kalman_q: float = 1.0,
        kalman_r: Union[float, str] = 0.01,
        kalman_gain_every: int = 1,
        gather_distributed: bool = False,
        dtype: torch.dtype = torch.float32,
        stats_resync_every: int = 1000,
    ) -> None:
        super().__init__()
        if int(size) < 1 or int(dim) < 1:
            raise ValueError(f"size and dim must be positive, got size={size}, dim={dim}")
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if int(stats_resync_every) < 1:
            raise ValueError(f"stats_resync_every must be >= 1, got {stats_resync_every}")
        self.stats_resync_every = int(stats_resync_every)
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
        self.register_buffer("memory", torch.zeros(self.size, self.dim, dtype=dtype))  # (M, D)
        self.register_buffer("label_memory", torch.zeros(self.size, dtype=torch.long))  # (M,)
        self.register_buffer("id_memory", torch.zeros(self.size, dtype=torch.long))  # (M,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next row to write
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))  # n = min(enqueued, size)
        self.register_buffer("has_labels", torch.zeros((), dtype=torch.bool))
        self.register_buffer("has_ids", torch.zeros((), dtype=torch.bool))
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

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return int(self.num_filled)

    @property
    def is_full(self) -> bool:
        """Whether every row holds an enqueued embedding."""
        return len(self) == self.size

    @property
    def _fixed_frame(self) -> bool:
        return self.memory.dtype in _FIXED_FRAME_DTYPES

    def _materialize(self, n: int) -> Tensor:
        """``(n, dim)`` float32 rows of a fixed-frame memory: ``raw * frame_scale + frame_shift``."""
        raw = self.memory[:n]  # (n, D) bf16 / fp16
        return torch.addcmul(self.frame_shift.float(), raw, self.frame_scale.float())  # (n, D) float32, one pass

    @property
    def embeddings(self) -> Tensor:
        """``(n, dim)`` float32 copy of the valid rows, in storage order."""
        if self._fixed_frame:
            return self._materialize(len(self))
        return self.memory[: len(self)].to(torch.float32, copy=True)

    @property
    def labels(self) -> Optional[Tensor]:
        """``(n,)`` int64 labels of the valid rows, or ``None`` if labels were never given."""
        return self.label_memory[: len(self)].clone() if bool(self.has_labels) else None

    @property
    def ids(self) -> Optional[Tensor]:
        """``(n,)`` int64 sample ids of the valid rows, or ``None`` if ids were never given."""
        return self.id_memory[: len(self)].clone() if bool(self.has_ids) else None

    def valid_memory(self) -> Tensor:
        """``(n, dim)`` live view of the valid rows, in the storage dtype, without a copy.

        For integrations that only read the memory right away (e.g. to compute a loss), where a
        copy of a large memory would cost time. Do not modify it, and do not keep it across a
        state-changing call. A bfloat16 / float16 queue keeps raw rows in a fixed frame, so
        there this returns the rows materialised as a new float32 tensor.
        """
        if self._fixed_frame:
            return self._materialize(len(self))
        return self.memory[: len(self)]

    def valid_labels(self) -> Tensor:
        """``(n,)`` live view of the valid labels (zeros if labels were never given); see :meth:`valid_memory`."""
        return self.label_memory[: len(self)]

    # ------------------------------------------------------------------ checks
    def _check_embeddings(self, x: Tensor, what: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"{what}: expected a torch.Tensor of shape (B, {self.dim}), got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{what}: expected shape (B, {self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{what}: expected a floating-point tensor, got {x.dtype}")
        # A finite sum proves every entry finite (3 us instead of 60 for a 64 x 512 batch on CPU);
        # only a non-finite sum (NaN/Inf, or an overflow of large finite values) needs the full check.
        if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            raise ValueError(f"{what}: expected finite values, got NaN or Inf in {bad} of {x.shape[0]} rows")
        return x.detach().to(device=self.memory.device, dtype=torch.float32)

    def _check_index(self, x: Optional[Tensor], n: int, what: str) -> Optional[Tensor]:
        if x is None:
            return None
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x)
        if x.ndim != 1 or x.shape[0] != n:
            raise ValueError(f"{what}: expected shape ({n},) to match the {n} embeddings, got {tuple(x.shape)}")
        if x.is_floating_point() or x.is_complex():
            raise ValueError(f"{what}: expected an integer tensor, got {x.dtype}")
        return x.detach().to(device=self.memory.device, dtype=torch.long)

    def _check_consistent(self, given: bool, stored: Tensor, what: str) -> None:
        if len(self) > 0 and given != bool(stored):
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
        self._check_consistent(labels is not None, self.has_labels, "labels")
        self._check_consistent(ids is not None, self.has_ids, "ids")
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
            ValueError: Wrong shape, non-floating dtype or non-finite values.
        """
        b = self._check_embeddings(batch, "batch")
        if self.gather_distributed:
            b = all_gather_cat(b)
        self._adapt(b)

    def _adapt(self, batch: Tensor) -> None:
        n = len(self)
        if not self.adaptation.active or batch.shape[0] < 2 or n < 2:
            return
        batch_mean, batch_std = F.moments(batch)  # (D,), (D,)
        target = self.adaptation.target(batch_mean, batch_std, batch.shape[0])
        if target is None:
            return
        f64 = torch.float64
        raw_mean, raw_var = self._memory_moments(n)  # (D,), (D,) float64, storage frame, O(D)
        if self._fixed_frame:
            mem_mean = torch.addcmul(self.frame_shift, raw_mean, self.frame_scale)  # rows as read
            mem_std = raw_var.sqrt() * self.frame_scale.abs()
        else:
            mem_mean, mem_std = raw_mean, raw_var.sqrt()
        scale, shift = F.moment_matching_affine(mem_mean, mem_std, target[0].to(f64), target[1].to(f64), self.eps)
        # Re-center the sums on the mean (s1 = 0): deviations stay small, the sums keep their precision.
        self.stat_sum.zero_()
        if self._fixed_frame:
            self.stat_center.copy_(raw_mean)
            self.stat_sumsq.copy_(raw_var).mul_(n - 1)
            self._compose_frame(scale, shift, n)
        else:
            mem = self.memory[:n]  # (n, D), live
            a, b = scale.to(mem.dtype), shift.to(mem.dtype)  # what is really applied
            torch.addcmul(b, mem, a, out=mem)  # one fused pass over the memory
            center, _, s2 = F.affine_sums(raw_mean, self.stat_sum, raw_var * (n - 1), a.to(f64), b.to(f64))
            self.stat_center.copy_(center)
            self.stat_sumsq.copy_(s2)
        self.stat_age.add_(1)

    # ------------------------------------------------------------------ running statistics
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
        self.stat_age.zero_()
        self.stat_synced.fill_(True)

    def _memory_moments(self, n: int) -> Tuple[Tensor, Tensor]:
        """Mean and variance (float64, ``(D,)``, storage frame) of the ``n >= 2`` valid rows, from the running sums.

        The sums are re-synchronised exactly when they are stale, every ``min(stats_resync_every, n)``
        adaptations (so the float32 rounding of the rewritten rows, which the sums do not see,
        never adds up to more than about one rounding of the rows' magnitude), or when a dimension
        is at the rounding floor (e.g. a column that became constant, whose variance from the sums
        would be rounding noise instead of exactly 0).
        """
        mean, var = F.moments_from_sums(self.stat_center, self.stat_sum, self.stat_sumsq, n)  # (D,), (D,)
        # var (n-1) / s2 is 1 for sums centered on the mean; at the floor it is rounding noise. An
        # exactly constant column (s1 = s2 = 0) gives 0/0 = nan, which is not flagged.
        floor = var * (n - 1) / self.stat_sumsq <= _SUSPICIOUS_VARIANCE  # (D,)
        due = self.stat_age >= min(self.stats_resync_every, n)
        if bool(~self.stat_synced | due | floor.any()):  # one host sync
            self._sync_stats(n)
            mean, var = F.moments_from_sums(self.stat_center, self.stat_sum, self.stat_sumsq, n)
        return mean, var.clamp_min_(0)

    def _compose_frame(self, scale: Tensor, shift: Tensor, n: int) -> None:
        """Fixed frame: compose ``z -> z * scale + shift`` into the frame map; the raw rows stay as they are.

        Called with the sums re-centered, so ``stat_center`` / ``stat_sumsq`` are the raw rows' mean
        and ``(n - 1)`` times their variance.
        """
        frame_a, frame_b = self.frame_scale, self.frame_shift
        raw_mean, raw_var = self.stat_center, self.stat_sumsq / (n - 1)  # (D,), (D,)
        # Raw columns whose rows are all equal (then scale is 0): keep the frame scale and move the
        # shift so that every row reads the target mean.
        const = raw_var == 0  # (D,)
        new_a = torch.where(const, frame_a, scale * frame_a)
        new_b = torch.where(const, shift - frame_a * raw_mean, torch.addcmul(shift, frame_b, scale))
        frame_a.copy_(new_a)
        frame_b.copy_(new_b)
        raw_std = raw_var.sqrt()
        ill = (frame_a == 0) | (
            ~const
            & (
                (raw_mean.abs() > _FRAME_MAX_OFFSET * raw_std)
                | (raw_std > _FRAME_SPREAD_LIMIT)
                | (raw_std < 1.0 / _FRAME_SPREAD_LIMIT)
            )
        )  # (D,)
        if bool(ill.any()):
            self._rebase(n)

    def _rebase(self, n: int) -> None:
        """Re-base the fixed frame: rewrite the raw rows (once) so each column has mean 0 and unit spread.

        The new frame is ``(std, mean)`` of the rows as read (scale 1 for a constant column), so
        low-precision raw rows keep their full relative precision. Sums are then synced exactly.
        """
        raw_mean, raw_var = self.stat_center, self.stat_sumsq.clamp_min(0) / (n - 1)  # (D,) raw frame
        eff_mean = torch.addcmul(self.frame_shift, raw_mean, self.frame_scale)  # (D,)
        eff_std = raw_var.sqrt() * self.frame_scale.abs()  # (D,)
        new_a = torch.where(eff_std > 0, eff_std, torch.ones_like(eff_std))
        # raw' = (raw * A + B - B') / A'
        r = (self.frame_scale / new_a).float()  # (D,)
        t = ((self.frame_shift - eff_mean) / new_a).float()  # (D,)
        for start in range(0, n, F._CHUNK_ROWS):
            chunk = self.memory[start : min(start + F._CHUNK_ROWS, n)]  # (c, D), live
            chunk.copy_(torch.addcmul(t, chunk.float(), r))
        self.frame_scale.copy_(new_a)
        self.frame_shift.copy_(eff_mean)
        self._sync_stats(n)

    def _start_frame(self, emb: Tensor) -> None:
        """Fixed frame for the first rows of an empty memory: their mean and std, so raw rows are centered."""
        self.frame_shift.copy_(emb.to(torch.float64).mean(dim=0))
        if emb.shape[0] >= 2:
            std = emb.to(torch.float64).std(dim=0)  # (D,)
            self.frame_scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))
        else:
            self.frame_scale.fill_(1.0)

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
            ``(B',)`` int64 row positions written (``B' = B`` times the world size when gathering).

        Raises:
            ValueError: Wrong shapes, non-finite values, a batch larger than the queue, or labels /
                ids given inconsistently. Nothing is changed then.
        """
        emb, labels, ids = self._prepare(embeddings, labels, ids)
        return self._enqueue(emb, labels, ids)

    def _enqueue(self, emb: Tensor, labels: Optional[Tensor], ids: Optional[Tensor]) -> Tensor:
        b = emb.shape[0]
        n_old = len(self)
        pos = (self.ptr + torch.arange(b, device=self.memory.device)) % self.size  # (B,)
        if self._fixed_frame:
            if n_old == 0:
                self._start_frame(emb)
            rows = ((emb.to(torch.float64) - self.frame_shift) / self.frame_scale).to(self.memory.dtype)  # (B, D) raw
        else:
            rows = emb.to(self.memory.dtype)  # (B, D)
        track = self.adaptation.active and n_old > 0 and bool(self.stat_synced)
        if track:
            # Rows are written in order until the memory is full, so the valid rows are 0..n-1 and
            # the rows this batch overwrites are its last k positions.
            k = min(b, max(0, n_old + b - self.size))
            self._add_to_sums(rows, 1.0)
            if k > 0:
                first = (int(self.ptr) + b - k) % self.size
                old = self.memory[first : first + k] if first + k <= self.size else self.memory[pos[b - k :]]
                self._add_to_sums(old, -1.0)
        start = int(self.ptr)
        if start + b <= self.size:  # no wrap: a plain slice copy
            self.memory[start : start + b] = rows
        else:
            self.memory[pos] = rows
        if labels is not None:
            self.label_memory[pos] = labels
            self.has_labels.fill_(True)
        if ids is not None:
            self.id_memory[pos] = ids
            self.has_ids.fill_(True)
        self.ptr.copy_((self.ptr + b) % self.size)
        self.num_filled.clamp_(max=self.size - b).add_(b)  # min(n + b, size)
        if self.adaptation.active and n_old == 0:
            self._sync_stats(b)  # the first rows: exact sums, about a stored row
        return pos

    def _add_to_sums(self, rows: Tensor, sign: float) -> None:
        """Add (``sign=1``) or remove (``sign=-1``) stored ``rows`` ``(k, D)`` from the running sums."""
        dev = rows.to(torch.float64) - self.stat_center  # (k, D)
        self.stat_sum.add_(dev.sum(dim=0), alpha=sign)
        self.stat_sumsq.add_(dev.mul_(dev).sum(dim=0), alpha=sign)

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
    def reset(self) -> None:
        """Empty the memory and forget the adaptation state."""
        self.memory.zero_()
        self.label_memory.zero_()
        self.id_memory.zero_()
        self.ptr.zero_()
        self.num_filled.zero_()
        self.has_labels.fill_(False)
        self.has_ids.fill_(False)
        self.stat_center.zero_()
        self.stat_sum.zero_()
        self.stat_sumsq.zero_()
        self.stat_age.zero_()
        self.stat_synced.fill_(False)
        self.frame_scale.fill_(1.0)
        self.frame_shift.zero_()
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
                self.stat_synced.fill_(False)
        return self

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, dtype={self.memory.dtype}, "
            f"gather_distributed={self.gather_distributed}, stats_resync_every={self.stats_resync_every}"
        )
