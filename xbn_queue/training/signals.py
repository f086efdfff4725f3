"""Turn SIGTERM / SIGINT into a "checkpoint and stop" request instead of a crash.

Inside ``with GracefulExit() as stop:`` the first SIGTERM or SIGINT only sets ``stop.requested``; the
training loop checks it after each step, writes a checkpoint and returns. A second SIGINT (Ctrl-C pressed
again) raises ``KeyboardInterrupt`` at once, for a user who does not want to wait. The previous handlers
are restored when the block exits::

    with GracefulExit() as stop:
        for step, batch in enumerate(loader):
            train_step(batch)
            if stop.requested:
                atomic_save(state(), out / "last.pt")
                break

Contexts nest (a comparison around its runs): a signal caught by the inner one is also recorded by
every enclosing one, and an inner context entered after a signal already reached an enclosing one
starts with ``requested`` set, so a run that begins (or is still loading its data) when Ctrl-C
arrives stops at its first step instead of training to the end.

Handlers can only be installed from the main thread; elsewhere the context does nothing but warn.
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any, Optional

__all__ = ["GracefulExit"]


class GracefulExit:
    """Context manager that records termination signals instead of dying.

    Args:
        signals: Signals to catch (default SIGTERM and SIGINT).
        enabled: If False, the context installs nothing (``requested`` stays False unless
            :meth:`request` is called).
        verbose: Print a one-line notice to stderr when a signal arrives.

    Attributes:
        requested: True once a caught signal arrived (or :meth:`request` was called).
        signum: The first signal received, or ``None``.
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        enabled: bool = True,
        verbose: bool = True,
    ) -> None:
        self.signals = tuple(signals)
        self.enabled = enabled
        self.verbose = verbose
        self.requested = False
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    #: The contexts entered and not yet exited, outermost first.
    _active: "list[GracefulExit]" = []

    def request(self, signum: Optional[int] = None) -> None:
        """Ask the loop to stop, as if a signal had arrived."""
        self.requested = True
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = not self.requested
        self.request(signum)
        for outer in GracefulExit._active:  # enclosing contexts learn about it too
            outer.request(signum)
        if self.verbose and first:
            name = signal.Signals(signum).name
            hint = "; press Ctrl-C again to abort now" if signum == signal.SIGINT else ""
            print(f"[xbn_queue] received {name}: will checkpoint and stop after the current step{hint}",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulExit":
        if not self.enabled:
            return self
        pending = next((c for c in GracefulExit._active if c.requested), None)
        if pending is not None:  # a signal reached an enclosing context before this one started
            self.request(pending.signum)
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("GracefulExit: not in the main thread, signal handlers not installed", stacklevel=2)
            return self
        GracefulExit._active.append(self)
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        if self in GracefulExit._active:
            GracefulExit._active.remove(self)
