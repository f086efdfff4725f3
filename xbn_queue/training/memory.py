"""The memory options both trainers share: one :class:`MemoryOptions`, one set of bounds, one size -> rows rule.

Each trainer keeps its own option names (``xbn-metric --memory-size`` takes rows or a fraction of the
training set, ``xbn-selfsup --queue-size`` rows; ``--method`` or ``--adaptation`` picks the adaptation),
and its ``config.yaml`` keeps them flat. What the options mean, their bounds and the arguments they give
the memory are here, once:

- a trainer declares each memory field with :func:`memory_field`, which attaches the shared bound
  (:data:`BOUNDS`, a :class:`~xbn_queue.training.cli.Range` shown in ``--help``, or a rule for
  ``--memory-size`` / ``--kalman-r``); :func:`~xbn_queue.training.cli.check_ranges`, the command line's
  check, enforces them (one line naming the option, exit status 2);
- ``cfg.memory_options()`` gathers the fields into a :class:`MemoryOptions`;
- right after the data is loaded, :meth:`MemoryOptions.rows` turns the size into rows and checks them
  once (a global batch fits, ``--prefill`` has enough distinct images, the device can hold them); the
  trainer passes the rows down;
- :meth:`MemoryOptions.queue_kwargs` gives the :class:`~xbn_queue.AdaptiveQueue` arguments (adaptation,
  warm-up, the Kalman filter's), which the memory takes as they are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Union

from xbn_queue.adaptation import kalman_r_value
from xbn_queue.training.cli import (Range, UsageError, above, at_least, check_memory_fits,
                                    check_memory_holds_a_batch)

__all__ = ["MemoryOptions", "BOUNDS", "RULES", "memory_field", "memory_rows", "check_memory_size", "check_kalman_r"]

#: The bounds of the numeric memory options, one set for both trainers (by :class:`MemoryOptions` field;
#: ``rows`` is a row count such as ``--queue-size``).
BOUNDS: Dict[str, Range] = {
    "rows": at_least(1),
    "warmup_steps": at_least(0),
    "kalman_p0": above(0),
    "kalman_q": at_least(0),
    "kalman_gain_every": at_least(1),
}

_EXPECTED_SIZE = "expected a row count >= 1 or a fraction of the training set > 0 (like 0.5 or 2.0)"


def _size_value(option: str, size: Union[int, float, str]) -> Union[int, float]:
    """``size`` as the int (rows) or float (a fraction of the training set) it stands for, checked."""
    if isinstance(size, bool):
        raise UsageError(f"{option} {size}: {_EXPECTED_SIZE}")
    value: Union[int, float]
    if isinstance(size, (int, float)):
        value = size
    else:
        text = str(size).strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise UsageError(f"{option} {size}: {_EXPECTED_SIZE}") from None
    if isinstance(value, float):
        if not (math.isfinite(value) and value > 0.0):
            raise UsageError(f"{option} {size}: a fraction of the training set must be a finite number > 0")
    elif value not in BOUNDS["rows"]:
        raise UsageError(f"{option} {size}: {_EXPECTED_SIZE}")
    return value


def memory_rows(size: Union[int, float, str], num_train: Optional[int], option: str = "--memory-size") -> int:
    """The memory's rows: an integer is a row count, a float (``0.5``, ``2.0``, ``5e-1``; also as a string)
    a multiple of the ``num_train`` training images, i.e. of an epoch (rounded, at least 1).

    A memory may hold more than an epoch (``2.0``, or a count above ``num_train``): it then keeps older
    copies of the same images, which have the same label and so are positives of their anchors.

    Args:
        size: The option's value.
        num_train: Training images, or ``None`` to check the value alone (returns 0 for a fraction).
        option: The option named in messages.

    Raises:
        UsageError: an unparsable value, a fraction that is not a finite number > 0, a count < 1.
    """
    value = _size_value(option, size)
    if isinstance(value, float):
        return 0 if num_train is None else max(1, int(round(value * num_train)))
    return value


def check_memory_size(option: str, value: Union[int, float, str]) -> None:
    """The rule of a memory size (a row count >= 1 or a fraction of the training set > 0), for ``check_ranges``."""
    _size_value(option, value)


def check_kalman_r(option: str, value: Union[float, str]) -> None:
    """The rule of ``--kalman-r`` (:func:`xbn_queue.adaptation.kalman_r_value`), for ``check_ranges``."""
    if kalman_r_value(value) is None:
        raise UsageError(f"{option} {value}: expected a number > 0, 'auto' or 'sampling'")


#: The memory options whose rule is more than a range: ``check(option, value)`` raises a one-line ``UsageError``.
RULES: Dict[str, Callable[[str, Any], None]] = {"size": check_memory_size, "kalman_r": check_kalman_r}


def memory_field(kind: str, default: Any, help: str, **metadata: Any) -> Any:
    """A trainer's config field for the memory option ``kind`` (a key of :data:`BOUNDS` or :data:`RULES`),
    carrying the shared bound: a ``range`` (enforced by ``check_ranges`` and shown in ``--help``) or a
    ``check`` rule (enforced by ``check_ranges``).

    Args:
        kind: ``"rows"``, ``"size"``, ``"warmup_steps"``, ``"kalman_p0"``, ``"kalman_q"``,
            ``"kalman_gain_every"`` or ``"kalman_r"``.
        default: The field's default.
        help: The option's help text.
        **metadata: Further field metadata (``group``, ...).

    Raises:
        KeyError: an unknown kind.
    """
    if kind in BOUNDS:
        metadata["range"] = BOUNDS[kind]
    else:
        metadata["check"] = RULES[kind]
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    """The memory of a run as the options describe it (built by ``cfg.memory_options()`` from checked options).

    Args:
        adaptation: ``"none"`` (XBM), ``"xbn"``, ``"axbn"``, ``"xbn-cov"``; ``None``: the run has no memory
            (``xbn-metric --method none``), its size is only recorded.
        size: Rows (an int), or a multiple of the training set (a float, ``xbn-metric``).
        warmup_steps: Steps the memory stays out of the loss while it fills and adapts.
        prefill: Fill the memory with distinct training images before its first step in the loss.
        kalman_p0: AXBN's initial estimate variance.
        kalman_q: AXBN's process noise (``None``: the noise model's default).
        kalman_r: AXBN's measurement noise: a number > 0, ``"auto"`` or ``"sampling"``.
        kalman_gain_every: AXBN recomputes its gain every this many steps.
        mask_same_ids: Leave stored keys of the query's own sample out of its negatives (``xbn-selfsup``).
        size_option: How messages name the size (``--memory-size``, ``--queue-size``).
    """

    adaptation: Optional[str]
    size: Union[int, float]
    warmup_steps: int = 0
    prefill: bool = False
    kalman_p0: float = 1.0
    kalman_q: Optional[float] = None
    kalman_r: Union[float, str] = 0.01
    kalman_gain_every: int = 1
    mask_same_ids: bool = False
    size_option: str = "--memory-size"

    def rows(self, num_train: int, dim: int, batch_size: int, world_size: int, device: Any = None) -> int:
        """The memory's rows for a training set of ``num_train`` images, checked once (call it right after
        the data is loaded; pass the result down).

        Args:
            num_train: Training images (a fraction is a multiple of them).
            dim: Embedding size (the memory is ``rows x dim``).
            batch_size: Batch size per process.
            world_size: Processes.
            device: Where the memory will live; ``None`` leaves its capacity unchecked (a series checking
                its plan before the runs, each of which checks it).

        Returns:
            The rows (without a memory, ``adaptation=None``: the rows the size stands for, unchecked).

        Raises:
            UsageError: a memory smaller than one global batch, ``prefill`` with more rows than training
                images, or a memory the device cannot hold (naming ``size_option`` and the value).
        """
        rows = memory_rows(self.size, num_train, self.size_option)
        if self.adaptation is None:
            return rows
        check_memory_holds_a_batch(self.size_option, self.size, rows, batch_size, world_size)
        if self.prefill and rows > num_train:
            raise UsageError(f"--prefill: fills the memory with distinct training images, but {self.size_option} "
                             f"{self.size} is {rows} rows, more than the {num_train} training images; use a memory "
                             "of at most the training set with --prefill")
        if device is not None:
            check_memory_fits(self.size_option, self.size, rows, dim, device)
        return rows

    def queue_kwargs(self) -> Dict[str, Any]:
        """The :class:`~xbn_queue.AdaptiveQueue` arguments these options set: ``adaptation``, ``warmup_steps``
        and, for AXBN, ``kalman_p0``, ``kalman_q``, ``kalman_r`` (as a float or the noise model's name) and
        ``kalman_gain_every``.

        Raises:
            ValueError: without a memory (``adaptation=None``).
        """
        if self.adaptation is None:
            raise ValueError("no memory (adaptation=None): there are no queue arguments")
        kw: Dict[str, Any] = {"adaptation": self.adaptation, "warmup_steps": self.warmup_steps}
        if self.adaptation == "axbn":
            kw.update(kalman_p0=self.kalman_p0, kalman_q=self.kalman_q, kalman_r=kalman_r_value(self.kalman_r),
                      kalman_gain_every=self.kalman_gain_every)
        return kw
