"""Configuration of the metric trainer: one dataclass, every field a ``--kebab-case`` option.

Fields left at ``None`` take a per-dataset default in :func:`resolve_config` (the recipe of the
paper's Section 5.1 for the real datasets, a small and quick setup for ``digits``); options the user
sets always win. The resolved configuration is what ``config.yaml`` in the run folder holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from xbn_queue.adaptation import kalman_r_value
from xbn_queue.training.cli import UsageError, above, at_least, available_cores, between, check_ranges
from xbn_queue.training.memory import MemoryOptions, memory_field
from xbn_queue.training.tracking import check_wandb_options

from .losses import DEFAULT_LOSS, DEFAULT_MINER, DEFAULT_MINER_ARGS

__all__ = ["MetricConfig", "kalman_r_value", "DATASET_DEFAULTS", "resolve_config", "validate_config", "METHODS",
           "MEMORY_METHODS", "method_memory", "COMPAT_KEYS", "COMPAT_DEFAULTS", "saved_config"]

#: The memory methods (``none``: no memory) and, for each, its ``-batch`` variant: the memory loss plus the
#: plain batch loss (the paper's XBM* for ``xbm-batch``; XBN*, AXBN* for ``xbn-batch``, ``axbn-batch``).
MEMORY_METHODS = ("xbm", "xbn", "axbn", "xbn-cov")
METHODS = ("none", "xbm", "xbm-batch", "xbn", "xbn-batch", "axbn", "axbn-batch", "xbn-cov", "xbn-cov-batch")
#: The memory's adaptation of each memory method (:class:`xbn_queue.AdaptiveQueue`'s ``adaptation``).
_ADAPTATION = {"xbm": "none", "xbn": "xbn", "axbn": "axbn", "xbn-cov": "xbn-cov"}

#: Options a checkpoint must agree on to be resumed.
COMPAT_KEYS = ["dataset", "method", "backbone", "width", "head", "embedding_dim", "embedding_norm", "memory_size",
               "batch_size", "m_per_class", "image_size", "split", "train_fraction", "split_seed", "max_per_class",
               "memory_warmup_steps", "prefill", "omniglot_rotations", "loss", "loss_args", "miner", "miner_args"]
#: Values of options added after checkpoints were first written (a checkpoint without them had these).
COMPAT_DEFAULTS: Dict[str, Any] = {"width": None, "max_per_class": None, "head": "linear", "memory_warmup_steps": 0,
                                   "prefill": False, "omniglot_rotations": 1, "loss": DEFAULT_LOSS, "loss_args": "",
                                   "miner": DEFAULT_MINER, "miner_args": DEFAULT_MINER_ARGS}


def method_memory(method: str) -> Tuple[Optional[str], bool]:
    """``(adaptation, batch_loss)`` of a ``--method``: the memory's adaptation (``None`` for ``none``, no
    memory) and whether the plain batch loss is added to the memory loss (the ``-batch`` methods).

    >>> method_memory("xbm-batch"), method_memory("axbn"), method_memory("none")
    (('none', True), ('axbn', False), (None, False))

    Raises:
        UsageError: an unknown method.
    """
    if method not in METHODS:
        raise UsageError(f"--method {method}: expected one of {', '.join(METHODS)}")
    if method == "none":
        return None, False
    base = method[: -len("-batch")] if method.endswith("-batch") else method
    return _ADAPTATION[base], base != method


def saved_config(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A configuration dict in the current form, for :data:`COMPAT_KEYS` checks (applied to both sides).

    Checkpoints written before ``width`` / ``max_per_class`` existed had their defaults, and before
    options kept their types ``memory_size`` was stored as a string (``'0.5'``, ``'64'``; a config
    built in Python may still hold one): it becomes the int or float it stands for.
    """
    out = dict(COMPAT_DEFAULTS, **saved)
    mem = out.get("memory_size")
    if isinstance(mem, str):
        try:
            out["memory_size"] = int(mem)
        except ValueError:
            try:
                out["memory_size"] = float(mem)
            except ValueError:
                pass
    return out

