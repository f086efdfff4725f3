"""Seeding and device selection.

``seed_everything(seed)`` seeds Python's ``random``, NumPy (when installed), torch's CPU generator and
every CUDA generator. ``resolve_device("auto")`` returns ``cuda`` when a GPU is visible and ``cpu``
otherwise; asking for ``"cuda"`` on a machine without CUDA is an error rather than a silent fallback::

    from xbn_queue.training.seeding import resolve_device, seed_everything

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)        # torch.device("cuda") or torch.device("cpu")
"""

from __future__ import annotations

import random
from typing import Union

import torch

__all__ = ["seed_everything", "resolve_device"]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed ``random``, NumPy (if installed), torch CPU and all CUDA generators.

    Args:
        seed: The seed, a non-negative integer below 2**32 (NumPy's limit).
        deterministic: Also ask torch for deterministic algorithms
            (``torch.use_deterministic_algorithms(True, warn_only=True)`` and cuDNN deterministic,
            non-benchmark mode). Off by default because it can slow GPU training down.

    Raises:
        ValueError: If ``seed`` is negative or not below 2**32.
    """
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the core
        pass
    else:
        np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """Turn a ``--device`` option into a ``torch.device``.

    Args:
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``,
            or a ``torch.device``.

    Returns:
        The device.

    Raises:
        ValueError: If the string is not a device, or CUDA (or the CUDA index, or MPS) is requested
            but not available.
    """
    if isinstance(device, torch.device):
        spec = str(device)
    else:
        spec = str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was requested but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use --device cpu or --device auto"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} was requested but only {count} CUDA device(s) are visible")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} was requested but MPS is not available; use --device cpu")
    return dev
