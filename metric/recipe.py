"""Training recipes: which defaults apply when the user does not set an option.

* ``paper``: the paper's Section 5.1 recipe for an ImageNet-pretrained backbone (a 2-epoch head-only
  warm-up with the backbone frozen, timm augmentation with RandAugment and random erasing); the
  default of the real datasets and ``folder``.
* ``from scratch``: a backbone that is not pretrained (``--no-pretrained`` and no ``--pretrained-path``)
  on those datasets. Freezing a random backbone would train the head on noise, so there is no
  warm-up; and a network learning from scratch on few classes overfits them under heavy
  augmentation, so the augmentation is mild (``--augment mild``: random-resized crop of 60-100 % of
  the area, a small random affine of +-10 degrees and +-5 % shift, horizontal flip; no RandAugment,
  no erasing).
* Independently of the recipe, ``conv4`` has no head by default (``--head none``: its flattened
  features are the embedding, as in the few-shot literature); every other backbone has a linear head.
* ``cub`` and ``cars196`` (CUB-200-2011 and Cars196 through pytorch-metric-learning's dataset
  classes): the paper's recipe (pretrained ResNet-50, 512-d, batch 64 of 16 classes x 4 images,
  memory 50 % of the training set). Their recipe line also states the PML split and the expected GPU
  time of an epoch, an estimate from the ResNet-50 figures of ``shared/GPU.md`` (:func:`gpu_epoch_estimate`).
* ``digits``: the digits demo's own small from-scratch defaults (:data:`metric.config.DATASET_DEFAULTS`),
  unchanged, so the README's main job gives the same numbers.

Options set explicitly (command line or ``--config``) always win over the recipe.
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["SCRATCH", "recipe_defaults", "recipe_name", "recipe_summary", "gpu_epoch_estimate", "GPU_MD_RESNET50"]

#: What the from-scratch recipe changes in the paper's defaults.
SCRATCH: Dict[str, Any] = dict(warmup_epochs=0, augment="mild", auto_augment="none", re_prob=0.0, crop_min_scale=0.6, lr=1e-3)


#: ``shared/GPU.md`` (one H200, 2026-11-26, medians of 20, bf16 autocast, channels_last, synthetic data):
#: ResNet-50 at 224 px, images per second of a training step at batch 64 and of inference at batch 256.
GPU_MD_RESNET50 = dict(train_img_s=2092.0, infer_img_s=15187.0, batch=64, image_size=224)


def gpu_epoch_estimate(dataset: str, backbone: str, image_size: int, batch_size: int) -> str:
    """The expected GPU time of one epoch of ``cub`` / ``cars196`` on the full dataset, in words.

    An estimate, not a measurement: ``(training images // batch) x batch`` at GPU.md's ResNet-50
    training throughput plus the retrieval images at its inference throughput, on one H200 with an
    input pipeline that keeps up (JPEG decoding and RandAugment on the CPU can be slower). Only for
    ``resnet50`` at 224 px, the figures GPU.md has.
    """
    from .datasets.pml import BENCHMARKS

    n_train, n_test = BENCHMARKS[dataset].full_sizes
    if backbone != "resnet50" or image_size != GPU_MD_RESNET50["image_size"]:
        return (f"no GPU time estimate for --backbone {backbone} at {image_size} px (shared/GPU.md has ResNet-50 at "
                "224 px only)")
    train_s = max(1, n_train // batch_size) * batch_size / GPU_MD_RESNET50["train_img_s"]
    eval_s = n_test / GPU_MD_RESNET50["infer_img_s"]
    return (f"expected GPU time per epoch on the full set about {train_s:.1f} s training + {eval_s:.1f} s retrieval "
            f"on one H200 (an estimate from shared/GPU.md's ResNet-50 224 px throughput, "
            f"{GPU_MD_RESNET50['train_img_s']:,.0f} img/s training, {GPU_MD_RESNET50['infer_img_s']:,.0f} img/s inference, "
            "if the input pipeline keeps up; not measured on this dataset)")


def _benchmark_clause(cfg: Any) -> str:
    """``cub`` / ``cars196``: PML's split, the memory's share and the GPU estimate (empty for other datasets)."""
    if cfg.dataset not in ("cub", "cars196"):
        return ""
    from .datasets.pml import BENCHMARKS

    spec = BENCHMARKS[cfg.dataset]
    mem = cfg.memory_size
    fraction = isinstance(mem, float) or (isinstance(mem, str) and not mem.strip().isdigit())
    share = f"{100 * float(mem):g} % of the training set" if fraction else f"{mem} rows"
    return (f"; data: {spec.title} through pytorch_metric_learning.datasets.{spec.class_name} (classes "
            f"{spec.train_classes} train, {spec.test_classes} retrieved leave-one-out), memory {share}; "
            + gpu_epoch_estimate(cfg.dataset, cfg.backbone, cfg.image_size, cfg.batch_size))


def _is_pretrained(pretrained: Any, pretrained_path: Any) -> bool:
    return bool(pretrained) or bool(pretrained_path)


def recipe_name(dataset: str, pretrained: Any, pretrained_path: Any) -> str:
    """``"digits"``, ``"paper"`` (pretrained backbone) or ``"from scratch"``."""
    if dataset == "digits":
        return "digits"
    return "paper" if _is_pretrained(pretrained, pretrained_path) else "from scratch"


def recipe_defaults(cfg: Any, dataset_defaults: Dict[str, Any]) -> Dict[str, Any]:
    """The defaults for ``cfg``'s unset fields: the dataset's, with the from-scratch recipe when it applies.

    Args:
        cfg: a :class:`metric.config.MetricConfig` (``None`` = not set by the user).
        dataset_defaults: the dataset's defaults.

    Returns:
        A new dict of defaults.
    """
    pretrained = dataset_defaults.get("pretrained") if cfg.pretrained is None else cfg.pretrained
    if recipe_name(cfg.dataset, pretrained, cfg.pretrained_path) == "from scratch":
        return dict(dataset_defaults, **SCRATCH)
    return dict(dataset_defaults)


def _classes_per_batch(cfg: Any) -> str:
    """``"16 classes x "`` for ``cub`` / ``cars196`` (the paper's 16 x 4), empty otherwise (lines kept as they were)."""
    return f"{cfg.batch_size // cfg.m_per_class} classes x " if cfg.dataset in ("cub", "cars196") else ""


def recipe_summary(cfg: Any) -> str:
    """One line saying which recipe applies to a resolved configuration and its effective values."""
    name = recipe_name(cfg.dataset, cfg.pretrained, cfg.pretrained_path)
    state = "pretrained" if _is_pretrained(cfg.pretrained, cfg.pretrained_path) else "not pretrained"
    label = {"digits": "digits defaults", "paper": "paper (Section 5.1)", "from scratch": "from scratch"}[name]
    if cfg.dataset == "omniglot" and name == "from scratch":
        label = "from scratch, small grayscale images"
    aa = cfg.auto_augment if (cfg.auto_augment or "none").lower() != "none" else "no RandAugment"
    if cfg.augment == "mild":
        aug = f"mild (crop {cfg.crop_min_scale:g}-1 of the area, +-10 deg affine, hflip {cfg.hflip:g}, erasing {cfg.re_prob:g})"
    else:
        aug = f"timm ({aa}, crop {cfg.crop_min_scale:g}-1 of the area, hflip {cfg.hflip:g}, erasing {cfg.re_prob:g})"
    head = "no head (features are the embedding)" if cfg.head == "none" else "linear head"
    rotations = getattr(cfg, "omniglot_rotations", 1)
    data = (f"; data: every character also rotated by 90, 180 and 270 degrees, each rotation a class "
            f"({rotations}x the classes, --omniglot-rotations {rotations})" if rotations > 1 else "") + _benchmark_clause(cfg)
    return (f"recipe: {label} (backbone {cfg.backbone}, {state}, {head}, {cfg.embedding_dim}-d): "
            f"{cfg.warmup_epochs} head-only warm-up epoch(s), AdamW lr {cfg.lr:g}, batch {cfg.batch_size} "
            f"({_classes_per_batch(cfg)}{cfg.m_per_class} per class), augmentation {aug}{data}; options you set win (--warmup-epochs, --lr, "
            "--augment, ...)")