_PAPER = dict(backbone="resnet50", pretrained=True, image_size=224, epochs=50, warmup_epochs=2, batch_size=64,
              m_per_class=4, lr=1e-4, embedding_dim=512, memory_size=0.5, auto_augment="rand-m9-mstd0.5",
              re_prob=0.2, crop_min_scale=0.08, hflip=0.5, workers=4, kalman_gain_every=100, threads=0,
              augment="timm", drift_every=10)

#: The datasets ``--download`` can fetch.
DOWNLOADABLE = ("omniglot", "cub", "cars196")

#: Per-dataset defaults for the fields left at ``None``.
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "sop": dict(_PAPER, recall_ks=[1, 10, 100, 1000]),
    "inshop": dict(_PAPER, recall_ks=[1, 10, 20, 30, 40, 50]),
    "deepfashion2": dict(_PAPER, recall_ks=[1, 5, 10, 20], memory_size=1.0, kalman_gain_every=10),
    "folder": dict(_PAPER, recall_ks=[1, 2, 4, 8]),
    # CUB-200-2011 and Cars196 (through PML's dataset classes): the paper's recipe, Recall@1/2/4/8 as reported
    "cub": dict(_PAPER, recall_ks=[1, 2, 4, 8]),
    "cars196": dict(_PAPER, recall_ks=[1, 2, 4, 8]),
    # digits: 8x8 images -> a tiny CNN at 16 px trained from scratch (lr 1e-3), 8 classes x 4 images per
    # batch, no crops/flips that would destroy a digit, a few epochs.
    "digits": dict(backbone="tinycnn", pretrained=False, image_size=16, epochs=12, warmup_epochs=1, batch_size=32,
                   m_per_class=4, lr=1e-3, embedding_dim=64, memory_size=0.5, auto_augment="none", re_prob=0.0,
                   crop_min_scale=0.7, hflip=0.0, workers=0, kalman_gain_every=10, recall_ks=[1, 2, 4, 8], threads=1,
                   augment="timm", drift_every=10),
    # omniglot: the from-scratch recipe for small grayscale images (Conv-4 without a head at 32 px, the
    # mild augmentation without flips: a mirrored character is another character), 4 images of each of
    # 4 characters per batch, memory = half the training set.
    "omniglot": dict(backbone="conv4", pretrained=False, image_size=32, epochs=6, warmup_epochs=0, batch_size=16,
                     m_per_class=4, lr=1e-3, embedding_dim=512, memory_size=0.5, auto_augment="none", re_prob=0.0,
                     crop_min_scale=0.6, hflip=0.0, workers=0, kalman_gain_every=10, recall_ks=[1, 2, 4, 8], threads=1,
                     augment="mild", drift_every=50),
}


def _h(text: str, **kw: Any) -> Dict[str, Any]:
    return dict(help=text, **kw)


@dataclass
class MetricConfig:
    """Supervised metric learning with an adaptive cross-batch memory (XBM / XBN / AXBN)."""

    # data
    dataset: str = field(default="digits", metadata=_h("dataset", choices=["sop", "inshop", "deepfashion2", "cub", "cars196", "folder", "digits", "omniglot"], group="data"))
    data_root: Optional[str] = field(default=None, metadata=_h("dataset root folder (not needed for digits; omniglot without it: the embedded subset)", group="data"))
    download: bool = field(default=False, metadata=_h("omniglot, cub, cars196: fetch the full dataset into --data-root first (omniglot with torchvision; cub and cars196 with pytorch-metric-learning, into a new or empty folder)", group="data"))
    omniglot_rotations: int = field(default=1, metadata=_h("omniglot: 4 makes every character rotated by 90, 180 and 270 degrees a class of its own, in training and in retrieval (Vinyals et al. 2016; Santoro et al. 2016): four times the classes from the same images; 1: the characters as drawn", choices=[1, 4], group="data"))
    split: str = field(default="auto", metadata=_h("folder/digits split: auto (folder: train/test folders or class split; digits: instance), class (disjoint classes) or instance", choices=["auto", "class", "instance"], group="data"))
    train_fraction: float = field(default=0.5, metadata=_h("fraction of classes (class split) or images (instance split) used for training", group="data", range=between(0, 1, lo_open=True, hi_open=True)))
    split_seed: int = field(default=0, metadata=_h("seed of the folder/digits split rule", group="data"))
    image_size: Optional[int] = field(default=None, metadata=_h("input size (default: 224; digits 16)", group="data", range=at_least(8)))
    auto_augment: Optional[str] = field(default=None, metadata=_h("timm auto-augment policy or 'none' (default rand-m9-mstd0.5; digits none)", group="data"))
    re_prob: Optional[float] = field(default=None, metadata=_h("random erasing probability (default 0.2; digits 0)", group="data", range=between(0, 1)))
    crop_min_scale: Optional[float] = field(default=None, metadata=_h("lower bound of the random-resized-crop area (default 0.08; digits 0.7)", group="data", hidden_aliases=["crop-scale-min"], range=between(0, 1, lo_open=True)))
    hflip: Optional[float] = field(default=None, metadata=_h("horizontal flip probability (default 0.5; digits 0)", group="data", range=between(0, 1)))
    augment: Optional[str] = field(default=None, metadata=_h("training augmentation: timm (timm's pipeline: random-resized crop, flip, colour jitter, --auto-augment, erasing) or mild (random-resized crop, small random affine, flip, erasing; no RandAugment) (default timm; not pretrained: mild)", choices=["timm", "mild"], group="data"))
    max_per_class: Optional[int] = field(default=None, metadata=_h("folder: use at most N images per class (the first N by file name) in training and in test (default: all)", group="data", range=at_least(1)))
    workers: Optional[int] = field(default=None, metadata=_h("data loader workers (default 4, at most the machine's cores; digits 0)", group="data", range=at_least(0)))
    skip_bad_images: bool = field(default=False, metadata=_h("warn about and skip unreadable images instead of stopping", group="data"))
    # model
    backbone: Optional[str] = field(default=None, metadata=_h("timm model name, or for small images conv4, cifar_resnet18 or tinycnn (default resnet50; digits tinycnn)", group="model"))
    width: Optional[int] = field(default=None, metadata=_h("channels of conv4 (default 64), of the first stage of cifar_resnet18 (default 64) or of tinycnn (default 16); not for timm models", group="model", range=at_least(1)))
    pretrained: Optional[bool] = field(default=None, metadata=_h("ImageNet-pretrained backbone from timm's hub (default on; digits off)", group="model"))
    pretrained_path: Optional[str] = field(default=None, metadata=_h("local state dict for the backbone (offline alternative to --pretrained)", group="model"))
    head: Optional[str] = field(default=None, metadata=_h("embedding head: linear (a linear layer to --embedding-dim) or none (the backbone's features are the embedding, and --embedding-dim is their size) (default: none for conv4, linear otherwise)", choices=["linear", "none"], group="model"))
    embedding_dim: Optional[int] = field(default=None, metadata=_h("embedding size (default 512; digits 64; --head none: the backbone's feature size)", group="model", range=at_least(1)))
    embedding_norm: str = field(default="l2", metadata=_h("l2, or l2 followed by bn / ln (Appendix A)", choices=["l2", "bn", "ln"], group="model"))
    # method and memory
    method: str = field(default="xbn", metadata=_h("none (No-XBM: the batch loss alone); a memory with its loss: xbm (XBM, not adapted), xbn (XBN, Eq. 6), axbn (AXBN, Kalman, Eq. 18-23), xbn-cov (full covariance); each memory method with -batch (xbm-batch = XBM*, xbn-batch = XBN*, axbn-batch = AXBN*, xbn-cov-batch) adds the plain batch loss to the memory loss", choices=list(METHODS), group="memory"))
    memory_size: Optional[Union[int, float]] = memory_field("size", None, "memory rows N (an integer >= 1), or a multiple of the training set (of an epoch), a decimal like 0.5 or 2.0 (default 0.5; deepfashion2 1.0). A memory larger than the training set (above 1.0) holds older copies of the same images: same label, so they are positives of their anchors", group="memory")
    memory_warmup_steps: int = memory_field("warmup_steps", 0, "keep the memory out of the loss for the first N steps of the method (after the head-only warm-up): the loss is the plain batch loss while the memory fills and adapts", group="memory")
    prefill: bool = field(default=False, metadata=_h("fill the memory with the current model's embeddings (eval mode, evaluation transform) of distinct training images right before the first step that uses it (after the head-only warm-up and --memory-warmup-steps)", group="memory"))
    kalman_r: Union[float, str] = memory_field("kalman_r", 0.01, "AXBN measurement noise r > 0 (per batch: r/B; the paper's 0.01 gives a Kalman gain >= 0.9987, i.e. XBN), 'auto' (per-dimension noise from the batch, Q = q R) or 'sampling' (noises in units of the population variance: R = 1/B, Q = q; gain 0.25 at batch 8, 0.54 at 64) (default 0.01)", group="memory")
    kalman_q: Optional[float] = memory_field("kalman_q", None, "AXBN process noise q (default 1; --kalman-r sampling: 0.01)", group="memory")
    kalman_p0: float = memory_field("kalman_p0", 1.0, "AXBN initial estimate variance p0", group="memory")
    kalman_gain_every: Optional[int] = memory_field("kalman_gain_every", None, "AXBN: recompute the Kalman gain every N steps (default 100; deepfashion2, digits 10)", group="memory")
    # loss
    loss: str = field(default=DEFAULT_LOSS, metadata=_h("the loss, a class of pytorch_metric_learning.losses by name, e.g. ContrastiveLoss, MultiSimilarityLoss, TripletMarginLoss, NTXentLoss (default SupConLoss: the paper's); with a memory, one PML's CrossBatchMemory supports", group="loss"))
    loss_args: str = field(default="", metadata=_h("keyword arguments of --loss, NAME=VALUE,... e.g. pos_margin=0,neg_margin=0.5 (default: none, PML's defaults)", metavar="NAME=VALUE,...", group="loss"))
    miner: str = field(default=DEFAULT_MINER, metadata=_h("the miner, a class of pytorch_metric_learning.miners by name, e.g. MultiSimilarityMiner, TripletMarginMiner, or none (all pairs) (default PairMarginMiner: the paper's)", group="loss"))
    miner_args: Optional[str] = field(default=None, metadata=_h("keyword arguments of --miner, NAME=VALUE,... (default: pos_margin=0.2,neg_margin=0.8 for PairMarginMiner, the paper's; none for other miners)", metavar="NAME=VALUE,...", group="loss"))
    # optimisation
    epochs: Optional[int] = field(default=None, metadata=_h("training epochs after the warm-up (default 50; digits 12)", group="optimisation", range=at_least(1)))
    warmup_epochs: Optional[int] = field(default=None, metadata=_h("head-only pre-warm-up epochs with SGD and the batch loss (default 2; not pretrained: 0; digits 1)", group="optimisation", range=at_least(0)))
    batch_size: Optional[int] = field(default=None, metadata=_h("batch size per process (default 64; digits 32)", group="optimisation", range=at_least(2)))
    m_per_class: Optional[int] = field(default=None, metadata=_h("images per class in a batch (default 4)", group="optimisation", range=at_least(2)))
    lr: Optional[float] = field(default=None, metadata=_h("AdamW learning rate (default 1e-4; digits 1e-3)", group="optimisation", range=above(0)))
    scale_lr: bool = field(default=False, metadata=_h("multiply lr and warmup lr by the number of processes (linear scaling)", group="optimisation"))
    weight_decay: float = field(default=1e-4, metadata=_h("AdamW weight decay", group="optimisation", range=at_least(0)))
    lr_step_epochs: int = field(default=15, metadata=_h("multiply lr by --lr-gamma every N epochs", group="optimisation", range=at_least(1)))
    lr_gamma: float = field(default=0.33, metadata=_h("step factor of the lr schedule", group="optimisation", range=between(0, 1, lo_open=True)))
    warmup_lr: float = field(default=1e-3, metadata=_h("SGD learning rate of the head-only warm-up", group="optimisation", range=above(0)))
    warmup_momentum: float = field(default=0.9, metadata=_h("SGD momentum of the warm-up", group="optimisation", range=between(0, 1, hi_open=True)))
    max_steps: Optional[int] = field(default=None, metadata=_h("stop after this many optimiser steps in total (warm-up included)", group="optimisation", range=at_least(1)))
    # runtime
    device: str = field(default="auto", metadata=_h("auto, cpu or cuda", choices=["auto", "cpu", "cuda"], group="runtime"))
    amp: bool = field(default=True, metadata=_h("mixed precision on GPU (bf16 autocast, or fp16 + GradScaler)", group="runtime"))
    channels_last: bool = field(default=True, metadata=_h("channels-last memory format on GPU", group="runtime"))
    tensor_cache: str = field(default="auto", metadata=_h("decode the images once into tensors and augment whole batches on the device: auto (with --augment mild: equal-sized in-memory images, as omniglot and digits, and image files within --tensor-cache-max-mb), on, off", choices=["auto", "on", "off"], group="runtime"))
    tensor_cache_max_mb: int = field(default=1024, metadata=_h("image files (folder, sop, cub, ...) take the tensor cache only when their decoded copies (2 x 3 x S x S bytes per file) take at most this many MiB; above it auto loads them per image with PIL (and says so), on is refused; 0: never for files", group="runtime", range=at_least(0)))
    tensor_cache_dir: Optional[str] = field(default=None, metadata=_h("keep the decoded image files here too and reuse them in later runs (an entry is reused while its file keeps its path, size and modification time); default: in memory for the run only", metavar="DIR", group="runtime"))
    threads: Optional[int] = field(default=None, metadata=_h("torch CPU threads, 0 = torch's default (default 0; digits 1: a tiny model runs fastest on one thread)", group="runtime", range=at_least(0)))
    seed: int = field(default=0, metadata=_h("random seed", group="runtime"))
    output_dir: Optional[str] = field(default=None, metadata=_h("run folder (default: a new folder runs/metric/<dataset>-<method>-<timestamp>)", group="runtime"))
    overwrite: bool = field(default=False, metadata=_h("replace the run that --output-dir holds (without it such a folder is refused unless --resume)", group="runtime"))
    resume: str = field(default="", metadata=_h("continue from a checkpoint: bare --resume / auto = OUTPUT_DIR/last.pt if present, or a path", nargs="?", const="auto", group="runtime"))
    checkpoint_every: int = field(default=0, metadata=_h("also write last.pt every N steps (0: only at epoch ends)", group="runtime", range=at_least(0)))
    progress: Optional[bool] = field(default=None, metadata=_h("progress bars (default: only when stderr is a terminal; otherwise plain lines)", group="runtime"))
    # evaluation and diagnostics
    recall_ks: Optional[List[int]] = field(default=None, metadata=_h("K of Recall@K (default: the dataset's customary ones)", group="evaluation", range=at_least(1)))
    eval_every: int = field(default=1, metadata=_h("evaluate every N epochs (and after the last)", group="evaluation", range=at_least(1)))
    eval_batch_size: int = field(default=256, metadata=_h("batch size for embedding the evaluation sets", group="evaluation", range=at_least(1)))
    eval_backend: str = field(default="torch", metadata=_h("nearest-neighbour search of the evaluation: torch (chunked matrix products) or faiss (an exact faiss index; needs faiss-cpu); both give the same Recall@K and MAP@R", choices=["torch", "faiss"], group="evaluation"))
    eval_chunk: int = field(default=2048, metadata=_h("queries per similarity chunk in the evaluation", group="evaluation", range=at_least(1)))
    drift_every: Optional[int] = field(default=None, metadata=_h("measure the probe batch's feature drift over one step every N steps, 0: off (default 10; omniglot 50: with batches of 16 the two probe passes would otherwise cost a quarter of the training)", group="evaluation", range=at_least(0)))
    probe_size: int = field(default=64, metadata=_h("size of the fixed probe batch (training images, evaluation transform)", group="evaluation", range=at_least(1)))
    staleness_samples: int = field(default=512, metadata=_h("memory rows compared with fresh embeddings of the same images at each evaluation", group="evaluation", range=at_least(1)))
    # tracking
    wandb_project: Optional[str] = field(default=None, metadata=_h("W&B project (default xbn-metric when W&B is on)", group="tracking"))
    wandb_mode: str = field(default="disabled", metadata=_h("W&B mode", choices=["online", "offline", "disabled"], group="tracking"))
    wandb_name: Optional[str] = field(default=None, metadata=_h("W&B run name", group="tracking"))
    wandb_group: Optional[str] = field(default=None, metadata=_h("W&B group of the run (default: none; compare and sweep group their runs under the series folder's name)", group="tracking"))
    wandb_tags: Optional[List[str]] = field(default=None, metadata=_h("more W&B tags (every run is tagged method=, seed=, dataset=; a sweep's runs also with their swept values)", group="tracking"))
    wandb_log_model: bool = field(default=False, metadata=_h("log best.pt to W&B as a model artifact at the end of the run (needs --wandb-mode online or offline)", group="tracking"))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method}: expected one of {', '.join(METHODS)}")

    def memory_options(self) -> MemoryOptions:
        """The memory these (resolved) options describe; ``adaptation`` is ``None`` for ``--method none``."""
        return MemoryOptions(adaptation=method_memory(self.method)[0], size=self.memory_size,
                             warmup_steps=self.memory_warmup_steps, prefill=self.prefill, kalman_p0=self.kalman_p0,
                             kalman_q=self.kalman_q, kalman_r=self.kalman_r, kalman_gain_every=self.kalman_gain_every,
                             size_option="--memory-size")


def validate_config(cfg: MetricConfig) -> None:
    """Every check of the options alone (no data needed): ranges and the relations between options.

    Raises:
        UsageError: naming the option, the value and what is expected.
    """
    check_ranges(cfg)  # the memory options' bounds too (xbn_queue.training.memory)
    check_wandb_options(cfg)
    from .losses import check_loss_and_miner, resolve_miner_args

    check_loss_and_miner(cfg.loss, cfg.loss_args, cfg.miner, resolve_miner_args(cfg.miner, cfg.miner_args),
                         memory=method_memory(cfg.method)[0] is not None)
    if cfg.method == "none" and (cfg.memory_warmup_steps or cfg.prefill):
        option = f"--memory-warmup-steps {cfg.memory_warmup_steps}" if cfg.memory_warmup_steps else "--prefill"
        raise UsageError(f"{option}: --method none has no memory; use a method with one "
                         f"({', '.join(m for m in METHODS if m != 'none')})")
    if cfg.download and cfg.dataset not in DOWNLOADABLE:
        raise UsageError(f"--download: applies to --dataset {', '.join(DOWNLOADABLE)} only, not {cfg.dataset}")
    if cfg.omniglot_rotations != 1 and cfg.dataset != "omniglot":
        raise UsageError(f"--omniglot-rotations {cfg.omniglot_rotations}: applies to --dataset omniglot only, not {cfg.dataset}")
    if cfg.download and not cfg.data_root:
        raise UsageError(f"--download: needs --data-root DIR, the folder the full {cfg.dataset} dataset is stored in")
    if cfg.tensor_cache_dir:
        from .fastdata import check_cache_dir

        check_cache_dir(cfg.tensor_cache_dir)
    if cfg.eval_backend == "faiss":
        import importlib.util

        if importlib.util.find_spec("faiss") is None:
            raise UsageError('--eval-backend faiss: faiss is not installed (pip install "xbn-queue[retrieval]")')
    if cfg.max_per_class is not None and cfg.dataset != "folder":
        raise UsageError(f"--max-per-class {cfg.max_per_class}: applies to --dataset folder only, not {cfg.dataset}")
    if cfg.batch_size is not None and cfg.m_per_class is not None and cfg.batch_size % cfg.m_per_class != 0:
        raise UsageError(f"--batch-size {cfg.batch_size}: expected a multiple of --m-per-class {cfg.m_per_class}")
    if cfg.pretrained and not cfg.pretrained_path and cfg.backbone in _small_backbones():
        raise UsageError(f"--pretrained: backbone {cfg.backbone!r} has no pretrained weights: use --no-pretrained or "
                         "--pretrained-path FILE")
    if cfg.head == "none" and cfg.warmup_epochs and cfg.embedding_norm == "l2":
        raise UsageError(f"--warmup-epochs {cfg.warmup_epochs}: the warm-up trains only the head, and --head none has "
                         "no parameters to train; use --warmup-epochs 0 (or --head linear)")


