"""xbn-queue: adaptive cross-batch memories (XBM / XBN / AXBN) for PyTorch.

The core needs torch only::

    from xbn_queue import AdaptiveQueue
    q = AdaptiveQueue(size=4096, dim=128, adaptation="xbn")   # "none" | "xbn" | "axbn"
    q.adapt(batch)
    q.enqueue(batch, labels)

Integrations import their libraries lazily: ``xbn_queue.pml`` (pytorch-metric-learning),
``xbn_queue.lightly`` (lightly); diagnostics live in ``xbn_queue.drift``.
"""

from . import functional
from .adaptation import ADAPTATIONS, AXBN, XBN, Adaptation, NoAdaptation, build_adaptation
from .queue import AdaptiveQueue

__version__ = "0.3.0"

__all__ = [
    "AdaptiveQueue",
    "Adaptation",
    "NoAdaptation",
    "XBN",
    "AXBN",
    "ADAPTATIONS",
    "build_adaptation",
    "functional",
    "__version__",
]
