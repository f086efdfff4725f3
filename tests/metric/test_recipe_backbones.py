"""--backbone conv4 / cifar_resnet18 / --width, the from-scratch recipe, --augment mild, --max-per-class."""

import dataclasses
import json

import pytest
import torch

from metric.cli import main
from metric.config import COMPAT_DEFAULTS, DATASET_DEFAULTS, MetricConfig, resolve_config
from metric.data import load_folder
from metric.model import PretrainedWeightsError, build_model
from metric.recipe import SCRATCH, recipe_summary
from metric.train import build_transforms
from xbn_queue.training.cli import UsageError

from .conftest import make_folder
from .helpers import tiny_argv


@pytest.mark.parametrize("name,width,size,features", [("conv4", None, 32, 64 * 2 * 2), ("conv4", 8, 84, 8 * 5 * 5),
                                                      ("cifar_resnet18", None, 32, 512), ("cifar_resnet18", 4, 16, 32),
                                                      ("tinycnn", 8, 16, 32)])
def test_small_backbones_and_width(name, width, size, features):
    m = build_model(name, 12, width=width, image_size=size)
    assert m.head.in_features == features
    m.eval()
    z = m(torch.randn(2, 3, size, size))
    assert z.shape == (2, 12)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))


def test_backbone_errors():
    with pytest.raises(ValueError, match="--width applies to the backbones"):
        build_model("resnet10t", 8, width=16)
    with pytest.raises(ValueError, match="at least 16 px"):
        build_model("conv4", 8, image_size=8)
    with pytest.raises(PretrainedWeightsError, match="'conv4' has no pretrained weights"):
        build_model("conv4", 8, pretrained=True)
    with pytest.raises(UsageError, match="--width 0: expected an integer >= 1"):
        resolve_config(MetricConfig(width=0))


def test_recipe_not_pretrained_skips_warmup_and_uses_mild_augmentation():
    scratch = resolve_config(MetricConfig(dataset="folder", backbone="conv4", pretrained=False))
    paper = resolve_config(MetricConfig(dataset="folder"))
    for key, value in SCRATCH.items():
        assert getattr(scratch, key) == value, key
    assert scratch.warmup_epochs == 0 and scratch.augment == "mild" and scratch.auto_augment == "none"
    assert paper.pretrained and paper.warmup_epochs == 2 and paper.augment == "timm" and paper.auto_augment == "rand-m9-mstd0.5"
    # a local weight file counts as pretrained: the paper's recipe
    local = resolve_config(MetricConfig(dataset="sop", pretrained=False, pretrained_path="w.pth"))
    assert local.warmup_epochs == 2 and local.augment == "timm"
    # explicit options win over the recipe
    mine = resolve_config(MetricConfig(dataset="folder", pretrained=False, warmup_epochs=3, augment="timm", lr=5e-4))
    assert (mine.warmup_epochs, mine.augment, mine.lr) == (3, "timm", 5e-4)
    assert mine.re_prob == SCRATCH["re_prob"]
    # digits keeps its own defaults (the README's main job is unchanged)
    digits = resolve_config(MetricConfig(dataset="digits"))
    assert all(getattr(digits, k) == v for k, v in DATASET_DEFAULTS["digits"].items())
    assert ("recipe: from scratch (backbone conv4, not pretrained, no head (features are the embedding), 12544-d): "
            "0 head-only warm-up") in recipe_summary(scratch)
    assert "mild" in recipe_summary(scratch) and "AdamW lr 0.001, batch 64 (4 per class)" in recipe_summary(scratch)
    assert "recipe: paper" in recipe_summary(paper) and "rand-m9-mstd0.5" in recipe_summary(paper)
    assert "recipe: digits defaults" in recipe_summary(digits)


def test_mild_augmentation_has_no_randaugment():
    from torchvision import transforms as T

    cfg = resolve_config(MetricConfig(dataset="folder", pretrained=False, image_size=24, re_prob=0.3))
    train_tf, eval_tf = build_transforms(cfg)
    kinds = [type(t) for t in train_tf.transforms]
    assert kinds == [T.RandomResizedCrop, T.RandomAffine, T.RandomHorizontalFlip, T.ToTensor, T.Normalize, T.RandomErasing]
    assert train_tf.transforms[0].scale == (cfg.crop_min_scale, 1.0) and train_tf.transforms[1].degrees == [-10.0, 10.0]
    assert "RandAugment" not in repr(train_tf)
    from PIL import Image

    img = Image.new("RGB", (40, 30), (120, 30, 200))
    assert train_tf(img).shape == eval_tf(img).shape == (3, 24, 24)
    paper_tf, _ = build_transforms(resolve_config(MetricConfig(dataset="folder", image_size=24)))
    assert "RandAugment" in repr(paper_tf)


def test_max_per_class_keeps_the_first_files(tmp_path):
    root = make_folder(tmp_path / "f", per_class=5, with_train_test=True)
    full = load_folder(root, split="class")
    few = load_folder(root, split="class", max_per_class=2)
    assert len(few.train) == 2 * full.train.num_classes and len(few.query) == 2 * full.query.num_classes
    assert set(few.train.items) <= set(full.train.items)
    assert all(p.endswith(("000.png", "001.png")) for p in few.train.items + few.query.items)
    with pytest.raises(UsageError, match="--max-per-class 10: applies to --dataset folder only, not digits"):
        resolve_config(MetricConfig(dataset="digits", max_per_class=10))
    with pytest.raises(UsageError, match="--max-per-class 0: expected an integer >= 1"):
        resolve_config(MetricConfig(dataset="folder", max_per_class=0))


