"""MoCo training with an adaptive queue inside lightly's ``NTXentLoss``.

One step (MoCo v1/v2 with shuffle-BN emulated by split batch-norm)::

    x0, x1 = aug(batch), aug(batch)                  # two views, (B, 3, S, S)
    q = encoder_q(x0)                                # (B, 128) queries, with gradient
    update_momentum(encoder_q, encoder_k, m)         # lightly
    k = encoder_k(x1[shuffle])[unshuffle]            # (B, 128) keys, no gradient
    loss = criterion(q, k)                           # --adapt-keys normalized: lightly NTXentLoss whose
                                                     # memory_bank is our AdaptiveMemoryBank: it adapts the
                                                     # stored unit keys to k's statistics (XBN / AXBN),
                                                     # returns them as negatives, then enqueues k.
                                                     # --adapt-keys raw (selfsup.loss): adapt the stored raw
                                                     # keys, enqueue k, NT-Xent against the whole queue
    SGD step; cosine schedule step

Everything random is a pure function of ``(seed, epoch, step, rank)`` (sampling, augmentation, the
key shuffle), and a checkpoint holds the encoders, optimizer, scheduler, AMP scaler, the loss (with
the queue and its adaptation state), the position in the epoch and the RNG states, so a resumed run
continues bit-for-bit on CPU.
"""

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.augment import TensorMoCoAugment, normalize_uint8, pil_train_transform
from selfsup.config import COMPAT_DEFAULTS, COMPAT_KEYS, DEFAULT_KNN_FEATURES, SelfSupConfig
from selfsup.data import (
    EpochBatches,
    ImageData,
    TwoViewDataset,
    load_dataset,
    pil_batch_loader,
    stratified_subset,
)
from selfsup.knn import extract_features, knn_accuracy
from selfsup.model import MoCoEncoder, make_key_encoder, momentum_update, shuffle_batch
from selfsup.prefill import prefill_queue

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
PLOT_NAME = "history.png"
PROG = "xbn-selfsup"
#: Parent of the default run folders (``runs/selfsup/<dataset>-<adaptation>-<timestamp>``).
DEFAULT_RUNS = "runs/selfsup"
#: Keys every xbn-selfsup checkpoint has.
CHECKPOINT_KEYS = ("config", "epoch", "step_in_epoch", "global_step", "encoder_q", "encoder_k", "criterion",
                   "optimizer", "scheduler", "rng")


class NonFiniteError(RuntimeError):
    """A non-finite loss or embedding; the message names the step and the checkpoint that was kept."""


def build_criterion(cfg: SelfSupConfig, distributed: bool = False) -> torch.nn.Module:
    """The MoCo loss with the adaptive queue inside, by ``cfg.adapt_keys``.

    ``"normalized"``: lightly's ``NTXentLoss`` with its memory bank replaced by
    :class:`xbn_queue.lightly.AdaptiveMemoryBank` (the one-line change a lightly user makes, the
    ``criterion.memory_bank = ...`` line): L2-normalised keys are stored and adapted.
    ``"raw"``: :class:`selfsup.loss.RawKeyMoCoLoss`, the paper's setup (PML's MoCo example): raw keys
    are stored and adapted, the loss normalises, the current batch's keys are negatives too.

    In both modes and for every adaptation the queue starts empty, so that every arm of a
    comparison starts from the same memory.
    """
    kw: Dict[str, Any] = {"warmup_steps": cfg.memory_warmup_steps}
    if cfg.adaptation == "axbn":
        kw.update(
            kalman_p0=cfg.kalman_p0,
            kalman_q=cfg.kalman_q,
            kalman_r=cfg.kalman_r_value(),
            kalman_gain_every=cfg.kalman_gain_every,
        )
    if cfg.adapt_keys == "raw":
        from selfsup.loss import RawKeyMoCoLoss

        return RawKeyMoCoLoss(
            cfg.queue_size, cfg.embedding_dim, cfg.temperature, cfg.adaptation, gather_distributed=distributed,
            mask_same_ids=cfg.mask_same_ids, **kw
        )
    from lightly.loss import NTXentLoss

    from xbn_queue.lightly import AdaptiveMemoryBank, AdaptiveNTXentLoss

    loss_class = AdaptiveNTXentLoss if cfg.mask_same_ids else NTXentLoss  # (lightly's loss, taking sample ids)
    criterion = loss_class(temperature=cfg.temperature, memory_bank_size=(cfg.queue_size, cfg.embedding_dim))
    # init="empty" for every adaptation: the arms of a comparison start from the same (empty) memory,
    # as the raw mode does (lightly's own bank, and AdaptiveMemoryBank's default for "none", start
    # with random unit rows instead)
    criterion.memory_bank = AdaptiveMemoryBank(
        size=(cfg.queue_size, cfg.embedding_dim), adaptation=cfg.adaptation, gather_distributed=distributed,
        init="empty", mask_same_ids=cfg.mask_same_ids, **kw
    )
    return criterion


