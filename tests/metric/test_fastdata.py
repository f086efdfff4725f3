"""The in-memory fast path: batched augmentation against torchvision's per-image ops, the evaluation
resize against timm's transform, and a cached run that resumes bit-identically."""

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode as IM
from torchvision.transforms.v2 import functional as TF

from metric.data import load_omniglot, open_image
from metric.fastdata import TensorMildAugment, _resize, eval_resize, normalize, to_uint8_batch, use_tensor_cache
from metric.train import train
from xbn_queue.training.augment import erase, sample_erasing
from xbn_queue.training.checkpoint import load_checkpoint

from .helpers import tiny_cfg

S = 32


@pytest.fixture(scope="module")
def omniglot():
    return load_omniglot()


@pytest.fixture(scope="module")
def batch(omniglot):
    return _resize(to_uint8_batch(omniglot.train.items[::40][:40]), (S, S), "bilinear")  # (40, 1, 32, 32) uint8


def reference(images, p, i):
    """torchvision's per-image pipeline with the same parameters: resized crop -> affine -> flip."""
    t, l, h, w = p["crop"][i].tolist()
    x = images[i:i + 1].double() / 255.0
    y = TF.resized_crop(x, t, l, h, w, [S, S], interpolation=IM.BILINEAR, antialias=False)
    y = TF.affine(y, angle=float(p["angle"][i]), translate=[int(p["translate"][i, 0]), int(p["translate"][i, 1])],
                  scale=1.0, shear=[0.0, 0.0], interpolation=IM.BILINEAR, fill=0.0)
    return TF.horizontal_flip(y) if bool(p["flip"][i]) else y


def neutral(n):
    return {"crop": torch.tensor([[0, 0, S, S]] * n), "angle": torch.zeros(n), "translate": torch.zeros(n, 2),
            "flip": torch.zeros(n, dtype=torch.bool), "erase": torch.zeros(n, 4, dtype=torch.long)}


def _foreground_diff(a, b):
    """|a - b| over the pixels where either image is >= 1/255 (a character is mostly black background)."""
    fg = (a >= 1 / 255) | (b >= 1 / 255)
    return (a - b).abs()[fg]


@pytest.mark.parametrize("part, tol_mean, tol_max", [("none", 1e-6, 1e-6), ("flip", 1e-6, 1e-6), ("translate", 1e-6, 1e-6),
                                                     ("angle", 1e-5, 1e-5),
                                                     ("crop", 2e-3, 0.15)])  # crop: neighbours outside the crop enter at its edge