def test_cli_conv4_run_prints_the_recipe_and_resume_checks_width(tmp_path, capsys):
    argv = tiny_argv(tmp_path, backbone="conv4", width=8, warmup_epochs=0, max_steps=2, head="linear")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "recipe: digits defaults (backbone conv4, not pretrained, linear head, 32-d): 0 head-only warm-up epoch(s)" in err
    saved = (tmp_path / "config.yaml").read_text()
    assert "backbone: conv4" in saved and "width: 8" in saved and "head: linear" in saved
    # a checkpoint of width 8 does not resume at width 16
    assert main(tiny_argv(tmp_path, backbone="conv4", width=16, warmup_epochs=0, max_steps=3, resume="auto", head="linear")) == 2
    assert "width: saved 8, now 16" in capsys.readouterr().err


@pytest.mark.parametrize("width,size", [(64, 32), (8, 84), (5, 16)])
def test_head_none_embeds_the_flattened_features(width, size):
    """--head none: the embedding is the backbone's flattened features, L2-normalised (float64 reference)."""
    from metric.model import backbone_feature_size

    dim = backbone_feature_size("conv4", width, size)
    assert dim == width * (size // 16) ** 2
    torch.manual_seed(0)
    m = build_model("conv4", dim, width=width, image_size=size, head="none").eval()
    assert isinstance(m.head, torch.nn.Identity) and list(m.head_parameters()) == []
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        f = m.backbone.double()(x.double())  # (3, dim)
        ref = f / f.norm(dim=1, keepdim=True)
        m.float()
        z = m(x)
    assert z.shape == (3, dim)
    torch.testing.assert_close(z.double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=f"head 'none' makes the backbone's {dim} features the embedding"):
        build_model("conv4", dim + 1, width=width, image_size=size, head="none")
    with pytest.raises(ValueError, match="head must be one of linear, none"):
        build_model("conv4", dim, width=width, image_size=size, head="mlp")


def test_head_defaults_and_embedding_dim_resolution():
    conv4 = resolve_config(MetricConfig(dataset="folder", backbone="conv4", pretrained=False, image_size=32, width=16))
    assert (conv4.head, conv4.embedding_dim) == ("none", 16 * 2 * 2)
    assert resolve_config(conv4) == conv4  # resolving twice (train() does) changes nothing
    linear = resolve_config(MetricConfig(dataset="folder", backbone="conv4", pretrained=False, image_size=32, head="linear"))
    assert (linear.head, linear.embedding_dim) == ("linear", 512)
    assert resolve_config(MetricConfig(dataset="digits")).head == "linear"  # the main job is unchanged
    assert resolve_config(MetricConfig(dataset="folder", backbone="cifar_resnet18", pretrained=False)).head == "linear"
    res = resolve_config(MetricConfig(dataset="folder", backbone="cifar_resnet18", pretrained=False, head="none", width=4))
    assert res.embedding_dim == 32
    same = resolve_config(MetricConfig(dataset="folder", backbone="conv4", pretrained=False, image_size=32, embedding_dim=256))
    assert same.embedding_dim == 256  # an explicit value equal to the feature size is accepted
    with pytest.raises(UsageError, match="--embedding-dim 64: with --head none the embedding is the 256 features"):
        resolve_config(MetricConfig(dataset="folder", backbone="conv4", pretrained=False, image_size=32, embedding_dim=64))
    with pytest.raises(UsageError, match="--warmup-epochs 2: the warm-up trains only the head"):
        resolve_config(MetricConfig(dataset="folder", backbone="conv4", pretrained=False, warmup_epochs=2))
    # with a BN / LN after the L2 the warm-up has parameters to train
    assert resolve_config(MetricConfig(dataset="folder", backbone="conv4", pretrained=False, warmup_epochs=1,
                                       embedding_norm="bn")).warmup_epochs == 1


def test_cli_head_none_trains_and_resume_checks_the_head(tmp_path, capsys):
    argv = tiny_argv(tmp_path, backbone="conv4", width=8, warmup_epochs=0, max_steps=2, embedding_dim=None)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "no head (features are the embedding), 8-d" in err
    saved = (tmp_path / "config.yaml").read_text()
    assert "head: none" in saved and "embedding_dim: 8" in saved
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("head.") for k in ckpt["model"]) and ckpt["memory"] is not None
    # a checkpoint without a head does not resume with one
    assert main(tiny_argv(tmp_path, backbone="conv4", width=8, warmup_epochs=0, max_steps=3, resume="auto",
                          head="linear", embedding_dim=8)) == 2
    assert "differs: head: saved 'none', now 'linear'" in capsys.readouterr().err


def test_checkpoint_written_by_an_older_version_still_resumes(tmp_path, capsys):
    assert main(tiny_argv(tmp_path, max_steps=2)) == 0
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    for key in ("augment", *COMPAT_DEFAULTS):
        del ckpt["config"][key]  # as saved before these options existed (0.1 - 0.3)
    ckpt["config"]["memory_size"] = "64"  # as saved before options kept their types
    torch.save(ckpt, tmp_path / "last.pt")
    assert main(tiny_argv(tmp_path, max_steps=4, resume="auto")) == 0
    assert "resumed from" in capsys.readouterr().err
