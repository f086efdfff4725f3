"""Mixed precision in one place: the AMP dtype rule, autocast, and the one loss scaler.

Every forward pass of both trainers and of their helpers (the training step, ``--prefill``, the
evaluation embeddings, ``xbn-metric embed``) enters :func:`autocast`, and every backward pass goes
through :func:`backward_step` (timm's single ``loss_scaler`` for every AMP case)::

    scaler = grad_scaler(cfg.amp, device)            # enabled only for float16 on CUDA
    with autocast(cfg.amp, device):
        loss = criterion(model(x), y)
    backward_step(loss, optimizer, scaler)           # zero_grad, (scaled) backward, step, update

The rule: on CUDA, bfloat16 where the GPU supports it, else float16 with a ``GradScaler``; on any
other device nothing changes (float32, no scaler; a disabled scaler's ``step`` is ``optimizer.step``).
"""

from __future__ import annotations

import torch

__all__ = ["amp_dtype", "amp_enabled", "autocast", "grad_scaler", "backward_step"]


def amp_enabled(enabled: bool, device: torch.device) -> bool:
    """Whether mixed precision is in effect: asked for (``--amp``) and on CUDA."""
    return bool(enabled) and torch.device(device).type == "cuda"


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype on ``device``: bfloat16 where CUDA supports it, else float16."""
    return torch.bfloat16 if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def autocast(enabled: bool, device: torch.device):
    """Mixed precision on CUDA (:func:`amp_dtype`) when ``enabled``; a no-op context elsewhere."""
    if amp_enabled(enabled, device):
        return torch.autocast("cuda", dtype=amp_dtype(device))
    return torch.autocast("cpu", enabled=False)


def grad_scaler(enabled: bool, device: torch.device) -> torch.amp.GradScaler:
    """The run's loss scaler: enabled only where autocast runs in float16 (its state goes into checkpoints)."""
    fp16 = amp_enabled(enabled, device) and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler("cuda", enabled=fp16)


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """``zero_grad``, backward and optimiser step, through ``scaler`` (a plain backward and step when disabled).

    Args:
        loss: The scalar loss, with gradient.
        optimizer: The optimiser to step.
        scaler: From :func:`grad_scaler`.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
