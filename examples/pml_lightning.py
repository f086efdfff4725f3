"""Metric learning with pytorch-metric-learning in Lightning, with an adaptive cross-batch memory.

The pipeline is PML's (``SupConLoss``, ``MPerClassSampler``); the one line that differs from a plain
PML ``CrossBatchMemory`` pipeline is the memory::

    self.criterion = AdaptiveCrossBatchMemory(SupConLoss(temperature=0.1), dim, memory_size=256, adaptation="xbn")

and :class:`xbn_queue.lightning.AdaptiveQueueCallback` adds the memory warm-up, the prefill and the drift /
staleness logging (to a CSV logger here: ``OUT/lightning_logs/version_0/metrics.csv``).

The data are synthetic (no download): 40 classes of 32-d points whose class lives in 8 directions, with
strong noise in the other 24 (see ``make_data``); the model trains on classes 0-27 and is
evaluated by Recall@1 (cosine, leave-one-out) on the 12 unseen classes 28-39, as metric-learning
benchmarks split classes. A run takes a few seconds on one CPU core::

    python examples/pml_lightning.py                            # XBN, 4 epochs
    python examples/pml_lightning.py --adaptation none          # plain XBM (PML's CrossBatchMemory)
    python examples/pml_lightning.py --fast-dev-run             # one batch (Lightning's fast_dev_run)

Needs ``pip install lightning pytorch-metric-learning`` (both in ``xbn-queue[dev]``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

try:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from pytorch_metric_learning.losses import SupConLoss
    from pytorch_metric_learning.samplers import MPerClassSampler
except ImportError as e:  # pragma: no cover - only without the extras
    raise SystemExit(f"pml_lightning.py needs lightning and pytorch-metric-learning: "
                     f"pip install lightning pytorch-metric-learning ({e})")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing
from xbn_queue.lightning import AdaptiveQueueCallback  # noqa: E402
from xbn_queue.pml import AdaptiveCrossBatchMemory  # noqa: E402

CLASSES, TRAIN_CLASSES, PER_CLASS, D_IN = 40, 28, 24, 32


# ---------------------------------------------------------------- data
def make_data(seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Synthetic classes: the class lives in 8 of the 32 input directions, strong shared noise in the other 24.

    A class is a centre in an 8-d signal space plus noise; 24 nuisance dimensions carry noise twice the
    centres' spread, and a fixed random rotation mixes all 32. Distances in the input are dominated by the
    nuisance, so the untrained embedding retrieves poorly; learning to ignore it carries over to
    unseen classes.

    Returns:
        ``(x, labels)``: (CLASSES * PER_CLASS, D_IN) float32 and (CLASSES * PER_CLASS,) int64, classes in order.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, 8, generator=g)  # (C, 8)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)  # (N,)
    signal = centres[labels] + 0.5 * torch.randn(len(labels), 8, generator=g)  # (N, 8)
    nuisance = 2.0 * torch.randn(len(labels), D_IN - 8, generator=g)  # (N, 24)
    rotation = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))[0]  # (D_IN, D_IN)
    return torch.cat([signal, nuisance], dim=1) @ rotation, labels  # (N, D_IN)


class Indexed(torch.utils.data.Dataset):
    """``(x, label, index)``: the index is the sample id the memory stores (for the staleness)."""

    def __init__(self, x: Tensor, labels: Tensor) -> None:
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor, Tensor]:
        return self.x[i], self.labels[i], torch.tensor(i)


# ---------------------------------------------------------------- model
class MetricModule(L.LightningModule):
    """A linear embedding (swap in any backbone) trained with PML's SupConLoss against an adaptive cross-batch memory.

    Args:
        dim: embedding dimension.
        memory_size: rows of the memory.
        adaptation: ``"xbn"``, ``"axbn"`` or ``"none"`` (plain XBM).
        lr: Adam learning rate.
    """

    def __init__(self, dim: int = 32, memory_size: int = 256, adaptation: str = "xbn", lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(D_IN, dim)
        self.criterion = AdaptiveCrossBatchMemory(SupConLoss(temperature=0.1), dim, memory_size=memory_size,
                                                  adaptation=adaptation)

    def forward(self, x: Tensor) -> Tensor:
        """(B, D_IN) -> (B, dim) unit embeddings."""
        return nn.functional.normalize(self.net(x), dim=1)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, labels, ids = batch
        loss = self.criterion(self(x), labels, ids=ids)  # adapt the memory, enqueue the batch, loss against it
        self.log("train_loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)


@torch.no_grad()
def recall_at_1(model: nn.Module, x: Tensor, labels: Tensor) -> float:
    """Leave-one-out Recall@1 by cosine similarity: the share of samples whose nearest other sample shares the class."""
    was = model.training
    model.eval()
    z = nn.functional.normalize(model(x), dim=1)  # (N, dim)
    model.train(was)
    sim = z @ z.t()  # (N, N)
    sim.fill_diagonal_(-float("inf"))
    return float((labels[sim.argmax(dim=1)] == labels).float().mean())


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adaptation", choices=["xbn", "axbn", "none"], default="xbn")
    p.add_argument("--memory-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch (m=4 per class)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--warmup-steps", type=int, default=10, help="steps before the memory enters the loss")
    p.add_argument("--no-prefill", dest="prefill", action="store_false",
                   help="let the memory fill over the steps instead of prefilling it after the warm-up")
    p.add_argument("--log-every", type=int, default=5, help="drift / staleness logged every N steps (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/pml_lightning", help="folder of the CSV log (default runs/pml_lightning)")
    p.add_argument("--fast-dev-run", action="store_true", help="one training batch (Lightning's fast_dev_run)")
    args = p.parse_args(argv)
    for name in ("memory_size", "batch_size", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("warmup_steps", "log_every"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.batch_size % 4:
        p.error("--batch-size must be a multiple of 4 (MPerClassSampler, m=4)")
    n_train = TRAIN_CLASSES * PER_CLASS
    if args.memory_size > n_train:
        p.error(f"--memory-size must be at most the {n_train} training samples (the prefill writes distinct samples)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Train, evaluate, print one line; returns ``{"recall@1": ..., "recall@1_untrained": ..., "steps": ...}``."""
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    x, labels = make_data(args.seed)
    train = labels < TRAIN_CLASSES
    dataset = Indexed(x[train], labels[train])
    # one epoch = every training sample once, in batches of batch_size / 4 classes x 4 samples
    length = len(dataset) // args.batch_size * args.batch_size
    sampler = MPerClassSampler(dataset.labels, m=4, batch_size=args.batch_size, length_before_new_iter=length)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    model = MetricModule(memory_size=args.memory_size, adaptation=args.adaptation, lr=args.lr)
    before = recall_at_1(model, x[~train], labels[~train])
    callback = AdaptiveQueueCallback(warmup_steps=args.warmup_steps, prefill=args.prefill, log_every=args.log_every)
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, fast_dev_run=args.fast_dev_run,
        logger=CSVLogger(args.out, name="lightning_logs", version=0), callbacks=[callback],
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=sys.stderr.isatty(),
        log_every_n_steps=1,
    )
    trainer.fit(model, loader)
    after = recall_at_1(model, x[~train], labels[~train])
    print(f"adaptation={args.adaptation}: Recall@1 {after:.3f} on {int((~train).sum())} samples of "
          f"{CLASSES - TRAIN_CLASSES} unseen classes (untrained: {before:.3f}), {trainer.global_step} steps")
    return {"recall@1": after, "recall@1_untrained": before, "steps": trainer.global_step}


if __name__ == "__main__":
    main()
    sys.exit(0)
