"""tqdm progress bars on a terminal, plain lines in a log file, nothing on non-main ranks.

``enabled=None`` (the trainers' default, ``--progress`` / ``--no-progress`` override it) means "a bar
only when stderr is a terminal"; otherwise long loops print a plain line about every tenth of the way
(``epoch 3/13: 500/5000 steps, 41 s``) instead of carriage-return updates that bloat a log file.

``progress(loader, desc="epoch 3")`` is ``tqdm(loader, ...)`` on rank 0 and a silent pass-through on
other ranks, when ``enabled=False``, or when tqdm is not installed. The returned object always supports
``set_postfix``, ``set_description``, ``update`` and ``close``, so loop code need not check::

    bar = progress(loader, total=len(loader), desc=f"epoch {epoch}", enabled=cfg.progress)
    for batch in bar:
        ...
        bar.set_postfix(loss=f"{loss.item():.3f}")
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, Optional, TypeVar

from xbn_queue.training.distributed import is_main_process

__all__ = ["progress"]

T = TypeVar("T")


class _Silent(Generic[T]):
    """Pass-through iterable with tqdm's most used methods as no-ops."""

    def __init__(self, iterable: Iterable[T], total: Optional[int] = None) -> None:
        self.iterable = iterable
        self.total = total

    def __iter__(self) -> Iterator[T]:
        return iter(self.iterable)

    def __len__(self) -> int:
        if self.total is not None:
            return self.total
        return len(self.iterable)  # type: ignore[arg-type]

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """No-op."""

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        """No-op."""

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        """No-op."""

    def update(self, n: float = 1) -> None:
        """No-op."""

    def write(self, s: str, *args: Any, **kwargs: Any) -> None:
        """No-op."""

    def close(self) -> None:
        """No-op."""

    def __enter__(self) -> "_Silent[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _Lines(_Silent[T]):
    """Pass-through that prints ``desc: i/total steps, t s`` to stderr every ``every`` items."""

    def __init__(self, iterable: Iterable[T], total: Optional[int], desc: Optional[str], every: int) -> None:
        super().__init__(iterable, total)
        self.desc, self.every = desc or "progress", every

    def __iter__(self) -> Iterator[T]:
        t0 = time.monotonic()
        for i, item in enumerate(self.iterable, 1):
            yield item
            if i % self.every == 0 and i != self.total:
                print(f"{self.desc}: {i}/{self.total} steps, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)


#: Loops shorter than this print no plain lines (the trainers print one line per epoch anyway).
LINE_MIN_TOTAL = 50


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(
    iterable: Iterable[T],
    total: Optional[int] = None,
    desc: Optional[str] = None,
    enabled: Optional[bool] = True,
    **kw: Any,
) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar on the main rank.

    Args:
        iterable: What to iterate over.
        total: Number of items (defaults to ``len(iterable)`` when it has one).
        desc: Bar label.
        enabled: ``True`` a bar, ``False`` nothing (``--no-progress``), ``None`` a bar when stderr is a
            terminal and otherwise a plain line every tenth of a loop of at least
            :data:`LINE_MIN_TOTAL` items.
        **kw: Passed to ``tqdm`` (e.g. ``leave=False``, ``file=...``).

    Returns:
        A tqdm object, or a pass-through with the same basic methods.
    """
    if not is_main_process() or enabled is False:
        return _Silent(iterable, total)
    if enabled is None and not _stderr_is_terminal():
        n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        if n is None or n < LINE_MIN_TOTAL:
            return _Silent(iterable, total)
        return _Lines(iterable, n, desc, every=math.ceil(n / 10))
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent(iterable, total)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, **kw)
