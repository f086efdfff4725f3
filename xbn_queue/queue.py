"""The adaptive cross-batch memory: a ring buffer of embeddings (and labels, ids) with a pluggable adaptation."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional as F
from .adaptation import Adaptation, build_adaptation
from .distributed import all_gather_cat

__all__ = ["AdaptiveQueue"]


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

    Raises:
        ValueError: On a non-positive size or dim, or a bad adaptation.
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
    ) -> None:
        super().__init__()
        if int(size) < 1 or int(dim) < 1:
            raise ValueError(f"size and dim must be positive, got size={size}, dim={dim}")
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
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

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return int(self.num_filled)

    @property
    def is_full(self) -> bool:
        """Whether every row holds an enqueued embedding."""
        return len(self) == self.size

    @property
    def embeddings(self) -> Tensor:
        """``(n, dim)`` float32 copy of the valid rows, in storage order."""
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
        state-changing call.
        """
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
        if not bool(torch.isfinite(x).all()):
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
        mem = self.memory[:n]  # (n, D), live
        mem_mean, mem_std = F.moments(mem)  # (D,), (D,)
        scale, shift = F.moment_matching_affine(mem_mean, mem_std, target[0], target[1], self.eps)
        F.apply_affine_(mem, scale, shift)

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
        pos = (self.ptr + torch.arange(b, device=self.memory.device)) % self.size  # (B,)
        self.memory[pos] = emb.to(self.memory.dtype)
        if labels is not None:
            self.label_memory[pos] = labels
            self.has_labels.fill_(True)
        if ids is not None:
            self.id_memory[pos] = ids
            self.has_ids.fill_(True)
        self.ptr.copy_((self.ptr + b) % self.size)
        self.num_filled.clamp_(max=self.size - b).add_(b)  # min(n + b, size)
        return pos

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
        self.adaptation.reset()

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, dtype={self.memory.dtype}, "
            f"gather_distributed={self.gather_distributed}"
        )
