"""The training loop: data -> model -> loss with memory -> evaluation -> logging and checkpoints.

One run (:func:`train`) does, per epoch: ``warmup_epochs`` head-only epochs (SGD, plain batch loss,
backbone frozen in eval mode), then ``epochs`` epochs of the method (AdamW on everything, lr x
``lr_gamma`` every ``lr_step_epochs``); an evaluation every ``eval_every`` epochs (Recall@K, MAP@R,
feature drift of a fixed probe batch, memory staleness), ``metrics.jsonl`` / W&B, ``last.pt`` and
``best.pt`` (by Recall@1).

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
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from xbn_queue.drift import feature_drift, queue_staleness
from xbn_queue.training.checkpoint import CheckpointError, atomic_save, check_compatible, load_checkpoint, resolve_resume
from xbn_queue.training.cli import (UsageError, check_memory_fits, check_output_dir, choose_output_dir, one_line,
                                    prepare_output_dir, warn)
from xbn_queue.training.config import config_to_dict, save_config
from xbn_queue.training.distributed import DistContext, init_distributed
from xbn_queue.training.progress import progress
from xbn_queue.training.rng import get_rng_state, set_rng_state
from xbn_queue.training.seeding import seed_everything
from xbn_queue.training.signals import GracefulExit
from xbn_queue.training.tracking import RunLogger, plot_history

from .config import COMPAT_KEYS, MetricConfig, memory_rows, resolve_config, saved_config
from .data import ImageDataset, RetrievalData, load_dataset
from .evaluate import retrieval_metrics
from .fastdata import TensorCache, TensorMildAugment, cached_batches, use_tensor_cache
from .model import MetricModel, build_model
from .prefill import prefill_memory
from .recipe import recipe_summary
from .sampler import MPerClassBatches, steps_per_epoch

__all__ = ["train", "NonFiniteError", "build_transforms", "build_losses", "embed_split", "default_output_dir"]

PROG = "xbn-metric"
#: Parent of the default run folders (``runs/metric/<dataset>-<method>-<timestamp>``).
DEFAULT_RUNS = "runs/metric"

#: Test hook: after writing the checkpoint of this global step, the process waits for SIGKILL / SIGTERM.
HANG_ENV = "XBN_METRIC_TEST_HANG_AFTER_STEP"
#: Test hook: at the end, every rank saves its memory (and ids) to ``DIR/queue_rank{r}.pt``.
DUMP_ENV = "XBN_METRIC_TEST_DUMP_QUEUE_DIR"


class NonFiniteError(RuntimeError):
    """A non-finite embedding or loss; the run stopped and the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------- pieces
