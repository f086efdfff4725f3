"""``--prefill``: the memory starts full of the current model's embeddings of training images.

Called once per run, right before the first step whose loss uses the memory (after the head-only
warm-up epochs and after ``--memory-warmup-steps``), so the memory starts from the warmed-up
model's features instead of filling over the next ``rows / B`` steps with ever staler ones.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import Tensor, nn

from xbn_queue import prefill
from xbn_queue.training.distributed import DistContext
from xbn_queue.training.precision import autocast
from xbn_queue.training.prefill import prefill_batches

from .config import MetricConfig

__all__ = ["prefill_memory"]


def prefill_memory(model: nn.Module, memory_loss: Any, dataset: Any, cfg: MetricConfig, ctx: DistContext,
                   device: torch.device) -> bool:
    """Fill ``memory_loss.queue`` with ``model``'s embeddings of distinct training images.

    The images are :func:`xbn_queue.training.prefill.prefill_batches`' choice (one per memory row,
    fixed by ``cfg.seed``), under the evaluation transform (``dataset`` yields ``(x, label, index,
    ok)``: the tensor cache's ``train_eval`` or an ``ImageDataset`` with the evaluation transform),
    embedded in eval mode without gradients (BatchNorm statistics are not touched, every
    submodule's mode is restored), stored with their labels and their indices as sample ids.
    Unreadable images (``--skip-bad-images``) are left out. No random generator is consumed.

    Args:
        model: the metric model (not the DDP wrapper: no collective in the forward pass).
        memory_loss: the :class:`xbn_queue.pml.AdaptiveCrossBatchMemory` of the run.
        dataset: the training images under the evaluation transform.
        cfg: the run's configuration (``seed``, ``eval_batch_size``, ``workers``, ``progress``,
            ``amp``, ``channels_last``).
        ctx: the process group; every rank embeds its share and the queue gathers them.
        device: the training device.

    Returns:
        ``True`` (for the run state: the prefill is done and must not run again on resume).
    """
    rows = memory_loss.queue.size
    batches = prefill_batches(len(dataset), rows, cfg.seed, cfg.eval_batch_size, ctx.rank, ctx.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[b.tolist() for b in batches],
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))

    def unpack(batch: Tuple[Tensor, Tensor, Tensor, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        x, y, idx, ok = batch
        return x[ok], y[ok].to(device), idx[ok].to(device)

    def embed(m: nn.Module, x: Tensor) -> Tensor:
        if cfg.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(cfg.amp, device):
            return m(x).float()  # (b, D)

    prefill(memory_loss.queue, model, loader, rows=rows, device=device, embed=embed, unpack=unpack,
            progress=cfg.progress)
    return True
