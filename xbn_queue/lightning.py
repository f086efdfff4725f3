"""A Lightning callback for a module holding an adaptive memory: warm-up, prefill, drift and staleness logging.

Any ``LightningModule`` that holds an :class:`~xbn_queue.AdaptiveQueue` or a drop-in
(:class:`xbn_queue.pml.AdaptiveCrossBatchMemory`, :class:`xbn_queue.lightly.AdaptiveMemoryBank`) gets
what the trainers (``xbn-metric``, ``xbn-selfsup``) do around their memory::

    from xbn_queue.lightning import AdaptiveQueueCallback
    trainer = L.Trainer(callbacks=[AdaptiveQueueCallback(warmup_steps=100, prefill=True, log_every=50)])

* **Warm-up** (``warmup_steps``): sets the queue's own ``warmup_steps`` (``--memory-warmup-steps`` of
  the trainers), so the drop-ins compute the plain batch loss for that many training steps while the
  memory fills and adapts. A loss written by hand reads ``queue.in_warmup``.
* **Prefill** (``prefill=True``): :func:`xbn_queue.prefill` of the train dataloader's batches, embedded
  by the module in eval mode without gradients, right before the first step whose loss uses the memory
  (the first training step without warm-up; after the warm-up otherwise), once per run (the callback's
  state is in Lightning's checkpoints). The global random state is restored afterwards, so the run
  draws the same shuffles and augmentations with or without it.
* **Drift and staleness** (``log_every=N``): every N optimiser steps, the feature drift of Eq. 5 over
  one step (``dk = 1``) of a fixed probe batch (:func:`xbn_queue.drift.feature_drift`, as the metric
  trainer measures it) and, when the memory stores sample ids that index the training dataset, the
  staleness of the stored rows against fresh embeddings of the same samples
  (:func:`xbn_queue.drift.queue_staleness`), sent to every logger of the trainer (``trainer.loggers``)
  at ``trainer.global_step`` and kept in :attr:`AdaptiveQueueCallback.history`.

Needs the optional package ``lightning`` (``pip install lightning``, included in ``xbn-queue[dev]``).
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

try:
    import lightning as L
except ImportError as err:  # the core needs torch only
    raise ImportError(
        'xbn_queue.lightning needs the optional package "lightning": pip install lightning '
        f'(included in "xbn-queue[dev]") ({err})'
    ) from None

from .drift import feature_drift, queue_staleness
from .prefill import Unpacked, _default_unpack, prefill
from .queue import AdaptiveQueue

__all__ = ["AdaptiveQueueCallback", "find_memory"]

Embed = Callable[[nn.Module, Any], Tensor]


def find_memory(module: nn.Module, name: Optional[str] = None) -> Tuple[Any, AdaptiveQueue]:
    """The memory of ``module``: what :func:`xbn_queue.prefill` writes into, and its :class:`AdaptiveQueue`.

    Args:
        module: the ``LightningModule`` (any ``nn.Module``).
        name: dotted attribute path of the memory (``"criterion"``, ``"criterion.memory_bank"``); an
            ``AdaptiveQueue`` or an object holding one in ``.queue``. ``None``: the one
            ``AdaptiveQueue`` among ``module``'s submodules.

    Returns:
        ``(target, queue)``: ``target`` is the object with the write rule of the memory (a lightly
        drop-in's bank, which has its own ``enqueue``) or the queue itself (the PML drop-in and a plain
        ``AdaptiveQueue``).

    Raises:
        ValueError: ``name`` is not an attribute path of ``module`` or holds no ``AdaptiveQueue``;
            without ``name``, ``module`` holds no ``AdaptiveQueue`` or several.
    """
    if name is not None:
        try:
            obj = operator.attrgetter(name)(module)
        except AttributeError:
            raise ValueError(f"memory={name!r}: {type(module).__name__} has no attribute {name!r}") from None
        queue = obj if isinstance(obj, AdaptiveQueue) else getattr(obj, "queue", None)
        if not isinstance(queue, AdaptiveQueue):
            raise ValueError(
                f"memory={name!r}: {type(obj).__name__} is not an AdaptiveQueue and holds none in .queue"
            )
        return _write_target(obj, queue), queue
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, AdaptiveQueue)]
    if not found:
        raise ValueError(
            f"{type(module).__name__} holds no AdaptiveQueue (nor a drop-in): give it one, or name it with memory=..."
        )
    if len(found) > 1:
        names = ", ".join(repr(n) for n, _ in found)
        raise ValueError(f"{type(module).__name__} holds several AdaptiveQueues ({names}): name one with memory=...")
    queue = found[0][1]
    owner = next((m for _, m in module.named_modules() if m is not queue and getattr(m, "queue", None) is queue), queue)
    return _write_target(owner, queue), queue


def _write_target(obj: Any, queue: AdaptiveQueue) -> Any:
    # a lightly bank writes with lightly's rule (its own enqueue); the PML drop-in's rows go into its queue
    return obj if obj is not queue and callable(getattr(obj, "enqueue", None)) else queue


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; every submodule's mode is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{' or None' if allow_none else ''}, got {value!r}")
    return value


class AdaptiveQueueCallback(L.Callback):
    """Warm-up, prefill, and drift / staleness logging for a ``LightningModule`` holding an adaptive memory.

    Args:
        memory: dotted attribute path of the memory in the module (an ``AdaptiveQueue`` or a drop-in);
            ``None``: the one ``AdaptiveQueue`` the module holds (see :func:`find_memory`).
        warmup_steps: set the queue's ``warmup_steps`` at the start of ``fit``: the memory stays out of
            the drop-ins' loss for this many training steps (batches, calls of the queue's ``update``);
            ``None`` leaves the queue's own setting.
        prefill: fill the memory from the train dataloader right before the first step that uses it.
        prefill_rows: rows this process writes (default: the memory's size; divided by the number of
            processes when the queue gathers across them, ``gather_distributed=True``).
        log_every: log drift and staleness every this many optimiser steps (0: never).
        probe_size: samples of the fixed probe batch (the training dataset's first ones; a smaller
            dataset gives all of its samples).
        probe: the probe inputs ``(N, ...)`` instead of the dataset's first samples.
        staleness_samples: at most this many distinct stored sample ids are re-embedded (evenly spaced
            over the sorted ids, in batches of ``probe_size``) for the staleness.
        dataset: what the stored ids index (``dataset[id]`` is a sample that ``unpack`` reads after
            collation), for the staleness; default: the train dataloader's dataset.
        embed: ``embed(module, x) -> (B, D)`` embeddings as the memory stores them; default
            ``module(x)``. Used by the prefill, the probe and the staleness.
        unpack: ``batch -> (x, labels or None, ids or None)``; default: ``x``, ``(x, labels)`` or
            ``(x, labels, ids)``.
        prefix: prefix of the logged keys.

    Logged keys (with the default prefix ``memory/``): ``rows`` and ``in_warmup`` (the queue's
    fill and warm-up state); ``drift_mean``, ``drift_max`` (:func:`~xbn_queue.drift.feature_drift` of
    the probe's embeddings after the step against before it); when the queue stores ids,
    ``staleness_mean_l2``, ``staleness_max_l2``, ``staleness_cosine``, ``staleness_moment_gap``,
    ``staleness_rows`` (:func:`~xbn_queue.drift.queue_staleness`); once, ``prefill_rows``.
    Measurements run on global rank 0 only; the prefill on every rank.

    Raises:
        ValueError: on a bad argument here; at ``fit``'s setup, when the memory cannot be found
            (:func:`find_memory`).
    """

    def __init__(
        self,
        memory: Optional[str] = None,
        *,
        warmup_steps: Optional[int] = None,
        prefill: bool = False,
        prefill_rows: Optional[int] = None,
        log_every: int = 0,
        probe_size: int = 64,
        probe: Optional[Tensor] = None,
        staleness_samples: int = 256,
        dataset: Any = None,
        embed: Optional[Embed] = None,
        unpack: Callable[[Any], Unpacked] = _default_unpack,
        prefix: str = "memory/",
    ) -> None:
        super().__init__()
        self.memory_name = memory
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0, allow_none=True)
        self.prefill = bool(prefill)
        self.prefill_rows = _check_int("prefill_rows", prefill_rows, 1, allow_none=True)
        self.log_every = _check_int("log_every", log_every, 0)
        self.probe_size = _check_int("probe_size", probe_size, 1)
        self.staleness_samples = _check_int("staleness_samples", staleness_samples, 1)
        if probe is not None and (not isinstance(probe, Tensor) or probe.dim() < 1 or probe.shape[0] == 0):
            raise ValueError(f"probe must be a tensor (N, ...) with N >= 1, got {getattr(probe, 'shape', type(probe))}")
        self.probe = probe
        self.dataset = dataset
        self.embed = embed
        self.unpack = unpack
        self.prefix = prefix
        self.prefilled = False  # in the checkpoint: a resumed run does not prefill again
        self.history: List[Dict[str, float]] = []  # every logged record, with its "step"
        self._target: Any = None
        self._queue: Optional[AdaptiveQueue] = None
        self._probe_x: Any = None
        self._z_before: Optional[Tensor] = None
        self._measured_step = -1

    # ------------------------------------------------------------------ state
    @property
    def queue(self) -> AdaptiveQueue:
        """The module's queue (found at ``fit``'s setup)."""
        if self._queue is None:
            raise RuntimeError("AdaptiveQueueCallback: the memory is found when trainer.fit starts")
        return self._queue

    def state_dict(self) -> Dict[str, Any]:
        return {"prefilled": self.prefilled}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.prefilled = bool(state_dict.get("prefilled", False))

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self._target, self._queue = find_memory(pl_module, self.memory_name)
        if self.warmup_steps is not None:
            self._queue.warmup_steps = self.warmup_steps  # read by queue.in_warmup, as --memory-warmup-steps sets it

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if self.log_every and trainer.is_global_zero:
            self._probe_x = self.probe if self.probe is not None else self._first_samples(trainer)

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        queue = self.queue
        if self.prefill and not self.prefilled and queue.num_steps == queue.warmup_steps:
            written = self._prefill(trainer, pl_module)
            self.prefilled = True
            self._log(trainer, {"prefill_rows": float(written)})
        step = trainer.global_step
        if self.log_every and trainer.is_global_zero and step % self.log_every == 0 and step != self._measured_step:
            self._measured_step = step  # once per optimiser step (gradient accumulation calls this per batch)
            self._z_before = self._embed(pl_module, self._probe_x)  # (N, D)

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._z_before is None or trainer.global_step == self._measured_step:  # no optimiser step yet
            return
        z_before, self._z_before = self._z_before, None
        d = feature_drift(self._embed(pl_module, self._probe_x), z_before)
        queue = self.queue
        record = {"rows": float(len(queue)), "in_warmup": float(queue.in_warmup),
                  "drift_mean": d["mean"], "drift_max": d["max"]}
        record.update(self._staleness(trainer, pl_module))
        self._log(trainer, record)

    # ------------------------------------------------------------------ steps
    def _prefill(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> int:
        """:func:`xbn_queue.prefill` from the train dataloader; the global random state is left as it was."""
        queue = self.queue
        rows = self.prefill_rows
        if rows is None:
            rows = queue.size // trainer.world_size if queue.gather_distributed else queue.size
        rows = min(rows, queue.size)
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # a shuffling sampler, random transforms: not the run's draws
            return prefill(self._target, pl_module, trainer.train_dataloader, rows=rows, embed=self.embed,
                           unpack=self.unpack, device=pl_module.device, progress=False)

    def _embed(self, pl_module: nn.Module, x: Any) -> Tensor:
        """(N, ...) inputs -> (N, D) float32 embeddings, in eval mode without gradients."""
        x = x.to(pl_module.device) if isinstance(x, Tensor) else x
        with _eval_mode(pl_module):
            z = self.embed(pl_module, x) if self.embed is not None else pl_module(x)
        return z.detach().float()

    def _dataset(self, trainer: "L.Trainer") -> Any:
        return self.dataset if self.dataset is not None else trainer.train_dataloader.dataset

    def _collate(self, trainer: "L.Trainer", indices: List[int]) -> Any:
        loader = trainer.train_dataloader
        collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
        dataset = self._dataset(trainer)
        return collate([dataset[i] for i in indices])

    def _first_samples(self, trainer: "L.Trainer") -> Any:
        n = min(self.probe_size, len(self._dataset(trainer)))
        with torch.random.fork_rng(devices=[]):  # random transforms: not the run's draws
            return self.unpack(self._collate(trainer, list(range(n))))[0]

    def _staleness(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> Dict[str, float]:
        """Stored rows against fresh embeddings of the same samples (:func:`xbn_queue.drift.queue_staleness`)."""
        queue = self.queue
        stored_ids = queue.ids  # (n,) or None
        if stored_ids is None or stored_ids.numel() == 0:
            return {}
        ids = torch.unique(stored_ids)  # (u,) sorted
        if ids.numel() > self.staleness_samples:  # evenly spaced over the stored ids, as the metric trainer does
            ids = ids[torch.linspace(0, ids.numel() - 1, self.staleness_samples).round().long().to(ids.device)]
        chosen = ids.tolist()
        fresh = []
        with torch.random.fork_rng(devices=[]):
            for start in range(0, len(chosen), self.probe_size):
                x = self.unpack(self._collate(trainer, chosen[start : start + self.probe_size]))[0]
                fresh.append(self._embed(pl_module, x))  # (b, D)
        r = queue_staleness(queue, ids, torch.cat(fresh))
        return {"staleness_mean_l2": r["mean_l2"], "staleness_max_l2": r["max_l2"],
                "staleness_cosine": r["mean_cosine"], "staleness_moment_gap": r["moment_gap"],
                "staleness_rows": float(r["count"])}

    def _log(self, trainer: "L.Trainer", record: Dict[str, float]) -> None:
        metrics = {self.prefix + k: v for k, v in record.items()}
        self.history.append({"step": trainer.global_step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