def build_transforms(cfg: MetricConfig):
    """The training transform and the evaluation transform (resize + centre crop, ImageNet normalisation).

    ``--augment timm``: timm's training pipeline (random-resized crop, flip, colour jitter,
    ``--auto-augment``, random erasing). ``--augment mild`` (the from-scratch recipe): random-resized
    crop of ``crop_min_scale``-100 % of the area, a random affine of +-10 degrees and +-5 % shift,
    horizontal flip, random erasing with ``re_prob``; no RandAugment, no colour jitter.
    """
    from timm.data import create_transform

    eval_tf = create_transform(input_size=cfg.image_size, is_training=False, interpolation="bicubic")
    if cfg.augment == "mild":
        from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from torchvision import transforms as T

        steps = [T.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                 T.RandomAffine(degrees=10, translate=(0.05, 0.05)),
                 T.RandomHorizontalFlip(cfg.hflip), T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
        if cfg.re_prob > 0:
            steps.append(T.RandomErasing(cfg.re_prob))
        return T.Compose(steps), eval_tf
    aa = None if (cfg.auto_augment or "none").lower() == "none" else cfg.auto_augment
    train_tf = create_transform(
        input_size=cfg.image_size, is_training=True, auto_augment=aa, re_prob=cfg.re_prob,
        scale=(cfg.crop_min_scale, 1.0), hflip=cfg.hflip, interpolation="bicubic",
    )
    return train_tf, eval_tf


def build_losses(cfg: MetricConfig, rows: int, distributed: bool):
    """The batch loss and (unless method is ``none``) the memory loss.

    Both use PML's ``SupConLoss`` with ``PairMarginMiner(pos_margin=0.2, neg_margin=0.8)``; the memory
    loss is :class:`xbn_queue.pml.AdaptiveCrossBatchMemory` with adaptation ``none`` (xbm, xbm-batch),
    ``xbn`` or ``axbn``, plus the batch loss for ``xbm-batch`` (XBM*).

    Returns:
        ``(batch_loss_fn(emb, labels) -> loss, memory_loss or None)``.
    """
    from pytorch_metric_learning import losses, miners

    from xbn_queue.pml import AdaptiveCrossBatchMemory

    base = losses.SupConLoss()
    miner = miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)

    def batch_loss(emb: Tensor, labels: Tensor) -> Tensor:
        return base(emb, labels, miner(emb, labels))

    if cfg.method == "none":
        return batch_loss, None
    adaptation = {"xbm": "none", "xbm-batch": "none", "xbn": "xbn", "axbn": "axbn", "xbn-cov": "xbn-cov"}[cfg.method]
    kw: Dict[str, Any] = {"gather_distributed": distributed,  # sample ids are stored with the rows (staleness)
                          "warmup_steps": cfg.memory_warmup_steps}
    if adaptation == "axbn":
        kw.update(kalman_p0=cfg.kalman_p0, kalman_q=cfg.kalman_q, kalman_gain_every=cfg.kalman_gain_every,
                  kalman_r="auto" if cfg.kalman_r == "auto" else float(cfg.kalman_r))
    mem = AdaptiveCrossBatchMemory(base, embedding_size=cfg.embedding_dim, memory_size=rows, miner=miner,
                                   adaptation=adaptation, add_batch_loss=cfg.method == "xbm-batch", **kw)
    return batch_loss, mem


def _shard(n: int, rank: int, world: int) -> List[int]:
    return list(range(rank, n, world))


@torch.no_grad()
def embed_split(model: nn.Module, ds: ImageDataset, cfg: MetricConfig, ctx: DistContext,
                device: torch.device, desc: str = "embed",
                on_bad: Optional[Callable[[List[int]], None]] = None) -> Tuple[Tensor, Tensor, int]:
    """Embed a dataset (built with the evaluation transform), sharded over ranks, gathered in order.

    ``on_bad``, when given, receives the dataset indices of the unreadable images (``--skip-bad-images``).

    Returns:
        ``(features (N', D) float32 on ``device``, labels (N',) int64, bad)`` where unreadable images
        (with ``--skip-bad-images``) are dropped and counted in ``bad``.
    """
    idx = _shard(len(ds), ctx.rank, ctx.world_size)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, idx), batch_size=cfg.eval_batch_size, shuffle=False,
        num_workers=cfg.workers, pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    feats, labels, index, oks = [], [], [], []
    try:
        for x, y, i, ok in progress(loader, desc=desc, enabled=cfg.progress, leave=False):
            x = x.to(device, non_blocking=True)
            if cfg.channels_last and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(cfg, device):
                z = model(x)  # (b, D)
            feats.append(z.float())
            labels.append(y.to(device))
            index.append(i.to(device))
            oks.append(ok.to(device))
    finally:
        model.train(was_training)
    d = cfg.embedding_dim
    f = torch.cat(feats) if feats else torch.zeros(0, d, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    i = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=device)
    ok = torch.cat(oks) if oks else torch.zeros(0, dtype=torch.bool, device=device)
    if ctx.is_distributed:
        f, y, i, ok = (ctx.gather_features(t) for t in (f, y, i, ok))
        order = torch.argsort(i)
        f, y, ok = f[order], y[order], ok[order]
    bad = int((~ok).sum())
    if bad and on_bad is not None:
        idx_all = torch.sort(i).values if ctx.is_distributed else i
        on_bad(idx_all[~ok].tolist())
    return f[ok], y[ok], bad


