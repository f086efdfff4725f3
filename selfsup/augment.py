"""MoCo CIFAR augmentations: the standard PIL pipeline and a batched tensor version of it.

The standard pipeline is the one of pytorch-metric-learning's MoCo CIFAR-10 notebook (which the
paper's Appendix B follows) and of the official MoCo CIFAR demo::

    RandomResizedCrop(32, scale=(0.08, 1))   # --crop-min-scale; lightly's MoCoV2Transform uses 0.2
    RandomHorizontalFlip(0.5)
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    RandomGrayscale(0.2)
    ToTensor(); Normalize(CIFAR mean, std)

:class:`TensorMoCoAugment` draws the same random parameters per sample (torchvision's
``RandomResizedCrop.get_params`` rules, vectorized; jitter factors and a random order of the four
jitter operations per sample) and applies them to a whole ``uint8`` batch at once: the crop and flip
through one sampling grid and ``F.grid_sample`` (bilinear, like PIL's resize of an upscaled crop), the
colour operations as the float formulas of ``torchvision.transforms.functional``. It runs wherever
the batch lives, so on a GPU the input pipeline is a few kernels instead of PIL in worker processes.
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from xbn_queue.training.augment import sample_crops  # noqa: F401  (re-exported: part of this module's API)

# Normalization of the PML / MoCo CIFAR-10 demos.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def pil_train_transform(
    image_size: int = 32,
    crop_min_scale: float = 0.08,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
):
    """The standard MoCo CIFAR augmentation of one PIL image (torchvision, uses torch's global RNG)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0)),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def normalize_uint8(images: Tensor, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> Tensor:
    """``(B, 3, H, W)`` uint8 -> float normalized like ``ToTensor(); Normalize(mean, std)``."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


# ----------------------------------------------------------------------------------------------
# pure functions on float images in [0, 1], shape (B, 3, H, W), per-sample factors of shape (B,)


def grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma of ``(B, 3, H, W)`` -> ``(B, 1, H, W)``."""
    r, g, b = x.unbind(dim=1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * grayscale(x)).clamp_(0.0, 1.0)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> HSV in [0, 1] (torchvision's formulas)."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_div
    gc = (maxc - g) / cr_div
    bc = (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = x.unbind(dim=1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = i.unsqueeze(1) == torch.arange(6, device=x.device).view(1, -1, 1, 1)  # (B, 6, H, W)
    a1 = torch.stack((v, q, p, p, t, v), dim=1)
    a2 = torch.stack((t, v, v, q, p, p), dim=1)
    a3 = torch.stack((p, p, t, v, v, q), dim=1)
    a4 = torch.stack((a1, a2, a3), dim=1)  # (B, 3, 6, H, W)
    return torch.einsum("bchw,bkchw->bkhw", mask.to(x.dtype), a4)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + factor.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class TensorMoCoAugment:
    """The MoCo CIFAR augmentation applied to a whole ``uint8`` batch on its own device.

    Args:
        size: output side.
        scale: area range of the random resized crop.
        jitter: ``(brightness, contrast, saturation, hue)`` strengths of ColorJitter.
        jitter_p: probability that colour jitter is applied.
        gray_p: probability of grayscale.
        flip_p: probability of a horizontal flip.
        mean, std: normalization.
        select_by_mask: apply each jitter operation to the whole batch and select (default on
            accelerators) instead of indexing the samples that need it (default on CPU).
    """

    def __init__(
        self,
        size: int = 32,
        scale: Tuple[float, float] = (0.08, 1.0),
        jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        flip_p: float = 0.5,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
        select_by_mask: Optional[bool] = None,
    ) -> None:
        self.select_by_mask = select_by_mask
        self.size = size
        self.scale = scale
        self.jitter = jitter
        self.jitter_p = jitter_p
        self.gray_p = gray_p
        self.flip_p = flip_p
        self.mean = tuple(mean)
        self.std = tuple(std)

    def sample_params(self, batch: int, height: int, width: int, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Draws every random parameter of a batch on the CPU (so results do not depend on the device).

        Returns:
            ``crop`` (B, 4) int64 top/left/h/w, ``flip`` (B,) bool, ``jitter`` (B,) bool,
            ``factors`` (B, 4) brightness/contrast/saturation/hue, ``order`` (B, 4) permutation of the
            four jitter operations, ``gray`` (B,) bool.
        """
        g = generator
        crop = sample_crops(batch, height, width, self.scale, generator=g)
        flip = torch.rand(batch, generator=g) < self.flip_p
        jit = torch.rand(batch, generator=g) < self.jitter_p
        b, c, s, h = self.jitter
        lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
        factors = lo + (hi - lo) * torch.rand(batch, 4, generator=g)
        order = torch.argsort(torch.rand(batch, 4, generator=g), dim=1)
        gray = torch.rand(batch, generator=g) < self.gray_p
        return {"crop": crop, "flip": flip, "jitter": jit, "factors": factors, "order": order, "gray": gray}

    def apply(self, images: Tensor, params: Dict[str, Tensor]) -> Tensor:
        """Applies drawn parameters.

        Args:
            images: ``(B, 3, H, W)`` uint8 (or float in [0, 255]) on any device.
            params: from :meth:`sample_params`.

        Returns:
            ``(B, 3, size, size)`` float32 normalized images on the images' device.
        """
        B, _, H, W = images.shape
        dev = images.device
        p = {k: v.to(dev, non_blocking=True) for k, v in params.items()}
        x = images.float().div_(255.0)  # (B, 3, H, W)
        # crop + resize + flip as one sampling grid (separable). Output pixel u of a crop (top, left, h, w)
        # reads source coordinate left + (u + 0.5) * w / S - 0.5, clamped to the crop's own pixels like
        # a resize of the cropped image (torchvision / PIL); a flip reverses u.
        S = self.size
        top, left, h, w = p["crop"].float().unbind(dim=1)  # (B,) each
        u = torch.arange(S, device=dev, dtype=torch.float32) + 0.5  # (S,)
        u_x = torch.where(p["flip"].view(-1, 1), S - u, u)  # (B, S) mirrored positions when flipped
        src_x = (left.view(-1, 1) + u_x * (w / S).view(-1, 1) - 0.5).clamp(min=left.view(-1, 1), max=(left + w - 1).view(-1, 1))
        src_y = (top.view(-1, 1) + u * (h / S).view(-1, 1) - 0.5).clamp(min=top.view(-1, 1), max=(top + h - 1).view(-1, 1))
        gx = (2.0 * src_x + 1.0) / W - 1.0  # (B, S) normalized, align_corners=False
        gy = (2.0 * src_y + 1.0) / H - 1.0
        grid = torch.stack((gx.unsqueeze(1).expand(B, S, S), gy.unsqueeze(2).expand(B, S, S)), dim=-1)  # (B, S, S, 2)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = x.clamp_(0.0, 1.0)
        # colour jitter with a per-sample random order of the four operations
        # (on CPU each operation runs on the samples that need it; on an accelerator on the whole batch
        # with a select, which avoids host synchronisations; both give the same values)
        for pos in range(4):
            for op_idx, op in enumerate(_JITTER_OPS):
                use = p["jitter"] & (p["order"][:, pos] == op_idx)  # (B,)
                if self.select_by_mask if self.select_by_mask is not None else dev.type != "cpu":
                    x = torch.where(use.view(-1, 1, 1, 1), op(x, p["factors"][:, op_idx]), x)
                else:
                    sel = torch.nonzero(use).squeeze(1)
                    if sel.numel():
                        x[sel] = op(x[sel], p["factors"][sel, op_idx])
        gray = p["gray"].view(-1, 1, 1, 1)
        x = torch.where(gray, grayscale(x).expand(-1, 3, -1, -1), x)
        m = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        return (x - m) / s

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Augments a ``(B, 3, H, W)`` uint8 batch; random parameters come from ``generator``."""
        params = self.sample_params(images.shape[0], images.shape[2], images.shape[3], generator)
        return self.apply(images, params)
