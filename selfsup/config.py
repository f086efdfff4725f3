"""Configuration of the MoCo trainer: one dataclass, every option of the command line.

Each field becomes a ``--kebab-case`` option through ``xbn_queue.training.config.parse_config``;
boolean fields become ``--x/--no-x``. Defaults follow the paper's Appendix B, which follows
pytorch-metric-learning's MoCo CIFAR-10 example (lr 0.03, SGD momentum 0.9, weight decay 5e-4,
cosine schedule, key-encoder momentum 0.99, queue 4096, temperature 0.1, k-NN k=200 t=0.1,
8 batch-norm splits) except the batch size, which is 128.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from xbn_queue.adaptation import kalman_r_value
from xbn_queue.training.cli import Range, UsageError, above, at_least, available_cores, between, check_ranges
from xbn_queue.training.memory import MemoryOptions, check_kalman_r, memory_field
from xbn_queue.training.tracking import check_wandb_options

ADAPTATIONS = ["none", "xbn", "axbn"]
DATASETS = ["cifar10", "cifar100", "folder", "digits"]
ADAPT_KEYS = ["raw", "normalized"]
KNN_FEATURES = ["head", "backbone"]
#: ``--knn-features`` of a new run (a resumed run keeps its checkpoint's unless the option is given).
DEFAULT_KNN_FEATURES = "head"

# Fields that must match between a checkpoint and the run resuming from it.
COMPAT_KEYS: List[str] = [
    "dataset",
    "image_size",
    "train_subset",
    "backbone",
    "head",
    "embedding_dim",
    "adaptation",
    "adapt_keys",
    "queue_size",
    "batch_size",
    "split_bn",
    "seed",
    "knn_features",  # knn_acc of the epochs so far was measured on these features
    "memory_warmup_steps",
    "prefill",
    "mask_same_ids",
]

# Values of COMPAT_KEYS that checkpoints written before the option existed were trained with.
COMPAT_DEFAULTS: Dict[str, Any] = {
    "adapt_keys": "normalized",  # before --adapt-keys: lightly's loss, normalised keys
    "knn_features": "backbone",  # before --knn-features: the monitor used the backbone's features
    "memory_warmup_steps": 0,
    "prefill": False,
    "mask_same_ids": False,
}


def _opt(default: Any, help: str, choices: Optional[List[Any]] = None, range: Optional[Range] = None, **meta: Any) -> Any:
    metadata: Dict[str, Any] = {"help": help, **meta}
    if choices is not None:
        metadata["choices"] = choices
    if range is not None:
        metadata["range"] = range  # enforced by validate() (check_ranges) and shown in --help
    return field(default=default, metadata=metadata)


@dataclass
class SelfSupConfig:
    """All options of ``xbn-selfsup`` (MoCo with an adaptive queue inside lightly's NTXentLoss)."""

    # data
    dataset: str = _opt("cifar10", "dataset to train on", DATASETS)
    data_root: str = _opt(".data", "root folder of the dataset (cifar: torchvision layout; folder: train/<class>/*, test/<class>/*)")
    download: bool = _opt(False, "let torchvision download CIFAR-10/100 when absent (needs internet)")
    image_size: int = _opt(32, "side of the (square) images fed to the network; images of another size are resized once at load time", range=at_least(8))
    train_subset: int = _opt(0, "use only this many training images (class-stratified, fixed choice); 0 = all", range=at_least(0))
    test_subset: int = _opt(0, "use only this many test images for the k-NN monitor (class-stratified); 0 = all", range=at_least(0))
    knn_bank_subset: int = _opt(0, "use only this many training images as the k-NN bank; 0 = the whole training set", range=at_least(0))
    skip_bad_images: bool = _opt(False, "skip unreadable images with a warning (their count goes to metrics.jsonl) instead of stopping")
    crop_min_scale: float = _opt(0.08, "minimum area fraction of RandomResizedCrop (0.08: torchvision default, PML/MoCo CIFAR demos; 0.2: lightly MoCoV2Transform)", range=between(0, 1, lo_open=True))
    gpu_augment: bool = _opt(True, "augment uint8 batches on the training device with the batched tensor pipeline (same distribution as the PIL one) instead of PIL in DataLoader workers")
    workers: int = _opt(min(2, available_cores()), "DataLoader worker processes for the PIL pipeline (default: 2, at most the machine's cores)", range=at_least(0))

    # model
    backbone: str = _opt("resnet18", "CIFAR ResNet (3x3 stem, no max-pool) from torchvision", ["resnet18", "resnet34", "resnet50"])
    head: str = _opt("linear", "projection head: one linear layer (MoCo v1 / PML example) or lightly's MoCoProjectionHead", ["linear", "mlp"])
    embedding_dim: int = _opt(128, "output dimension of the projection head (the queue's dim)", range=at_least(1))
    width: int = _opt(64, "channels of the first ResNet stage (64 = standard; smaller for quick CPU runs)", range=at_least(1))
    split_bn: int = _opt(8, "split batch-norm into this many groups to emulate multi-GPU shuffle-BN (1 = plain BN)", range=at_least(1))
    momentum: float = _opt(0.99, "momentum of the key encoder (lightly's update_momentum)", range=between(0, 1))

    # queue / loss
    adaptation: str = _opt("xbn", "how the stored keys are adapted: none (plain MoCo queue), xbn (Eq. 6), axbn (Kalman, Eq. 18-23)", ADAPTATIONS)
    adapt_keys: str = _opt(
        "raw",
        "what the queue stores and adapts: raw (the key encoder's outputs, normalised only inside the loss, the current "
        "batch's keys among the negatives: PML's MoCo example, the paper's setup) or normalized (L2-normalised keys in "
        "lightly's NTXentLoss)",
        ADAPT_KEYS,
    )
    queue_size: int = memory_field("rows", 4096, "number of keys in the queue")
    temperature: float = _opt(0.1, "temperature of the NT-Xent loss", range=above(0))
    memory_warmup_steps: int = memory_field("warmup_steps", 0, "keep the queue out of the loss for the first N steps (it still fills and adapts): the other keys of the batch are the negatives")
    prefill: bool = _opt(False, "fill the queue with the key encoder's keys (eval mode, no augmentation) of distinct training images right before the first step that uses it (after --memory-warmup-steps)")
    mask_same_ids: bool = _opt(False, "leave out of each query's negatives the stored keys of its own image (older keys of the same sample); the fraction of such negatives is logged as same_id_negatives_frac either way with --adapt-keys raw")
    kalman_p0: float = memory_field("kalman_p0", 1.0, "AXBN: initial error covariance")
    kalman_q: Optional[float] = memory_field("kalman_q", None, "AXBN: process noise (default 1; --kalman-r sampling: 0.01)")
    kalman_r: Union[float, str] = memory_field("kalman_r", 0.01, "AXBN: measurement noise: a float > 0 (per batch r/B; the paper's 0.01 gives a Kalman gain >= 0.9987, i.e. XBN), 'auto' (per-dimension noise from each batch, Q = q R) or 'sampling' (noises in units of the population variance: R = 1/B, Q = q; gain below 1 for small batches) (default 0.01)")
    kalman_gain_every: int = memory_field("kalman_gain_every", 1, "AXBN: recompute the Kalman gain every this many steps")

    # optimisation
    batch_size: int = _opt(128, "images per step per process", range=at_least(2))
    epochs: int = _opt(200, "training epochs (the cosine schedule spans them)", range=at_least(1))
    lr: float = _opt(0.03, "SGD learning rate (per process batch; see --scale-lr)", range=above(0))
    scale_lr: bool = _opt(False, "multiply --lr by the number of processes (linear scaling for the effective batch batch_size * world_size)")
    sgd_momentum: float = _opt(0.9, "SGD momentum", range=between(0, 1, hi_open=True))
    weight_decay: float = _opt(5e-4, "SGD weight decay", range=at_least(0))
    max_steps: Optional[int] = _opt(None, "stop after this many optimizer steps in total (default: no limit; 0, as before 0.5, "
                                    "also means no limit); for tests and quick runs", range=at_least(0))
    amp: bool = _opt(True, "mixed precision (bf16 autocast) on GPU; ignored on CPU")
    channels_last: bool = _opt(True, "channels-last memory format on GPU")
    device: str = _opt("auto", "training device", ["auto", "cpu", "cuda"])
    seed: int = _opt(0, "random seed (model init, sampling and augmentation)")
    threads: int = _opt(0, "CPU threads for torch (torch.set_num_threads); 0 = torch's default", range=at_least(0))

    # k-NN monitor
    knn_k: int = _opt(200, "neighbours of the weighted k-NN monitor", range=at_least(1))
    knn_t: float = _opt(0.1, "temperature of the k-NN weights exp(s / t)", range=above(0))
    knn_features: Optional[str] = _opt(
        None,
        "features the k-NN monitor reports as knn_acc: head (the encoder output, embedding_dim wide, after the "
        "projection head's last layer: the paper's Appendix B, PML's MoCo example) or backbone (before the head); "
        "both are logged as knn_acc_head / knn_acc_backbone (default: head; a resumed run keeps its checkpoint's)",
        KNN_FEATURES,
    )
    knn_every: int = _opt(1, "run the k-NN monitor every this many epochs (0 = only at the end)", range=at_least(0))
    knn_batch_size: int = _opt(512, "batch size of feature extraction and k-NN chunks", range=at_least(1))
    linear_probe: bool = _opt(False, "also evaluate a linear probe whenever the k-NN monitor runs: a linear classifier trained on the same frozen features of the k-NN bank (standardised, SGD, cosine schedule), top-1 on the test features; logged as probe_acc (the --knn-features features), probe_acc_backbone, probe_acc_head")
    probe_epochs: int = _opt(100, "epochs of the linear probe's training on the frozen features (batch 256, lr 0.1, momentum 0.9)", range=at_least(1))

    # outputs / resume
    output_dir: Optional[str] = _opt(None, "run folder: config.yaml, metrics.jsonl, last.pt, history.png (default: a new folder runs/selfsup/<dataset>-<adaptation>-<timestamp>)")
    overwrite: bool = _opt(False, "replace the run that --output-dir holds (without it such a folder is refused unless --resume)")
    resume: str = field(
        default="",
        metadata={
            "help": "resume from a checkpoint (a file, or a run folder); 'auto' or a bare --resume: OUTPUT_DIR/last.pt when it exists",
            "nargs": "?",
            "const": "auto",
        },
    )
    checkpoint_every: int = _opt(0, "also checkpoint every this many steps (0 = only at the end of each epoch)", range=at_least(0))
    log_every: int = _opt(10, "write a metrics line every this many steps", range=at_least(0))
    progress: Optional[bool] = _opt(None, "progress bars (default: only when stderr is a terminal; otherwise plain lines)")
    wandb_project: str = _opt("", "Weights & Biases project (empty = xbn-selfsup when --wandb-mode is not disabled)")
    wandb_mode: str = _opt("disabled", "Weights & Biases mode", ["online", "offline", "disabled"])
    wandb_name: str = _opt("", "name of the run in W&B (default: the output folder's name)", hidden_aliases=["run-name"])
    wandb_group: Optional[str] = _opt(None, "W&B group of the run (default: none; compare groups its runs under the comparison folder's name)")
    wandb_tags: Optional[List[str]] = _opt(None, "more W&B tags (every run is tagged method=<adaptation>, seed=, dataset=)")
    wandb_log_model: bool = _opt(False, "log last.pt to W&B as a model artifact at the end of the run (needs --wandb-mode online or offline)")

    def memory_options(self) -> MemoryOptions:
        """The queue these options describe (``--queue-size`` is its rows)."""
        return MemoryOptions(adaptation=self.adaptation, size=self.queue_size, warmup_steps=self.memory_warmup_steps,
                             prefill=self.prefill, kalman_p0=self.kalman_p0, kalman_q=self.kalman_q,
                             kalman_r=self.kalman_r, kalman_gain_every=self.kalman_gain_every,
                             mask_same_ids=self.mask_same_ids, size_option="--queue-size")

    def kalman_r_value(self) -> Union[float, str]:
        """Returns ``kalman_r`` as a float, or the string ``"auto"`` or ``"sampling"``.

        Raises:
            UsageError: a value that is none of these.
        """
        check_kalman_r("--kalman-r", self.kalman_r)  # the library's rule (xbn_queue.adaptation), one for both trainers
        return kalman_r_value(self.kalman_r)

    def effective_lr(self, world_size: int = 1) -> float:
        """The SGD learning rate a run sets: ``lr``, times ``world_size`` with ``--scale-lr``."""
        return self.lr * (world_size if self.scale_lr else 1)

    def validate(self) -> None:
        """Checks values that argparse cannot.

        Raises:
            UsageError: naming the option, the value and what is expected.
        """
        check_ranges(self)  # every field's declared range or rule, the memory options' too (xbn_queue.training.memory)
        check_wandb_options(self)
        if self.batch_size % self.split_bn != 0:
            raise UsageError(f"--batch-size {self.batch_size}: expected a multiple of --split-bn {self.split_bn}")
