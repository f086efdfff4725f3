"""Optional ``torch.compile`` of the queue's O(D) bookkeeping, with a plain fallback.

The per-step bookkeeping of :mod:`xbn_queue.functional` that the queue runs through :class:`Fused`
(:func:`~xbn_queue.functional.xbn_step_` for float32 / float64 memories,
:func:`~xbn_queue.functional.frame_step_` for bfloat16 / float16 ones) is a dozen small element-wise
kernels in eager mode; compiled, each becomes one or two fused kernels. The AXBN filter step
(:func:`~xbn_queue.functional.kalman_step_`, six element-wise kernels) always runs eagerly.
Whether to compile:

* ``XBN_QUEUE_COMPILE=0`` (or ``false`` / ``off``) turns compilation off everywhere;
* otherwise the queue's ``compile=`` argument decides when it is ``True`` / ``False``;
* otherwise ``XBN_QUEUE_COMPILE=1`` turns it on everywhere;
* otherwise (the default) it is on for CUDA memories and off on CPU, where compiling needs a C++
  compiler and tens of seconds while the eager kernels cost microseconds.

A compilation that fails (no compiler, an unsupported torch build) warns once per function and
falls back to the eager function, which computes the same thing.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional

import torch

__all__ = ["compile_enabled", "Fused"]

_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def compile_enabled(device: torch.device, flag: Optional[bool]) -> bool:
    """Whether to use the compiled bookkeeping for a memory on ``device`` (see the module docstring)."""
    env = os.environ.get("XBN_QUEUE_COMPILE", "").strip().lower()
    if env in _OFF:
        return False
    if flag is not None:
        return bool(flag)
    if env in _ON:
        return True
    return device.type == "cuda"


class Fused:
    """A function that runs compiled (``torch.compile``, static shapes) when asked, eagerly otherwise.

    Compilation is lazy (first compiled call). Inside a region that is itself being compiled the
    plain function is traced instead (the outer compilation fuses it).

    Args:
        fn: The eager function; it must give the same results as its compiled form.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.failed = False
        self._compiled: Optional[Callable[..., Any]] = None

    def __call__(self, compiled: bool, *args: Any, **kwargs: Any) -> Any:
        if compiled and not self.failed and not torch.compiler.is_compiling():
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self.fn, dynamic=False)
                return self._compiled(*args, **kwargs)
            except Exception as e:  # compilation problems surface at the first call
                self.failed = True
                warnings.warn(
                    f"xbn_queue: torch.compile of {self.fn.__name__} failed ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); using the eager kernels "
                    "(set XBN_QUEUE_COMPILE=0 to skip the attempt)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return self.fn(*args, **kwargs)
