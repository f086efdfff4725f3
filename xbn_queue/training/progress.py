"""tqdm progress bars that stay quiet on non-main ranks.

``progress(loader, desc="epoch 3")`` is ``tqdm(loader, ...)`` on rank 0 and a silent pass-through on
other ranks, when ``enabled=False``, or when tqdm is not installed. The returned object always supports
``set_postfix``, ``set_description``, ``update`` and ``close``, so loop code need not check::

    bar = progress(loader, total=len(loader), desc=f"epoch {epoch}", enabled=cfg.progress)
    for batch in bar:
        ...
        bar.set_postfix(loss=f"{loss.item():.3f}")
"""

from __future__ import annotations

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


def progress(
    iterable: Iterable[T],
    total: Optional[int] = None,
    desc: Optional[str] = None,
    enabled: bool = True,
    **kw: Any,
) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar on the main rank.

    Args:
        iterable: What to iterate over.
        total: Number of items (defaults to ``len(iterable)`` when it has one).
        desc: Bar label.
        enabled: False disables the bar (e.g. ``--no-progress`` or in tests).
        **kw: Passed to ``tqdm`` (e.g. ``leave=False``, ``file=...``).

    Returns:
        A tqdm object, or a silent pass-through with the same basic methods.
    """
    if not enabled or not is_main_process():
        return _Silent(iterable, total)
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent(iterable, total)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, **kw)
