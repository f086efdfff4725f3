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


@pytest.mark.parametrize("part, tol", [("none", 1e-6), ("flip", 1e-6), ("translate", 1e-6), ("angle", 2e-4),
                                       ("crop", 3e-3)])  # crop: neighbours outside the crop enter at its edge
def test_each_operation_equals_torchvision(batch, part, tol):
    aug = TensorMildAugment(S, 0.6, hflip=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    drawn = aug.sample_params(len(batch), S, S, torch.Generator().manual_seed(3))
    p = neutral(len(batch))
    if part != "none":
        p[part] = drawn[part]
    if part == "flip":
        assert 0 < int(p["flip"].sum()) < len(batch)
    ours = aug.apply(batch, p)[:, :1].double()  # (B, 1, S, S)
    for i in range(len(batch)):
        err = (ours[i:i + 1] - reference(batch, p, i)).abs().mean().item()
        assert err < tol, (part, i, err)


def test_composition_close_to_torchvision(batch):
    # one resampling instead of two: small differences, far below what a wrong sign or order gives
    aug = TensorMildAugment(S, 0.6, hflip=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    p = aug.sample_params(len(batch), S, S, torch.Generator().manual_seed(4))
    ours = aug.apply(batch, p)[:, :1].double()
    errs = [(ours[i:i + 1] - reference(batch, p, i)).abs().mean().item() for i in range(len(batch))]
    flipped = dict(p, angle=-p["angle"])
    wrong = [(ours[i:i + 1] - reference(batch, flipped, i)).abs().mean().item() for i in range(len(batch))]
    assert np.mean(errs) < 0.02 and np.mean(wrong) > 2 * np.mean(errs)


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