def criterion_queue(criterion: torch.nn.Module) -> Any:
    """The :class:`xbn_queue.AdaptiveQueue` inside a loss built by :func:`build_criterion`."""
    bank = getattr(criterion, "memory_bank", None)
    return bank.queue if bank is not None else criterion.queue


def _step_generator(seed: int, epoch: int, step: int, rank: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, step, rank, stream]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & ((1 << 63) - 1))


def default_output_dir(cfg: SelfSupConfig) -> SelfSupConfig:
    """``cfg`` with ``output_dir`` filled: the folder of ``--resume PATH``, else a new timestamped folder.

    Raises:
        UsageError: a bare ``--resume`` without ``--output-dir``.
    """
    from xbn_queue.training.cli import choose_output_dir

    if cfg.output_dir:
        return cfg
    return replace(cfg, output_dir=choose_output_dir(None, cfg.resume, DEFAULT_RUNS, cfg.dataset, cfg.adaptation))


def recipe_summary(cfg: SelfSupConfig, world_size: int = 1, steps_per_epoch: int = 0) -> str:
    """One line naming the recipe a resolved configuration trains with, the learning rate it sets included.

    Args:
        cfg: the run's configuration (``knn_features`` resolved).
        world_size: number of processes (``--scale-lr`` multiplies the learning rate by it).
        steps_per_epoch: optimizer steps per epoch, for the length of the cosine schedule (0: not shown).
    """
    lr = cfg.effective_lr(world_size)
    lr_text = f"lr {lr:g}" + (f" (--lr {cfg.lr:g} x {world_size} processes)" if lr != cfg.lr else "")
    span = f"{cfg.epochs * steps_per_epoch} steps" if steps_per_epoch else f"{cfg.epochs} epochs"
    keys = "raw keys (PML's MoCo example)" if cfg.adapt_keys == "raw" else "normalized keys (lightly)"
    return (f"recipe: MoCo (Appendix B) with {cfg.backbone} width {cfg.width}, {cfg.head} head to {cfg.embedding_dim}-d, "
            f"split-BN {cfg.split_bn}, key momentum {cfg.momentum:g}; SGD {lr_text}, momentum {cfg.sgd_momentum:g}, "
            f"weight decay {cfg.weight_decay:g}, cosine over {span}, batch {cfg.batch_size}; queue {cfg.queue_size} "
            f"of {keys}, starting empty, adaptation {cfg.adaptation}; k-NN monitor on {cfg.knn_features} features "
            f"(k={cfg.knn_k}, t={cfg.knn_t:g})")


def check_data(cfg: SelfSupConfig, data: ImageData, world_size: int = 1) -> None:
    """Refuse data on which training or the k-NN monitor cannot give a meaningful number.

    Raises:
        UsageError: fewer than two training classes, or a queue larger than the training set.
    """
    from xbn_queue.training.cli import UsageError

    where = f"--dataset {cfg.dataset} --data-root {cfg.data_root}"
    n_classes = len(np.unique(data.train_labels))
    if n_classes < 2:
        raise UsageError(f"{where}: the training split has {n_classes} class(es); the k-NN monitor needs at least 2")
    if cfg.queue_size > len(data.train_images):
        raise UsageError(f"--queue-size {cfg.queue_size}: larger than the {len(data.train_images)} training images "
                         f"(the queue would hold the same images several times); expected at most {len(data.train_images)}")
    if len(data.train_images) < cfg.batch_size * world_size:
        raise UsageError(f"--batch-size {cfg.batch_size}: larger than the {len(data.train_images)} training images "
                         f"(x {world_size} processes)")


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all().item())


