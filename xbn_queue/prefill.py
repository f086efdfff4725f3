"""Fill a memory with the embeddings of a data loader under the current model (a warm start).

After a warm-up on the batch alone, the memory can start from the warmed-up model's features
instead of filling over the next ``size / B`` steps (the XBM paper starts its memory after a
warm-up; PML and lightly users ask for this)::

    from xbn_queue import prefill
    prefill(loss_fn.queue, model, train_loader)            # PML drop-in, or any AdaptiveQueue
    prefill(criterion.memory_bank, key_encoder, loader,    # lightly's NTXentLoss stores unit keys
            embed=lambda m, x: torch.nn.functional.normalize(m(x), dim=1))

Rows are written with ``enqueue`` (no adaptation, no training step counted: the warm-up counter
of :class:`~xbn_queue.AdaptiveQueue` is left alone), without gradients, in the order of the loader,
until ``rows`` rows were written (the memory's size by default) or the loader ends.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterable, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["prefill", "memory_size"]

Unpacked = Tuple[Any, Optional[Tensor], Optional[Tensor]]


def _default_unpack(batch: Any) -> Unpacked:
    """``x``, ``(x,)``, ``(x, labels)`` or ``(x, labels, ids)`` (lists too)."""
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        items = list(batch) + [None] * (3 - len(batch))
        return items[0], items[1], items[2]
    raise ValueError(
        f"prefill: cannot read a batch of type {type(batch).__name__} (expected x, (x, labels) or "
        "(x, labels, ids)); pass unpack=..."
    )


def memory_size(memory: Any) -> int:
    """The rows ``memory`` holds: an :class:`~xbn_queue.AdaptiveQueue`'s ``size``, or its ``.queue``'s.

    Raises:
        ValueError: ``memory`` is neither.
    """
    queue = getattr(memory, "queue", memory)
    size = getattr(queue, "size", None)
    if not isinstance(size, int):
        raise ValueError(
            f"prefill: {type(memory).__name__} is not a memory (expected an AdaptiveQueue, or an object with "
            "an AdaptiveQueue in .queue and an enqueue(embeddings, labels, ids) method)"
        )
    return size


def _module_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    """``model`` in train (``True``) or eval mode inside the block; every submodule's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _enqueue_at_most(memory: Any, emb: Tensor, labels: Optional[Tensor], ids: Optional[Tensor], room: int) -> int:
    """Enqueue the first ``room`` rows of a batch at most (the last batch is cut to fit); the rows written."""
    k = min(emb.shape[0], room)
    if k < emb.shape[0]:
        emb = emb[:k]  # (k, D)
        labels = labels[:k] if labels is not None else None
        ids = ids[:k] if ids is not None else None
    memory.enqueue(emb.detach(), labels, ids)
    return k


@torch.no_grad()
def prefill(
    memory: Any,
    model: nn.Module,
    loader: Iterable[Any],
    *,
    train: bool = False,
    rows: Optional[int] = None,
    device: Optional[torch.device] = None,
    embed: Optional[Callable[[nn.Module, Any], Tensor]] = None,
    unpack: Callable[[Any], Unpacked] = _default_unpack,
    progress: Optional[bool] = None,
) -> int:
    """Enqueue ``model``'s embeddings of ``loader``'s batches, with their labels and ids, into ``memory``.

    Args:
        memory: an :class:`~xbn_queue.AdaptiveQueue`, or a drop-in's memory with an
            ``enqueue(embeddings, labels, ids)`` method (``AdaptiveMemoryBank``); for the PML
            drop-in and the selfsup loss pass their ``.queue``.
        model: computes the embeddings (``model(x)``, or ``embed(model, x)``).
        loader: iterable of batches (a ``DataLoader``), read until ``rows`` rows are written.
        train: run the model in train mode (``True``) or eval mode (``False``, the default);
            every submodule's mode is restored afterwards.
        rows: rows to write (default: the memory's size). The last batch is cut to fit, so the
            first rows written are not overwritten.
        device: where the inputs go (default: the device of the model's first parameter).
        embed: ``embed(model, x) -> (B, D)`` instead of ``model(x)`` (e.g. to L2-normalise).
        unpack: ``batch -> (x, labels or None, ids or None)``; by default ``x``, ``(x,)``,
            ``(x, labels)`` or ``(x, labels, ids)``.
        progress: show a progress bar (tqdm, if installed); ``None``: only on a terminal.

    Returns:
        The number of rows written (fewer than ``rows`` if the loader ended first).

    Raises:
        ValueError: a memory without a size, ``rows`` outside ``[1, size]``, a batch that cannot be
            unpacked, or what the memory's ``enqueue`` refuses (wrong shapes, labels given
            inconsistently...).
    """
    capacity = memory_size(memory)
    target = capacity if rows is None else int(rows)
    if not 1 <= target <= capacity:
        raise ValueError(f"prefill: rows must be in [1, {capacity}] (the memory's size), got {rows}")
    device = _module_device(model) if device is None else torch.device(device)
    written = 0
    with _mode(model, train), _progress_bar(target, progress) as bar:
        for batch in loader:
            x, labels, ids = unpack(batch)
            x = x.to(device) if isinstance(x, Tensor) else x
            emb = embed(model, x) if embed is not None else model(x)  # (B, D)
            k = _enqueue_at_most(memory, emb, labels, ids, target - written)
            written += k
            bar.update(k)
            if written >= target:
                break
    return written


@contextlib.contextmanager
def _progress_bar(total: int, progress: Optional[bool]) -> Iterator[Any]:
    """A tqdm bar of ``total`` rows (closed at the block's end), or an object whose ``update`` does nothing."""
    tqdm = None
    if progress or (progress is None and sys.stderr.isatty()):
        try:
            from tqdm import tqdm
        except ImportError:  # the core needs torch only: no bar without tqdm
            pass
    if tqdm is None:
        yield _NoBar()
        return
    bar = tqdm(total=total, desc="prefill", unit="rows", leave=False)
    try:
        yield bar
    finally:
        bar.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass
