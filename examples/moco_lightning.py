"""MoCo as a Lightning module, with lightly's modules and an adaptive memory bank inside ``NTXentLoss``.

The one line that differs from lightly's own MoCo example is the memory bank::

    self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(memory_size, dim))
    self.criterion.memory_bank = AdaptiveMemoryBank(size=(memory_size, dim), adaptation="xbn")

Runs on scikit-learn's 8x8 digits (no download), on the CPU in about a minute::

    python examples/moco_lightning.py                          # XBN, 1 process
    python examples/moco_lightning.py --adaptation none        # lightly's plain memory bank
    python examples/moco_lightning.py --devices 2 --strategy ddp --accelerator cpu   # 2 processes (gloo)

The bank is part of the module's state dict, so Lightning checkpoints carry it and ``--resume`` continues
the run where it stopped. Augmentations are drawn from a generator seeded by (seed, step, rank), and the
shuffling by (seed, epoch), so a run resumed at an epoch boundary is the uninterrupted run.
Needs ``pip install lightning lightly scikit-learn`` (all in ``xbn-queue[dev]``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

try:
    import lightning as L
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
except ImportError as e:  # pragma: no cover - only without the extras
    raise SystemExit(f"moco_lightning.py needs lightning and lightly: pip install lightning lightly ({e})")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing
from xbn_queue.lightly import AdaptiveMemoryBank  # noqa: E402


# ---------------------------------------------------------------- data
def load_digits(limit: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """scikit-learn's digits as images.

    Returns:
        ``(images, labels)``: (N, 1, 8, 8) float32 in [0, 1] and (N,) int64; the first ``limit`` only if given.
    """
    from sklearn.datasets import load_digits as _load

    digits = _load()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    return (images[:limit], labels[:limit]) if limit else (images, labels)


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle drawn from (seed, epoch): Lightning calls ``set_epoch``, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """A random view of each image: shift by up to one pixel, brightness / contrast jitter, pixel noise.

    Args:
        x: (B, 1, H, W) images in [0, 1].
        generator: a CPU generator; every draw comes from it (then moved to ``x``'s device).

    Returns:
        (B, 1, H, W) views.
    """
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (1, 1, 1, 1))  # (B, 1, H + 2, W + 2)
    dy, dx = torch.randint(0, 3, (2, b), generator=generator).tolist()
    views = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])  # (B, 1, H, W)
    scale = 1 + 0.4 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)  # (B, 1, 1, 1)
    shift = 0.2 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    noise = 0.1 * torch.randn(x.shape, generator=generator)
    return views * scale.to(x.device) + shift.to(x.device) + noise.to(x.device)


# ---------------------------------------------------------------- model
def small_cnn(width: int = 32) -> nn.Module:
    """(B, 1, 8, 8) -> (B, 2 * width) features."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 2w, 4, 4)
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 2w)
    )


class MoCo(L.LightningModule):
    """MoCo v2 (query encoder, momentum key encoder, a bank of keys as negatives).

    Args:
        memory_size: rows in the memory bank.
        dim: output dimension of the projection head (and of the bank rows).
        adaptation: ``"xbn"``, ``"axbn"`` or ``"none"`` (lightly's plain bank).
        temperature: NT-Xent temperature.
        lr: SGD learning rate.
        momentum: key encoder EMA momentum.
        width: width of the small CNN.
        seed: seed of the augmentations.
    """

    def __init__(
        self,
        memory_size: int = 512,
        dim: int = 32,
        adaptation: str = "xbn",
        temperature: float = 0.1,
        lr: float = 0.05,
        momentum: float = 0.99,
        width: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = small_cnn(width)
        self.projection_head = MoCoProjectionHead(2 * width, 2 * width, dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=(memory_size, dim))
        # the change: every rank's keys go into every rank's bank, so all ranks hold the same bank
        self.criterion.memory_bank = AdaptiveMemoryBank(
            size=(memory_size, dim), adaptation=adaptation, gather_distributed=True
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, 8, 8) -> (B, dim) queries."""
        return self.projection_head(self.backbone(x))

    @torch.no_grad()
    def forward_momentum(self, x: Tensor) -> Tensor:
        """(B, 1, 8, 8) -> (B, dim) keys, from the momentum encoder."""
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images = batch[0]  # (B, 1, 8, 8)
        update_momentum(self.backbone, self.backbone_momentum, m=self.hparams.momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=self.hparams.momentum)
        g = torch.Generator().manual_seed((self.hparams.seed * 1_000_003 + self.global_step) * 64 + self.global_rank)
        query = self(augment(images, g))  # (B, dim)
        key = self.forward_momentum(augment(images, g))  # (B, dim)
        loss = self.criterion(query, key)  # the bank adapts to the keys, returns negatives, enqueues the keys
        self.log("train_loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)


@torch.no_grad()
def knn_accuracy(model: MoCo, train: Tuple[Tensor, Tensor], test: Tuple[Tensor, Tensor], k: int = 5) -> float:
    """k-NN accuracy (cosine, majority vote) of the backbone's features: a quick check that MoCo learned."""
    model.eval()
    f_train = nn.functional.normalize(model.backbone(train[0]), dim=1)  # (N, F)
    f_test = nn.functional.normalize(model.backbone(test[0]), dim=1)  # (T, F)
    nearest = (f_test @ f_train.t()).topk(k, dim=1).indices  # (T, k)
    votes = nn.functional.one_hot(train[1][nearest], num_classes=10).sum(dim=1)  # (T, 10)
    return float((votes.argmax(dim=1) == test[1]).float().mean())


def make_trainer(args: argparse.Namespace, callbacks: Optional[List[L.Callback]] = None) -> L.Trainer:
    return L.Trainer(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        default_root_dir=args.out,
        logger=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        callbacks=callbacks,
        log_every_n_steps=1,
    )


def make_loader(images: Tensor, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    dataset = torch.utils.data.TensorDataset(images)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed), drop_last=True
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adaptation", choices=["xbn", "axbn", "none"], default="xbn")
    p.add_argument("--memory-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--limit", type=int, default=None, help="use the first N digits only")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="moco_lightning_run", help="folder for the final checkpoint")
    p.add_argument("--resume", default=None, help="a checkpoint written by an earlier run")
    args = p.parse_args(argv)
    for name in ("memory_size", "batch_size", "max_epochs", "devices"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.resume and not Path(args.resume).is_file():
        p.error(f"--resume: no checkpoint at {args.resume}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    images, labels = load_digits(args.limit)
    n_train = int(0.8 * len(images))
    model = MoCo(memory_size=args.memory_size, adaptation=args.adaptation, seed=args.seed)
    trainer = make_trainer(args)
    trainer.fit(model, make_loader(images[:n_train], args.batch_size, args.seed), ckpt_path=args.resume)
    ckpt = Path(args.out) / "last.ckpt"
    trainer.save_checkpoint(ckpt)  # on every rank (Lightning writes it once)
    if trainer.is_global_zero:
        acc = knn_accuracy(model.cpu(), (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:]))
        print(f"adaptation={args.adaptation}: k-NN accuracy {acc:.3f} on {len(images) - n_train} held-out digits; "
              f"checkpoint {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
