"""Small helpers shared by the drop-ins (``xbn_queue.pml``, ``xbn_queue.lightly``); torch only."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["follow_device"]


def follow_device(module: nn.Module, reference: torch.Tensor, device: torch.device) -> bool:
    """Move ``module`` to ``device`` when ``reference`` (one of its buffers) is elsewhere.

    PML's ``CrossBatchMemory`` and lightly's memory bank work when only the model was moved to a
    GPU (PML moves its memory to the embeddings' device at every call, lightly moves the returned
    bank); the drop-ins do the same by moving their queue, once, to the device of the embeddings
    they are given. Comparing two ``torch.device`` objects is a host-side check: no device sync.

    Args:
        module: the module holding the state (e.g. an :class:`~xbn_queue.AdaptiveQueue`).
        reference: a tensor of ``module`` whose device stands for the module's.
        device: the device of the incoming embeddings.

    Returns:
        Whether the module was moved.
    """
    if reference.device == device:
        return False
    module.to(device)
    return True
