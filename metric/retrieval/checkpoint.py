"""A trained run's embedding model, rebuilt from its checkpoint alone (no hub access)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from xbn_queue.training.cli import UsageError
from xbn_queue.training.seeding import resolve_device

__all__ = ["LoadedModel", "load_run_model", "checkpoint_of", "file_sha256", "PROG"]

PROG = "xbn-metric"
PathLike = Union[str, os.PathLike]


@dataclasses.dataclass
class LoadedModel:
    """A run's embedding model rebuilt from its checkpoint.

    Attributes:
        model: The :class:`~metric.model.MetricModel` in eval mode, on ``device``.
        config: The run's resolved :class:`~metric.config.MetricConfig` (as saved in the checkpoint).
        checkpoint: The checkpoint file.
        sha256: SHA-256 of the checkpoint file (hex).
        transform: The run's evaluation transform (PIL image -> (3, H, W) tensor).
        device: Where the model lives.
        files_cached: The run evaluated through its tensor cache (recorded from 0.6 on), so image files are decoded
            as that cache decodes them (:class:`~metric.fastdata.DecodedFileSplit`) rather than by its transform.
    """

    model: nn.Module
    config: Any
    checkpoint: Path
    sha256: str
    transform: Any
    device: torch.device
    files_cached: bool = False


def checkpoint_of(run: PathLike) -> Path:
    """The checkpoint a ``RUN`` argument means: ``RUN/best.pt`` for a run folder, else ``RUN`` itself.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    p = Path(run)
    ckpt = p / "best.pt" if p.is_dir() else p
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint" + (" (the run has no best.pt yet)" if p.is_dir() else ""))
    return ckpt


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _device(device: str) -> torch.device:
    """``--device`` as a ``torch.device`` (the trainers' rule, :func:`xbn_queue.training.seeding.resolve_device`)."""
    try:
        return resolve_device(device)
    except ValueError as err:
        raise UsageError(f"--device {device}: {err}") from None


def load_run_model(run: PathLike, device: str = "auto") -> LoadedModel:
    """Rebuild a run's embedding model from its checkpoint, without any hub access.

    The architecture comes from the configuration saved with the checkpoint (the run's ``config.yaml``);
    the weights, including a pretrained backbone's, from the checkpoint itself.

    Args:
        run: A run folder (its ``best.pt`` is used) or a checkpoint file.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: the file is not an ``xbn-metric`` checkpoint or its weights do not load.
    """
    from xbn_queue.training.checkpoint import CheckpointError, load_checkpoint
    from xbn_queue.training.config import config_from_dict

    from ..config import MetricConfig
    from ..model import build_model
    from ..transforms import build_transforms

    path = checkpoint_of(run)
    ckpt = load_checkpoint(path, map_location="cpu", kind=PROG, required_keys=("config", "model"))
    try:
        cfg = config_from_dict(MetricConfig, ckpt["config"], source=str(path))
        model = build_model(cfg.backbone, cfg.embedding_dim, cfg.embedding_norm, False, None, cfg.width,
                            cfg.image_size, cfg.head)
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        from xbn_queue.training.cli import one_line

        raise CheckpointError(f"{path} is not a readable {PROG} checkpoint (the model does not load: "
                              f"{one_line(err)[:160]})") from None
    dev = _device(device)
    files_cached = bool((ckpt.get("meta") or {}).get("tensor_cache", False))
    return LoadedModel(model.to(dev).eval(), cfg, path, file_sha256(path), build_transforms(cfg)[1], dev, files_cached)
