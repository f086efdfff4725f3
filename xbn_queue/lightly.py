"""Drop-in adaptive memory bank for lightly's losses (e.g. ``NTXentLoss`` in MoCo).

Example:
    >>> from lightly.loss import NTXentLoss
    >>> from xbn_queue.lightly import AdaptiveMemoryBank
    >>> criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
    >>> criterion.memory_bank = AdaptiveMemoryBank(size=(4096, 128), adaptation="xbn")
    >>> loss = criterion(query, key)  # key's statistics adapt the bank, then key is enqueued

lightly's ``NTXentLoss`` calls ``self.memory_bank.forward(out1, update=out0.requires_grad)`` and uses
the returned bank (D, n) as negatives without normalizing them; XBN's moment matching moves rows off
the unit sphere, so the bank is returned L2-normalized by default (``normalize=False`` returns the
adapted rows as stored).

Differences from lightly's ``MemoryBankModule``, by design:

* The memory starts empty and only valid rows are returned, so the bank has shape (D, n) with
  n = min(rows enqueued, N). On the very first call it is an empty (D, 0) tensor (lightly's bank
  instead starts with N random unit vectors); ``NTXentLoss`` then has only the positive logit and its
  loss is exactly 0 for that one step, with zero gradient.
* A batch that does not fit before the end of the ring wraps around to row 0 (lightly drops the rest
  of the batch); with N a multiple of the batch size both banks hold the same rows.
* All state (rows, pointer, adaptation state) is in registered, persistent buffers of ``queue``, so
  ``state_dict()`` checkpoints the bank (lightly's bank buffer is non-persistent).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import Module

try:
    from lightly.models.modules.memory_bank import MemoryBankModule
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("xbn_queue.lightly needs lightly: pip install 'xbn-queue[lightly]'") from e

from . import distributed as xdist
from .queue import AdaptiveQueue

__all__ = ["AdaptiveMemoryBank"]


class AdaptiveMemoryBank(MemoryBankModule):
    """A lightly ``MemoryBankModule`` backed by an :class:`~xbn_queue.AdaptiveQueue` (XBM / XBN / AXBN).

    It subclasses lightly's ``MemoryBankModule`` (without allocating lightly's random bank) so that it
    is accepted wherever lightly expects a memory bank; all state lives in ``self.queue``.

    Args:
        size: (N, D): number of stored rows and their dimension.
        adaptation: ``"none"`` (plain memory bank), ``"xbn"`` (Eq. 6) or ``"axbn"`` (Eq. 18-23).
        gather_distributed: all-gather the batch across ranks before the statistics and the enqueue
            (as lightly's bank does before its enqueue); a no-op without a process group.
        feature_dim_first: return the bank as (D, n) (lightly's default) instead of (n, D).
        normalize: L2-normalize the returned rows (the stored rows are left as adapted).
        **queue_kwargs: further :class:`~xbn_queue.AdaptiveQueue` arguments (``eps``, ``kalman_*``, ...).

    Raises:
        ValueError: if ``size`` is not a pair of positive ints.
    """

    def __init__(
        self,
        size: Sequence[int],
        adaptation: str = "xbn",
        gather_distributed: bool = False,
        feature_dim_first: bool = True,
        normalize: bool = True,
        **queue_kwargs: Any,
    ) -> None:
        # Skip MemoryBankModule.__init__: it allocates a random (N, D) bank we would never use.
        Module.__init__(self)
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if len(size_tuple) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size_tuple):
            raise ValueError(f"size must be a pair (N, D) of positive ints, got {size!r}")
        self.size = size_tuple
        self.gather_distributed = bool(gather_distributed)
        self.feature_dim_first = bool(feature_dim_first)
        self.normalize = bool(normalize)
        self.adaptation = adaptation
        # The bank gathers across ranks itself (once per step, for both the statistics and the
        # enqueue), so its queue does not gather again.
        self.queue = AdaptiveQueue(size=size_tuple[0], dim=size_tuple[1], adaptation=adaptation, **queue_kwargs)

    def forward(
        self,
        output: Tensor,
        labels: Optional[Tensor] = None,
        update: bool = False,
    ) -> Tuple[Tensor, Tensor]:
        """Return the (adapted) bank, then enqueue ``output`` if ``update``.

        Args:
            output: (B, D) embeddings of this batch (e.g. the keys), returned unchanged.
            labels: ignored (lightly's signature).
            update: adapt the stored rows to ``output``'s statistics, return them, then enqueue
                ``output``. Without it the bank is returned as it is and nothing changes.

        Returns:
            ``(output, bank)`` with ``bank`` (D, n) if ``feature_dim_first`` else (n, D), float32,
            detached, a copy (never the live memory), L2-normalized rows if ``normalize``; n = 0 on
            an empty memory.

        Raises:
            ValueError: if ``output`` is not (B, D) with finite values and B <= N (before anything changes).
        """
        if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[1] != self.size[1]:
            raise ValueError(
                f"output must be (B, D={self.size[1]}), got {tuple(getattr(output, 'shape', ()))}"
            )
        with torch.no_grad():
            if update:
                batch = output.detach()
                if self.gather_distributed and xdist.is_distributed():
                    batch = xdist.all_gather_cat(batch)  # (B * world, D), rank order
                if batch.shape[0] > self.size[0]:  # checked before the memory is adapted
                    raise ValueError(
                        f"output: a batch of {batch.shape[0]} rows is larger than the memory bank size {self.size[0]}"
                    )
                self.queue.adapt(batch)
            bank = self._snapshot()  # (n, D), a copy
            if update:
                self.queue.enqueue(batch)
        if self.feature_dim_first:
            bank = bank.t()  # (D, n)
        return output, bank

    def _snapshot(self) -> Tensor:
        """(n, D) float32 copy of the stored rows, L2-normalized if ``normalize``."""
        rows = self.queue.valid_memory()  # (n, D): a live view, or new rows for a fixed-frame queue
        live = rows.untyped_storage().data_ptr() == self.queue.memory.untyped_storage().data_ptr()
        if self.normalize and not live:  # rows materialised just now: normalise them in place
            return rows.div_(torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min_(1e-12))
        if self.normalize:
            return torch.nn.functional.normalize(rows.float(), dim=1)  # new tensor, never the buffer
        return rows.to(torch.float32, copy=live)

    @property
    def bank(self) -> Tensor:  # type: ignore[override]
        """(n, D) copy of the stored rows as stored (lightly's attribute name; not normalized)."""
        return self.queue.embeddings  # already a float32 copy

    @property
    def bank_ptr(self) -> Tensor:  # type: ignore[override]
        """(1,) long tensor with the write pointer (lightly's attribute name)."""
        return torch.tensor([int(self.queue.ptr)], dtype=torch.long)

    @torch.no_grad()
    def _init_memory_bank(self, size: Tuple[int, ...]) -> None:
        """Empty the memory (lightly's method name)."""
        self.queue.reset()

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch: Tensor) -> None:
        """Enqueue ``batch`` (B, D) without adapting (lightly's method name)."""
        if self.gather_distributed and xdist.is_distributed():
            batch = xdist.all_gather_cat(batch.detach())
        self.queue.enqueue(batch)

    def reset(self) -> None:
        """Empty the memory and the adaptation state."""
        self.queue.reset()

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, adaptation={self.adaptation!r}, gather_distributed={self.gather_distributed}, "
            f"feature_dim_first={self.feature_dim_first}, normalize={self.normalize}"
        )