class Trainer:
    """Holds the state of one MoCo run; :meth:`fit` trains, checkpoints and logs.

    Args:
        cfg: the run's configuration.
        data: an already loaded dataset (e.g. shared by ``compare``); loaded from ``cfg`` when ``None``.
    """

    def __init__(self, cfg: SelfSupConfig, data: Optional[ImageData] = None) -> None:
        from xbn_queue.training.cli import UsageError, check_memory_fits, check_output_dir
        from xbn_queue.training.distributed import init_distributed
        from xbn_queue.training.seeding import seed_everything

        cfg.validate()
        cfg = default_output_dir(cfg)
        # --knn-features unset: head for a new run; a resumed run takes its checkpoint's (load_checkpoint)
        self.knn_features_given = cfg.knn_features is not None
        cfg = replace(cfg, knn_features=cfg.knn_features or DEFAULT_KNN_FEATURES)
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        # checks: nothing is written before all of them (options, folder, data, checkpoint) have passed
        check_output_dir(self.out, resume=bool(cfg.resume), overwrite=cfg.overwrite)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.ctx = init_distributed(cfg.device)
        self.device = self.ctx.device
        check_memory_fits("--queue-size", cfg.queue_size, cfg.queue_size, cfg.embedding_dim, self.device)
        seed_everything(cfg.seed)
        if cfg.queue_size < cfg.batch_size * self.ctx.world_size:
            raise UsageError(
                f"--queue-size {cfg.queue_size}: expected at least one global batch "
                f"({cfg.batch_size} x {self.ctx.world_size} processes)"
            )
        self.data = data if data is not None else load_dataset(
            cfg.dataset,
            cfg.data_root,
            download=cfg.download,
            image_size=cfg.image_size,
            skip_bad_images=cfg.skip_bad_images,
            train_subset=cfg.train_subset,
            test_subset=cfg.test_subset,
        )
        check_data(cfg, self.data, self.ctx.world_size)
        self.on_gpu = self.device.type == "cuda"
        if self.on_gpu:
            torch.backends.cudnn.benchmark = True
        self.amp = cfg.amp and self.on_gpu
        self.amp_dtype = torch.bfloat16 if (self.on_gpu and torch.cuda.is_bf16_supported()) else torch.float16
        self.memory_format = torch.channels_last if (cfg.channels_last and self.on_gpu) else torch.contiguous_format

        # images as one uint8 tensor (N, 3, S, S); on the GPU when augmenting there
        train_u8 = torch.from_numpy(self.data.train_images).permute(0, 3, 1, 2).contiguous()
        self.train_u8 = train_u8.to(self.device) if (cfg.gpu_augment and self.on_gpu) else train_u8
        self.eval_train_u8 = self.train_u8
        self.test_u8 = torch.from_numpy(self.data.test_images).permute(0, 3, 1, 2).contiguous()
        bank_idx = stratified_subset(self.data.train_labels, cfg.knn_bank_subset)
        self.knn_bank_idx = torch.from_numpy(bank_idx)
        self.sampler = EpochBatches(len(self.train_u8), cfg.batch_size, cfg.seed, self.ctx.rank, self.ctx.world_size)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        # model, loss (with our bank inside), optimizer
        self.encoder_q = MoCoEncoder(cfg.backbone, cfg.head, cfg.embedding_dim, cfg.width, cfg.split_bn)
        self.encoder_q.to(self.device, memory_format=self.memory_format)
        self.encoder_k = make_key_encoder(self.encoder_q)
        self.criterion = build_criterion(cfg, distributed=self.ctx.is_distributed).to(self.device)
        self.model_q: torch.nn.Module = self.encoder_q
        if self.ctx.is_distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model_q = DDP(self.encoder_q, device_ids=[self.device.index] if self.on_gpu else None)
        self.optimizer = torch.optim.SGD(
            self.encoder_q.parameters(), lr=cfg.effective_lr(self.ctx.world_size), momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay
        )
        # cosine over the whole run (per step), as PML's example does per epoch
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(1, cfg.epochs * self.steps_per_epoch)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)

        self.tensor_aug = TensorMoCoAugment(size=cfg.image_size, scale=(cfg.crop_min_scale, 1.0))
        self.pil_dataset = TwoViewDataset(
            self.data.train_images, pil_train_transform(cfg.image_size, cfg.crop_min_scale), cfg.seed
        )
        # position: the next step to run is step `step_in_epoch` of epoch `epoch` (0-based)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.epoch_loss_sum = 0.0
        self.epoch_loss_count = 0
        self.last_knn: Optional[float] = None
        self.record_pending = False  # a signal stopped the run after a step, before its epoch record
        self.last_checkpoint: Optional[Path] = None
        self.prefilled = False  # --prefill: done once per run (kept in the checkpoint)
        self.same_id_sum, self.same_id_steps = 0.0, 0  # this epoch: fractions of same-sample negatives

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> Dict[str, Any]:
        from xbn_queue.training.config import config_to_dict
        from xbn_queue.training.rng import get_rng_state

        return {
            "config": config_to_dict(self.cfg),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_loss_count": self.epoch_loss_count,
            "last_knn": self.last_knn,
            "record_pending": self.record_pending,
            "prefilled": self.prefilled,
            "same_id_sum": self.same_id_sum,
            "same_id_steps": self.same_id_steps,
            "encoder_q": self.encoder_q.state_dict(),
            "encoder_k": self.encoder_k.state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": get_rng_state(),
            "world_size": self.ctx.world_size,
        }

    def save_checkpoint(self) -> Optional[Path]:
        """Atomically writes ``last.pt`` (rank 0 only)."""
        from xbn_queue.training.checkpoint import atomic_save

        if self.ctx.is_main:
            self.last_checkpoint = atomic_save(self.state_dict(), self.out / CHECKPOINT_NAME)
        self.ctx.barrier()
        return self.last_checkpoint

    def load_checkpoint(self, path: Path) -> None:
        """Restores everything from ``path``.

        Without an explicit ``--knn-features`` the run takes the checkpoint's (``backbone`` for a
        checkpoint written before the option existed), so ``knn_acc`` keeps its meaning across the resume.

        Raises:
            ValueError: when the checkpoint's configuration differs on a key of ``COMPAT_KEYS``.
        """
        from xbn_queue.training.checkpoint import check_compatible, load_checkpoint
        from xbn_queue.training.config import config_to_dict
        from xbn_queue.training.rng import set_rng_state

        ckpt = load_checkpoint(path, map_location="cpu", kind=PROG, required_keys=CHECKPOINT_KEYS)
        saved_cfg = {**COMPAT_DEFAULTS, **ckpt["config"]}  # keys a checkpoint from before the option lacks
        if not self.knn_features_given:
            self.cfg = replace(self.cfg, knn_features=saved_cfg["knn_features"])
        check_compatible(saved_cfg, config_to_dict(self.cfg), COMPAT_KEYS, source=path)
        if ckpt.get("world_size", 1) != self.ctx.world_size:
            log.warning(
                "checkpoint was written with %s processes, resuming with %s: the sampling order changes from here on",
                ckpt.get("world_size", 1),
                self.ctx.world_size,
            )
        try:
            self.encoder_q.load_state_dict(ckpt["encoder_q"])
            self.encoder_k.load_state_dict(ckpt["encoder_k"])
            self.criterion.load_state_dict(ckpt["criterion"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, KeyError, TypeError, ValueError) as err:
            from xbn_queue.training.checkpoint import CheckpointError
            from xbn_queue.training.cli import one_line

            raise CheckpointError(f"{path} is not a readable {PROG} checkpoint (the state does not load: "
                                  f"{one_line(err)[:160]})") from None
        set_rng_state(ckpt["rng"])
        self.epoch = int(ckpt["epoch"])
        self.step_in_epoch = int(ckpt["step_in_epoch"])
        self.global_step = int(ckpt["global_step"])
        self.epoch_loss_sum = float(ckpt["epoch_loss_sum"])
        self.epoch_loss_count = int(ckpt["epoch_loss_count"])
        self.last_knn = ckpt.get("last_knn")
        self.record_pending = bool(ckpt.get("record_pending", False))
        self.prefilled = bool(ckpt.get("prefilled", False))
        self.same_id_sum, self.same_id_steps = float(ckpt.get("same_id_sum", 0.0)), int(ckpt.get("same_id_steps", 0))
        self.last_checkpoint = Path(path)

    # ------------------------------------------------------------------------------------------
    # k-NN monitor

    def _prepare(self, u8: Tensor) -> Tensor:
        return normalize_uint8(u8).contiguous(memory_format=self.memory_format)

    @torch.no_grad()
    def knn_eval_all(self) -> Dict[str, float]:
        """Weighted k-NN accuracy (fraction in [0, 1]) of the query encoder's backbone and head features.

        The head features are the head applied to the same backbone features (one forward).

        Returns:
            ``{"backbone": acc, "head": acc}``.
        """
        enc = self.encoder_q
        was_training = enc.training
        enc.eval()
        rank, world = self.ctx.rank, self.ctx.world_size
        if world > 1:
            # DDP broadcasts rank 0's batch-norm statistics at the start of each forward, so after the
            # last training forward every rank has updated them with its own batch: evaluate rank 0's
            # model (the one checkpointed) on every rank.
            for buf in enc.buffers():
                torch.distributed.broadcast(buf, src=0)

        def both(x: Tensor) -> Tensor:
            f = enc.features(x)  # (b, F) backbone features
            h = enc.head(f)  # (b, embedding_dim) encoder output
            return torch.cat([F.normalize(f.float(), dim=1), F.normalize(h.float(), dim=1)], dim=1)  # (b, F + E)

        def features(images: Tensor, idx: Tensor) -> Tensor:
            mine = idx[rank::world]
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                f = extract_features(both, images, self.cfg.knn_batch_size, self.device, self._prepare, mine, normalize=False)
            if world > 1:  # gather every rank's share and restore the original order
                f = self.ctx.gather_features(f)
                order = self.ctx.gather_features(mine.to(self.device))
                f = f[torch.argsort(order)]
            return f

        dim_head = self.cfg.embedding_dim
        bank = features(self.eval_train_u8, self.knn_bank_idx)  # (N, F + E)
        bank_labels = torch.from_numpy(self.data.train_labels)[self.knn_bank_idx].to(self.device)
        queries = features(self.test_u8, torch.arange(len(self.test_u8)))  # (M, F + E)
        test_labels = torch.from_numpy(self.data.test_labels).to(self.device)
        out = {}
        for name, cols in (("backbone", slice(0, bank.shape[1] - dim_head)), ("head", slice(bank.shape[1] - dim_head, None))):
            out[name] = knn_accuracy(
                queries[:, cols].contiguous(),
                test_labels,
                bank[:, cols].contiguous(),
                bank_labels,
                self.data.num_classes,
                k=self.cfg.knn_k,
                t=self.cfg.knn_t,
            )
        enc.train(was_training)
        return out

    def knn_eval(self) -> float:
        """Weighted k-NN accuracy (fraction in [0, 1]) of the features chosen by ``--knn-features``."""
        return self.knn_eval_all()[self.cfg.knn_features]

    # ------------------------------------------------------------------------------------------
    # training

    def _views(self, epoch: int, step: int, idx: Tensor, batch: Optional[tuple]) -> tuple:
        """Two augmented views ``(B, 3, S, S)`` of the batch and the generator for the key shuffle."""
        g = _step_generator(self.cfg.seed, epoch, step, self.ctx.rank, 1)
        if batch is None:  # tensor pipeline on the training device
            u8 = self.train_u8[idx.to(self.train_u8.device)].to(self.device, non_blocking=True)
            x0 = self.tensor_aug(u8, g)
            x1 = self.tensor_aug(u8, g)
        else:
            _, x0, x1 = batch
            x0 = x0.to(self.device, non_blocking=True)
            x1 = x1.to(self.device, non_blocking=True)
        x0 = x0.contiguous(memory_format=self.memory_format)
        x1 = x1.contiguous(memory_format=self.memory_format)
        return x0, x1, g

    def train_step(self, x0: Tensor, x1: Tensor, g: torch.Generator, ids: Optional[Tensor] = None) -> Tensor:
        """One MoCo step; returns the (detached) loss. ``ids``: ``(B,)`` sample ids of the batch, stored with the keys.

        Raises:
            NonFiniteError: before the queue is touched when a query or key is not finite, or after
                the loss when it is not finite (no optimizer step is taken).
        """
        self.model_q.train()
        self.encoder_k.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            q = self.model_q(x0)  # (B, D) queries
        with torch.no_grad():
            momentum_update(self.encoder_q, self.encoder_k, self.cfg.momentum)
            x1s, unshuffle = shuffle_batch(x1, g)  # shuffle-BN: keys normalized with other groups
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                k = self.encoder_k(x1s)[unshuffle]  # (B, D) keys in the original order
        q, k = q.float(), k.float()
        if not (_finite(q) and _finite(k)):
            raise self._non_finite("embedding")
        # adapt the queue to k, negatives, enqueue k (order by --adapt-keys)
        loss = self.criterion(q, k) if ids is None else self.criterion(q, k, ids=ids)
        self._count_same_id_negatives(q.shape[0])
        if not _finite(loss):
            raise self._non_finite("loss")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def _count_same_id_negatives(self, batch: int) -> None:
        """Add this step's fraction of negatives that were older keys of the query's own sample (masked or not).

        Known where the loss reports it: ``--adapt-keys raw`` with ids (the count over ``B x (n - 1)``
        negatives, the positive left out), or ``--mask-same-ids`` in lightly's loss (the mask over the
        ``B x n`` bank rows). Steps whose loss leaves the queue out (warm-up) add nothing.
        """
        count = getattr(self.criterion, "same_id_negatives", None)
        if count is not None:
            n = len(criterion_queue(self.criterion))
            self.same_id_sum += float(count) / (batch * max(n - 1, 1))
            self.same_id_steps += 1
            return
        mask = getattr(getattr(self.criterion, "memory_bank", None), "negative_mask", None)
        if mask is not None and mask.numel() > 0:
            self.same_id_sum += float(mask.float().mean())
            self.same_id_steps += 1

    def _non_finite(self, what: str) -> NonFiniteError:
        ckpt = f"the last good checkpoint {self.last_checkpoint} is kept" if self.last_checkpoint else "no checkpoint had been written yet"
        return NonFiniteError(
            f"non-finite {what} at step {self.global_step + 1} (epoch {self.epoch + 1}, step {self.step_in_epoch + 1} of "
            f"{self.steps_per_epoch}); stopping: {ckpt} and the queue holds no NaN/Inf. Lower --lr or check the input data."
        )

    def _batches(self, epoch: int, start: int):
        rows = self.sampler.batches(epoch)[start:][: max(0, self.total_steps - self.global_step)]
        if self.cfg.gpu_augment:
            for row in rows:
                yield row, None
        else:
            loader = pil_batch_loader(self.pil_dataset, rows, epoch, self.cfg.workers, pin_memory=self.on_gpu)
            for row, batch in zip(rows, loader):
                yield row, batch

    def fit(self) -> Dict[str, Any]:
        """Trains until ``epochs`` (or ``max_steps``), resuming first if asked.

        Returns:
            A summary: ``knn_acc`` (last k-NN accuracy), ``loss`` (last epoch mean), ``global_step``,
            ``stopped`` (True when a signal stopped the run), ``signal`` (its number), ``output_dir``,
            and ``already_complete`` when ``--resume`` found a finished run (nothing is trained or written).
        """
        from xbn_queue.training.checkpoint import resolve_resume
        from xbn_queue.training.config import config_to_dict, save_config
        from xbn_queue.training.progress import progress
        from xbn_queue.training.signals import GracefulExit
        from xbn_queue.training.tracking import RunLogger, plot_history

        from xbn_queue.training.cli import prepare_output_dir

        cfg = self.cfg
        resume_path = resolve_resume(cfg.resume, self.out) if cfg.resume else None
        if resume_path is not None:
            self.load_checkpoint(resume_path)
            if self.global_step >= self.total_steps and not self.record_pending:
                if self.ctx.is_main:
                    print(f"[{PROG}] {self.out} is already complete (epoch {self.epoch} of {cfg.epochs}, step "
                          f"{self.global_step}): nothing to train", file=sys.stderr, flush=True)
                return {"knn_acc": self.last_knn, "loss": float("nan"), "global_step": self.global_step,
                        "stopped": False, "signal": None, "output_dir": str(self.out), "already_complete": True}
        elif cfg.resume and self.ctx.is_main:
            print(f"[{PROG}] --resume: no checkpoint in {self.out}, starting a new run", file=sys.stderr)
        cfg = self.cfg  # resolved by the checkpoint (--knn-features)
        # sample ids go with the keys (raw keys: to count same-sample negatives; --mask-same-ids: to mask them),
        # unless the run resumes a queue whose keys were stored without ids
        queue = criterion_queue(self.criterion)
        self.pass_ids = cfg.mask_same_ids or (cfg.adapt_keys == "raw" and (len(queue) == 0 or queue.ids is not None))
        # every check passed: from here on the run folder is written
        self.ctx.barrier()  # every rank has checked the folder before rank 0 creates anything in it
        if self.ctx.is_main:
            prepare_output_dir(self.out, overwrite=cfg.overwrite and resume_path is None)
            save_config(cfg, self.out / "config.yaml")
            print(f"[{PROG}] run folder: {self.out}", file=sys.stderr, flush=True)
            print(f"[{PROG}] {recipe_summary(cfg, self.ctx.world_size, self.steps_per_epoch)}", file=sys.stderr,
                  flush=True)
            if resume_path is not None:
                print(f"[{PROG}] resumed from {resume_path} at epoch {self.epoch + 1}, step {self.global_step}",
                      file=sys.stderr, flush=True)
        self.ctx.barrier()
        logger = RunLogger(
            self.out,
            config_to_dict(cfg),
            project=cfg.wandb_project or "xbn-selfsup",
            mode=cfg.wandb_mode,
            enabled=self.ctx.is_main,
            name=cfg.wandb_name or self.out.name,
            resume_step=self.global_step if resume_path is not None else None,
        )
        bad_images = len(self.data.bad_images)
        stopped = False
        signum: Optional[int] = None
        last_epoch_loss = float("nan")
        try:
            with GracefulExit(enabled=True, verbose=self.ctx.is_main) as stop:
                while self.epoch < cfg.epochs and (self.global_step < self.total_steps or self.record_pending):
                    epoch = self.epoch
                    t0 = time.perf_counter()
                    steps_run = 0
                    bar = progress(
                        self._batches(epoch, self.step_in_epoch),
                        total=self.steps_per_epoch - self.step_in_epoch,
                        desc=f"epoch {epoch + 1}/{cfg.epochs}",
                        enabled=cfg.progress,
                        leave=False,
                    )
                    for idx, batch in bar:
                        if cfg.prefill and not self.prefilled and queue.num_steps == cfg.memory_warmup_steps:
                            self.prefilled = prefill_queue(self.encoder_k, self.criterion, self.eval_train_u8,
                                                           self._prepare, cfg, self.ctx, self.device, self.pass_ids)
                        x0, x1, g = self._views(epoch, self.step_in_epoch, idx, batch)
                        ids = torch.as_tensor(idx, dtype=torch.long).to(self.device) if self.pass_ids else None
                        loss = self.train_step(x0, x1, g, ids)
                        self.global_step += 1
                        self.step_in_epoch += 1
                        steps_run += 1
                        loss_value = loss.item()
                        self.epoch_loss_sum += loss_value
                        self.epoch_loss_count += 1
                        if cfg.log_every > 0 and self.global_step % cfg.log_every == 0:
                            mean_loss = self.ctx.all_reduce_mean(loss_value)
                            logger.log(
                                {
                                    "epoch": epoch + self.step_in_epoch / self.steps_per_epoch,
                                    "loss": mean_loss,
                                    "step_loss": mean_loss,  # only on step records (for the plot)
                                    "lr": self.optimizer.param_groups[0]["lr"],
                                },
                                step=self.global_step,
                            )
                            if hasattr(bar, "set_postfix"):
                                bar.set_postfix(loss=f"{mean_loss:.4f}")
                        end_of_epoch = self.step_in_epoch == self.steps_per_epoch
                        done = self.global_step >= self.total_steps
                        if self._stop_requested(stop):
                            stopped = True
                            signum = stop.signum or 15  # another rank's signal: SIGTERM (torchrun forwards it)
                            break
                        if done or end_of_epoch:
                            break
                        if cfg.checkpoint_every > 0 and self.global_step % cfg.checkpoint_every == 0:
                            self.save_checkpoint()
                    if hasattr(bar, "close"):
                        bar.close()
                    if stopped:
                        self.record_pending = self.step_in_epoch == self.steps_per_epoch or self.global_step >= self.total_steps
                        self.save_checkpoint()
                        break
                    self.record_pending = False
                    epoch_time = time.perf_counter() - t0
                    end_of_epoch = self.step_in_epoch == self.steps_per_epoch
                    done = self.global_step >= self.total_steps
                    knn_now = done or self.epoch + 1 == cfg.epochs or (
                        end_of_epoch and cfg.knn_every > 0 and (epoch + 1) % cfg.knn_every == 0
                    )
                    record: Dict[str, Any] = {
                        "epoch": epoch + self.step_in_epoch / self.steps_per_epoch,
                        "loss": self.ctx.all_reduce_mean(self.epoch_loss_sum / max(1, self.epoch_loss_count)),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "epoch_time_s": epoch_time,
                        "images_per_s": steps_run * cfg.batch_size * self.ctx.world_size / max(epoch_time, 1e-9),
                        "queue_fill": len(criterion_queue(self.criterion)),
                    }
                    record["epoch_loss"] = record["loss"]  # mean over the epoch (only on epoch records)
                    if self.same_id_steps:
                        record["same_id_negatives_frac"] = self.ctx.all_reduce_mean(self.same_id_sum / self.same_id_steps)
                    if cfg.skip_bad_images:
                        record["bad_images"] = bad_images
                    if knn_now:
                        accs = self.knn_eval_all()
                        self.last_knn = accs[cfg.knn_features]
                        record["knn_acc"] = self.last_knn
                        record["knn_acc_backbone"], record["knn_acc_head"] = accs["backbone"], accs["head"]
                    last_epoch_loss = record["loss"]
                    if end_of_epoch:
                        self.epoch += 1
                        self.step_in_epoch = 0
                        self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
                        self.same_id_sum, self.same_id_steps = 0.0, 0
                    logger.log(record, step=self.global_step)
                    if self.ctx.is_main:
                        msg = f"epoch {record['epoch']:.2f} step {self.global_step}: loss {record['loss']:.4f}"
                        if "knn_acc" in record:
                            msg += f", k-NN {100 * record['knn_acc']:.2f}%"
                        print(msg, file=sys.stderr, flush=True)
                    self.save_checkpoint()
                    if done:
                        break
        finally:
            logger.finish()
        if self.ctx.is_main and (self.out / "metrics.jsonl").is_file():
            plot_history(
                self.out / "metrics.jsonl",
                self.out / PLOT_NAME,
                panels=[("knn_acc",), ("step_loss", "epoch_loss")],
                x="epoch",
                title=f"MoCo {cfg.dataset}, adaptation={cfg.adaptation}",
                percent=("knn_acc",),
            )
        if self.ctx.is_main:
            state = "stopped by a signal" if stopped else "finished"
            print(f"[{PROG}] {state} at step {self.global_step}; run folder: {self.out}", file=sys.stderr, flush=True)
        return {
            "knn_acc": self.last_knn,
            "loss": last_epoch_loss,
            "global_step": self.global_step,
            "stopped": stopped,
            "signal": signum,
            "output_dir": str(self.out),
        }

    def _stop_requested(self, stop) -> bool:
        flag = stop.requested
        if self.ctx.is_distributed:  # every rank must stop at the same step
            t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.ctx.backend == "nccl" else "cpu")
            torch.distributed.all_reduce(t)
            flag = bool(t.item() > 0)
        return flag

    def close(self) -> None:
        self.ctx.cleanup()


def train(cfg: SelfSupConfig, data: Optional[ImageData] = None) -> Dict[str, Any]:
    """Builds a :class:`Trainer`, runs it, and releases the process group."""
    trainer = Trainer(cfg, data)
    try:
        return trainer.fit()
    finally:
        trainer.close()
