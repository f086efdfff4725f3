"""``--prefill``: the MoCo queue starts full of the key encoder's keys of training images.

Called once per run, right before the first step whose loss uses the queue (after
``--memory-warmup-steps``), so the queue starts from the current key encoder's keys instead of filling
over the next ``queue_size / B`` steps.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xbn_queue import prefill
from xbn_queue.training.distributed import DistContext
from xbn_queue.training.precision import autocast
from xbn_queue.training.prefill import prefill_batches

from .config import SelfSupConfig

__all__ = ["prefill_queue"]


def prefill_queue(encoder_k: nn.Module, criterion: nn.Module, images_u8: Tensor, prepare: Callable[[Tensor], Tensor],
                  cfg: SelfSupConfig, ctx: DistContext, device: torch.device, with_ids: bool) -> bool:
    """Fill the queue inside ``criterion`` with ``encoder_k``'s keys of distinct training images.

    The images are :func:`xbn_queue.training.prefill.prefill_batches`' choice (one per queue row, fixed
    by ``cfg.seed``), without augmentation (``prepare``: uint8 -> normalised float, as for the k-NN
    monitor), embedded in eval mode without gradients (BatchNorm statistics untouched, modes
    restored). Stored as the step stores keys: raw (``--adapt-keys raw``) or L2-normalised
    (``normalized``, lightly's bank), with the image indices as sample ids when ``with_ids``.

    Args:
        encoder_k: the key encoder.
        criterion: the loss of :func:`selfsup.train.build_criterion` (its queue is filled).
        images_u8: ``(N, 3, S, S)`` uint8 training images.
        prepare: uint8 batch -> the encoder's input.
        cfg: the run's configuration (``seed``, ``knn_batch_size``, ``adapt_keys``, ``progress``, ``amp``).
        ctx: the process group; every rank embeds its share and the queue gathers them.
        device: the training device.
        with_ids: store sample ids (the training steps pass them too).

    Returns:
        ``True`` (for the run state: the prefill is done and must not run again on resume).
    """
    memory = criterion.queue if cfg.adapt_keys == "raw" else criterion.memory_bank
    rows = memory.queue.size if cfg.adapt_keys != "raw" else memory.size
    batches = prefill_batches(len(images_u8), rows, cfg.seed, cfg.knn_batch_size, ctx.rank, ctx.world_size)

    def loader() -> Iterator[Tuple[Tensor, None, Optional[Tensor]]]:
        for idx in batches:
            ids = torch.from_numpy(idx).to(device)  # (b,)
            yield prepare(images_u8[ids.to(images_u8.device)].to(device)), None, ids if with_ids else None

    def embed(m: nn.Module, x: Tensor) -> Tensor:
        with autocast(cfg.amp, device):  # as the training step
            k = m(x).float()  # (b, D)
        return k if cfg.adapt_keys == "raw" else F.normalize(k, dim=1)

    prefill(memory, encoder_k, loader(), rows=rows, device=device, embed=embed, progress=cfg.progress)
    return True
