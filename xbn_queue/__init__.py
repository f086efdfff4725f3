"""xbn-queue: adaptive cross-batch memories (XBM / XBN / AXBN) for PyTorch.

The core needs torch only::

    from xbn_queue import AdaptiveQueue
    q = AdaptiveQueue(size=4096, dim=128, adaptation="xbn")   # "none" | "xbn" | "axbn" | "xbn-cov"
    q.adapt(batch)
    q.enqueue(batch, labels)
    prefill(q, model, loader)                                 # a warm start from a data loader

Integrations import their libraries lazily: ``xbn_queue.pml`` (pytorch-metric-learning),
``xbn_queue.lightly`` (lightly); diagnostics live in ``xbn_queue.drift``.
"""

from . import functional
from .adaptation import ADAPTATIONS, AXBN, XBN, Adaptation, NoAdaptation, XBNCov, build_adaptation
from .prefill import prefill
from .queue import AdaptiveQueue

__version__ = "0.6.0"

__all__ = [
    "AdaptiveQueue",
    "Adaptation",
    "NoAdaptation",
    "XBN",
    "AXBN",
    "XBNCov",
    "ADAPTATIONS",
    "build_adaptation",
    "functional",
    "prefill",
    "__version__",
]
