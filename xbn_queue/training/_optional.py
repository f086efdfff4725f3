"""Lazy imports of optional packages with an error message that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

# Import name -> (pip distribution name, extra of xbn-queue that provides it).
_EXTRAS: dict[str, tuple[str, str]] = {
    "yaml": ("pyyaml", "train"),
    "numpy": ("numpy", "train"),
    "tqdm": ("tqdm", "train"),
    "matplotlib": ("matplotlib", "train"),
    "wandb": ("wandb", "wandb"),
    "faiss": ("faiss-cpu", "retrieval"),
    "onnx": ("onnx", "retrieval"),
    "onnxruntime": ("onnxruntime", "retrieval"),
    "onnxscript": ("onnxscript", "retrieval"),
    "safetensors": ("safetensors", "hub"),
    "huggingface_hub": ("huggingface_hub", "hub"),
}
#: Extras that ``metric`` and ``selfsup`` include.
_IN_TRAINERS = ("train", "wandb")


def require(name: str, purpose: str) -> ModuleType:
    """Import an optional dependency or raise an ``ImportError`` that says how to get it.

    Args:
        name: Top-level import name, e.g. ``"yaml"`` or ``"matplotlib.figure"``.
        purpose: What needs it, used in the message (e.g. ``"--config FILE.yaml"``).

    Returns:
        The imported module.

    Raises:
        ImportError: If the package is not installed; the message names the pip extra.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        top = name.split(".")[0]
        dist, extra = _EXTRAS.get(top, (top, "all"))
        also = ' (also included in "xbn-queue[metric]" and "xbn-queue[selfsup]")' if extra in _IN_TRAINERS else ""
        raise ImportError(
            f"{purpose} needs the optional package '{dist}', which is not installed. "
            f'Install it with: pip install "xbn-queue[{extra}]"{also}.'
        ) from err
