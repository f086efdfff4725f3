"""Count the aten ops and host synchronisations a piece of PyTorch code dispatches.

``aten._local_scalar_dense`` is the op behind ``.item()`` / ``int()`` / ``bool()`` / ``float()`` of a
tensor: on a GPU each one stalls the host until the device has caught up. Every other aten op is
about one kernel launch on a GPU. Counting works on any device, the CPU included, so a test can show
that a step is sync-free without a GPU::

    from xbn_queue.opcount import OpCounter
    with OpCounter() as c:
        queue.update(z, labels)
    assert c.syncs == 0, c.ops
"""

from __future__ import annotations

import collections
from typing import Callable, Dict

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OP", "OpCounter", "count_ops"]

#: The aten op behind a device-to-host read of a tensor's value.
SYNC_OP = "aten._local_scalar_dense.default"


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by name (``ops["aten.add_.Tensor"]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        """Host synchronisations (``aten._local_scalar_dense`` calls)."""
        return self.ops[SYNC_OP]

    @property
    def total(self) -> int:
        """All aten ops, host synchronisations included."""
        return sum(self.ops.values())


def count_ops(fn: Callable[[], object]) -> OpCounter:
    """Run ``fn()`` under an :class:`OpCounter` and return the counter."""
    counter = OpCounter()
    with counter:
        fn()
    return counter
