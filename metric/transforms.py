"""The trainer's image transforms: the training augmentation and the evaluation transform of a run.

Used by the run itself (:mod:`metric.train`), the experiment baselines, and the retrieval application
(:mod:`metric.retrieval` rebuilds a run's evaluation transform from its saved configuration).
"""

from __future__ import annotations

from .config import MetricConfig

__all__ = ["build_transforms"]


def build_transforms(cfg: MetricConfig):
    """The training transform and the evaluation transform (resize + centre crop, ImageNet normalisation).

    ``--augment timm``: timm's training pipeline (random-resized crop, flip, colour jitter,
    ``--auto-augment``, random erasing). ``--augment mild`` (the from-scratch recipe): random-resized
    crop of ``crop_min_scale``-100 % of the area, a random affine of +-10 degrees and +-5 % shift,
    horizontal flip, random erasing with ``re_prob``; no RandAugment, no colour jitter.
    """
    from timm.data import create_transform

    eval_tf = create_transform(input_size=cfg.image_size, is_training=False, interpolation="bicubic")
    if cfg.augment == "mild":
        from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from torchvision import transforms as T

        steps = [T.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                 T.RandomAffine(degrees=10, translate=(0.05, 0.05)),
                 T.RandomHorizontalFlip(cfg.hflip), T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
        if cfg.re_prob > 0:
            steps.append(T.RandomErasing(cfg.re_prob))
        return T.Compose(steps), eval_tf
    aa = None if (cfg.auto_augment or "none").lower() == "none" else cfg.auto_augment
    train_tf = create_transform(
        input_size=cfg.image_size, is_training=True, auto_augment=aa, re_prob=cfg.re_prob,
        scale=(cfg.crop_min_scale, 1.0), hflip=cfg.hflip, interpolation="bicubic",
    )
    return train_tf, eval_tf
