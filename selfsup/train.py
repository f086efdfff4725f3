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

import dataclasses
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

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
from selfsup.knn import knn_accuracy
from selfsup.model import MoCoEncoder, make_key_encoder, momentum_update, shuffle_batch
from selfsup.probe import linear_probe_accuracy
from xbn_queue.adaptation import AXBN
from xbn_queue.training.checkpoint import check_compatible
from xbn_queue.training.cli import UsageError, check_output_dir, check_two_classes, one_line
from xbn_queue.training.config import config_to_dict
from xbn_queue.training.embed import embed_sharded
from xbn_queue.training.loop import (Callback, NonFiniteError, RunLoop, RunState, RunSummary, broadcast_buffers,
                                     with_output_dir, wrap_ddp)
from xbn_queue.training.precision import autocast
from xbn_queue.training.prefill import prefill_memory
from xbn_queue.training.seeding import seed_everything
from xbn_queue.training.tracking import WandbReport, kalman_gain_record, plot_history

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
PLOT_NAME = "history.png"
PROG = "xbn-selfsup"
#: Parent of the default run folders (``runs/selfsup/<dataset>-<adaptation>-<timestamp>``).
DEFAULT_RUNS = "runs/selfsup"
#: Keys every xbn-selfsup checkpoint has.
CHECKPOINT_KEYS = ("config", "encoder_q", "encoder_k", "criterion", "optimizer", "scheduler", "rng")

__all__ = ["Trainer", "SelfSupState", "train", "NonFiniteError", "build_criterion", "criterion_queue", "check_data",
           "recipe_summary", "default_output_dir"]


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
    memory = cfg.memory_options()
    rows = cfg.queue_size  # a row count, checked by check_data (MemoryOptions.rows)
    if cfg.adapt_keys == "raw":
        from selfsup.loss import RawKeyMoCoLoss

        return RawKeyMoCoLoss(rows, cfg.embedding_dim, cfg.temperature, gather_distributed=distributed,
                              mask_same_ids=memory.mask_same_ids, **memory.queue_kwargs())
    from lightly.loss import NTXentLoss

    from xbn_queue.lightly import AdaptiveMemoryBank, AdaptiveNTXentLoss

    loss_class = AdaptiveNTXentLoss if memory.mask_same_ids else NTXentLoss  # (lightly's loss, taking sample ids)
    criterion = loss_class(temperature=cfg.temperature)  # no bank of its own: the adaptive bank goes in below
    # init="empty" for every adaptation: the arms of a comparison start from the same (empty) memory,
    # as the raw mode does (lightly's own bank, and AdaptiveMemoryBank's default for "none", start
    # with random unit rows instead)
    criterion.memory_bank = AdaptiveMemoryBank(size=(rows, cfg.embedding_dim), gather_distributed=distributed,
                                               init="empty", mask_same_ids=memory.mask_same_ids,
                                               **memory.queue_kwargs())
    return criterion


def criterion_memory(criterion: torch.nn.Module) -> Any:
    """The module holding the queue inside a loss built by :func:`build_criterion` (its bank, or the loss itself),
    with ``deferred_enqueue()``."""
    bank = getattr(criterion, "memory_bank", None)
    return bank if bank is not None else criterion


def criterion_queue(criterion: torch.nn.Module) -> Any:
    """The :class:`xbn_queue.AdaptiveQueue` inside a loss built by :func:`build_criterion`."""
    bank = getattr(criterion, "memory_bank", None)
    return bank.queue if bank is not None else criterion.queue


def _prefill_reader(images_u8: Tensor, prepare: Callable[[Tensor], Tensor], device: torch.device, with_ids: bool):
    """``--prefill``'s reader (:func:`xbn_queue.training.prefill.prefill_memory`): batches of training-set indices ->
    ``(x, None, ids)``, the unaugmented images ``prepare``d as for the k-NN monitor, their indices as sample ids
    when the training steps pass ids."""
    def read(batches: List[np.ndarray]) -> Iterator[Tuple[Tensor, None, Optional[Tensor]]]:
        for idx in batches:
            ids = torch.from_numpy(idx).to(device)  # (b,)
            yield prepare(images_u8[ids.to(images_u8.device)].to(device)), None, ids if with_ids else None
    return read


