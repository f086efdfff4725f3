"""How far the tensor-cache augmentation (``metric/fastdata.py``) is from the per-image PIL pipeline.

``--dataset omniglot`` trains on 105x105 images. Without the tensor cache every training image goes
through the PIL pipeline of ``metric.train.build_transforms`` (``--augment mild``): torchvision's
``RandomResizedCrop(32, bicubic)`` on the 105-px original, ``RandomAffine(10, translate=(0.05, 0.05))``
(nearest neighbour, fill 0) on the 32-px crop, ``ToTensor``. With the cache (``--tensor-cache auto``,
the default) every image is resized once to 32 px (bilinear, antialiased) and
:class:`metric.fastdata.TensorMildAugment` takes the crop from that 32-px image and applies crop and
affine through one bilinear ``grid_sample``.

This script gives both pipelines the same parameters: a crop of a fixed fraction of the original's
area (aspect ratio log-uniform in [3/4, 4/3], random position, in 105-px pixels for PIL and the same
region in 32-px coordinates for the cache), the same angle and whole-pixel shift (drawn as
``RandomAffine`` draws them), no flip, no erasing, no normalisation. It reports the per-pixel
absolute difference in [0, 1] (one channel: the images are gray)

* over the *non-background* pixels: those where either output is at least 1/255 (a white-on-black
  character is mostly background, and a mean over all pixels is mostly zeros);
* its mean, its 99th percentile and its maximum, per crop area, with the crop alone (no affine) and
  with the affine;
* and, as a yardstick, the same numbers when the cache's angle has the wrong sign.

Usage::

    python benchmarks/fastdata_vs_pil.py                       # 512 training images, areas 0.6 and 0.8
    python benchmarks/fastdata_vs_pil.py --json fastdata_vs_pil.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

S = 32  # the --dataset omniglot input size


def draw_params(n: int, side: int, area: float, gen: torch.Generator, affine: bool = True) -> Dict[str, torch.Tensor]:
    """Crops of ``area`` of a ``side`` x ``side`` image and ``RandomAffine(10, (0.05, 0.05))`` parameters.

    Returns:
        ``crop`` (n, 4) int64 top/left/h/w in ``side`` pixels, ``angle`` (n,) degrees, ``translate`` (n, 2)
        whole output pixels (zeros without ``affine``).
    """
    ratio = torch.exp(torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))  # (n,) w / h
    w = torch.round(torch.sqrt(area * side * side * ratio)).clamp(1, side).long()  # (n,)
    h = torch.round(torch.sqrt(area * side * side / ratio)).clamp(1, side).long()  # (n,)
    top = (torch.rand(n, generator=gen) * (side - h + 1)).floor().long()  # (n,)
    left = (torch.rand(n, generator=gen) * (side - w + 1)).floor().long()  # (n,)
    angle = torch.empty(n).uniform_(-10.0, 10.0, generator=gen)  # (n,)
    shift = torch.round(torch.empty(n, 2).uniform_(-0.05 * S, 0.05 * S, generator=gen))  # (n, 2)
    if not affine:
        angle, shift = torch.zeros(n), torch.zeros(n, 2)
    return {"crop": torch.stack([top, left, h, w], dim=1), "angle": angle, "translate": shift}


def pil_pipeline(items: Sequence[np.ndarray], p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The non-cached ``--augment mild`` pipeline with fixed parameters: ``(n, S, S)`` float64 in [0, 1]."""
    from torchvision.transforms import InterpolationMode as IM
    from torchvision.transforms import functional as TF

    from metric.data import open_image

    out = []
    for i, item in enumerate(items):
        img = open_image(item)  # RGB PIL, as the dataset opens it
        t, l, h, w = p["crop"][i].tolist()
        img = TF.resized_crop(img, t, l, h, w, [S, S], interpolation=IM.BICUBIC)  # RandomResizedCrop
        img = TF.affine(img, angle=float(p["angle"][i]), translate=[int(p["translate"][i, 0]), int(p["translate"][i, 1])],
                        scale=1.0, shear=[0.0, 0.0], interpolation=IM.NEAREST, fill=0)  # RandomAffine's defaults
        out.append(TF.to_tensor(img)[0].double())  # (S, S); the three channels are equal
    return torch.stack(out)


def cached_pipeline(items: Sequence[np.ndarray], p: Dict[str, torch.Tensor], side: int) -> torch.Tensor:
    """The tensor cache with the same parameters: ``(n, S, S)`` float64 in [0, 1]."""
    from metric.fastdata import TensorMildAugment, _resize, to_uint8_batch

    cache = _resize(to_uint8_batch(items), (S, S), "bilinear")  # (n, 1, S, S) uint8, as TensorCache.build
    aug = TensorMildAugment(S, 0.6, mean=(0, 0, 0), std=(1, 1, 1))
    n = len(items)
    q = {"crop": p["crop"].double() * (S / side), "angle": p["angle"], "translate": p["translate"],
         "flip": torch.zeros(n, dtype=torch.bool), "erase": torch.zeros(n, 4, dtype=torch.long)}
    return aug.apply(cache, q)[:, 0].double()  # (n, S, S)


def compare(a: torch.Tensor, b: torch.Tensor) -> Dict[str, float]:
    """Per-pixel |a - b| over the pixels where either image is >= 1/255: mean, 99th percentile, max."""
    fg = (a >= 1 / 255) | (b >= 1 / 255)  # (n, S, S) non-background
    d = (a - b).abs()[fg]
    return {"mean": d.mean().item(), "p99": torch.quantile(d.float(), 0.99).item(), "max": d.max().item(),
            "mean_all_pixels": (a - b).abs().mean().item(), "foreground_frac": fg.double().mean().item()}


def measure(items: Sequence[np.ndarray], area: float, seed: int, affine: bool = True) -> Dict[str, Dict[str, float]]:
    """Both pipelines on ``items`` with one draw of parameters; also the cache with the angle's sign flipped."""
    side = items[0].shape[0]
    p = draw_params(len(items), side, area, torch.Generator().manual_seed(seed), affine)
    ref = pil_pipeline(items, p)
    out = {"cache": compare(cached_pipeline(items, p, side), ref)}
    if affine:
        out["cache, angle sign flipped"] = compare(cached_pipeline(items, dict(p, angle=-p["angle"]), side), ref)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512, help="training images, evenly spaced over the split")
    ap.add_argument("--areas", default="0.6,0.8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from metric.data import load_omniglot

    train = load_omniglot().train.items
    step = max(len(train) // a.images, 1)
    items = list(train[::step][: a.images])
    result = {"images": len(items), "seed": a.seed, "torch": torch.__version__, "rows": []}
    print(f"{len(items)} Omniglot training images (105 px) -> 32 px; |cache - PIL| in [0, 1] over non-background pixels")
    print("| crop area | affine | pipeline | mean | 99th pct | max | mean over all pixels | non-background |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for area in [float(x) for x in a.areas.split(",")]:
        for affine in (False, True):
            for name, r in measure(items, area, a.seed, affine).items():
                print(f"| {area:.0%} | {'+-10 deg, +-5 %' if affine else 'none'} | {name} | {r['mean']:.4f} | {r['p99']:.3f} "
                      f"| {r['max']:.3f} | {r['mean_all_pixels']:.4f} | {r['foreground_frac']:.0%} |")
                result["rows"].append(dict(area=area, affine=affine, pipeline=name, **r))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