def _autocast(cfg: MetricConfig, device: torch.device):
    if cfg.amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _unwrap(m: nn.Module) -> MetricModel:
    return m.module if hasattr(m, "module") else m  # type: ignore[return-value]


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


def _wrap_ddp(model: MetricModel, ctx: DistContext, device: torch.device) -> nn.Module:
    if not ctx.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _all_flags(ctx: DistContext, *flags: bool) -> List[bool]:
    """Logical OR of each flag over all ranks (one collective)."""
    if not ctx.is_distributed:
        return list(flags)
    import torch.distributed as dist

    t = torch.tensor([float(f) for f in flags], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _fresh_acc() -> Dict[str, float]:
    return {"loss_sum": 0.0, "loss_n": 0, "drift_mean_sum": 0.0, "drift_max_sum": 0.0, "drift_n": 0}


# ------------------------------------------------------------------------------------------- train
def train(cfg: MetricConfig) -> Dict[str, Any]:
    """Train (or resume) one run; see the module docstring.

    Args:
        cfg: the configuration (``None`` fields get the dataset defaults).

    Returns:
        ``{"output_dir", "best": metrics of the best evaluation, "last": the last evaluation,
        "steps", "stopped": None | "signal" | "max_steps", "signal": the signal number or None,
        "already_complete": True when ``--resume`` found a finished run}`` (on every rank; files only
        on rank 0).

    Raises:
        NonFiniteError: a non-finite embedding or loss (the step is named; last.pt is left as it was).
        UsageError: bad options or data, an unusable ``--output-dir`` (checked before anything is written).
        CheckpointError: a file that is not a readable xbn-metric checkpoint.
        ValueError: incompatible checkpoint.
        metric.data.DataFormatError, metric.data.BadImageError, metric.model.PretrainedWeightsError.
    """
    cfg = default_output_dir(resolve_config(cfg))
    ctx = init_distributed(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        ctx.cleanup()


def _check_data(cfg: MetricConfig, data: RetrievalData, world: int) -> int:
    """Refuse data on which training or evaluation cannot give a meaningful number (before any write).

    Returns:
        The number of memory rows (``--memory-size`` resolved against the training set).

    Raises:
        UsageError: fewer than two training classes, no class with ``m_per_class`` images, fewer classes
            than a batch needs, a memory smaller than one global batch, or no query with a positive.
    """
    labels = np.asarray(data.train.labels)
    classes, counts = np.unique(labels, return_counts=True)
    where = f"--dataset {cfg.dataset}" + (f" --data-root {cfg.data_root}" if cfg.data_root else "")
    if len(classes) < 2:
        raise UsageError(f"{where}: the training split has {len(classes)} class(es); metric learning needs at least 2 "
                         "(one class trains to loss 0 and scores Recall 100%)")
    rows = memory_rows(cfg.memory_size, len(data.train))
    if cfg.m_per_class > counts.max():
        raise UsageError(f"--m-per-class {cfg.m_per_class}: no training class has that many images (largest: "
                         f"{counts.max()}); expected at most {counts.max()}")
    if cfg.batch_size // cfg.m_per_class > len(classes):
        raise UsageError(f"--batch-size {cfg.batch_size}: {cfg.batch_size // cfg.m_per_class} classes per batch "
                         f"(--m-per-class {cfg.m_per_class}) but the training split has {len(classes)}; expected at most "
                         f"{len(classes) * cfg.m_per_class}")
    if cfg.method != "none" and rows < cfg.batch_size * world:
        raise UsageError(f"--memory-size {cfg.memory_size}: {rows} rows, fewer than one global batch "
                         f"({cfg.batch_size} x {world} processes)")
    q = np.asarray(data.query.labels)
    if data.query_is_gallery:
        qc, qn = np.unique(q, return_counts=True)
        with_pos = int(qn[qn > 1].sum())
    else:
        with_pos = int(np.isin(q, np.asarray(data.gallery.labels)).sum())
    if with_pos == 0:
        raise UsageError(f"{where}: no query image has a positive (same class) in the gallery, so Recall@K and "
                         "MAP@R are undefined; each evaluation class needs at least 2 images")
    return rows


def default_output_dir(cfg: MetricConfig) -> MetricConfig:
    """Fill ``output_dir`` when not given: the folder of ``--resume PATH``, else a new timestamped folder.

    Raises:
        UsageError: a bare ``--resume`` without ``--output-dir`` (there is no run to continue in a new folder).
    """
    if cfg.output_dir:
        return cfg
    return dataclasses.replace(cfg, output_dir=choose_output_dir(None, cfg.resume, DEFAULT_RUNS, cfg.dataset, cfg.method))


def _train(cfg: MetricConfig, ctx: DistContext) -> Dict[str, Any]:
    device = ctx.device
    out = Path(cfg.output_dir)
    # ---------------------------------------------------------- checks: nothing is written before they pass
    check_output_dir(out, resume=bool(cfg.resume), overwrite=cfg.overwrite)
    if isinstance(cfg.memory_size, int) or str(cfg.memory_size).strip().isdigit():
        check_memory_fits("--memory-size", cfg.memory_size, int(cfg.memory_size), cfg.embedding_dim, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    data: RetrievalData = load_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.train_fraction, cfg.split_seed,
                                       max_per_class=cfg.max_per_class, download=cfg.download)
    world = ctx.world_size
    rows = _check_data(cfg, data, world)
    if cfg.method != "none":
        check_memory_fits("--memory-size", cfg.memory_size, rows, cfg.embedding_dim, device)
    cfg_dict = config_to_dict(cfg)
    meta = {"memory_rows": rows, "world_size": world}

    train_tf, eval_tf = build_transforms(cfg)
    model = build_model(cfg.backbone, cfg.embedding_dim, cfg.embedding_norm, cfg.pretrained, cfg.pretrained_path,
                        cfg.width, cfg.image_size, cfg.head).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    batch_loss, mem_loss = build_losses(cfg, rows, ctx.is_distributed)
    if mem_loss is not None:
        mem_loss.to(device)
    use_amp = cfg.amp and device.type == "cuda"
    fp16 = use_amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16) if device.type == "cuda" else None

    W = cfg.warmup_epochs
    total_epochs = W + cfg.epochs
    spe = steps_per_epoch(len(data.train), cfg.batch_size, world)
    # Fixed probe batch for the drift diagnostic: training images under the evaluation transform.
    probe_idx = np.random.default_rng([cfg.seed, 0x70726F62]).permutation(len(data.train))[: cfg.probe_size]
    cache: Optional[TensorCache] = None
    if use_tensor_cache(cfg.tensor_cache, cfg.augment, data):  # decoded once, batches augmented on the device
        cache = TensorCache.build(data, cfg.image_size, device)
        fast_augment = TensorMildAugment(cfg.image_size, cfg.crop_min_scale, hflip=cfg.hflip, re_prob=cfg.re_prob)
        train_eval_ds, query_ds, gallery_ds = cache.train_eval, cache.query, cache.gallery
    else:
        train_ds = ImageDataset(data.train, train_tf, skip_bad_images=cfg.skip_bad_images)
        in_memory = all(isinstance(it, np.ndarray) for it in data.train.items[:1] + data.query.items[:1])
        train_eval_ds = ImageDataset(data.train, eval_tf, skip_bad_images=cfg.skip_bad_images, cache=in_memory)  # probe, staleness
        query_ds = ImageDataset(data.query, eval_tf, skip_bad_images=cfg.skip_bad_images, cache=in_memory)
        gallery_ds = query_ds if data.query_is_gallery else ImageDataset(data.gallery, eval_tf, skip_bad_images=cfg.skip_bad_images, cache=in_memory)
    bad_files: Dict[str, str] = {}  # distinct unreadable files seen so far -> reason (warned about once)

    def note_bad(items: List[Any]) -> None:
        for item in items:
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"in-memory image {id(item)}"
            if name not in bad_files:
                bad_files[name] = "unreadable"
                if ctx.is_main:
                    warn(PROG, f"skipping unreadable image {name} (--skip-bad-images)")

    probe_items = [train_eval_ds[int(i)] for i in probe_idx]
    note_bad([data.train.items[int(i)] for i, (_, _, _, ok) in zip(probe_idx, probe_items) if not ok])
    probe = torch.stack([p[0] for p in probe_items]).to(device)  # (P, 3, H, W)

    # ---------------------------------------------------------------------------- state / resume
    st: Dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_recall": -1.0, "best_epoch": 0,
                          "bad_images": 0, "acc": _fresh_acc(), "best": {}, "last": {}, "prefilled": False}
    ckpt_path = resolve_resume(cfg.resume, out)
    ckpt = None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, map_location="cpu", kind=PROG, required_keys=("config", "meta", "model", "state", "rng"))
        saved = dict(saved_config(ckpt["config"]), **ckpt["meta"])
        check_compatible(saved, dict(saved_config(cfg_dict), **meta), COMPAT_KEYS + ["memory_rows", "world_size"], source=ckpt_path)
        try:
            model.load_state_dict(ckpt["model"])
            if mem_loss is not None:
                mem_loss.load_state_dict(ckpt["memory"])
        except (RuntimeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{ckpt_path} is not a readable {PROG} checkpoint (model or memory do not load: "
                                  f"{one_line(err)[:160]})") from None
        st = ckpt["state"]
        bad_files.update({name: "unreadable" for name in st.get("bad_files", [])})
        finished = st["epoch"] >= total_epochs or (cfg.max_steps is not None and st["global_step"] >= cfg.max_steps)
        if finished:
            if ctx.is_main:
                print(f"[{PROG}] {out} is already complete ({st['epoch']} of {total_epochs} epochs, step "
                      f"{st['global_step']}): nothing to train", file=sys.stderr)
            return {"output_dir": str(out), "best": st["best"], "last": st["last"], "steps": st["global_step"],
                    "stopped": None, "signal": None, "seconds": 0.0, "already_complete": True}
    elif cfg.resume and ctx.is_main:
        print(f"[{PROG}] --resume: no checkpoint in {out}, starting a new run", file=sys.stderr)
    # ---------------------------------------------------------------------- every check passed: write
    ctx.barrier()  # every rank has checked the folder before rank 0 creates anything in it
    if ctx.is_main:
        prepare_output_dir(out, overwrite=cfg.overwrite and ckpt is None)
        save_config(cfg, out / "config.yaml")
        print(f"[{PROG}] run folder: {out}", file=sys.stderr, flush=True)
        print(f"[{PROG}] {recipe_summary(cfg)}", file=sys.stderr, flush=True)
    ctx.barrier()
    warm = st["epoch"] < W
    _set_phase(model, warm)
    opt = _make_optimizer(cfg, model, warm, world)
    sched = None if warm else torch.optim.lr_scheduler.StepLR(opt, cfg.lr_step_epochs, cfg.lr_gamma)
    if ckpt is not None:
        if ckpt.get("optimizer_phase") == ("warmup" if warm else "train"):
            opt.load_state_dict(ckpt["optimizer"])  # else saved at the warm-up's end: a fresh AdamW, as uninterrupted
        if sched is not None and ckpt.get("scheduler") is not None:
            sched.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if ctx.is_main:
            print(f"[{PROG}] resumed from {ckpt_path} at epoch {st['epoch'] + 1}, step {st['global_step']}", file=sys.stderr)
    net = _wrap_ddp(model, ctx, device)
    logger = RunLogger(out, cfg_dict, project=cfg.wandb_project or "xbn-metric", mode=cfg.wandb_mode,
                       enabled=ctx.is_main, name=cfg.wandb_name,
                       resume_step=st["global_step"] if ckpt is not None else None)

    def save(path: Path) -> None:
        if not ctx.is_main:
            return
        atomic_save({
            "format": 1, "config": cfg_dict, "meta": meta, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "optimizer_phase": "warmup" if isinstance(opt, torch.optim.SGD) else "train",
            "scheduler": sched.state_dict() if sched is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "memory": mem_loss.state_dict() if mem_loss is not None else None,
            "state": st, "rng": get_rng_state(),
        }, path)

    def embed_probe() -> Tensor:
        was = model.training
        model.eval()
        with torch.no_grad(), _autocast(cfg, device):
            z = model(probe).float()  # (P, D)
        model.train(was)
        if warm:
            model.backbone.eval()
        return z

    def evaluate() -> Dict[str, Any]:
        _sync_buffers(model, ctx)  # BatchNorm running stats of rank 0 everywhere: same features on every shard
        qf, ql, bad_q = embed_split(model, query_ds, cfg, ctx, device, desc="query",
                                    on_bad=lambda ids: note_bad([data.query.items[j] for j in ids]))
        if data.query_is_gallery:
            gf, gl, bad_g = qf, ql, 0
        else:
            gf, gl, bad_g = embed_split(model, gallery_ds, cfg, ctx, device, desc="gallery",
                                        on_bad=lambda ids: note_bad([data.gallery.items[j] for j in ids]))
        rec: Dict[str, Any] = {}
        if ctx.is_main:
            metrics_fn = retrieval_metrics
            if cfg.eval_backend == "faiss":  # the same metrics through an exact faiss index
                from .retrieval import faiss_retrieval_metrics as metrics_fn
            rec = metrics_fn(qf, ql, gf, gl, ks=cfg.recall_ks, query_is_gallery=data.query_is_gallery,
                             chunk_size=cfg.eval_chunk)
            rec["eval_bad_images"] = bad_q + bad_g  # per evaluation; files are counted once via note_bad
            if mem_loss is not None and len(mem_loss.queue) > 0:
                rec.update(_staleness(model, mem_loss.queue, train_eval_ds, cfg, device))
        _set_phase(model, warm)
        return rec

    # ------------------------------------------------------------------------------------- loop
    hang_step = int(os.environ.get(HANG_ENV, "0") or 0)
    stopped: Optional[str] = None
    t_start = time.time()
    with GracefulExit(enabled=True, verbose=ctx.is_main) as stop:
        while st["epoch"] < total_epochs and stopped is None:
            epoch = st["epoch"]
            if (epoch < W) != warm:  # warm-up -> training: new optimiser, schedule and DDP wrapper
                warm = epoch < W
                _set_phase(model, warm)
                opt = _make_optimizer(cfg, model, warm, world)
                sched = None if warm else torch.optim.lr_scheduler.StepLR(opt, cfg.lr_step_epochs, cfg.lr_gamma)
                net = _wrap_ddp(model, ctx, device)
            sampler = MPerClassBatches(data.train.labels, cfg.batch_size, cfg.m_per_class, cfg.seed, epoch,
                                       ctx.rank, world, start=st["step_in_epoch"])
            if cache is not None:
                loader = cached_batches(cache, data.train.labels, sampler, fast_augment)
            else:  # a private generator: creating the loader must not consume the global RNG (exact resume)
                loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.workers,
                                                     pin_memory=device.type == "cuda",
                                                     generator=torch.Generator().manual_seed(cfg.seed + epoch))
            bar = progress(loader, total=len(sampler), desc=f"epoch {epoch + 1}/{total_epochs}" + (" (warm-up)" if warm else ""),
                           enabled=cfg.progress, leave=False)
            for x, y, idx, ok in bar:
                step = st["global_step"] + 1
                if cfg.prefill and not warm and not st.get("prefilled") and mem_loss.queue.num_steps == cfg.memory_warmup_steps:
                    st["prefilled"] = prefill_memory(model, mem_loss, train_eval_ds, cfg, ctx, device)
                if not bool(ok.all()):
                    note_bad([data.train.items[int(i)] for i in idx[~ok]])
                    st["bad_images"] = len(bad_files)
                    st["bad_files"] = sorted(bad_files)
                    x, y, idx = x[ok], y[ok], idx[ok]
                x, y, idx = x.to(device, non_blocking=True), y.to(device), idx.to(device)
                if cfg.channels_last and device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                measure = cfg.drift_every > 0 and st["step_in_epoch"] % cfg.drift_every == 0 and ctx.is_main
                z_before = embed_probe() if measure else None

                with _autocast(cfg, device):
                    emb = net(x)  # (B, D) float32
                bad_emb, = _all_flags(ctx, not bool(torch.isfinite(emb).all()))
                if bad_emb:
                    raise NonFiniteError(
                        f"non-finite embedding at step {step} (epoch {epoch + 1}); stopped before it reached "
                        f"the memory; the last good checkpoint is {out / 'last.pt'}")
                if warm or mem_loss is None:
                    loss = batch_loss(emb, y)
                else:
                    loss = mem_loss(emb, y, ids=idx)  # adapt the memory, enqueue (with sample ids), loss
                bad_loss, = _all_flags(ctx, not bool(torch.isfinite(loss)))
                if bad_loss:
                    raise NonFiniteError(
                        f"non-finite loss at step {step} (epoch {epoch + 1}); the run stopped and the last "
                        f"good checkpoint is {out / 'last.pt'}")
                opt.zero_grad(set_to_none=True)
                if scaler is not None and scaler.is_enabled():
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                st["global_step"] = step
                st["step_in_epoch"] += 1
                st["acc"]["loss_sum"] += float(loss.detach())
                st["acc"]["loss_n"] += 1
                if z_before is not None:
                    d = feature_drift(embed_probe(), z_before)
                    st["acc"]["drift_mean_sum"] += d["mean"]
                    st["acc"]["drift_max_sum"] += d["max"]
                    st["acc"]["drift_n"] += 1
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                last_of_epoch = st["step_in_epoch"] >= spe
                hit_max = cfg.max_steps is not None and step >= cfg.max_steps
                want_stop, = _all_flags(ctx, stop.requested)
                if not last_of_epoch and (want_stop or hit_max or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                    save(out / "last.pt")
                    if hang_step and step == hang_step:  # test hook (see HANG_ENV): wait for a signal
                        print(f"[xbn-metric] test hook: checkpoint of step {step} written; waiting for a signal", file=sys.stderr, flush=True)
                        while not stop.requested:
                            time.sleep(0.05)
                        want_stop = True
                if want_stop and not last_of_epoch:
                    stopped = "signal"
                    break
                if hit_max and not last_of_epoch:
                    stopped = "max_steps"
                    break
            if stopped == "signal":
                break
            # ------------------------------------------------------------- end of epoch (or max_steps)
            epoch_done = st["step_in_epoch"] >= spe
            if epoch_done:
                if sched is not None:
                    sched.step()
            do_eval = stopped == "max_steps" or (epoch_done and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == total_epochs))
            if cfg.max_steps is not None and st["global_step"] >= cfg.max_steps:
                stopped = "max_steps"
                do_eval = True
            if do_eval:
                rec = evaluate()
                if ctx.is_main:
                    acc = st["acc"]
                    record: Dict[str, Any] = {
                        "epoch": epoch + 1, "step": st["global_step"], "phase": "warmup" if warm else "train",
                        "lr": opt.param_groups[0]["lr"],
                        "loss": acc["loss_sum"] / max(acc["loss_n"], 1),
                    }
                    record.update({k: v for k, v in rec.items() if k.startswith(("recall@", "map@r"))})
                    if acc["drift_n"]:
                        record["drift_mean"] = acc["drift_mean_sum"] / acc["drift_n"]
                        record["drift_max"] = acc["drift_max_sum"] / acc["drift_n"]
                    record.update({k: v for k, v in rec.items() if not k.startswith(("recall@", "map@r"))})
                    record["memory_rows"] = len(mem_loss.queue) if mem_loss is not None else 0
                    record["bad_images"] = len(bad_files)  # distinct files, training and evaluation
                    logger.log(record, step=st["global_step"])
                    _print_epoch(record, total_epochs, cfg)
                    st["last"] = record
                    r1 = record.get("recall@1", float("nan"))
                    if isinstance(r1, float) and not math.isnan(r1) and r1 > st["best_recall"]:
                        st["best_recall"], st["best_epoch"], st["best"] = r1, epoch + 1, record
                        save(out / "best.pt")
                    try:
                        plot_history(out / "metrics.jsonl", out / "recall_drift.png",
                                     panels=[("recall@1",), ("drift_mean", "drift_max")], x="epoch",
                                     title=f"{cfg.dataset} / {cfg.method}", percent=("recall@1",))
                    except Exception as err:  # plotting must never kill a run
                        print(f"[xbn-metric] warning: could not plot: {err}", file=sys.stderr)
                # every rank keeps the same bookkeeping
                st = _broadcast_state(st, ctx)
            if epoch_done:
                st["epoch"] += 1
                st["step_in_epoch"] = 0
                st["acc"] = _fresh_acc()
            save(out / "last.pt")
            want_stop, = _all_flags(ctx, stop.requested)
            if want_stop and stopped is None and st["epoch"] < total_epochs:
                stopped = "signal"
    _sync_buffers(model, ctx)
    if os.environ.get(DUMP_ENV) and mem_loss is not None:
        Path(os.environ[DUMP_ENV]).mkdir(parents=True, exist_ok=True)
        torch.save({"memory": mem_loss.queue.embeddings.cpu(), "labels": mem_loss.queue.labels.cpu(),
                    "ids": mem_loss.queue.ids.cpu(), "model": {k: v.cpu() for k, v in model.state_dict().items()}},
                   Path(os.environ[DUMP_ENV]) / f"queue_rank{ctx.rank}.pt")
    ctx.barrier()
    logger.finish()
    if ctx.is_main:
        state = {"signal": "stopped by a signal", "max_steps": f"stopped at --max-steps {cfg.max_steps}"}.get(stopped or "", "finished")
        print(f"[{PROG}] {state} at step {st['global_step']}; run folder: {out}", file=sys.stderr, flush=True)
    return {"output_dir": str(out), "best": st["best"], "last": st["last"], "steps": st["global_step"],
            "stopped": stopped, "signal": (stop.signum or signal.SIGTERM) if stopped == "signal" else None,
            "seconds": time.time() - t_start}


