"""The in-memory fast path of the metric trainer: decode once, augment whole batches on the device.

For a small dataset whose images are already in memory (``omniglot``, ``digits``) and the mild
from-scratch augmentation (``--augment mild``), per-image PIL work in worker processes costs more
than the Conv-4 it feeds. ``--tensor-cache`` (default ``auto``: on exactly then) replaces it:

* every training image is resized once to ``image_size`` x ``image_size`` and kept as a uint8
  tensor ``(N, C, S, S)`` (on the training device);
* each batch is gathered by index and augmented at once by :class:`TensorMildAugment`, whose random
  parameters come from a generator seeded by the batch's own augmentation seed
  (:class:`metric.sampler.MPerClassBatches`), so a resumed run sees the same augmentations;
* the evaluation images (training split for the probe and staleness, query, gallery) go through the
  evaluation transform (resize of the shorter side to ``floor(S / 0.875)``, centre crop ``S``, as
  timm's) once, batched, and are kept as uint8 tensors.

The augmentation is torchvision's ``RandomResizedCrop(S, scale=(crop_min_scale, 1))`` ->
``RandomAffine(10, translate=(0.05, 0.05))`` -> ``RandomHorizontalFlip(hflip)`` -> ``Normalize`` ->
``RandomErasing(re_prob)`` with every parameter drawn by torchvision's rules, applied through one
sampling grid (:func:`xbn_queue.training.augment.crop_affine_grid`): the crop is taken from the
image already resized to ``S`` (bilinear, antialiased; not from the original pixels) and resampled
bilinearly once, where the per-image pipeline crops the original with PIL's bicubic filter and rotates
with nearest neighbour. On Omniglot (105 px -> 32 px) the two differ by a mean of 0.13-0.14 (max
0.65) in [0, 1] over the non-background pixels for the same crop, angle and shift
(``benchmarks/fastdata_vs_pil.py``, docs/metric.md); each operation alone equals torchvision's on the
32-px image (tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from xbn_queue.training.augment import crop_affine_grid, erase, sample_crops, sample_erasing

from .data import RetrievalData, Split

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TensorMildAugment", "TensorCache", "CachedSplit", "use_tensor_cache",
           "equal_sized_in_memory", "runs_cached",
           "eval_resize", "to_uint8_batch", "cached_batches"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: timm's default evaluation crop: resize the shorter side to ``floor(S / 0.875)``, then centre-crop ``S``.
EVAL_CROP_PCT = 0.875


def normalize(x_u8: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """``(B, C, H, W)`` uint8 (``C`` 1 or 3) -> ``(B, 3, H, W)`` float32 ``(x / 255 - mean) / std``."""
    x = x_u8.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class TensorMildAugment:
    """The ``--augment mild`` pipeline on a whole uint8 batch (see the module docstring).

    Args:
        size: output side ``S``.
        crop_min_scale: lower bound of the random-resized-crop area.
        degrees: rotation range +-``degrees``.
        translate: fraction of ``S`` of the largest shift (torchvision rounds it to whole pixels).
        hflip: probability of a horizontal flip.
        re_prob: probability of random erasing (value 0, on the normalised image).
        mean, std: normalisation.
    """

    def __init__(self, size: int, crop_min_scale: float, degrees: float = 10.0, translate: float = 0.05,
                 hflip: float = 0.0, re_prob: float = 0.0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.size, self.scale = int(size), (float(crop_min_scale), 1.0)
        self.degrees, self.translate, self.hflip, self.re_prob = float(degrees), float(translate), float(hflip), float(re_prob)
        self.mean, self.std = tuple(mean), tuple(std)

    def sample_params(self, batch: int, height: int, width: int, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Every random parameter of a batch, drawn on the CPU by torchvision's rules.

        Returns:
            ``crop`` (B, 4) top/left/h/w, ``angle`` (B,) degrees, ``translate`` (B, 2) whole output
            pixels, ``flip`` (B,) bool, ``erase`` (B, 4) top/left/h/w (h = w = 0: none).
        """
        g, S = generator, self.size
        crop = sample_crops(batch, height, width, self.scale, generator=g)
        angle = torch.empty(batch).uniform_(-self.degrees, self.degrees, generator=g)
        max_d = self.translate * S
        shift = torch.round(torch.empty(batch, 2).uniform_(-max_d, max_d, generator=g))
        flip = torch.rand(batch, generator=g) < self.hflip
        boxes = sample_erasing(batch, S, S, self.re_prob, generator=g)
        return {"crop": crop, "angle": angle, "translate": shift, "flip": flip, "erase": boxes}

    def apply(self, images: Tensor, params: Dict[str, Tensor]) -> Tensor:
        """``(B, C, H, W)`` uint8 on any device -> ``(B, 3, S, S)`` float32, normalised, on that device."""
        dev = images.device
        p = {k: v.to(dev, non_blocking=True) for k, v in params.items()}
        grid, valid = crop_affine_grid(p["crop"], p["angle"], p["translate"], p["flip"], images.shape[-2:], self.size)
        x = F.grid_sample(images.float().div_(255.0), grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = (x * valid).clamp_(0.0, 1.0)  # torchvision fills outside the rotated crop with 0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        m = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        x = (x - m) / s
        return erase(x, p["erase"]) if self.re_prob > 0 else x

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        params = self.sample_params(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, params)


def to_uint8_batch(items: Sequence[np.ndarray]) -> Tensor:
    """Equal-sized in-memory images (``(H, W)`` gray or ``(H, W, 3)``) -> ``(N, C, H, W)`` uint8."""
    arr = np.stack([np.asarray(a, dtype=np.uint8) for a in items])
    t = torch.from_numpy(arr)
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2).contiguous()


