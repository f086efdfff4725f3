"""The metric-learning run: data -> model -> loss with memory -> evaluation -> logging and checkpoints.

:class:`MetricRun` is the shared :class:`~xbn_queue.training.loop.RunLoop` with the metric trainer's
steps. Per epoch: ``warmup_epochs`` head-only epochs (SGD, plain batch loss, backbone frozen in eval
mode), then ``epochs`` epochs of the method (AdamW on everything, lr x ``lr_gamma`` every
``lr_step_epochs``); an evaluation every ``eval_every`` epochs (Recall@K, MAP@R, feature drift of a
fixed probe batch, memory staleness), ``metrics.jsonl`` / W&B, ``last.pt`` and ``best.pt`` (by Recall@1).

Exact resume: the batches of an epoch and every augmentation are functions of ``(seed, epoch)``
(:mod:`metric.sampler`), and a checkpoint holds model, optimiser, scheduler, AMP scaler, memory (with
the Kalman state), the ids of the stored rows, the position in the epoch, the epoch's running sums and
all RNG states; on CPU a resumed run is bit-identical to an uninterrupted one.

Distributed (``torchrun``): every rank draws its own m-per-class batches (global batch ``r`` of the
epoch's sequence goes to rank ``r % world``), embeddings are all-gathered before the memory is adapted
and updated (every rank holds the same memory), the model is wrapped in DDP, evaluation features
are gathered, and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from xbn_queue.drift import feature_drift, queue_staleness
from xbn_queue.training.checkpoint import check_compatible
from xbn_queue.training.cli import UsageError, check_output_dir, check_two_classes, one_line, warn
from xbn_queue.training.config import config_to_dict
from xbn_queue.training.distributed import DistContext
from xbn_queue.training.embed import embed_sharded, shard_indices
from xbn_queue.training.loop import (Callback, NonFiniteError, RunLoop, RunState, RunSummary, broadcast_buffers,
                                     with_output_dir, wrap_ddp)
from xbn_queue.training.precision import autocast
from xbn_queue.training.prefill import prefill_memory
from xbn_queue.training.progress import progress
from xbn_queue.training.seeding import seed_everything
from xbn_queue.training.tracking import WandbReport, kalman_gain_record, plot_history

from .config import COMPAT_KEYS, MetricConfig, method_memory, resolve_config, saved_config
from .data import ImageDataset, RetrievalData, load_dataset
from .evaluate import is_score, retrieval_metrics
from .fastdata import TensorCache, TensorMildAugment, cached_batches, tensor_cache_plan, use_tensor_cache
from .model import MetricModel, build_model
from .recipe import recipe_summary
from .sampler import MPerClassBatches, steps_per_epoch
from .transforms import build_transforms

__all__ = ["train", "MetricRun", "MetricState", "NonFiniteError", "build_transforms", "build_losses", "embed_split",
           "default_output_dir"]

PROG = "xbn-metric"
#: Parent of the default run folders (``runs/metric/<dataset>-<method>-<timestamp>``).
DEFAULT_RUNS = "runs/metric"
#: Keys every xbn-metric checkpoint has.
CHECKPOINT_KEYS = ("config", "meta", "model", "state", "rng")


# ----------------------------------------------------------------------------------------- pieces
def build_losses(cfg: MetricConfig, rows: int, distributed: bool):
    """The batch loss and (unless method is ``none``) the memory loss.

    Both use the PML loss and miner of ``--loss`` / ``--miner`` with their arguments (default the paper's
    ``SupConLoss()`` with ``PairMarginMiner(pos_margin=0.2, neg_margin=0.8)``, :mod:`metric.losses`); the memory
    loss is :class:`xbn_queue.pml.AdaptiveCrossBatchMemory` with the method's adaptation (``none`` for
    xbm, ``xbn``, ``axbn``, ``xbn-cov``), plus the batch loss (``add_batch_loss``) for the ``-batch``
    methods (XBM*, XBN*, AXBN*); see :func:`metric.config.method_memory`.

    Returns:
        ``(batch_loss_fn(emb, labels) -> loss, memory_loss or None)``.
    """
    from xbn_queue.pml import AdaptiveCrossBatchMemory

    from .losses import build_loss, build_miner, resolve_miner_args

    base = build_loss(cfg.loss, cfg.loss_args)
    miner = build_miner(cfg.miner, resolve_miner_args(cfg.miner, cfg.miner_args))

    def batch_loss(emb: Tensor, labels: Tensor) -> Tensor:
        return base(emb, labels, miner(emb, labels) if miner is not None else None)

    adaptation, add_batch_loss = method_memory(cfg.method)
    if adaptation is None:
        return batch_loss, None
    mem = AdaptiveCrossBatchMemory(base, embedding_size=cfg.embedding_dim, memory_size=rows, miner=miner,
                                   add_batch_loss=add_batch_loss, gather_distributed=distributed,
                                   **cfg.memory_options().queue_kwargs())
    return batch_loss, mem


def _loader(ds: Any, batches: List[List[int]], cfg: MetricConfig, device: torch.device) -> torch.utils.data.DataLoader:
    """``(x, label, index, readable)`` batches of ``ds`` (evaluation transform), one per list of indices; a private
    generator (reading never consumes the global RNG: exact resume)."""
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=cfg.workers,
                                       pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))


def embed_split(model: nn.Module, ds: ImageDataset, cfg: MetricConfig, ctx: DistContext,
                device: torch.device, desc: str = "embed",
                on_bad: Optional[Callable[[List[int]], None]] = None) -> Tuple[Tensor, Tensor, int]:
    """Embed a dataset (built with the evaluation transform), sharded over ranks, gathered in order
    (:func:`xbn_queue.training.embed.embed_sharded`).

    ``on_bad``, when given, receives the dataset indices of the unreadable images (``--skip-bad-images``).

    Returns:
        ``(features (N', D) float32 on ``device``, labels (N',) int64, bad)`` where unreadable images
        (with ``--skip-bad-images``) are dropped and counted in ``bad``.
    """
    idx = shard_indices(len(ds), ctx.rank, ctx.world_size)
    loader = _loader(ds, [idx[s:s + cfg.eval_batch_size] for s in range(0, len(idx), cfg.eval_batch_size)], cfg, device)
    batches = ((x, i, y, ok) for x, y, i, ok in progress(loader, desc=desc, enabled=cfg.progress, leave=False))
    channels_last = cfg.channels_last and device.type == "cuda"
    f, i, y, ok = embed_sharded(model, batches, dim=cfg.embedding_dim, ctx=ctx, device=device, amp=cfg.amp,
                                columns=(torch.long, torch.bool),
                                memory_format=torch.channels_last if channels_last else torch.preserve_format)
    bad = int((~ok).sum())
    if bad and on_bad is not None:
        on_bad(i[~ok].tolist())
    return f[ok], y[ok], bad


def _prefill_reader(ds: Any, cfg: MetricConfig, device: torch.device):
    """``--prefill``'s reader (:func:`xbn_queue.training.prefill.prefill_memory`): batches of training-set indices
    -> ``(x, labels, ids)`` of the readable images of ``ds`` (the training set under the evaluation transform)."""
    def read(batches: List[np.ndarray]) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        for x, y, idx, ok in _loader(ds, [b.tolist() for b in batches], cfg, device):
            x = x[ok].to(device)
            if cfg.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y[ok].to(device), idx[ok].to(device)
    return read


def _set_phase(model: MetricModel, warm: bool) -> None:
    """Warm-up: backbone frozen (no grad, eval mode); otherwise everything trains."""
    for p in model.backbone.parameters():
        p.requires_grad_(not warm)
    model.train()
    if warm:
        model.backbone.eval()


def _make_optimizer(cfg: MetricConfig, model: MetricModel, warm: bool, world: int):
    scale = world if cfg.scale_lr else 1
    if warm:
        return torch.optim.SGD(model.head_parameters(), lr=cfg.warmup_lr * scale, momentum=cfg.warmup_momentum)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr * scale, weight_decay=cfg.weight_decay)


# ------------------------------------------------------------------------------------------- train
def train(cfg: MetricConfig, callbacks: Iterable[Callback] = ()) -> Dict[str, Any]:
    """Train (or resume) one run; see the module docstring.

    Args:
        cfg: the configuration (``None`` fields get the dataset defaults).
        callbacks: hooks into the run (:class:`xbn_queue.training.loop.Callback`).

    Returns:
        :class:`xbn_queue.training.loop.RunSummary` as a dictionary: ``output_dir``, ``global_step``,
        ``stopped`` (``None`` | ``"signal"`` | ``"max_steps"``), ``signal``, ``seconds``,
        ``already_complete``, ``best`` (the best evaluation's record), ``last`` (the last one); on every
        rank, files only on rank 0.

    Raises:
        NonFiniteError: a non-finite embedding or loss (the step is named; last.pt is left as it was).
        UsageError: bad options or data, an unusable ``--output-dir`` (checked before anything is written).
        CheckpointError: a file that is not a readable xbn-metric checkpoint.
        ValueError: incompatible checkpoint.
        metric.data.DataFormatError, metric.data.BadImageError, metric.model.PretrainedWeightsError.
    """
    run = MetricRun(cfg, callbacks)
    try:
        return run.fit().to_dict()
    finally:
        run.close()


def default_output_dir(cfg: MetricConfig) -> MetricConfig:
    """Fill ``output_dir`` when not given: the folder of ``--resume PATH``, else a new timestamped folder.

    Raises:
        UsageError: a bare ``--resume`` without ``--output-dir`` (there is no run to continue in a new folder).
    """
    return with_output_dir(cfg, DEFAULT_RUNS, cfg.dataset, cfg.method)


@dataclasses.dataclass
class MetricState(RunState):
    """The metric run's position, the open epoch's running sums, the best evaluation, the unreadable files.

    Saved in the checkpoint's ``state`` entry (:meth:`to_dict`); :meth:`from_dict` also reads the layout
    of 0.2 - 0.4 (the sums under ``acc``).
    """

    best_recall: float = -1.0
    best_epoch: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    drift_mean_sum: float = 0.0
    drift_max_sum: float = 0.0
    drift_n: int = 0
    bad_files: List[str] = dataclasses.field(default_factory=list)
    prefilled: bool = False

    epoch_sums = ("loss_sum", "loss_n", "drift_mean_sum", "drift_max_sum", "drift_n")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MetricState":
        """The state of any checkpoint since 0.2 (missing keys keep their defaults)."""
        return super().from_dict({**d, **d.get("acc", {})})  # 0.2 - 0.4 kept the epoch's sums under "acc"


class MetricReport(Callback):
    """The metric run's side work: one line per evaluation, ``best.pt`` on a new best Recall@1, the plot."""

    def on_epoch_end(self, loop: "MetricRun", record: Dict[str, Any]) -> None:
        if not record:  # no evaluation this epoch (or not rank 0)
            return
        _print_epoch(record, loop.total_epochs, loop.cfg)
        if loop.state.best.get("step") == record["step"]:
            loop.save_checkpoint("best.pt")

    def on_run_end(self, loop: "MetricRun", summary: RunSummary) -> None:
        if loop.ctx.is_main and (loop.out / "metrics.jsonl").is_file():
            try:
                plot_history(loop.out / "metrics.jsonl", loop.out / "recall_drift.png",
                             panels=[("recall@1",), ("drift_mean", "drift_max")], x="epoch",
                             title=f"{loop.cfg.dataset} / {loop.cfg.method}", percent=("recall@1",))
            except Exception as err:  # plotting must never kill a run
                loop.say(f"warning: could not plot: {one_line(err)}")


@dataclasses.dataclass
class EvaluationSets:
    """The images a run is evaluated on, under the evaluation transform: datasets of ``(image, label, index, ok)``.

    Attributes:
        train: The training split (the drift probe, the staleness sample, the baselines' BatchNorm statistics).
        query: The query split.
        gallery: The gallery split (``query`` itself when the query is the gallery).
        cache: The decoded tensors of the in-memory fast path (:class:`~metric.fastdata.TensorCache`), else ``None``.
    """

    train: Any
    query: Any
    gallery: Any
    cache: Optional[TensorCache] = None


def evaluation_sets(cfg: MetricConfig, data: RetrievalData, device: torch.device, size: Optional[int] = None,
                    cached: Optional[bool] = None, write: bool = True) -> EvaluationSets:
    """The evaluation sets at ``size`` px (default ``cfg.image_size``), for the trainer and the baselines alike.

    With the tensor cache (``cached``; by default :func:`~metric.fastdata.use_tensor_cache` of the options, image
    files within ``--tensor-cache-max-mb`` included) every split is decoded once into tensors on ``device``
    (kept in ``--tensor-cache-dir`` when given; ``write``: this process may write it); else each is an
    :class:`~metric.data.ImageDataset` under the evaluation transform of :func:`build_transforms` (resize, centre
    crop, ImageNet normalisation), kept once transformed when the images are in memory.
    """
    size = cfg.image_size if size is None else int(size)
    if cached is None:
        cached = use_tensor_cache(cfg.tensor_cache, cfg.augment, data, size, cfg.tensor_cache_max_mb)
    if cached:
        cache = TensorCache.build(data, size, device, cfg.tensor_cache_dir, write=write, skip_bad=cfg.skip_bad_images)
        return EvaluationSets(cache.train_eval, cache.query, cache.gallery, cache)
    eval_tf = build_transforms(dataclasses.replace(cfg, image_size=size))[1]
    skip = cfg.skip_bad_images
    in_memory = all(isinstance(it, np.ndarray) for it in data.train.items[:1] + data.query.items[:1])
    train = ImageDataset(data.train, eval_tf, skip_bad_images=skip, cache=in_memory)
    query = ImageDataset(data.query, eval_tf, skip_bad_images=skip, cache=in_memory)
    gallery = query if data.query_is_gallery else ImageDataset(data.gallery, eval_tf, skip_bad_images=skip, cache=in_memory)
    return EvaluationSets(train, query, gallery)


class MetricRun(RunLoop):
    """One metric-learning run on the shared loop (see the module docstring).

    Args:
        cfg: the configuration (``None`` fields get the dataset defaults).
        callbacks: hooks into the run.
    """

    prog = PROG
    checkpoint_keys = CHECKPOINT_KEYS
    wandb_report = WandbReport("method", ("recall@1", "map@r"), model_file="best.pt", model_at="best")
    state_class = MetricState
    state: MetricState

    def __init__(self, cfg: MetricConfig, callbacks: Iterable[Callback] = ()) -> None:
        super().__init__(default_output_dir(resolve_config(cfg)), callbacks, side_work=[MetricReport()])

    # ------------------------------------------------------------------------- check and build
    def check(self) -> None:
        """Options, run folder, memory size, data; nothing is written."""
        cfg, device = self.cfg, self.device
        check_output_dir(self.out, resume=bool(cfg.resume), overwrite=cfg.overwrite)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.data: RetrievalData = load_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.train_fraction,
                                                cfg.split_seed, max_per_class=cfg.max_per_class, download=cfg.download,
                                                omniglot_rotations=cfg.omniglot_rotations)
        self.rows = _check_data(cfg, self.data, self.ctx.world_size, device)  # --memory-size as rows, from here on
        self.cached, self.cache_note = tensor_cache_plan(cfg.tensor_cache, cfg.augment, self.data, cfg.image_size,
                                                         cfg.tensor_cache_max_mb)

    def build(self) -> None:
        """Model, losses (the memory inside), AMP scaler, datasets, probe batch; the optimiser comes per phase."""
        cfg, device = self.cfg, self.device
        self.cfg_dict = config_to_dict(cfg)
        self.meta = {"memory_rows": self.rows, "world_size": self.ctx.world_size,
                     "tensor_cache": bool(self.cached)}  # how it evaluated (xbn-metric embed does the same)
        self.model = build_model(cfg.backbone, cfg.embedding_dim, cfg.embedding_norm, cfg.pretrained,
                                 cfg.pretrained_path, cfg.width, cfg.image_size, cfg.head).to(device)
        if cfg.channels_last and device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_loss, self.mem_loss = build_losses(cfg, self.rows, self.ctx.is_distributed)
        if self.mem_loss is not None:
            self.mem_loss.to(device)
        self.total_epochs = cfg.warmup_epochs + cfg.epochs
        self.steps_per_epoch = steps_per_epoch(len(self.data.train), cfg.batch_size, self.ctx.world_size)
        self.eval_every = cfg.eval_every
        self.recipe = recipe_summary(cfg)
        self.build_datasets()
        self.build_probe()
        self.warm: Optional[bool] = None  # the phase of the current optimiser (set by start_epoch)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.sched: Optional[torch.optim.lr_scheduler.StepLR] = None
        self.net: nn.Module = self.model
        self.resumed_optim: Optional[Dict[str, Any]] = None

    def build_datasets(self) -> None:
        """The training data step (the in-memory fast path or per-image loading) and the evaluation sets."""
        cfg, data = self.cfg, self.data
        if self.cache_note and self.ctx.is_main:  # image files above --tensor-cache-max-mb
            self.say(self.cache_note)
        sets = evaluation_sets(cfg, data, self.device, cached=self.cached, write=self.ctx.is_main)
        self.cache: Optional[TensorCache] = sets.cache
        self.train_eval_ds, self.query_ds, self.gallery_ds = sets.train, sets.query, sets.gallery  # probe, staleness
        if self.cache is not None:  # decoded once, batches augmented on the device
            if self.cache.files is not None and self.ctx.is_main:
                self.say(self.cache.files.summary())
            self.fast_augment = TensorMildAugment(cfg.image_size, cfg.crop_min_scale, hflip=cfg.hflip, re_prob=cfg.re_prob)
        else:
            self.train_ds = ImageDataset(data.train, build_transforms(cfg)[0], skip_bad_images=cfg.skip_bad_images)

    def build_probe(self) -> None:
        """The fixed probe batch of the drift diagnostic: training images under the evaluation transform."""
        cfg = self.cfg
        probe_idx = np.random.default_rng([cfg.seed, 0x70726F62]).permutation(len(self.data.train))[: cfg.probe_size]
        items = [self.train_eval_ds[int(i)] for i in probe_idx]
        self.note_bad([self.data.train.items[int(i)] for i, (_, _, _, ok) in zip(probe_idx, items) if not ok])
        self.probe = torch.stack([p[0] for p in items]).to(self.device)  # (P, 3, H, W)

    def note_bad(self, items: List[Any]) -> None:
        """Count unreadable files once each (``--skip-bad-images``), warning on rank 0."""
        for item in items:
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"in-memory image {id(item)}"
            if name not in self.state.bad_files:
                self.state.bad_files.append(name)
                if self.ctx.is_main:
                    warn(PROG, f"skipping unreadable image {name} (--skip-bad-images)")

    # ---------------------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> Dict[str, Any]:
        """The shared layout (:meth:`RunLoop.checkpoint_state`) with the model, the memory and the phase's optimiser."""
        return {**super().checkpoint_state(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "optimizer_phase": "warmup" if self.warm else "train",
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "memory": self.mem_loss.state_dict() if self.mem_loss is not None else None}

    def load_state(self, ckpt: Dict[str, Any], path: Path) -> None:
        """Refuse another configuration; model, memory, run state and RNG now; optimiser and scheduler when the
        phase starts (:meth:`start_epoch`)."""
        saved = dict(saved_config(ckpt["config"]), **ckpt["meta"])
        now = dict(saved_config(self.cfg_dict), **self.meta)
        check_compatible(saved, now, COMPAT_KEYS + ["memory_rows", "world_size"], source=path)
        self.model.load_state_dict(ckpt["model"])
        if self.mem_loss is not None:
            self.mem_loss.load_state_dict(ckpt["memory"])
        bad = self.state.bad_files  # noted while building (the probe batch)
        super().load_state(ckpt, path)
        self.state.bad_files = sorted(set(self.state.bad_files) | set(bad))
        self.resumed_optim = ckpt

    # ------------------------------------------------------------------------------- training
    def start_epoch(self) -> None:
        """Warm-up -> training: a new optimiser, schedule and DDP wrapper (restored from the checkpoint on resume)."""
        warm = self.state.epoch < self.cfg.warmup_epochs
        if warm == self.warm:
            return
        self.warm = warm
        self.phase = "warm-up" if warm else ""
        _set_phase(self.model, warm)
        self.optimizer = _make_optimizer(self.cfg, self.model, warm, self.ctx.world_size)
        self.sched = None if warm else torch.optim.lr_scheduler.StepLR(self.optimizer, self.cfg.lr_step_epochs, self.cfg.lr_gamma)
        ckpt, self.resumed_optim = self.resumed_optim, None
        if ckpt is not None and ckpt.get("optimizer_phase") == ("warmup" if warm else "train"):
            self.optimizer.load_state_dict(ckpt["optimizer"])  # else saved at the warm-up's end: a fresh AdamW, as uninterrupted
            if self.sched is not None and ckpt.get("scheduler") is not None:
                self.sched.load_state_dict(ckpt["scheduler"])
        self.net = wrap_ddp(self.model, self.ctx)

    def batches(self) -> Iterator[Tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(images, labels, dataset indices, readable)`` of the epoch's m-per-class batches for this rank."""
        cfg, st = self.cfg, self.state
        sampler = MPerClassBatches(self.data.train.labels, cfg.batch_size, cfg.m_per_class, cfg.seed, st.epoch,
                                   self.ctx.rank, self.ctx.world_size, start=st.step_in_epoch)
        if self.cache is not None:
            return iter(cached_batches(self.cache, self.data.train.labels, sampler, self.fast_augment))
        # a private generator: creating the loader must not consume the global RNG (exact resume)
        return iter(torch.utils.data.DataLoader(self.train_ds, batch_sampler=sampler, num_workers=cfg.workers,
                                                pin_memory=self.device.type == "cuda",
                                                generator=torch.Generator().manual_seed(cfg.seed + st.epoch)))

    def train_step(self, batch: Tuple[Tensor, Tensor, Tensor, Tensor]) -> float:
        """Prefill when due, embed, check, loss with the memory (adapt; the batch held back), check, enqueue,
        backward and optimiser step, drift probe; returns the loss."""
        self.fill_memory_if_due()  # --prefill: once, right before the first step whose loss uses the memory
        x, y, idx = self.readable(batch)
        measure = self.cfg.drift_every > 0 and self.state.step_in_epoch % self.cfg.drift_every == 0 and self.ctx.is_main
        z_before = self.embed_probe() if measure else None
        with self.autocast():
            emb = self.net(x)  # (B, D) float32
        self.check_finite("embedding", emb)  # every rank, before the memory is adapted
        if self.warm or self.mem_loss is None:
            loss = self.batch_loss(emb, y)
            self.check_finite("loss", loss)
        else:
            with self.mem_loss.deferred_enqueue():  # the batch (with sample ids) is written at the block's end
                loss = self.mem_loss(emb, y, ids=idx)  # adapt the memory, loss against it and the batch
                self.check_finite("loss", loss)  # raises: the batch never reaches the memory
        self.backward_step(loss)  # one loss scaler (xbn_queue.training.precision)
        value = float(loss.detach())
        self.state.loss_sum += value
        self.state.loss_n += 1
        if z_before is not None:
            d = feature_drift(self.embed_probe(), z_before)
            self.state.drift_mean_sum += d["mean"]
            self.state.drift_max_sum += d["max"]
            self.state.drift_n += 1
        return value

    def fill_memory_if_due(self) -> None:
        """``--prefill``: fill the memory right before the first step whose loss uses it (after any head-only
        warm-up and ``--memory-warmup-steps``), once per run (recorded in the checkpoint)."""
        cfg, st = self.cfg, self.state
        if (cfg.prefill and not self.warm and not st.prefilled and self.mem_loss is not None
                and self.mem_loss.queue.num_steps == cfg.memory_warmup_steps):
            st.prefilled = prefill_memory(self.mem_loss.queue, self.model, _prefill_reader(self.train_eval_ds, cfg, self.device),
                                          num_train=len(self.train_eval_ds), seed=cfg.seed, batch_size=cfg.eval_batch_size,
                                          ctx=self.ctx, device=self.device, amp=cfg.amp, progress=cfg.progress)

    def readable(self, batch: Tuple[Tensor, Tensor, Tensor, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """The batch without unreadable images (counted once each), on the device."""
        x, y, idx, ok = batch
        if not bool(ok.all()):
            self.note_bad([self.data.train.items[int(i)] for i in idx[~ok]])
            x, y, idx = x[ok], y[ok], idx[ok]
        x, y, idx = x.to(self.device, non_blocking=True), y.to(self.device), idx.to(self.device)
        if self.cfg.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, idx

    def embed_probe(self) -> Tensor:
        """``(P, D)`` embeddings of the probe batch in eval mode (the phase's train/eval modes restored)."""
        was = self.model.training
        self.model.eval()
        with torch.no_grad(), self.autocast():
            z = self.model(self.probe).float()  # (P, D)
        self.model.train(was)
        if self.warm:
            self.model.backbone.eval()
        return z

    # ----------------------------------------------------------------------------- evaluation
    def end_epoch(self, evaluate: bool) -> Dict[str, Any]:
        """Schedule step at the epoch's end; when ``evaluate``, the evaluation and its record (every rank agrees)."""
        if self.epoch_done() and self.sched is not None:
            self.sched.step()
        if not evaluate:
            return {}
        record = self.record(self.evaluate())
        self.state = self.ctx.broadcast_object(self.state)  # every rank keeps the same bookkeeping
        return record

    def evaluate(self) -> Dict[str, Any]:
        """Recall@K and MAP@R of the query split against the gallery, memory staleness (rank 0 computes)."""
        broadcast_buffers(self.model, self.ctx)  # BatchNorm running stats of rank 0 everywhere: same features on every shard
        data = self.data
        qf, ql, bad_q = embed_split(self.model, self.query_ds, self.cfg, self.ctx, self.device, desc="query",
                                    on_bad=lambda ids: self.note_bad([data.query.items[j] for j in ids]))
        if data.query_is_gallery:
            gf, gl, bad_g = qf, ql, 0
        else:
            gf, gl, bad_g = embed_split(self.model, self.gallery_ds, self.cfg, self.ctx, self.device, desc="gallery",
                                        on_bad=lambda ids: self.note_bad([data.gallery.items[j] for j in ids]))
        rec: Dict[str, Any] = {}
        if self.ctx.is_main:
            metrics_fn = retrieval_metrics
            if self.cfg.eval_backend == "faiss":  # the same metrics through an exact faiss index
                from .evaluate import faiss_retrieval_metrics as metrics_fn
            rec = metrics_fn(qf, ql, gf, gl, ks=self.cfg.recall_ks, query_is_gallery=data.query_is_gallery,
                             chunk_size=self.cfg.eval_chunk)
            rec["eval_bad_images"] = bad_q + bad_g  # per evaluation; files are counted once via note_bad
            if self.mem_loss is not None and len(self.mem_loss.queue) > 0:
                rec.update(_staleness(self.model, self.mem_loss.queue, self.train_eval_ds, self.cfg, self.device))
            if self.mem_loss is not None:
                rec.update(kalman_gain_record(self.mem_loss.queue.adaptation))
        _set_phase(self.model, bool(self.warm))
        return rec

    def record(self, rec: Dict[str, Any]) -> Dict[str, Any]:
        """The evaluation's record (rank 0; ``{}`` elsewhere): the epoch's sums, the scores, the memory; the last
        and the best (by Recall@1) kept in the state. :class:`MetricReport` prints it and writes ``best.pt``."""
        if not self.ctx.is_main:
            return {}
        st = self.state
        record: Dict[str, Any] = {"epoch": st.epoch + 1, "step": st.global_step, "phase": "warmup" if self.warm else "train",
                                  "lr": self.optimizer.param_groups[0]["lr"], "loss": st.loss_sum / max(st.loss_n, 1)}
        record.update({k: v for k, v in rec.items() if is_score(k)})
        if st.drift_n:
            record["drift_mean"] = st.drift_mean_sum / st.drift_n
            record["drift_max"] = st.drift_max_sum / st.drift_n
        record.update({k: v for k, v in rec.items() if not is_score(k)})
        record["memory_rows"] = len(self.mem_loss.queue) if self.mem_loss is not None else 0
        record["bad_images"] = len(st.bad_files)  # distinct files, training and evaluation
        st.last = record
        r1 = record.get("recall@1", float("nan"))
        if isinstance(r1, float) and not math.isnan(r1) and r1 > st.best_recall:
            st.best_recall, st.best_epoch, st.best = r1, st.epoch + 1, record
        return record


def _check_data(cfg: MetricConfig, data: RetrievalData, world: int, device: Optional[torch.device] = None) -> int:
    """Refuse data on which training or evaluation cannot give a meaningful number (before any write), and
    turn ``--memory-size`` into rows (:meth:`xbn_queue.training.memory.MemoryOptions.rows`, the one place
    they are checked).

    Args:
        device: where the memory will live (``None``: its capacity is not checked, as for a sweep's plan).

    Returns:
        The number of memory rows (``--memory-size`` resolved against the training set).

    Raises:
        UsageError: fewer than two training classes, no class with ``m_per_class`` images, fewer classes
            than a batch needs, no query with a positive, a memory smaller than one global batch,
            ``--prefill`` with a memory larger than the training set, or one the device cannot hold.
    """
    labels = np.asarray(data.train.labels)
    classes, counts = np.unique(labels, return_counts=True)
    where = f"--dataset {cfg.dataset}" + (f" --data-root {cfg.data_root}" if cfg.data_root else "")
    check_two_classes(labels, where, "metric learning needs at least 2 (one class trains to loss 0 and scores Recall 100%)")
    if cfg.m_per_class > counts.max():
        raise UsageError(f"--m-per-class {cfg.m_per_class}: no training class has that many images (largest: "
                         f"{counts.max()}); expected at most {counts.max()}")
    if cfg.batch_size // cfg.m_per_class > len(classes):
        raise UsageError(f"--batch-size {cfg.batch_size}: {cfg.batch_size // cfg.m_per_class} classes per batch "
                         f"(--m-per-class {cfg.m_per_class}) but the training split has {len(classes)}; expected at most "
                         f"{len(classes) * cfg.m_per_class}")
    q = np.asarray(data.query.labels)
    if data.query_is_gallery:
        qc, qn = np.unique(q, return_counts=True)
        with_pos = int(qn[qn > 1].sum())
    else:
        with_pos = int(np.isin(q, np.asarray(data.gallery.labels)).sum())
    if with_pos == 0:
        raise UsageError(f"{where}: no query image has a positive (same class) in the gallery, so Recall@K and "
                         "MAP@R are undefined; each evaluation class needs at least 2 images")
    return cfg.memory_options().rows(len(labels), cfg.embedding_dim, cfg.batch_size, world, device)


def _print_epoch(record: Dict[str, Any], total_epochs: int, cfg: MetricConfig) -> None:
    """One plain line per evaluation on stderr (Recall in %), e.g. for a log file."""
    shown = ", ".join(f"{k.replace('recall@', 'R@').replace('map@r', 'MAP@R').replace('r_precision', 'R-Prec')} {100 * v:.2f}%" for k, v in record.items()
                      if is_score(k) and isinstance(v, float))
    print(f"[{PROG}] epoch {record['epoch']}/{total_epochs} ({record['phase']}), step {record['step']}: "
          f"loss {record['loss']:.4f}" + (f", {shown}" if shown else ""), file=sys.stderr, flush=True)


@torch.no_grad()
def _staleness(model: MetricModel, queue, ds: ImageDataset, cfg: MetricConfig, device: torch.device) -> Dict[str, float]:
    """Stored memory rows vs fresh embeddings (current model, evaluation transform) of the same images.

    Up to ``cfg.staleness_samples`` distinct stored sample ids, evenly spaced over the memory, are
    re-embedded; :func:`xbn_queue.drift.queue_staleness` compares every stored row of those ids.
    """
    stored_ids = queue.ids  # (n,)
    if stored_ids is None or stored_ids.numel() == 0:
        return {}
    ids = torch.unique(stored_ids)  # (u,) sorted
    if ids.numel() > cfg.staleness_samples:
        ids = ids[torch.linspace(0, ids.numel() - 1, cfg.staleness_samples).round().long().to(ids.device)]
    fresh = []
    was = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, ids.tolist()), batch_size=cfg.eval_batch_size,
                                         shuffle=False, num_workers=cfg.workers, generator=torch.Generator().manual_seed(0))
    for x, _, _, _ in loader:
        with autocast(cfg.amp, device):
            fresh.append(model(x.to(device)).float())  # (b, D)
    model.train(was)
    r = queue_staleness(queue, ids, torch.cat(fresh))
    return {"staleness_mean_l2": r["mean_l2"], "staleness_max_l2": r["max_l2"], "staleness_cosine": r["mean_cosine"],
            "staleness_moment_gap": r["moment_gap"], "staleness_rows": r["count"]}