def _print_epoch(record: Dict[str, Any], total_epochs: int, cfg: MetricConfig) -> None:
    """One plain line per evaluation on stderr (Recall in %), e.g. for a log file."""
    shown = ", ".join(f"{k.replace('recall@', 'R@').replace('map@r', 'MAP@R')} {100 * v:.2f}%" for k, v in record.items()
                      if k.startswith(("recall@", "map@r")) and isinstance(v, float))
    print(f"[{PROG}] epoch {record['epoch']}/{total_epochs} ({record['phase']}), step {record['step']}: "
          f"loss {record['loss']:.4f}" + (f", {shown}" if shown else ""), file=sys.stderr, flush=True)


def _sync_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank; no-op on one process."""
    if not ctx.is_distributed:
        return
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b.data, src=0)


def _broadcast_state(st: Dict[str, Any], ctx: DistContext) -> Dict[str, Any]:
    if not ctx.is_distributed:
        return st
    import torch.distributed as dist

    box = [st]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
        with _autocast(cfg, device):
            fresh.append(model(x.to(device)).float())  # (b, D)
    model.train(was)
    r = queue_staleness(queue, ids, torch.cat(fresh))
    return {"staleness_mean_l2": r["mean_l2"], "staleness_max_l2": r["max_l2"], "staleness_cosine": r["mean_cosine"],
            "staleness_moment_gap": r["moment_gap"], "staleness_rows": r["count"]}