def _step_generator(seed: int, epoch: int, step: int, rank: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, step, rank, stream]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & ((1 << 63) - 1))


def default_output_dir(cfg: SelfSupConfig) -> SelfSupConfig:
    """``cfg`` with ``output_dir`` filled: the folder of ``--resume PATH``, else a new timestamped folder.

    Raises:
        UsageError: a bare ``--resume`` without ``--output-dir``.
    """
    return with_output_dir(cfg, DEFAULT_RUNS, cfg.dataset, cfg.adaptation)


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


def check_data(cfg: SelfSupConfig, data: ImageData, world_size: int = 1, device: Optional[torch.device] = None) -> int:
    """Refuse data on which training or the k-NN monitor cannot give a meaningful number, and check the queue's
    rows (:meth:`xbn_queue.training.memory.MemoryOptions.rows`, the one place they are checked).

    Args:
        device: where the queue will live (``None``: its capacity is not checked, as for a comparison's plan).

    Returns:
        The queue's rows (``--queue-size``).

    Raises:
        UsageError: fewer than two training classes, a queue larger than the training set, a batch larger
            than it, a queue smaller than one global batch or one the device cannot hold.
    """
    where = f"--dataset {cfg.dataset} --data-root {cfg.data_root}"
    check_two_classes(data.train_labels, where, "the k-NN monitor needs at least 2")
    rows = cfg.memory_options().rows(len(data.train_images), cfg.embedding_dim, cfg.batch_size, world_size, device)
    if cfg.queue_size > len(data.train_images):
        raise UsageError(f"--queue-size {cfg.queue_size}: larger than the {len(data.train_images)} training images "
                         f"(the queue would hold the same images several times); expected at most {len(data.train_images)}")
    if len(data.train_images) < cfg.batch_size * world_size:
        raise UsageError(f"--batch-size {cfg.batch_size}: larger than the {len(data.train_images)} training images "
                         f"(x {world_size} processes)")
    return rows


@dataclasses.dataclass
class SelfSupState(RunState):
    """The MoCo run's position, the open epoch's loss sums, the last k-NN accuracy and epoch loss.

    Saved in the checkpoint's ``state`` entry (:meth:`to_dict`); :meth:`from_dict` also reads the flat
    layout of 0.4 and before (the whole checkpoint).
    """

    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    last_knn: Optional[float] = None
    last_probe: Optional[float] = None  # --linear-probe: the last evaluation's probe accuracy
    last_loss: float = float("nan")  # the last epoch record's mean loss
    prefilled: bool = False  # --prefill: done once per run
    same_id_sum: float = 0.0  # this epoch: the steps' fractions of same-sample negatives, and their count
    same_id_steps: int = 0

    epoch_sums = ("epoch_loss_sum", "epoch_loss_count", "same_id_sum", "same_id_steps")

    def values(self) -> Dict[str, Any]:
        probe = {} if self.last_probe is None else {"probe_acc": self.last_probe}
        return {"knn_acc": self.last_knn, "loss": self.last_loss, **probe}


class SelfSupReport(Callback):
    """The MoCo run's side work: a step record every ``--log-every`` steps, one line per epoch, the plot."""

    def on_step_end(self, loop: "Trainer") -> None:
        st, every = loop.state, loop.cfg.log_every
        if every > 0 and st.global_step % every == 0:
            mean_loss = loop.ctx.all_reduce_mean(loop.step_loss)  # every rank
            loop.log({"epoch": st.epoch + st.step_in_epoch / loop.steps_per_epoch, "loss": mean_loss,
                      "step_loss": mean_loss,  # only on step records (for the plot)
                      "lr": loop.optimizer.param_groups[0]["lr"]})

    def on_epoch_end(self, loop: "Trainer", record: Dict[str, Any]) -> None:
        if loop.ctx.is_main and record:
            knn = f", k-NN {100 * record['knn_acc']:.2f}%" if "knn_acc" in record else ""
            knn += f", probe {100 * record['probe_acc']:.2f}%" if "probe_acc" in record else ""
            print(f"epoch {record['epoch']:.2f} step {loop.state.global_step}: loss {record['loss']:.4f}{knn}",
                  file=sys.stderr, flush=True)

    def on_run_end(self, loop: "Trainer", summary: RunSummary) -> None:
        if loop.ctx.is_main and (loop.out / "metrics.jsonl").is_file():
            try:
                plot_history(loop.out / "metrics.jsonl", loop.out / PLOT_NAME, panels=[("knn_acc", "probe_acc"), ("step_loss", "epoch_loss")],
                             x="epoch", title=f"MoCo {loop.cfg.dataset}, adaptation={loop.cfg.adaptation}",
                             percent=("knn_acc", "probe_acc"))
            except Exception as err:  # plotting must never kill a run
                loop.say(f"warning: could not plot: {one_line(err)}")


