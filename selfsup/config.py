"""Configuration of the MoCo trainer: one dataclass, every option of the command line.

Each field becomes a ``--kebab-case`` option through ``xbn_queue.training.config.parse_config``;
boolean fields become ``--x/--no-x``. Defaults follow the paper's Appendix B, which follows
pytorch-metric-learning's MoCo CIFAR-10 example (lr 0.03, SGD momentum 0.9, weight decay 5e-4,
cosine schedule, key-encoder momentum 0.99, queue 4096, temperature 0.1, k-NN k=200 t=0.1,
8 batch-norm splits) except the batch size, which is 128.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

ADAPTATIONS = ["none", "xbn", "axbn"]
DATASETS = ["cifar10", "cifar100", "folder", "digits"]
ADAPT_KEYS = ["raw", "normalized"]
KNN_FEATURES = ["backbone", "head"]

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
]


def _opt(default: Any, help: str, choices: Optional[List[Any]] = None) -> Any:
    metadata: Dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass
class SelfSupConfig:
    """All options of ``xbn-selfsup`` (MoCo with an adaptive queue inside lightly's NTXentLoss)."""

    # data
    dataset: str = _opt("cifar10", "dataset to train on", DATASETS)
    data_root: str = _opt(".data", "root folder of the dataset (cifar: torchvision layout; folder: train/<class>/*, test/<class>/*)")
    download: bool = _opt(False, "let torchvision download CIFAR-10/100 when absent (needs internet)")
    image_size: int = _opt(32, "side of the (square) images fed to the network; images of another size are resized once at load time")
    train_subset: int = _opt(0, "use only this many training images (class-stratified, fixed choice); 0 = all")
    test_subset: int = _opt(0, "use only this many test images for the k-NN monitor (class-stratified); 0 = all")
    knn_bank_subset: int = _opt(0, "use only this many training images as the k-NN bank; 0 = the whole training set")
    skip_bad_images: bool = _opt(False, "skip unreadable images with a warning (their count goes to metrics.jsonl) instead of stopping")
    crop_min_scale: float = _opt(0.08, "minimum area fraction of RandomResizedCrop (0.08: torchvision default, PML/MoCo CIFAR demos; 0.2: lightly MoCoV2Transform)")
    gpu_augment: bool = _opt(True, "augment uint8 batches on the training device with the batched tensor pipeline (same distribution as the PIL one) instead of PIL in DataLoader workers")
    workers: int = _opt(2, "DataLoader worker processes for the PIL pipeline")

    # model
    backbone: str = _opt("resnet18", "CIFAR ResNet (3x3 stem, no max-pool) from torchvision", ["resnet18", "resnet34", "resnet50"])
    head: str = _opt("linear", "projection head: one linear layer (MoCo v1 / PML example) or lightly's MoCoProjectionHead", ["linear", "mlp"])
    embedding_dim: int = _opt(128, "output dimension of the projection head (the queue's dim)")
    width: int = _opt(64, "channels of the first ResNet stage (64 = standard; smaller for quick CPU runs)")
    split_bn: int = _opt(8, "split batch-norm into this many groups to emulate multi-GPU shuffle-BN (1 = plain BN)")
    momentum: float = _opt(0.99, "momentum of the key encoder (lightly's update_momentum)")

    # queue / loss
    adaptation: str = _opt("xbn", "how the stored keys are adapted: none (plain MoCo queue), xbn (Eq. 6), axbn (Kalman, Eq. 18-23)", ADAPTATIONS)
    adapt_keys: str = _opt(
        "raw",
        "what the queue stores and adapts: raw (the key encoder's outputs, normalised only inside the loss, the current "
        "batch's keys among the negatives: PML's MoCo example, the paper's setup) or normalized (L2-normalised keys in "
        "lightly's NTXentLoss)",
        ADAPT_KEYS,
    )
    queue_size: int = _opt(4096, "number of keys in the queue")
    temperature: float = _opt(0.1, "temperature of lightly's NTXentLoss")
    kalman_p0: float = _opt(1.0, "AXBN: initial error covariance")
    kalman_q: float = _opt(1.0, "AXBN: process noise")
    kalman_r: str = _opt("0.01", "AXBN: measurement noise (a float, or 'auto' to estimate it from each batch)")
    kalman_gain_every: int = _opt(1, "AXBN: recompute the Kalman gain every this many steps")

    # optimisation
    batch_size: int = _opt(128, "images per step per process")
    epochs: int = _opt(200, "training epochs (the cosine schedule spans them)")
    lr: float = _opt(0.03, "SGD learning rate (per process batch; see --scale-lr)")
    scale_lr: bool = _opt(False, "multiply --lr by the number of processes (linear scaling for the effective batch batch_size * world_size)")
    sgd_momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "SGD weight decay")
    max_steps: int = _opt(0, "stop after this many optimizer steps in total (0 = no limit; for tests and quick runs)")
    amp: bool = _opt(True, "mixed precision (bf16 autocast) on GPU; ignored on CPU")
    channels_last: bool = _opt(True, "channels-last memory format on GPU")
    device: str = _opt("auto", "training device", ["auto", "cpu", "cuda"])
    seed: int = _opt(0, "random seed (model init, sampling and augmentation)")
    threads: int = _opt(0, "CPU threads for torch (torch.set_num_threads); 0 = torch's default")

    # k-NN monitor
    knn_k: int = _opt(200, "neighbours of the weighted k-NN monitor")
    knn_t: float = _opt(0.1, "temperature of the k-NN weights exp(s / t)")
    knn_features: str = _opt(
        "backbone",
        "features the k-NN monitor uses as knn_acc: backbone (before the head) or head (the embedding_dim encoder "
        "output, as PML's MoCo example); both are logged as knn_acc_backbone / knn_acc_head",
        KNN_FEATURES,
    )
    knn_every: int = _opt(1, "run the k-NN monitor every this many epochs (0 = only at the end)")
    knn_batch_size: int = _opt(512, "batch size of feature extraction and k-NN chunks")

    # outputs / resume
    output_dir: str = _opt("runs/selfsup", "run folder (config.yaml, metrics.jsonl, last.pt, history.png)")
    resume: str = field(
        default="",
        metadata={
            "help": "resume from a checkpoint (a file, or a run folder); 'auto' or a bare --resume: OUTPUT_DIR/last.pt when it exists",
            "nargs": "?",
            "const": "auto",
        },
    )
    checkpoint_every: int = _opt(0, "also checkpoint every this many steps (0 = only at the end of each epoch)")
    log_every: int = _opt(10, "write a metrics line every this many steps")
    progress: bool = _opt(True, "show tqdm progress bars")
    wandb_project: str = _opt("", "Weights & Biases project (empty = xbn-selfsup when --wandb-mode is not disabled)")
    wandb_mode: str = _opt("disabled", "Weights & Biases mode", ["online", "offline", "disabled"])
    run_name: str = _opt("", "name of the run in W&B (default: the output folder's name)")

    def kalman_r_value(self) -> Union[float, str]:
        """Returns ``kalman_r`` as a float, or the string ``"auto"``."""
        if str(self.kalman_r).strip().lower() == "auto":
            return "auto"
        return float(self.kalman_r)

    def validate(self) -> None:
        """Checks values that argparse cannot.

        Raises:
            ValueError: naming the option and the value that is wrong.
        """
        if self.batch_size < 2:
            raise ValueError(f"--batch-size must be at least 2, got {self.batch_size}")
        if self.split_bn < 1 or self.batch_size % self.split_bn != 0:
            raise ValueError(
                f"--batch-size {self.batch_size} must be divisible by --split-bn {self.split_bn}"
            )
        if self.queue_size < 1:
            raise ValueError(f"--queue-size must be positive, got {self.queue_size}")
        if self.temperature <= 0 or self.knn_t <= 0:
            raise ValueError("--temperature and --knn-t must be positive")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"--momentum must be in [0, 1], got {self.momentum}")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"--crop-min-scale must be in (0, 1], got {self.crop_min_scale}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {self.epochs}")
        self.kalman_r_value()  # raises ValueError for a value that is neither a float nor "auto"
