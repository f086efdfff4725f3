"""The batched tensor augmentation against torchvision: operations, crop geometry, output statistics."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from selfsup.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    TensorMoCoAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    normalize_uint8,
    pil_train_transform,
    sample_crops,
)


def colourful_images(n, size=32, seed=0):
    """Smooth random colour fields with a few sharp blobs, (n, size, size, 3) uint8."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    img = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        cy, cx = torch.randint(4, size - 4, (2,), generator=g)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < 16).float()
        img[i] = img[i] * (1 - blob) + blob * torch.rand(3, 1, 1, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize(
    "ours,theirs,factors",
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4]),
        (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4]),
        (adjust_saturation, TF.adjust_saturation, [0.6, 1.0, 1.4]),
        (adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.07]),
    ],
)
def test_per_sample_colour_ops_match_torchvision(ours, theirs, factors):
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = ours(x.clone(), torch.tensor(factors))
    ref = torch.stack([theirs(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_crop_and_flip_geometry_matches_torchvision_resized_crop():
    img = torch.from_numpy(colourful_images(1)).permute(0, 3, 1, 2)  # (1, 3, 32, 32) uint8
    aug = TensorMoCoAugment(size=32, mean=(0, 0, 0), std=(1, 1, 1))
    params = aug.sample_params(1, 32, 32, torch.Generator().manual_seed(0))
    params.update(crop=torch.tensor([[3, 5, 10, 20]]), jitter=torch.tensor([False]), gray=torch.tensor([False]))
    ref = TF.resized_crop(img.float() / 255, 3, 5, 10, 20, [32, 32], antialias=False)
    params["flip"] = torch.tensor([False])
    torch.testing.assert_close(aug.apply(img, params), ref, atol=1e-5, rtol=0)
    params["flip"] = torch.tensor([True])
    torch.testing.assert_close(aug.apply(img, params), TF.hflip(ref), atol=1e-5, rtol=0)
    # the whole image, unflipped, is returned exactly
    params.update(crop=torch.tensor([[0, 0, 32, 32]]), flip=torch.tensor([False]))
    torch.testing.assert_close(aug.apply(img, params), img.float() / 255, atol=1e-6, rtol=0)


def test_crop_distribution_matches_torchvision_get_params():
    n = 20000
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    ref = torch.tensor([T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]).float()
    ours = sample_crops(n, 32, 32, (0.08, 1.0), generator=torch.Generator().manual_seed(1)).float()
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    area_ref, area_ours = ref[:, 2] * ref[:, 3] / 1024, ours[:, 2] * ours[:, 3] / 1024
    torch.testing.assert_close(torch.quantile(area_ours, qs), torch.quantile(area_ref, qs), atol=0.02, rtol=0)
    ar_ref, ar_ours = ref[:, 3] / ref[:, 2], ours[:, 3] / ours[:, 2]
    torch.testing.assert_close(torch.quantile(ar_ours, qs), torch.quantile(ar_ref, qs), atol=0.05, rtol=0)
    # crop centre positions (uniform placement)
    cy_ref, cy_ours = ref[:, 0] + ref[:, 2] / 2, ours[:, 0] + ours[:, 2] / 2
    torch.testing.assert_close(torch.quantile(cy_ours, qs), torch.quantile(cy_ref, qs), atol=0.6, rtol=0)
    assert ((ours[:, 2] >= 1) & (ours[:, 2] <= 32) & (ours[:, 0] + ours[:, 2] <= 32)).all()
    assert ((ours[:, 3] >= 1) & (ours[:, 3] <= 32) & (ours[:, 1] + ours[:, 3] <= 32)).all()


def test_output_statistics_match_the_pil_pipeline():
    """Per-channel mean / std and grayscale rate of both pipelines agree on the same images."""
    images = colourful_images(48)
    reps = 25
    pil = pil_train_transform(32, 0.08)
    torch.manual_seed(0)
    pil_out = torch.stack([pil(Image.fromarray(im)) for _ in range(reps) for im in images])  # (1200, 3, 32, 32)
    aug = TensorMoCoAugment(size=32, scale=(0.08, 1.0))
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).repeat(reps, 1, 1, 1)
    ten_out = aug(batch, torch.Generator().manual_seed(0))
    assert ten_out.shape == pil_out.shape and ten_out.dtype == torch.float32
    for name, stat in [("mean", lambda x: x.mean(dim=(0, 2, 3))), ("std", lambda x: x.std(dim=(0, 2, 3)))]:
        a, b = stat(ten_out), stat(pil_out)
        assert torch.allclose(a, b, atol=0.06, rtol=0.05), f"{name}: tensor {a.tolist()} vs PIL {b.tolist()}"
    # per-image statistics: spread of image means and of image contrasts
    for stat in (lambda x: x.mean(dim=(2, 3)).std(dim=0), lambda x: x.std(dim=(2, 3)).mean(dim=0)):
        torch.testing.assert_close(stat(ten_out), stat(pil_out), atol=0.06, rtol=0.08)

    def gray_rate(x):  # un-normalize; grayscale images have equal channels
        rgb = x * torch.tensor(CIFAR_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
        return ((rgb[:, 0] - rgb[:, 1]).abs().amax(dim=(1, 2)) < 0.02).float().mean().item()

    assert abs(gray_rate(ten_out) - 0.2) < 0.04 and abs(gray_rate(pil_out) - 0.2) < 0.04


def test_mask_and_index_paths_agree_and_generator_makes_it_deterministic():
    batch = torch.from_numpy(colourful_images(16)).permute(0, 3, 1, 2)
    a = TensorMoCoAugment(select_by_mask=False)(batch, torch.Generator().manual_seed(5))
    b = TensorMoCoAugment(select_by_mask=True)(batch, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    c = TensorMoCoAugment()(batch, torch.Generator().manual_seed(6))
    assert not torch.equal(a, c)


def test_normalize_uint8_matches_totensor_normalize():
    im = colourful_images(1)[0]
    ref = T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])(Image.fromarray(im))
    ours = normalize_uint8(torch.from_numpy(im).permute(2, 0, 1)[None])[0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