def test_the_grid_reproduces_each_torchvision_op_on_the_cached_image(batch, part, tol_mean, tol_max):
    """The geometry of one grid_sample: each op alone, on the 32-px cached image, against torchvision's tensor op
    (bilinear, no antialiasing). This is not the PIL pipeline of a non-cached run: see the next test."""
    aug = TensorMildAugment(S, 0.6, hflip=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    drawn = aug.sample_params(len(batch), S, S, torch.Generator().manual_seed(3))
    p = neutral(len(batch))
    if part != "none":
        p[part] = drawn[part]
    if part == "flip":
        assert 0 < int(p["flip"].sum()) < len(batch)
    ours = aug.apply(batch, p)[:, :1].double()  # (B, 1, S, S)
    ref = torch.cat([reference(batch, p, i) for i in range(len(batch))])  # (B, 1, S, S)
    d = _foreground_diff(ours, ref)
    assert d.mean().item() < tol_mean and d.max().item() < tol_max, (part, d.mean().item(), d.max().item())


def _pil_mild(items, crops, angles, shifts):
    """The non-cached --augment mild pipeline of a run (metric.train.build_transforms) with fixed parameters:
    RandomResizedCrop(32, bicubic) of the 105-px original, RandomAffine (nearest, fill 0), ToTensor."""
    from torchvision.transforms import functional as F1

    from metric.train import build_transforms

    from metric.config import MetricConfig, resolve_config

    cfg = resolve_config(MetricConfig(dataset="omniglot"))  # the defaults of --dataset omniglot
    assert (cfg.augment, cfg.image_size, cfg.hflip) == ("mild", S, 0.0)
    tf, _ = build_transforms(cfg)
    kinds = [type(t).__name__ for t in tf.transforms]
    assert kinds[:4] == ["RandomResizedCrop", "RandomAffine", "RandomHorizontalFlip", "ToTensor"]
    rrc, aff = tf.transforms[0], tf.transforms[1]
    out = []
    for item, (t, l, h, w), a, (tx, ty) in zip(items, crops.tolist(), angles.tolist(), shifts.tolist()):
        img = F1.resized_crop(open_image(item), t, l, h, w, [S, S], interpolation=rrc.interpolation)
        img = F1.affine(img, angle=a, translate=[int(tx), int(ty)], scale=1.0, shear=[0.0, 0.0],
                        interpolation=aff.interpolation, fill=aff.fill)
        out.append(F1.to_tensor(img)[:1].double())
    return torch.stack(out)  # (n, 1, S, S)


@pytest.mark.parametrize("area", [0.6, 0.8])
def test_the_cache_against_the_pil_pipeline_of_a_non_cached_run(omniglot, area):
    """docs/metric.md's numbers: the cache (32-px bilinear copy, one grid_sample) against the PIL pipeline on the
    105-px originals, same crop region, angle and shift. benchmarks/fastdata_vs_pil.py measured over 512 images a
    mean |difference| over non-background pixels of 0.14 (60 %) / 0.13 (80 %), max 0.65 / 0.64; a rotation of the
    wrong sign gives 0.27 / 0.25. Bounds: those plus a margin for this smaller sample."""
    items = list(omniglot.train.items[::37][:48])
    n, side = len(items), items[0].shape[0]
    g = torch.Generator().manual_seed(5)
    ratio = torch.exp(torch.empty(n).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g))
    w = torch.round(torch.sqrt(area * side * side * ratio)).clamp(1, side).long()
    h = torch.round(torch.sqrt(area * side * side / ratio)).clamp(1, side).long()
    top = (torch.rand(n, generator=g) * (side - h + 1)).floor().long()
    left = (torch.rand(n, generator=g) * (side - w + 1)).floor().long()
    crops = torch.stack([top, left, h, w], dim=1)  # (n, 4) in 105-px pixels
    angles = torch.empty(n).uniform_(-10.0, 10.0, generator=g)
    shifts = torch.round(torch.empty(n, 2).uniform_(-0.05 * S, 0.05 * S, generator=g))
    ref = _pil_mild(items, crops, angles, shifts)

    cache = _resize(to_uint8_batch(items), (S, S), "bilinear")  # as TensorCache.build
    aug = TensorMildAugment(S, area, mean=(0, 0, 0), std=(1, 1, 1))

    def cached(angle):
        p = {"crop": crops.double() * (S / side), "angle": angle, "translate": shifts,
             "flip": torch.zeros(n, dtype=torch.bool), "erase": torch.zeros(n, 4, dtype=torch.long)}
        return aug.apply(cache, p)[:, :1].double()

    d = _foreground_diff(cached(angles), ref)
    wrong = _foreground_diff(cached(-angles), ref)
    print(f"area {area}: mean {d.mean().item():.4f} max {d.max().item():.3f}; wrong sign {wrong.mean().item():.4f}")
    assert d.mean().item() < 0.16 and d.max().item() < 0.75
    assert wrong.mean().item() > 1.6 * d.mean().item()