def _small_backbones() -> Dict[str, int]:
    from .model import SMALL_BACKBONES

    return SMALL_BACKBONES


def resolve_config(cfg: MetricConfig) -> MetricConfig:
    """Fill the ``None`` fields with the defaults (a new object; ``cfg`` is unchanged) and check it.

    The defaults are the dataset's (``workers``: at most the cores this process may use), updated by the training recipe (:func:`metric.recipe.recipe_defaults`):
    a backbone that is not pretrained gets the from-scratch recipe (no head-only warm-up, mild
    augmentation) instead of the paper's. ``head`` defaults to ``none`` for ``conv4`` and ``linear``
    otherwise; with ``none``, ``embedding_dim`` becomes the backbone's feature size.

    Raises:
        UsageError: an option out of its range (see :func:`validate_config`).
    """
    from .recipe import recipe_defaults

    defaults = recipe_defaults(cfg, DATASET_DEFAULTS[cfg.dataset])
    updates = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    if "workers" in updates:  # a default never starts more loader processes than there are cores
        updates["workers"] = min(updates["workers"], available_cores())
    out = dataclasses.replace(cfg, **updates)
    if out.kalman_q is None:  # the noise model's own default, written into config.yaml (a bad --kalman-r: below)
        from xbn_queue.adaptation import AXBN

        out = dataclasses.replace(out, kalman_q=AXBN.default_q(kalman_r_value(out.kalman_r) or 0.01))
    if out.head is None:
        out = dataclasses.replace(out, head="none" if out.backbone == "conv4" else "linear")
    validate_config(out)
    out = _canonical_loss_args(out)
    if out.head == "none":
        out = dataclasses.replace(out, embedding_dim=_head_none_dim(out, explicit=cfg.embedding_dim))
    return out