class Trainer(RunLoop):
    """One MoCo run on the shared loop; checks and builds on construction, :meth:`fit` trains.

    Args:
        cfg: the run's configuration.
        data: an already loaded dataset (e.g. shared by ``compare``); loaded from ``cfg`` when ``None``.
        callbacks: hooks into the run (:class:`xbn_queue.training.loop.Callback`).
    """

    prog = PROG
    checkpoint_keys = CHECKPOINT_KEYS
    wandb_report = WandbReport("adaptation", ("knn_acc",), model_file=CHECKPOINT_NAME, model_at="last")
    state_class = SelfSupState
    state: SelfSupState

    def __init__(self, cfg: SelfSupConfig, data: Optional[ImageData] = None, callbacks: Iterable[Callback] = ()) -> None:
        cfg.validate()
        cfg = default_output_dir(cfg)
        # --knn-features unset: head for a new run; a resumed run takes its checkpoint's (load_state)
        self.knn_features_given = cfg.knn_features is not None
        if cfg.kalman_q is None:  # the AXBN noise model's own default, written into config.yaml
            cfg = replace(cfg, kalman_q=AXBN.default_q(cfg.kalman_r_value()))
        if cfg.max_steps == 0:  # "no limit" as written before 0.5 (config.yaml, --max-steps 0): None from here on
            cfg = replace(cfg, max_steps=None)
        self._pass_ids: Optional[bool] = None  # decided at the first step, after any resume
        self.data = data
        super().__init__(replace(cfg, knn_features=cfg.knn_features or DEFAULT_KNN_FEATURES), callbacks,
                         side_work=[SelfSupReport()])

    # ------------------------------------------------------------------------- check and build
    def check(self) -> None:
        """Options, run folder, queue size, data; nothing is written."""
        cfg, world = self.cfg, self.ctx.world_size
        check_output_dir(self.out, resume=bool(cfg.resume), overwrite=cfg.overwrite)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        if self.data is None:
            self.data = load_dataset(cfg.dataset, cfg.data_root, download=cfg.download, image_size=cfg.image_size,
                                     skip_bad_images=cfg.skip_bad_images, train_subset=cfg.train_subset,
                                     test_subset=cfg.test_subset)
        check_data(cfg, self.data, world, self.device)  # the queue's rows too

    def build(self) -> None:
        """Images as uint8 tensors, sampler, encoders, loss (the queue inside), optimiser, schedule, views."""
        cfg, device = self.cfg, self.device
        self.on_gpu = device.type == "cuda"
        if self.on_gpu:
            torch.backends.cudnn.benchmark = True
        self.memory_format = torch.channels_last if (cfg.channels_last and self.on_gpu) else torch.contiguous_format
        # images as one uint8 tensor (N, 3, S, S); on the GPU when augmenting there
        train_u8 = torch.from_numpy(self.data.train_images).permute(0, 3, 1, 2).contiguous()
        self.train_u8 = train_u8.to(device) if (cfg.gpu_augment and self.on_gpu) else train_u8
        self.eval_train_u8 = self.train_u8
        self.test_u8 = torch.from_numpy(self.data.test_images).permute(0, 3, 1, 2).contiguous()
        self.knn_bank_idx = torch.from_numpy(stratified_subset(self.data.train_labels, cfg.knn_bank_subset))
        self.sampler = EpochBatches(len(self.train_u8), cfg.batch_size, cfg.seed, self.ctx.rank, self.ctx.world_size)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_epochs = cfg.epochs
        self.eval_every = cfg.knn_every
        self.build_model()
        self.recipe = recipe_summary(cfg, self.ctx.world_size, self.steps_per_epoch)
        self.tensor_aug = TensorMoCoAugment(size=cfg.image_size, scale=(cfg.crop_min_scale, 1.0))
        self.pil_dataset = TwoViewDataset(self.data.train_images, pil_train_transform(cfg.image_size, cfg.crop_min_scale),
                                          cfg.seed)

    def build_model(self) -> None:
        """Query and key encoders, the loss with the queue, SGD with a per-step cosine schedule, AMP scaler."""
        cfg, device = self.cfg, self.device
        self.encoder_q = MoCoEncoder(cfg.backbone, cfg.head, cfg.embedding_dim, cfg.width, cfg.split_bn)
        self.encoder_q.to(device, memory_format=self.memory_format)
        self.encoder_k = make_key_encoder(self.encoder_q)
        self.criterion = build_criterion(cfg, distributed=self.ctx.is_distributed).to(device)
        self.model_q = wrap_ddp(self.encoder_q, self.ctx)
        self.optimizer = torch.optim.SGD(self.encoder_q.parameters(), lr=cfg.effective_lr(self.ctx.world_size),
                                         momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
        # cosine over the whole run (per step), as PML's example does per epoch
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                    T_max=max(1, cfg.epochs * self.steps_per_epoch))

    # ---------------------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> Dict[str, Any]:
        """The shared layout (:meth:`RunLoop.checkpoint_state`) with the encoders, the loss (the queue), SGD, schedule."""
        return {**super().checkpoint_state(), "encoder_q": self.encoder_q.state_dict(),
                "encoder_k": self.encoder_k.state_dict(), "criterion": self.criterion.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state(self, ckpt: Dict[str, Any], path: Path) -> None:
        """Refuses another configuration (without ``--knn-features`` the run takes the checkpoint's), then restores.

        A checkpoint written before ``--knn-features`` existed counts as ``backbone``, so ``knn_acc`` keeps its
        meaning across the resume.

        Raises:
            IncompatibleCheckpointError: the checkpoint's configuration differs on a key of ``COMPAT_KEYS``.
        """
        saved_cfg = {**COMPAT_DEFAULTS, **ckpt["config"]}  # keys a checkpoint from before the option lacks
        if not self.knn_features_given:
            self.cfg = replace(self.cfg, knn_features=saved_cfg["knn_features"])
        check_compatible(saved_cfg, config_to_dict(self.cfg), COMPAT_KEYS, source=path)
        saved_world = ckpt.get("meta", ckpt).get("world_size", 1)  # flat before 0.5
        if saved_world != self.ctx.world_size:
            log.warning("checkpoint was written with %s processes, resuming with %s: the sampling order changes "
                        "from here on", saved_world, self.ctx.world_size)
        self.encoder_q.load_state_dict(ckpt["encoder_q"])
        self.encoder_k.load_state_dict(ckpt["encoder_k"])
        self.criterion.load_state_dict(ckpt["criterion"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        super().load_state(ckpt, path)

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
        broadcast_buffers(enc, self.ctx)  # evaluate rank 0's model (the one checkpointed) on every rank

        def both(x: Tensor) -> Tensor:
            f = enc.features(x)  # (b, F) backbone features
            h = enc.head(f)  # (b, embedding_dim) encoder output
            return torch.cat([F.normalize(f.float(), dim=1), F.normalize(h.float(), dim=1)], dim=1)  # (b, F + E)

        def features(images: Tensor, idx: Tensor) -> Tensor:  # (n, F + E), this rank's share embedded, all gathered
            mine = idx[self.ctx.rank::self.ctx.world_size]
            batches = ((self._prepare(images[ids.to(images.device)].to(self.device, non_blocking=True)), ids)
                       for ids in mine.split(self.cfg.knn_batch_size))
            return embed_sharded(enc, batches, encode=both, dim=enc.backbone.num_features + self.cfg.embedding_dim,
                                 ctx=self.ctx, device=self.device, amp=self.amp)[0]

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
            if self.cfg.linear_probe:  # the same features: a linear classifier on the bank's, top-1 on the test set's
                out[f"probe_{name}"] = linear_probe_accuracy(
                    bank[:, cols], bank_labels, queries[:, cols], test_labels, self.data.num_classes,
                    epochs=self.cfg.probe_epochs, seed=self.cfg.seed)
        return out

    def knn_eval(self) -> float:
        """Weighted k-NN accuracy (fraction in [0, 1]) of the features chosen by ``--knn-features``."""
        return self.knn_eval_all()[self.cfg.knn_features]

    # ------------------------------------------------------------------------------------------
    # training

    def views(self, epoch: int, step: int, idx: Tensor, batch: Optional[tuple]) -> tuple:
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

    def moco_step(self, x0: Tensor, x1: Tensor, g: torch.Generator, ids: Optional[Tensor] = None) -> Tensor:
        """One MoCo step; returns the (detached) loss. ``ids``: ``(B,)`` sample ids of the batch, stored with the keys.

        Raises:
            NonFiniteError: on every rank, before the queue is touched when a query or key is not finite
                on any rank, or when the loss is not finite, before the keys are enqueued and before the
                optimizer step.
        """
        self.model_q.train()
        self.encoder_k.train()
        with autocast(self.amp, self.device):
            q = self.model_q(x0)  # (B, D) queries
        with torch.no_grad():
            momentum_update(self.encoder_q, self.encoder_k, self.cfg.momentum)
            x1s, unshuffle = shuffle_batch(x1, g)  # shuffle-BN: keys normalized with other groups
            with autocast(self.amp, self.device):
                k = self.encoder_k(x1s)[unshuffle]  # (B, D) keys in the original order
        q, k = q.float(), k.float()
        self.check_finite("embedding", q, k)  # every rank, before the queue is adapted
        with criterion_memory(self.criterion).deferred_enqueue():  # k is written at the block's end
            # adapt the queue to k, the loss against it (with k where --adapt-keys puts it)
            loss = self.criterion(q, k) if ids is None else self.criterion(q, k, ids=ids)
            self.check_finite("loss", loss)  # raises: k never reaches the queue
        self.count_same_id_negatives(q.shape[0])
        self.backward_step(loss)  # one loss scaler (xbn_queue.training.precision)
        self.scheduler.step()
        return loss.detach()

    def count_same_id_negatives(self, batch: int) -> None:
        """Add this step's fraction of negatives that were older keys of the query's own sample (masked or not).

        Known where the loss reports it: ``--adapt-keys raw`` with ids (the count over ``B x (n - 1)``
        negatives, the positive left out), or ``--mask-same-ids`` in lightly's loss (the mask over the
        ``B x n`` bank rows). Steps whose loss leaves the queue out (warm-up) add nothing.
        """
        st = self.state
        count = getattr(self.criterion, "same_id_negatives", None)
        if count is not None:
            n = len(criterion_queue(self.criterion))
            st.same_id_sum += float(count) / (batch * max(n - 1, 1))
            st.same_id_steps += 1
            return
        mask = getattr(getattr(self.criterion, "memory_bank", None), "negative_mask", None)
        if mask is not None and mask.numel() > 0:
            st.same_id_sum += float(mask.float().mean())
            st.same_id_steps += 1

    def batches(self) -> Iterator[Tuple[Tensor, Optional[tuple]]]:
        """``(sample indices, None)`` per step on the tensor pipeline, ``(indices, PIL views)`` otherwise."""
        epoch, start = self.state.epoch, self.state.step_in_epoch
        rows = self.sampler.batches(epoch)[start:]  # the loop stops at max_steps
        if self.cfg.gpu_augment:
            for row in rows:
                yield row, None
        else:
            loader = pil_batch_loader(self.pil_dataset, rows, epoch, self.cfg.workers, pin_memory=self.on_gpu)
            for row, batch in zip(rows, loader):
                yield row, batch

    def train_step(self, batch: Tuple[Tensor, Optional[tuple]]) -> float:
        """Prefill when due, two views of the batch, one MoCo step, the epoch's loss sums; returns the loss."""
        self.fill_memory_if_due()  # --prefill: once, right before the first step whose loss uses the queue
        idx, pil_views = batch
        x0, x1, g = self.views(self.state.epoch, self.state.step_in_epoch, idx, pil_views)
        ids = torch.as_tensor(idx, dtype=torch.long).to(self.device) if self.pass_ids() else None
        loss = self.moco_step(x0, x1, g, ids).item()
        self.state.epoch_loss_sum += loss
        self.state.epoch_loss_count += 1
        return loss

    def pass_ids(self) -> bool:
        """Sample ids go with the keys (raw keys: to count same-sample negatives; ``--mask-same-ids``: to mask
        them), unless the run resumed a queue whose keys were stored without ids."""
        if self._pass_ids is None:
            queue = criterion_queue(self.criterion)
            self._pass_ids = self.cfg.mask_same_ids or (
                self.cfg.adapt_keys == "raw" and (len(queue) == 0 or queue.ids is not None))
        return self._pass_ids

    def fill_memory_if_due(self) -> None:
        """``--prefill``: fill the queue right before the first step whose loss uses it (after
        ``--memory-warmup-steps``), once per run (recorded in the checkpoint)."""
        cfg, st = self.cfg, self.state
        if cfg.prefill and not st.prefilled and criterion_queue(self.criterion).num_steps == cfg.memory_warmup_steps:
            memory = criterion_queue(self.criterion) if cfg.adapt_keys == "raw" else self.criterion.memory_bank
            read = _prefill_reader(self.eval_train_u8, self._prepare, self.device, with_ids=self.pass_ids())
            st.prefilled = prefill_memory(memory, self.encoder_k, read,
                                          num_train=len(self.eval_train_u8), seed=cfg.seed, batch_size=cfg.knn_batch_size,
                                          ctx=self.ctx, device=self.device, amp=self.amp,
                                          normalize=cfg.adapt_keys != "raw", progress=cfg.progress)

    def end_epoch(self, evaluate: bool) -> Dict[str, Any]:
        """The epoch's record (every rank): mean loss, speed, queue fill; the k-NN accuracy when ``evaluate``."""
        st, cfg = self.state, self.cfg
        epoch_time = time.perf_counter() - self.epoch_started
        record: Dict[str, Any] = {
            "epoch": st.epoch + st.step_in_epoch / self.steps_per_epoch,
            "loss": self.ctx.all_reduce_mean(st.epoch_loss_sum / max(1, st.epoch_loss_count)),
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_time,
            "images_per_s": self.steps_this_epoch * cfg.batch_size * self.ctx.world_size / max(epoch_time, 1e-9),
            "queue_fill": len(criterion_queue(self.criterion)),
        }
        record["epoch_loss"] = record["loss"]  # mean over the epoch (only on epoch records)
        if st.same_id_steps:
            record["same_id_negatives_frac"] = self.ctx.all_reduce_mean(st.same_id_sum / st.same_id_steps)
        if cfg.skip_bad_images:
            record["bad_images"] = len(self.data.bad_images)
        if evaluate:
            accs = self.knn_eval_all()
            st.last_knn = record["knn_acc"] = accs[cfg.knn_features]
            record["knn_acc_backbone"], record["knn_acc_head"] = accs["backbone"], accs["head"]
            if cfg.linear_probe:
                st.last_probe = record["probe_acc"] = accs[f"probe_{cfg.knn_features}"]
                record["probe_acc_backbone"], record["probe_acc_head"] = accs["probe_backbone"], accs["probe_head"]
        record.update(kalman_gain_record(criterion_queue(self.criterion).adaptation))  # AXBN only
        st.last_loss = record["loss"]
        return record


def train(cfg: SelfSupConfig, data: Optional[ImageData] = None, callbacks: Iterable[Callback] = ()) -> Dict[str, Any]:
    """Builds a :class:`Trainer`, runs it, and releases the process group.

    Returns:
        :class:`xbn_queue.training.loop.RunSummary` as a dictionary: ``output_dir``, ``global_step``,
        ``stopped`` (``None`` | ``"signal"`` | ``"max_steps"``), ``signal``, ``seconds``,
        ``already_complete``, ``knn_acc`` (the last k-NN accuracy), ``loss`` (the last epoch's mean).
    """
    trainer = Trainer(cfg, data, callbacks)
    try:
        return trainer.fit().to_dict()
    finally:
        trainer.close()
