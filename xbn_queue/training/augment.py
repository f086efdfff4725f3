"""Batched image augmentation: random parameters drawn per sample, applied to a whole batch at once.

Both trainers augment small images (CIFAR, Omniglot, digits) many times per second. Instead of PIL
work per image in worker processes, the random parameters of a batch are drawn on the CPU from one
generator (so they do not depend on the device) and applied to a ``(B, C, H, W)`` batch wherever it
lives with one sampling grid and ``F.grid_sample``.

* :func:`sample_crops`: ``torchvision.transforms.RandomResizedCrop.get_params``, vectorized.
* :func:`sample_erasing`: ``torchvision.transforms.RandomErasing.get_params``, vectorized.
* :func:`crop_affine_grid`: the sampling grid of "resized crop, then rotate and translate about the
  centre, then flip horizontally" (torchvision's ``RandomResizedCrop`` -> ``RandomAffine`` ->
  ``RandomHorizontalFlip``) as one map from output pixels to input pixels.
* :func:`erase`: zero a rectangle per sample (``RandomErasing`` with ``value=0``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["sample_crops", "sample_erasing", "crop_affine_grid", "erase"]


def sample_crops(
    batch: int,
    height: int,
    width: int,
    scale: Tuple[float, float],
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: Optional[torch.Generator] = None,
    attempts: int = 10,
) -> Tensor:
    """Vectorized ``torchvision.transforms.RandomResizedCrop.get_params``.

    Per sample: up to ``attempts`` draws of an area fraction in ``scale`` and a log-uniform aspect
    ratio; the first draw that fits is used, otherwise the central crop clamped to ``ratio``.

    Returns:
        ``(batch, 4)`` int64 ``(top, left, h, w)`` on the CPU.
    """
    area = float(height * width)
    ta = area * torch.empty(batch, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    ar = torch.exp(log_r)
    w = torch.round(torch.sqrt(ta * ar)).long()  # (B, attempts)
    h = torch.round(torch.sqrt(ta / ar)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    u_i = torch.rand(batch, attempts, generator=generator)
    u_j = torch.rand(batch, attempts, generator=generator)
    top = torch.floor(u_i * (height - h + 1).clamp(min=1)).long()
    left = torch.floor(u_j * (width - w + 1).clamp(min=1)).long()
    first = torch.where(ok.any(dim=1), ok.int().argmax(dim=1), torch.full((batch,), -1))
    # fallback: whole image, clamped to the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw])
    pick = first.clamp(min=0).unsqueeze(1)
    out = torch.stack(
        (top.gather(1, pick)[:, 0], left.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0], w.gather(1, pick)[:, 0]), dim=1
    )
    return torch.where((first >= 0).unsqueeze(1), out, fallback.expand(batch, 4))


def sample_erasing(
    batch: int,
    height: int,
    width: int,
    p: float,
    scale: Tuple[float, float] = (0.02, 0.33),
    ratio: Tuple[float, float] = (0.3, 3.3),
    generator: Optional[torch.Generator] = None,
    attempts: int = 10,
) -> Tensor:
    """Vectorized ``torchvision.transforms.RandomErasing.get_params`` (with probability ``p`` per sample).

    Returns:
        ``(batch, 4)`` int64 ``(top, left, h, w)`` on the CPU; ``h = w = 0`` where nothing is erased
        (not drawn, or no attempt fitted, as torchvision then returns the image unchanged).
    """
    apply = torch.rand(batch, generator=generator) < p
    area = float(height * width)
    ta = area * torch.empty(batch, attempts).uniform_(scale[0], scale[1], generator=generator)
    ar = torch.exp(torch.empty(batch, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    h = torch.round(torch.sqrt(ta * ar)).long()  # (B, attempts)
    w = torch.round(torch.sqrt(ta / ar)).long()
    ok = (h < height) & (w < width)
    top = torch.floor(torch.rand(batch, attempts, generator=generator) * (height - h + 1).clamp(min=1)).long()
    left = torch.floor(torch.rand(batch, attempts, generator=generator) * (width - w + 1).clamp(min=1)).long()
    pick = ok.int().argmax(dim=1, keepdim=True)  # first fitting attempt
    out = torch.cat((top.gather(1, pick), left.gather(1, pick), h.gather(1, pick), w.gather(1, pick)), dim=1)
    keep = (apply & ok.any(dim=1)).unsqueeze(1)
    return torch.where(keep, out, torch.zeros_like(out))


def crop_affine_grid(
    crop: Tensor,
    angle: Tensor,
    translate: Tensor,
    flip: Tensor,
    in_size: Tuple[int, int],
    out_size: int,
) -> Tuple[Tensor, Tensor]:
    """Sampling grid of "resized crop -> rotate/translate about the centre -> horizontal flip".

    Output pixel ``o`` (normalised coordinates, ``align_corners=False``) is first un-flipped, then
    mapped through the inverse affine ``a = R(-angle) (o - t)`` (``angle`` counter-clockwise in
    degrees as in ``torchvision.transforms.functional.affine``, ``t`` the translation in output
    pixels), then into the crop ``(top, left, h, w)`` of the ``in_size`` input. Points that fall
    outside the crop are marked invalid: torchvision fills them (here: with zeros).

    Args:
        crop: ``(B, 4)`` ``(top, left, h, w)`` in input pixels.
        angle: ``(B,)`` degrees.
        translate: ``(B, 2)`` ``(tx, ty)`` in output pixels.
        flip: ``(B,)`` bool.
        in_size: ``(H, W)`` of the input.
        out_size: side ``S`` of the square output.

    Returns:
        ``grid`` ``(B, S, S, 2)`` for ``F.grid_sample(..., align_corners=False)`` and ``valid``
        ``(B, 1, S, S)`` float (1 inside the rotated crop, 0 where torchvision fills).
    """
    dev = crop.device
    H, W = in_size
    S = out_size
    c = (torch.arange(S, device=dev, dtype=torch.float32) + 0.5) * (2.0 / S) - 1.0  # (S,) pixel centres
    ox = c.view(1, 1, S).expand(crop.shape[0], S, S)
    oy = c.view(1, S, 1).expand(crop.shape[0], S, S)
    ox = torch.where(flip.view(-1, 1, 1), -ox, ox)
    tx = (translate[:, 0] * (2.0 / S)).view(-1, 1, 1)
    ty = (translate[:, 1] * (2.0 / S)).view(-1, 1, 1)
    th = torch.deg2rad(angle.float()).view(-1, 1, 1)
    cos, sin = torch.cos(th), torch.sin(th)
    # counter-clockwise on screen (y down) is a rotation by -angle in (x, y); the inverse map rotates by +angle
    dx, dy = ox - tx, oy - ty
    ax = cos * dx + sin * dy
    ay = -sin * dx + cos * dy
    top, left, h, w = crop.float().unbind(dim=1)
    cx = (-1.0 + (2.0 * left + w) / W).view(-1, 1, 1)
    cy = (-1.0 + (2.0 * top + h) / H).view(-1, 1, 1)
    gx = cx + ax * (w / W).view(-1, 1, 1)
    gy = cy + ay * (h / H).view(-1, 1, 1)
    valid = ((ax.abs() <= 1.0) & (ay.abs() <= 1.0)).unsqueeze(1).float()
    return torch.stack((gx, gy), dim=-1), valid


def erase(x: Tensor, boxes: Tensor, value: float = 0.0) -> Tensor:
    """Set the rectangle ``boxes[i] = (top, left, h, w)`` of every image ``x[i]`` to ``value`` (a new tensor).

    Args:
        x: ``(B, C, H, W)``.
        boxes: ``(B, 4)`` int64; ``h = 0`` or ``w = 0`` leaves the image unchanged.
    """
    B, _, H, W = x.shape
    b = boxes.to(x.device)
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    top, left, h, w = (v.view(-1, 1, 1) for v in b.unbind(dim=1))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, H, W)
    return x.masked_fill(inside.unsqueeze(1), value)
