"""Configuration of the metric trainer: one dataclass, every field a ``--kebab-case`` option.

Fields left at ``None`` take a per-dataset default in :func:`resolve_config` (the recipe of the
paper's Section 5.1 for the real datasets, a small and quick setup for ``digits``); options the user
sets always win. The resolved configuration is what ``config.yaml`` in the run folder holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["MetricConfig", "DATASET_DEFAULTS", "resolve_config", "memory_rows", "METHODS", "COMPAT_KEYS",
           "COMPAT_DEFAULTS"]

METHODS = ("none", "xbm", "xbm-batch", "xbn", "axbn")

#: Options a checkpoint must agree on to be resumed.
COMPAT_KEYS = ["dataset", "method", "backbone", "width", "embedding_dim", "embedding_norm", "memory_size", "batch_size",
               "m_per_class", "image_size", "split", "train_fraction", "split_seed", "max_per_class"]
#: Values of options added after checkpoints were first written (a checkpoint without them had these).
COMPAT_DEFAULTS: Dict[str, Any] = {"width": None, "max_per_class": None}

_PAPER = dict(backbone="resnet50", pretrained=True, image_size=224, epochs=50, warmup_epochs=2, batch_size=64,
              m_per_class=4, lr=1e-4, embedding_dim=512, memory_size="0.5", auto_augment="rand-m9-mstd0.5",
              re_prob=0.2, crop_scale_min=0.08, hflip=0.5, workers=4, kalman_gain_every=100, threads=0, augment="timm")

#: Per-dataset defaults for the fields left at ``None``.
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "sop": dict(_PAPER, recall_ks=[1, 10, 100, 1000]),
    "inshop": dict(_PAPER, recall_ks=[1, 10, 20, 30, 40, 50]),
    "deepfashion2": dict(_PAPER, recall_ks=[1, 5, 10, 20], memory_size="1.0", kalman_gain_every=10),
    "folder": dict(_PAPER, recall_ks=[1, 2, 4, 8]),
    # digits: 8x8 images -> a tiny CNN at 16 px trained from scratch (lr 1e-3), 8 classes x 4 images per
    # batch, no crops/flips that would destroy a digit, a few epochs.
    "digits": dict(backbone="tinycnn", pretrained=False, image_size=16, epochs=12, warmup_epochs=1, batch_size=32,
                   m_per_class=4, lr=1e-3, embedding_dim=64, memory_size="0.5", auto_augment="none", re_prob=0.0,
                   crop_scale_min=0.7, hflip=0.0, workers=0, kalman_gain_every=10, recall_ks=[1, 2, 4, 8], threads=1,
                   augment="timm"),
}


def _h(text: str, **kw: Any) -> Dict[str, Any]:
    return dict(help=text, **kw)


@dataclass
class MetricConfig:
    """Supervised metric learning with an adaptive cross-batch memory (XBM / XBN / AXBN)."""

    # data
    dataset: str = field(default="digits", metadata=_h("dataset", choices=["sop", "inshop", "deepfashion2", "folder", "digits"], group="data"))
    data_root: Optional[str] = field(default=None, metadata=_h("dataset root folder (not needed for digits)", group="data"))
    split: str = field(default="auto", metadata=_h("folder/digits split: auto (folder: train/test folders or class split; digits: instance), class (disjoint classes) or instance", choices=["auto", "class", "instance"], group="data"))
    train_fraction: float = field(default=0.5, metadata=_h("fraction of classes (class split) or images (instance split) used for training", group="data"))
    split_seed: int = field(default=0, metadata=_h("seed of the folder/digits split rule", group="data"))
    image_size: Optional[int] = field(default=None, metadata=_h("input size (default: 224; digits 16)", group="data"))
    auto_augment: Optional[str] = field(default=None, metadata=_h("timm auto-augment policy or 'none' (default rand-m9-mstd0.5; digits none)", group="data"))
    re_prob: Optional[float] = field(default=None, metadata=_h("random erasing probability (default 0.2; digits 0)", group="data"))
    crop_scale_min: Optional[float] = field(default=None, metadata=_h("lower bound of the random-resized-crop area (default 0.08; digits 0.7)", group="data"))
    hflip: Optional[float] = field(default=None, metadata=_h("horizontal flip probability (default 0.5; digits 0)", group="data"))
    augment: Optional[str] = field(default=None, metadata=_h("training augmentation: timm (timm's pipeline: random-resized crop, flip, colour jitter, --auto-augment, erasing) or mild (random-resized crop, small random affine, flip, erasing; no RandAugment) (default timm; not pretrained: mild)", choices=["timm", "mild"], group="data"))
    max_per_class: Optional[int] = field(default=None, metadata=_h("folder: use at most N images per class (the first N by file name) in training and in test (default: all)", group="data"))
    workers: Optional[int] = field(default=None, metadata=_h("data loader workers (default 4; digits 0)", group="data"))
    skip_bad_images: bool = field(default=False, metadata=_h("warn about and skip unreadable images instead of stopping", group="data"))
    # model
    backbone: Optional[str] = field(default=None, metadata=_h("timm model name, or for small images conv4, cifar_resnet18 or tinycnn (default resnet50; digits tinycnn)", group="model"))
    width: Optional[int] = field(default=None, metadata=_h("channels of conv4 (default 64), of the first stage of cifar_resnet18 (default 64) or of tinycnn (default 16); not for timm models", group="model"))
    pretrained: Optional[bool] = field(default=None, metadata=_h("ImageNet-pretrained backbone from timm's hub (default on; digits off)", group="model"))
    pretrained_path: Optional[str] = field(default=None, metadata=_h("local state dict for the backbone (offline alternative to --pretrained)", group="model"))
    embedding_dim: Optional[int] = field(default=None, metadata=_h("embedding size (default 512; digits 64)", group="model"))
    embedding_norm: str = field(default="l2", metadata=_h("l2, or l2 followed by bn / ln (Appendix A)", choices=["l2", "bn", "ln"], group="model"))
    # method and memory
    method: str = field(default="xbn", metadata=_h("none (batch loss), xbm (memory loss), xbm-batch (XBM*: memory + batch), xbn, axbn", choices=list(METHODS), group="memory"))
    memory_size: Optional[str] = field(default=None, metadata=_h("memory rows N, or a fraction of the training set like 0.5 (default 0.5; deepfashion2 1.0)", group="memory"))
    kalman_r: str = field(default="0.01", metadata=_h("AXBN measurement noise r (per batch: r/B), or 'auto'", group="memory"))
    kalman_q: float = field(default=1.0, metadata=_h("AXBN process noise q", group="memory"))
    kalman_p0: float = field(default=1.0, metadata=_h("AXBN initial estimate variance p0", group="memory"))
    kalman_gain_every: Optional[int] = field(default=None, metadata=_h("AXBN: recompute the Kalman gain every N steps (default 100; deepfashion2, digits 10)", group="memory"))
    # optimisation
    epochs: Optional[int] = field(default=None, metadata=_h("training epochs after the warm-up (default 50; digits 12)", group="optimisation"))
    warmup_epochs: Optional[int] = field(default=None, metadata=_h("head-only pre-warm-up epochs with SGD and the batch loss (default 2; not pretrained: 0; digits 1)", group="optimisation"))
    batch_size: Optional[int] = field(default=None, metadata=_h("batch size per process (default 64; digits 32)", group="optimisation"))
    m_per_class: Optional[int] = field(default=None, metadata=_h("images per class in a batch (default 4)", group="optimisation"))
    lr: Optional[float] = field(default=None, metadata=_h("AdamW learning rate (default 1e-4; digits 1e-3)", group="optimisation"))
    scale_lr: bool = field(default=False, metadata=_h("multiply lr and warmup lr by the number of processes (linear scaling)", group="optimisation"))
    weight_decay: float = field(default=1e-4, metadata=_h("AdamW weight decay", group="optimisation"))
    lr_step_epochs: int = field(default=15, metadata=_h("multiply lr by --lr-gamma every N epochs", group="optimisation"))
    lr_gamma: float = field(default=0.33, metadata=_h("step factor of the lr schedule", group="optimisation"))
    warmup_lr: float = field(default=1e-3, metadata=_h("SGD learning rate of the head-only warm-up", group="optimisation"))
    warmup_momentum: float = field(default=0.9, metadata=_h("SGD momentum of the warm-up", group="optimisation"))
    max_steps: Optional[int] = field(default=None, metadata=_h("stop after this many optimiser steps in total (warm-up included)", group="optimisation"))
    # runtime
    device: str = field(default="auto", metadata=_h("auto, cpu or cuda", choices=["auto", "cpu", "cuda"], group="runtime"))
    amp: bool = field(default=True, metadata=_h("mixed precision on GPU (bf16 autocast, or fp16 + GradScaler)", group="runtime"))
    channels_last: bool = field(default=True, metadata=_h("channels-last memory format on GPU", group="runtime"))
    threads: Optional[int] = field(default=None, metadata=_h("torch CPU threads, 0 = torch's default (default 0; digits 1: a tiny model runs fastest on one thread)", group="runtime"))
    seed: int = field(default=0, metadata=_h("random seed", group="runtime"))
    output_dir: str = field(default="runs/metric", metadata=_h("run folder", group="runtime"))
    resume: str = field(default="", metadata=_h("continue from a checkpoint: bare --resume / auto = OUTPUT_DIR/last.pt if present, or a path", nargs="?", const="auto", group="runtime"))
    checkpoint_every: int = field(default=0, metadata=_h("also write last.pt every N steps (0: only at epoch ends)", group="runtime"))
    progress: bool = field(default=True, metadata=_h("tqdm progress bars", group="runtime"))
    # evaluation and diagnostics
    recall_ks: Optional[List[int]] = field(default=None, metadata=_h("K of Recall@K (default: the dataset's customary ones)", group="evaluation"))
    eval_every: int = field(default=1, metadata=_h("evaluate every N epochs (and after the last)", group="evaluation"))
    eval_batch_size: int = field(default=256, metadata=_h("batch size for embedding the evaluation sets", group="evaluation"))
    eval_chunk: int = field(default=2048, metadata=_h("queries per similarity chunk in the evaluation", group="evaluation"))
    drift_every: int = field(default=10, metadata=_h("measure the probe batch's feature drift over one step every N steps (0: off)", group="evaluation"))
    probe_size: int = field(default=64, metadata=_h("size of the fixed probe batch (training images, evaluation transform)", group="evaluation"))
    staleness_samples: int = field(default=512, metadata=_h("memory rows compared with fresh embeddings of the same images at each evaluation", group="evaluation"))
    # tracking
    wandb_project: Optional[str] = field(default=None, metadata=_h("W&B project (default xbn-metric when W&B is on)", group="tracking"))
    wandb_mode: str = field(default="disabled", metadata=_h("W&B mode", choices=["online", "offline", "disabled"], group="tracking"))
    wandb_name: Optional[str] = field(default=None, metadata=_h("W&B run name", group="tracking"))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.checkpoint_every < 0 or self.eval_every < 1 or self.drift_every < 0:
            raise ValueError("checkpoint_every and drift_every must be >= 0 and eval_every >= 1")
        if self.width is not None and self.width < 1:
            raise ValueError(f"--width must be >= 1, got {self.width}")
        if self.max_per_class is not None and (self.max_per_class < 1 or self.dataset != "folder"):
            raise ValueError(f"--max-per-class must be >= 1 and applies to --dataset folder only, got {self.max_per_class} "
                             f"with --dataset {self.dataset}")
        if self.kalman_r != "auto":
            try:
                float(self.kalman_r)
            except ValueError:
                raise ValueError(f"kalman_r must be a number or 'auto', got {self.kalman_r!r}") from None


def resolve_config(cfg: MetricConfig) -> MetricConfig:
    """Fill the ``None`` fields with the dataset's defaults (a new object; ``cfg`` is unchanged).

    The defaults are the dataset's, updated by the training recipe (:func:`metric.recipe.recipe_defaults`):
    a backbone that is not pretrained gets the from-scratch recipe (no head-only warm-up, mild
    augmentation) instead of the paper's.
    """
    from .recipe import recipe_defaults

    defaults = recipe_defaults(cfg, DATASET_DEFAULTS[cfg.dataset])
    updates = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    out = dataclasses.replace(cfg, **updates)
    if out.batch_size % out.m_per_class != 0:
        raise ValueError(f"batch_size {out.batch_size} must be a multiple of m_per_class {out.m_per_class}")
    return out


def memory_rows(memory_size: str, num_train: int) -> int:
    """Number of memory rows: an integer literal is a row count, a decimal (``0.5``, ``1.0``, ``5e-1``)
    a fraction of the ``num_train`` training images (rounded, at least 1).

    Raises:
        ValueError: unparsable value, a fraction outside (0, 1], or a count < 1.
    """
    text = str(memory_size).strip()
    try:
        n = int(text)
    except ValueError:
        try:
            frac = float(text)
        except ValueError:
            raise ValueError(f"memory_size must be a row count or a fraction, got {memory_size!r}") from None
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"memory_size fraction must be in (0, 1], got {memory_size!r}")
        return max(1, int(round(frac * num_train)))
    if n < 1:
        raise ValueError(f"memory_size must be >= 1, got {memory_size!r}")
    return n