def _resize(x: Tensor, size: Tuple[int, int], mode: str) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> uint8 ``(N, C, *size)`` with antialiasing (PIL-like), in chunks."""
    out = []
    for chunk in x.split(1024):
        y = F.interpolate(chunk.float(), size=size, mode=mode, antialias=True, align_corners=False)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else x.new_zeros((0, x.shape[1], *size))


def eval_resize(x: Tensor, size: int) -> Tensor:
    """The evaluation geometry on a uint8 batch: shorter side to ``floor(S / 0.875)`` (bicubic), centre crop ``S``."""
    H, W = x.shape[-2:]
    short = int(math.floor(size / EVAL_CROP_PCT))
    nh, nw = (short, max(short, int(short * W / H))) if H <= W else (max(short, int(short * H / W)), short)
    y = _resize(x, (nh, nw), "bicubic")
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return y[..., top:top + size, left:left + size].contiguous()


def equal_sized_in_memory(items: Sequence[object]) -> bool:
    """Whether every item is an in-memory image array (``digits``, ``omniglot``) of one shape."""
    return bool(items) and all(isinstance(i, np.ndarray) for i in items) and len({np.shape(i) for i in items}) == 1


def runs_cached(tensor_cache: str, augment: str, items: Sequence[object]) -> bool:
    """Whether a run with these options evaluated ``items`` through the cache (so embedding them again must too)."""
    return tensor_cache != "off" and (tensor_cache == "on" or augment == "mild") and equal_sized_in_memory(items)


def use_tensor_cache(mode: str, augment: str, data: RetrievalData) -> bool:
    """Whether the fast path applies: ``on``, or ``auto`` with ``--augment mild`` and equal-sized in-memory images."""
    if mode == "off":
        return False
    splits = [data.train, data.query] + ([] if data.query_is_gallery else [data.gallery])
    ok = all(len(s) for s in splits) and equal_sized_in_memory([i for s in splits for i in s.items])
    if mode == "on" and not ok:
        from xbn_queue.training.cli import UsageError

        raise UsageError("--tensor-cache on: needs equal-sized in-memory images (--dataset omniglot or digits); "
                         "use --tensor-cache auto")
    return ok and (mode == "on" or augment == "mild")


class CachedSplit(Dataset):
    """A split's evaluation images as a dataset of ``(image (3, S, S) float, label, index, ok=True)``.

    Drop-in for :class:`metric.data.ImageDataset` (evaluation transform) where the images are cached.
    """

    def __init__(self, split: Split, images_u8: Tensor) -> None:
        self.split, self.images = split, images_u8

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, keys: List[int]) -> List[Tuple[Tensor, int, int, bool]]:
        idx = torch.as_tensor([int(k) for k in keys], dtype=torch.long)
        x = normalize(self.images.index_select(0, idx.to(self.images.device)))
        return [(x[j], int(self.split.labels[k]), int(k), True) for j, k in enumerate(keys)]

    def __getitem__(self, key: int) -> Tuple[Tensor, int, int, bool]:
        return self.__getitems__([int(key)])[0]

    def batch(self, indices: Tensor) -> Tensor:
        """``(n,)`` indices -> ``(n, 3, S, S)`` normalised float images on the cache's device."""
        return normalize(self.images.index_select(0, indices.to(self.images.device)))


@dataclass
class TensorCache:
    """The decoded images of a run: ``train`` (augmentation source) and the evaluation sets.

    Attributes:
        train: ``(N, C, S, S)`` uint8, every training image resized to the input size.
        train_eval, query, gallery: :class:`CachedSplit` of the evaluation-transformed images.
    """

    train: Tensor
    train_eval: CachedSplit
    query: CachedSplit
    gallery: CachedSplit

    @classmethod
    def build(cls, data: RetrievalData, image_size: int, device: torch.device) -> "TensorCache":
        """Decode and resize every image once (a few seconds for 10^4 small images)."""
        raw_train = to_uint8_batch(data.train.items)
        train = _resize(raw_train, (image_size, image_size), "bilinear").to(device)
        train_eval = CachedSplit(data.train, eval_resize(raw_train, image_size).to(device))
        query = CachedSplit(data.query, eval_resize(to_uint8_batch(data.query.items), image_size).to(device))
        gallery = query if data.query_is_gallery else CachedSplit(
            data.gallery, eval_resize(to_uint8_batch(data.gallery.items), image_size).to(device))
        return cls(train, train_eval, query, gallery)


def cached_batches(cache: TensorCache, labels: np.ndarray, batches: Iterable[List[Tuple[int, int]]],
                   augment: TensorMildAugment) -> Iterator[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Augmented training batches from the cache, like the per-image ``DataLoader``.

    Args:
        cache: the run's cache.
        labels: (N,) training labels.
        batches: lists of ``(index, augmentation_seed)`` (:class:`metric.sampler.MPerClassBatches`).
        augment: the batched augmentation; its generator is seeded by the batch's first seed.

    Yields:
        ``(x (B, 3, S, S) float on the cache's device, labels (B,), indices (B,), ok (B,) all True)``,
        the last three int64 / bool on the CPU, as the ``DataLoader`` gives them.
    """
    lab = torch.as_tensor(labels, dtype=torch.long)
    for batch in batches:
        idx = torch.as_tensor([int(i) for i, _ in batch], dtype=torch.long)
        g = torch.Generator().manual_seed(int(batch[0][1]))
        x = augment(cache.train.index_select(0, idx.to(cache.train.device)), g)
        yield x, lab[idx], idx, torch.ones(len(batch), dtype=torch.bool)
