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
* ``digits``: the digits demo's own small from-scratch defaults (:data:`metric.config.DATASET_DEFAULTS`),
  unchanged, so the README's main job gives the same numbers.

Options set explicitly (command line or ``--config``) always win over the recipe.
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["SCRATCH", "recipe_defaults", "recipe_name", "recipe_summary"]

#: What the from-scratch recipe changes in the paper's defaults.
SCRATCH: Dict[str, Any] = dict(warmup_epochs=0, augment="mild", auto_augment="none", re_prob=0.0, crop_min_scale=0.6, lr=1e-3)


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
            f"({rotations}x the classes, --omniglot-rotations {rotations})" if rotations > 1 else "")
    return (f"recipe: {label} (backbone {cfg.backbone}, {state}, {head}, {cfg.embedding_dim}-d): "
            f"{cfg.warmup_epochs} head-only warm-up epoch(s), AdamW lr {cfg.lr:g}, batch {cfg.batch_size} "
            f"({cfg.m_per_class} per class), augmentation {aug}{data}; options you set win (--warmup-epochs, --lr, "
            "--augment, ...)")