def _canonical_loss_args(cfg: MetricConfig) -> MetricConfig:
    """``--loss-args`` / ``--miner-args`` in their canonical form (sorted ``NAME=VALUE``), the miner's default
    arguments filled in: what ``config.yaml`` and a checkpoint hold, so that equal options compare equal."""
    from .losses import format_kwargs, parse_kwargs, resolve_miner_args

    miner_args = resolve_miner_args(cfg.miner, cfg.miner_args)
    return dataclasses.replace(cfg, loss_args=format_kwargs(parse_kwargs(cfg.loss_args, "--loss-args")),
                               miner_args=format_kwargs(parse_kwargs(miner_args, "--miner-args")))


def _head_none_dim(cfg: MetricConfig, explicit: Optional[int]) -> int:
    """With ``--head none`` the embedding size is the backbone's feature size; an explicit other one is refused."""
    from .model import backbone_feature_size

    try:
        size = backbone_feature_size(cfg.backbone, cfg.width, cfg.image_size)
    except ValueError as err:
        raise UsageError(f"--backbone {cfg.backbone}: {err}") from None
    if explicit is not None and explicit != size:
        raise UsageError(f"--embedding-dim {explicit}: with --head none the embedding is the {size} features of "
                         f"--backbone {cfg.backbone} at --image-size {cfg.image_size}; leave --embedding-dim unset "
                         f"(or use --head linear)")
    return size