def test_parameters_follow_torchvision_ranges():
    aug = TensorMildAugment(S, 0.6, degrees=10, translate=0.05, hflip=0.25, re_prob=0.5)
    p = aug.sample_params(4000, S, S, torch.Generator().manual_seed(0))
    area = (p["crop"][:, 2] * p["crop"][:, 3]).double() / (S * S)
    assert area.min() >= 0.6 - 0.05 and area.max() <= 1.0
    assert p["angle"].abs().max() <= 10 and p["translate"].abs().max() <= round(0.05 * S)
    assert torch.equal(p["translate"], p["translate"].round())  # whole pixels, as torchvision
    assert abs(p["flip"].double().mean().item() - 0.25) < 0.03
    erased = p["erase"][:, 2] > 0
    assert abs(erased.double().mean().item() - 0.5) < 0.03
    e = p["erase"][erased].double()
    assert ((e[:, 2] * e[:, 3]) / (S * S)).min() >= 0.02 - 0.01 and ((e[:, 2] * e[:, 3]) / (S * S)).max() <= 0.33 + 0.02
    assert (e[:, 0] + e[:, 2]).max() <= S and (e[:, 1] + e[:, 3]).max() <= S


def test_erase_against_a_plain_loop():
    x = torch.randn(6, 3, 9, 7, dtype=torch.float64)
    boxes = sample_erasing(6, 9, 7, p=0.7, generator=torch.Generator().manual_seed(1))
    boxes[0] = torch.tensor([1, 2, 3, 4])
    expected = x.clone()
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        expected[i, :, t:t + h, l:l + w] = 0.0
    torch.testing.assert_close(erase(x, boxes), expected, rtol=0, atol=0)


def test_same_generator_same_batch_on_any_call(batch):
    aug = TensorMildAugment(S, 0.6, re_prob=0.3)
    a = aug(batch, torch.Generator().manual_seed(9))
    b = aug(batch, torch.Generator().manual_seed(9))
    c = aug(batch, torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (len(batch), 3, S, S) and a.dtype == torch.float32


def test_eval_resize_matches_timm_transform(omniglot):
    from timm.data import create_transform

    tf = create_transform(input_size=S, is_training=False, interpolation="bicubic")
    items = omniglot.query.items[:50]
    ref = torch.stack([tf(open_image(a)) for a in items])  # PIL: resize 36 (bicubic, antialias), centre crop 32
    ours = normalize(eval_resize(to_uint8_batch(items), S))
    diff = (ours - ref).abs() * 0.226  # back to [0, 1] units
    assert diff.mean().item() < 2e-3 and diff.max().item() < 0.08
    non_square = torch.zeros(2, 3, 40, 60, dtype=torch.uint8)
    assert eval_resize(non_square, S).shape == (2, 3, S, S)


def test_tensor_cache_rules():
    from metric.data import load_digits
    from xbn_queue.training.cli import UsageError

    digits = load_digits()
    assert use_tensor_cache("auto", "mild", digits) and not use_tensor_cache("auto", "timm", digits)
    assert use_tensor_cache("on", "timm", digits) and not use_tensor_cache("off", "mild", digits)
    paths = type(digits)("folder", type(digits.train)(["a.jpg"], np.zeros(1, np.int64)), digits.query, digits.query, True)
    assert not use_tensor_cache("auto", "mild", paths)
    with pytest.raises(UsageError, match="--tensor-cache on: needs equal-sized in-memory images"):
        use_tensor_cache("on", "mild", paths)


def test_cached_run_resumes_bit_identically(tmp_path):
    kw = dict(method="xbn", epochs=2, warmup_epochs=0, augment="mild", crop_min_scale=0.6, tensor_cache="on",
              checkpoint_every=3)
    train(tiny_cfg(tmp_path / "straight", **kw))
    r = train(tiny_cfg(tmp_path / "split", max_steps=7, **kw))
    assert r["stopped"] == "max_steps"
    train(tiny_cfg(tmp_path / "split", resume="auto", **kw))
    # the stop at --max-steps adds an evaluation record; the trained state must not differ at all
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    for part in ("model", "memory"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)  # bit-identical
    assert a["state"]["global_step"] == b["state"]["global_step"] == 22
