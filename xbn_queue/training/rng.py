"""Capture and restore every random-number generator a training loop uses, for exact resume.

``get_rng_state()`` returns a dict holding the state of Python's ``random``, NumPy's global generator
(when NumPy is installed), torch's CPU generator and every CUDA generator (when CUDA is available).
It contains only tensors, lists, tuples, ints, floats, strings and ``None``, so a checkpoint that holds it
loads with ``torch.load(..., weights_only=True)``. ``set_rng_state(d)`` restores it::

    ckpt["rng"] = get_rng_state()          # when saving
    set_rng_state(ckpt["rng"])             # after loading, just before the loop continues

State for a generator missing from the dict (e.g. a CPU checkpoint resumed on a GPU box) is left alone.
Per-rank state differs under DDP, so each rank should save its own (or the trainer re-seeds per rank).
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch

__all__ = ["get_rng_state", "set_rng_state"]


def get_rng_state() -> dict[str, Any]:
    """Capture the state of all random-number generators.

    Returns:
        A dict with keys ``"python"``, ``"torch"``, and ``"numpy"`` (if NumPy is installed) and
        ``"cuda"`` (a list of uint8 tensors, one per device, if CUDA is available).
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        # keys: (624,) uint32 -> int64 tensor so that weights_only loading accepts it.
        state["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(x: Any) -> Any:
    """Convert nested lists back to tuples (``random.setstate`` needs tuples)."""
    if isinstance(x, (list, tuple)):
        return tuple(_as_tuple(v) for v in x)
    return x


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states captured by :func:`get_rng_state`.

    Args:
        state: The dict returned by :func:`get_rng_state` (possibly after a save / load round trip).

    Raises:
        ValueError: If an entry is malformed.
    """
    if "python" in state:
        random.setstate(_as_tuple(state["python"]))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            warnings.warn("checkpoint holds a NumPy RNG state but NumPy is not installed; skipped", stacklevel=2)
        else:
            s = state["numpy"]
            keys = torch.as_tensor(s["keys"]).cpu().numpy().astype(np.uint32)
            np.random.set_state((s["name"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"])))
    if "cuda" in state and torch.cuda.is_available():
        saved = [torch.as_tensor(t, dtype=torch.uint8).cpu() for t in state["cuda"]]
        count = torch.cuda.device_count()
        if len(saved) != count:
            warnings.warn(
                f"checkpoint holds CUDA RNG states for {len(saved)} device(s), this machine has {count}; "
                "restoring the first min(saved, present)",
                stacklevel=2,
            )
        for i, t in enumerate(saved[:count]):
            torch.cuda.set_rng_state(t, device=i)
