"""The run loop both trainers share: it owns *when* (stopping, the epoch's end, precision, checks, saving).

A run, in :meth:`RunLoop.fit` and :meth:`RunLoop.run_epochs`::

    __init__: setup()            # check() (nothing written), read_resume() (--resume's checkpoint read: a
                                 #   corrupt file is refused here), then build(): data, model, memory, optimiser
    resume_if_asked()            # load_state(last.pt): model, memory, optimiser, RNG, RunState
    prepare_run_folder()         # the first write (rank 0), between two barriers: lock, config.yaml
    on_run_start                 # callbacks: open metrics.jsonl / W&B
    while not finished():
        start_epoch()
        train_one_epoch()        # per batch: train_step(batch), advance, on_step_end, stop_request()
        close_epoch()            # end_epoch(evaluate=evaluation_due()), next epoch, on_epoch_end
                                 #   (skipped only for a signal inside an epoch)
    on_train_end                 # callbacks: last.pt unless it holds this step
    finish()                     # on_run_end: plot, close the logger; returns a RunSummary

**The one stop rule.** After every step the loop asks :meth:`stop_request` (a signal on any rank, then
``max_steps``); a non-finite embedding or loss raises :class:`NonFiniteError` from :meth:`check_finite`
before the memory or the optimiser is touched. A signal inside an epoch stops at once (``last.pt`` of
that step). A stop at the step that ends an epoch, and ``max_steps`` anywhere, first finish the
epoch's bookkeeping (evaluation when due, the record, ``best.pt``, ``last.pt``); a run that is then
complete reports itself complete (``max_steps`` when it was reached), otherwise it stops.

A trainer supplies *what* (at most eight hooks): :meth:`check`, :meth:`build`, :meth:`start_epoch`,
:meth:`batches`, :meth:`train_step`, :meth:`end_epoch`, :meth:`checkpoint_state` and :meth:`load_state`
(both extend the base's layout). The product's side work (checkpoints, ``metrics.jsonl`` / W&B, the
progress bar, a trainer's printed lines and plot) is done by :class:`Callback` objects, as a user's or
a test's would be. An error after the run folder was written is marked
(:func:`~xbn_queue.training.cli.mark_started`), so that the command line never reports it as bad input.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from xbn_queue.training.checkpoint import (CheckpointError, IncompatibleCheckpointError, atomic_save, load_checkpoint,
                                           resolve_resume)
from xbn_queue.training.cli import (FolderLock, UsageError, check_output_dir, choose_output_dir, mark_started,
                                   one_line, prepare_output_dir)
from xbn_queue.training.config import config_to_dict, save_config
from xbn_queue.training.distributed import DistContext, init_distributed
from xbn_queue.training.precision import amp_dtype, amp_enabled, autocast, backward_step, grad_scaler
from xbn_queue.training.progress import progress
from xbn_queue.training.rng import get_rng_state, set_rng_state
from xbn_queue.training.signals import GracefulExit
from xbn_queue.training.tracking import RunLogger, WandbReport

__all__ = ["RunLoop", "RunState", "RunSummary", "Callback", "Checkpointer", "Tracking", "ProgressBar",
           "NonFiniteError", "with_output_dir", "autocast", "amp_dtype", "wrap_ddp", "any_rank", "all_finite",
           "broadcast_buffers", "Stop", "Reason", "CHECKPOINT_FORMAT"]

#: Why a run stopped early: ``None`` (it did not), ``"signal"`` or ``"max_steps"``.
Stop = Optional[str]
#: The former name of :data:`Stop`.
Reason = Stop

#: The checkpoint layout written by :meth:`RunLoop.checkpoint_state` (both trainers): ``format``, ``config``,
#: ``meta``, ``state`` (:meth:`RunState.to_dict`), ``rng``, ``scaler``, then the trainer's own entries.
#: Format 1 (xbn-metric 0.2 - 0.4) had the same top level; xbn-selfsup 0.4 and before kept the state flat.
CHECKPOINT_FORMAT = 2


class NonFiniteError(RuntimeError):
    """A non-finite embedding or loss; the run stopped, the message names the step and the checkpoint kept."""


@dataclasses.dataclass
class RunState:
    """Where a run stands; every field goes into the checkpoint (:meth:`to_dict` / :meth:`from_dict`).

    A trainer subclasses it with its own fields; those named in ``epoch_sums`` return to their defaults
    when the epoch advances.

    Attributes:
        epoch: The epoch being trained (0-based); equals the number of finished epochs between epochs.
        step_in_epoch: Steps of ``epoch`` already taken.
        global_step: Steps taken in the whole run.
        best: The best evaluation's record (``{}`` when the trainer keeps none).
        last: The last evaluation's record.
        record_pending: Only read from checkpoints that xbn-selfsup 0.4 and earlier wrote when a signal
            came at an epoch's last step: that epoch's bookkeeping is still to do (the resumed run does
            it first). The loop never sets it: it finishes the bookkeeping before it stops.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: Dict[str, Any] = dataclasses.field(default_factory=dict)
    last: Dict[str, Any] = dataclasses.field(default_factory=dict)
    record_pending: bool = False

    #: Fields that restart from their default at each epoch (running sums of the open epoch).
    epoch_sums: ClassVar[Tuple[str, ...]] = ()

    def advance(self) -> None:
        """One more step taken."""
        self.global_step += 1
        self.step_in_epoch += 1

    def next_epoch(self) -> None:
        """The epoch is finished: the position moves to the start of the next one, its sums restart."""
        self.epoch += 1
        self.step_in_epoch = 0
        self.record_pending = False
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in self.epoch_sums:
            setattr(self, name, defaults[name])

    def values(self) -> Dict[str, Any]:
        """The headline numbers a :class:`RunSummary` carries besides best and last (none here)."""
        return {}

    def to_dict(self) -> Dict[str, Any]:
        """Every field as plain Python values (the checkpoint's ``state`` entry)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunState":
        """The state saved by :meth:`to_dict`; a missing key keeps its default, an unknown key is ignored."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.init and f.name in d})


@dataclasses.dataclass
class RunSummary:
    """What a run returns (on every rank).

    Attributes:
        output_dir: The run folder.
        global_step: Steps taken in the whole run (resumed runs included).
        stopped: ``None`` (trained to the end), ``"signal"`` or ``"max_steps"``.
        signal: The signal number when ``stopped == "signal"``.
        seconds: Wall time of this invocation's training.
        already_complete: ``--resume`` found a finished run; nothing was trained or written.
        best: The best evaluation's record (``{}`` when the trainer keeps none).
        last: The last evaluation's record.
        values: The trainer's headline numbers (e.g. ``knn_acc``, ``loss``), merged into :meth:`to_dict`.
    """

    output_dir: str
    global_step: int
    stopped: Stop = None
    signal: Optional[int] = None
    seconds: float = 0.0
    already_complete: bool = False
    best: Dict[str, Any] = dataclasses.field(default_factory=dict)
    last: Dict[str, Any] = dataclasses.field(default_factory=dict)
    values: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """A plain dictionary: every field but ``values``, and the entries of ``values``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "values"}
        out.update(self.values)
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunSummary":
        """The inverse of :meth:`to_dict`: unknown keys go to ``values``, missing ones keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)} - {"values"}
        return cls(**{k: v for k, v in d.items() if k in names}, values={k: v for k, v in d.items() if k not in names})


class Callback:
    """Hooks into a run; every method is optional. Called on every rank, in the order given.

    ``loop.state`` is the live :class:`RunState`; ``loop.stop`` the run's
    :class:`~xbn_queue.training.signals.GracefulExit` (``loop.stop.requested``); ``loop.step_loss`` the
    last step's loss. The product's own callbacks (:class:`Tracking`, :class:`ProgressBar`, the trainer's,
    :class:`Checkpointer`) come first, so a user's callback sees a hook after the checkpoint it caused::

        on_run_start
        ( on_epoch_start
          ( [on_checkpoint("last.pt") every --checkpoint-every steps] on_step_end )*
          [on_checkpoint("best.pt")] on_checkpoint("last.pt") on_epoch_end )*      (not for a signal inside an epoch)
        [on_checkpoint("last.pt") when the run stopped inside an epoch] on_train_end
        on_run_end                                       (on_exception instead, on an error after on_run_start)
    """

    def on_run_start(self, loop: "RunLoop") -> None:
        """After the run folder is prepared, before the first step."""

    def on_epoch_start(self, loop: "RunLoop") -> None:
        """Before the epoch's first remaining step."""

    def on_step_end(self, loop: "RunLoop") -> None:
        """After each optimiser step (``loop.state.global_step`` counts it), before the stop request is read."""

    def on_epoch_end(self, loop: "RunLoop", record: Dict[str, Any]) -> None:
        """After the epoch's bookkeeping (``record``: what :meth:`RunLoop.end_epoch` returned, ``{}`` for none).

        The state has moved to the next epoch when this one was complete; ``max_steps`` and the
        epoch's last step with a signal end here too.
        """

    def on_checkpoint(self, loop: "RunLoop", path: Path) -> None:
        """After a checkpoint was written (rank 0 writes; every rank is called)."""

    def on_train_end(self, loop: "RunLoop", stop: Stop) -> None:
        """After the last step and its bookkeeping (``stop``: why the run stops, ``None`` at its end)."""

    def on_run_end(self, loop: "RunLoop", summary: RunSummary) -> None:
        """After the last checkpoint, before the final line and before the process group is released."""

    def on_exception(self, loop: "RunLoop", err: BaseException) -> None:
        """The run failed after :meth:`on_run_start` (the error is raised again afterwards)."""


class Tracking(Callback):
    """``metrics.jsonl`` and W&B (:class:`~xbn_queue.training.tracking.RunLogger`, rank 0): opened at the run's
    start, every epoch record logged, closed at its end or on an error."""

    def on_run_start(self, loop: "RunLoop") -> None:
        loop.logger = loop.open_logger()

    def on_epoch_end(self, loop: "RunLoop", record: Dict[str, Any]) -> None:
        if record:
            loop.log(record)

    def on_run_end(self, loop: "RunLoop", summary: RunSummary) -> None:
        if loop.logger is not None:
            loop.logger.finish()

    def on_exception(self, loop: "RunLoop", err: BaseException) -> None:
        if loop.logger is not None:
            loop.logger.finish(failed=True)  # W&B marks the run failed and logs no model artifact


class ProgressBar(Callback):
    """The epoch's progress bar (:func:`~xbn_queue.training.progress.progress`: a bar on a terminal, plain
    lines in a log file, nothing on other ranks or with ``--no-progress``), the step's loss beside it."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.ticks: Optional[Iterator[int]] = None

    def on_epoch_start(self, loop: "RunLoop") -> None:
        total = loop.steps_per_epoch - loop.state.step_in_epoch
        self.bar = progress(range(total), total=total, desc=loop.epoch_description(),
                            enabled=getattr(loop.cfg, "progress", None), leave=False)
        self.ticks = iter(self.bar)
        next(self.ticks, None)  # the bar counts a step when the next one is asked for

    def on_step_end(self, loop: "RunLoop") -> None:
        if self.ticks is not None:
            next(self.ticks, None)
            self.bar.set_postfix(loss=f"{loop.step_loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self.ticks = None

    def on_epoch_end(self, loop: "RunLoop", record: Dict[str, Any]) -> None:
        self.close()

    def on_train_end(self, loop: "RunLoop", stop: Stop) -> None:
        self.close()

    def on_exception(self, loop: "RunLoop", err: BaseException) -> None:
        self.close()


class Checkpointer(Callback):
    """``last.pt``: every ``--checkpoint-every`` steps inside an epoch, after every epoch's bookkeeping, and
    when the run stops (unless ``last.pt`` already holds that step)."""

    def on_step_end(self, loop: "RunLoop") -> None:
        if loop.checkpoint_due() and not loop.epoch_done() and not loop.max_steps_reached():
            loop.save_checkpoint()

    def on_epoch_end(self, loop: "RunLoop", record: Dict[str, Any]) -> None:
        loop.save_checkpoint()

    def on_train_end(self, loop: "RunLoop", stop: Stop) -> None:
        loop.save_checkpoint(unless_current=True)


def _file_stamp(path: Path) -> Optional[tuple]:
    """``(size, mtime_ns, inode)`` of a file, ``None`` when it is gone: whether it was rewritten since."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def with_output_dir(cfg: Any, runs_dir: str, *parts: str) -> Any:
    """``cfg`` with ``output_dir`` filled: the folder of ``--resume PATH``, else ``runs_dir/<parts>-<timestamp>``.

    Raises:
        UsageError: a bare ``--resume`` without ``--output-dir`` (there is no run to continue in a new folder).
    """
    if cfg.output_dir:
        return cfg
    return dataclasses.replace(cfg, output_dir=choose_output_dir(None, cfg.resume, runs_dir, *parts))


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` under several processes, ``model`` itself otherwise."""
    if not ctx.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def any_rank(ctx: DistContext, *flags: bool) -> List[bool]:
    """Logical OR of each flag over all ranks (one collective; none on a single process)."""
    if not ctx.is_distributed:
        return list(flags)
    import torch.distributed as dist

    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_finite(ctx: DistContext, *tensors: torch.Tensor) -> bool:
    """True when every value of every tensor is finite on every rank.

    The flag is reduced on the device, then over the ranks by one all-reduce (none without a process
    group), and read once on the host: every rank gets the same answer, so every rank stops together.
    """
    flags = [torch.isfinite(t.detach()).all().reshape(1) for t in tensors]  # (1,) bool each, on its device
    ok = flags[0] if len(flags) == 1 else torch.cat([f.to(flags[0].device) for f in flags]).all().reshape(1)
    if not ctx.is_distributed:
        return bool(ok)
    import torch.distributed as dist

    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    bad = (~ok).to(device=device, dtype=torch.int32)  # (1,) 1 where this rank saw a NaN/Inf
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank (timm's ``distribute_bn``); no-op on one process.

    DDP broadcasts rank 0's buffers at the start of each forward, so after the last training forward
    every rank holds statistics updated with its own batch: evaluate (and checkpoint) rank 0's model.
    """
    if not ctx.is_distributed:
        return
    from timm.utils import distribute_bn

    distribute_bn(model, ctx.world_size, reduce=False)


class RunLoop:
    """One training run in named steps; trainers subclass it (see the module docstring).

    Construction checks and builds (:meth:`setup`); nothing is written before :meth:`fit`.

    Args:
        cfg: The trainer's configuration dataclass (``output_dir``, ``resume``, ``overwrite``, ``device``,
            ``amp``, ``max_steps`` (``None``: no limit), ``checkpoint_every``, ``progress``, ``wandb_*`` are
            read here).
        callbacks: Hooks called during the run, after the product's own.
        side_work: The trainer's own callbacks (its printed lines, ``best.pt``, its plot), called after
            :class:`Tracking` and :class:`ProgressBar`, before :class:`Checkpointer`.

    Class attributes a subclass sets: ``prog`` (the command, e.g. ``"xbn-metric"``, also the checkpoint
    kind), ``checkpoint_keys`` (keys every checkpoint of the trainer has), ``state_class`` (its
    :class:`RunState`), ``wandb_report`` (what its W&B run reports besides the records,
    :class:`~xbn_queue.training.tracking.WandbReport`).
    """

    prog: str = "xbn-queue"
    checkpoint_keys: Sequence[str] = ()
    state_class: type = RunState
    wandb_report: Optional[WandbReport] = None  # job type, tags, summary and model artifact of the W&B run

    def __init__(self, cfg: Any, callbacks: Iterable[Callback] = (), side_work: Iterable[Callback] = ()) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.state = self.state_class()
        self.max_steps: Optional[int] = cfg.max_steps  # None: no limit
        self.stop = GracefulExit(enabled=False)
        self.resumed_from: Optional[Path] = None
        self.last_checkpoint: Optional[Path] = None
        self.logger: Optional[RunLogger] = None
        self._saved_step = self._saved_epoch = -1
        self._resumed_stamp: Optional[tuple] = None
        #: ``--resume``'s checkpoint, read by :meth:`read_resume` before the build, restored by :meth:`resume_if_asked`.
        self._pending_resume: Optional[Tuple[Path, Dict[str, Any]]] = None
        #: Held by rank 0 from :meth:`prepare_run_folder` to the end of :meth:`fit`.
        self.folder_lock = FolderLock(self.out, "--output-dir", what=f"an {self.prog} run", prog=self.prog)
        #: Set by :meth:`build`: steps per epoch, epochs, evaluation every N epochs (0: only the last), the
        #: optimiser :meth:`backward_step` steps, the model whose buffers ranks agree on at the end, the recipe line.
        self.steps_per_epoch = 0
        self.total_epochs = 0
        self.eval_every = 1
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.model: Optional[nn.Module] = None
        self.recipe = ""
        #: What a checkpoint records about the run besides its configuration (``world_size`` is added).
        self.meta: Dict[str, Any] = {}
        #: Shown beside the progress bar's epoch (e.g. ``"warm-up"``).
        self.phase = ""
        #: The open epoch: when its first step of this invocation began, its steps taken, the last step's loss.
        self.epoch_started = time.perf_counter()
        self.steps_this_epoch = 0
        self.step_loss = float("nan")
        #: The product's side work first (the trainer's between the logger and ``last.pt``), then ``callbacks``.
        self.callbacks: List[Callback] = [Tracking(), ProgressBar(), *side_work, Checkpointer(), *callbacks]
        self.ctx: DistContext = init_distributed(cfg.device)
        self.device = self.ctx.device
        self.amp = amp_enabled(cfg.amp, self.device)  # --amp on CUDA (xbn_queue.training.precision)
        self.scaler = grad_scaler(cfg.amp, self.device)  # the run's one loss scaler (float16 only)
        try:
            self.setup()
        except BaseException:
            self.close()
            raise

    def setup(self) -> None:
        """Check everything (nothing is written), read ``--resume``'s checkpoint, then build."""
        self.check()
        self.read_resume()
        self.build()

    def read_resume(self) -> None:
        """With ``--resume``: find and read the checkpoint before anything is built, so that a corrupt or
        truncated file is refused at once (one line, exit 2); :meth:`resume_if_asked` restores it after the build.

        Raises:
            CheckpointError: not a readable checkpoint of this trainer.
        """
        path = resolve_resume(self.cfg.resume, self.out) if self.cfg.resume else None
        if path is not None:
            stamp = _file_stamp(Path(path))  # taken before reading: a rewrite during the read is noticed later
            ckpt = load_checkpoint(path, map_location="cpu", kind=self.prog, required_keys=tuple(self.checkpoint_keys))
            self._pending_resume, self._resumed_stamp = (Path(path), ckpt), stamp

    def close(self) -> None:
        """Release the process group (if this run created it)."""
        self.ctx.cleanup()

    # ----------------------------------------------------------------------------------- the run
    def fit(self) -> RunSummary:
        """Train (or resume) to the end, a signal or ``max_steps``; see the module docstring."""
        self.resume_if_asked()
        if self.resumed_from is not None and self.finished():
            return self.already_complete()
        try:
            self.prepare_run_folder()  # takes the folder's lock; a refusal there is bad input (exit 2)
            try:
                return self.run_epochs()
            except NonFiniteError:  # its message names the step and the checkpoint kept
                raise
            except Exception as err:  # the folder is written: never "bad input, nothing written" (exit 2)
                mark_started(err, self.where_stopped())
                raise
        finally:
            self.folder_lock.release()

    def run_epochs(self) -> RunSummary:
        """The epochs, from where the state stands to the end, a signal or ``max_steps`` (the one stop rule)."""
        stop: Stop = None
        t_start = time.time()
        with GracefulExit(enabled=True, verbose=self.ctx.is_main) as self.stop:
            self.emit("on_run_start")
            try:
                while stop is None and not self.finished():
                    self.start_epoch()
                    stop = self.train_one_epoch()
                    if stop != "signal" or self.epoch_done():  # a signal inside an epoch skips the bookkeeping
                        self.close_epoch()
                        if self.max_steps_reached():
                            stop = "max_steps"
                        elif self.finished():
                            stop = None  # complete: a signal at the run's last step changes nothing
                    if stop is None and not self.finished() and self.stop_requested():
                        stop = "signal"  # arrived during the bookkeeping
                self.emit("on_train_end", stop)
            except BaseException as err:
                self.emit("on_exception", err)
                raise
        return self.finish(stop, time.time() - t_start)

    def train_one_epoch(self) -> Stop:
        """The epoch's remaining steps; returns why they stopped early (``None``: the epoch is done)."""
        self.epoch_started, self.steps_this_epoch = time.perf_counter(), 0
        if self.max_steps_reached():  # only after a resume of a run stopped there (its bookkeeping pending)
            return "max_steps"
        self.emit("on_epoch_start")
        for batch in self.batches():
            self.step_loss = self.train_step(batch)
            self.state.advance()
            self.steps_this_epoch += 1
            self.emit("on_step_end")
            stop = self.stop_request()
            if stop is not None or self.epoch_done():
                return stop
        return None

    def close_epoch(self) -> None:
        """The epoch's bookkeeping: :meth:`end_epoch` (evaluating when due), the next epoch when this one is
        complete, then ``on_epoch_end`` (the record logged, ``best.pt``, ``last.pt``)."""
        record = self.end_epoch(self.evaluation_due())
        if self.epoch_done():
            self.state.next_epoch()
        self.emit("on_epoch_end", record or {})

    # ---------------------------------------------------------------------- when: the loop decides
    def finished(self) -> bool:
        """Nothing is left to train: every epoch done, or ``max_steps`` taken (and its bookkeeping done)."""
        if self.state.record_pending:
            return False
        return self.state.epoch >= self.total_epochs or self.max_steps_reached()

    def max_steps_reached(self) -> bool:
        """``max_steps`` steps taken (never with ``max_steps=None``)."""
        return self.max_steps is not None and self.state.global_step >= self.max_steps

    def epoch_done(self) -> bool:
        """Every step of the current epoch taken (its bookkeeping may still be due)."""
        return self.state.step_in_epoch >= self.steps_per_epoch

    def evaluation_due(self) -> bool:
        """At an epoch's end every ``eval_every`` epochs (0: none but the last) and after the last; at ``max_steps``."""
        if self.max_steps_reached():
            return True
        if not self.epoch_done():
            return False
        number = self.state.epoch + 1
        return number >= self.total_epochs or (self.eval_every > 0 and number % self.eval_every == 0)

    def stop_request(self) -> Stop:
        """After a step: ``"signal"`` (any rank; every rank stops at the same step), ``"max_steps"`` or ``None``."""
        if self.stop_requested():
            return "signal"
        return "max_steps" if self.max_steps_reached() else None

    def stop_requested(self) -> bool:
        """True when any rank received a signal (one collective)."""
        return any_rank(self.ctx, self.stop.requested)[0]

    def checkpoint_due(self) -> bool:
        """``--checkpoint-every N``: a checkpoint after every N-th step."""
        every = self.cfg.checkpoint_every or 0
        return every > 0 and self.state.global_step % every == 0

    def emit(self, hook: str, *args: Any) -> None:
        """Call ``hook`` of every callback, in order."""
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def where_stopped(self) -> str:
        """What a failed run left: its folder, the step, the checkpoint and how to continue."""
        kept = (f"{self.last_checkpoint} holds step {self._saved_step}" if self.last_checkpoint
                else "no checkpoint was written yet")
        return (f"the run in {self.out} stopped after step {self.state.global_step} ({kept}): continue it with "
                f"--resume once fixed")

    # ------------------------------------------------------------------- what: a trainer supplies
    def check(self) -> None:
        """Every check of options, folder, data and memory; raises before anything is written."""
        raise NotImplementedError

    def build(self) -> None:
        """Data pipeline, model, memory, optimiser; sets ``steps_per_epoch``, ``total_epochs``, ``optimizer``."""
        raise NotImplementedError

    def start_epoch(self) -> None:
        """Per-epoch setup before the first batch (e.g. a phase change); nothing by default."""

    def batches(self) -> Iterator[Any]:
        """The remaining batches of ``state.epoch`` from ``state.step_in_epoch`` on."""
        raise NotImplementedError

    def train_step(self, batch: Any) -> float:
        """One step; returns the loss. The order: embeddings, ``check_finite(embeddings)``, the loss with the
        batch held back from the memory (adapt, loss), ``check_finite(loss)``, the batch into the memory,
        ``backward_step(loss)``."""
        raise NotImplementedError

    def end_epoch(self, evaluate: bool) -> Dict[str, Any]:
        """The epoch's bookkeeping before it advances: evaluation when ``evaluate``, the schedule, best.

        Returns:
            The record to log (``{}``: nothing to log on this rank).
        """
        raise NotImplementedError

    def checkpoint_state(self) -> Dict[str, Any]:
        """Everything ``last.pt`` holds; a trainer adds its modules to ``super().checkpoint_state()``."""
        return {"format": CHECKPOINT_FORMAT, "config": config_to_dict(self.cfg), "meta": {"world_size": self.ctx.world_size, **self.meta},
                "state": self.state.to_dict(), "rng": get_rng_state(), "scaler": self.scaler.state_dict()}

    def load_state(self, ckpt: Dict[str, Any], path: Path) -> None:
        """Restore the run state, loss scaler and RNG from ``ckpt`` (any layout since 0.2).

        A trainer first refuses a checkpoint of another configuration (``check_compatible``, raising
        :class:`~xbn_queue.training.checkpoint.IncompatibleCheckpointError`), restores its modules, then
        calls this.
        """
        flat = ckpt.get("state") if isinstance(ckpt.get("state"), dict) else ckpt  # xbn-selfsup <= 0.4: flat
        self.state = self.state_class.from_dict(flat)
        if ckpt.get("scaler"):  # None or {} without float16 AMP
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])

    # ------------------------------------------------------------------------- the shared steps
    def epoch_description(self) -> str:
        """The progress bar's label."""
        return f"epoch {self.state.epoch + 1}/{self.total_epochs}" + (f" ({self.phase})" if self.phase else "")

    def resume_if_asked(self) -> None:
        """With ``--resume``: restore the run from its checkpoint (``resumed_from`` is set)."""
        if self._pending_resume is None and self.cfg.resume:  # a subclass that did not run setup()
            self.read_resume()
        if self._pending_resume is not None:
            path, ckpt = self._pending_resume
            self._pending_resume = None  # the checkpoint's tensors are not kept beyond the restore
            self.restore(path, ckpt)
            self.resumed_from = path
        elif self.cfg.resume and self.ctx.is_main:
            self.say(f"--resume: no checkpoint in {self.out}, starting a new run")

    def restore(self, path: Path, ckpt: Optional[Dict[str, Any]] = None) -> None:
        """Model, memory, optimiser, RNG and position from the checkpoint at ``path`` (``ckpt``: already read).

        Raises:
            CheckpointError: not a readable checkpoint of this trainer (one line).
            ValueError: a checkpoint of an incompatible configuration (one line naming the keys).
        """
        if ckpt is None:
            self._resumed_stamp = _file_stamp(Path(path))
            ckpt = load_checkpoint(path, map_location="cpu", kind=self.prog, required_keys=tuple(self.checkpoint_keys))
        try:
            self.load_state(ckpt, Path(path))
        except IncompatibleCheckpointError:
            raise
        except (RuntimeError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable {self.prog} checkpoint (the state does not load: "
                                  f"{one_line(err)[:160]})") from None
        self.last_checkpoint = Path(path)
        self._saved_step, self._saved_epoch = self.state.global_step, self.state.epoch

    def already_complete(self) -> RunSummary:
        """``--resume`` found a finished run: say so, write nothing."""
        if self.ctx.is_main:
            self.say(f"{self.out} is already complete (epoch {self.state.epoch} of {self.total_epochs}, step "
                     f"{self.state.global_step}): nothing to train")
        st = self.state
        return RunSummary(str(self.out), st.global_step, already_complete=True, best=st.best, last=st.last,
                          values=st.values())

    def lock_run_folder(self) -> None:
        """Rank 0 takes the run folder's lock (:class:`~xbn_queue.training.cli.FolderLock`) and checks the folder
        again under it: another run may have written into it since :meth:`check`. Every rank raises when it fails.

        Raises:
            UsageError: the folder is in use by another process (naming it), or now holds a run (a new run
                without ``--overwrite``), or its checkpoint changed since ``--resume`` read it.
        """
        error: Optional[UsageError] = None
        if self.ctx.is_main:
            try:
                self.folder_lock.acquire()
                check_output_dir(self.out, resume=bool(self.cfg.resume), overwrite=self.cfg.overwrite)
                if self.resumed_from is not None and _file_stamp(self.resumed_from) != self._resumed_stamp:
                    raise UsageError(f"--resume: {self.resumed_from} changed since it was read (another run wrote "
                                     "into this folder); resume again")
            except UsageError as err:
                self.folder_lock.release()
                error = err
        if any_rank(self.ctx, error is not None)[0]:
            raise error or UsageError(f"--output-dir {self.out}: refused on rank 0 (see its message)")

    def prepare_run_folder(self) -> None:
        """The first write: the lock, the folder (emptied with ``--overwrite``), ``config.yaml``, the opening lines."""
        self.ctx.barrier()  # every rank has checked the folder before rank 0 creates anything in it
        self.lock_run_folder()
        if self.ctx.is_main:
            prepare_output_dir(self.out, overwrite=self.cfg.overwrite and self.resumed_from is None)
            save_config(self.cfg, self.out / "config.yaml")
            self.say(f"run folder: {self.out}")
            if self.recipe:
                self.say(self.recipe)
            if self.resumed_from is not None:
                self.say(f"resumed from {self.resumed_from} at epoch {self.state.epoch + 1}, step {self.state.global_step}")
        self.ctx.barrier()

    def open_logger(self) -> RunLogger:
        """``metrics.jsonl`` and W&B (rank 0); a resumed run drops records after its checkpoint's step."""
        cfg = self.cfg
        return RunLogger(self.out, config_to_dict(cfg), project=cfg.wandb_project or self.prog, mode=cfg.wandb_mode,
                         enabled=self.ctx.is_main, name=cfg.wandb_name or self.out.name,
                         resume_step=self.state.global_step if self.resumed_from is not None else None,
                         report=self.wandb_report)

    def log(self, record: Dict[str, Any]) -> None:
        """One record at the current step (rank 0 writes)."""
        assert self.logger is not None
        self.logger.log(record, step=self.state.global_step)

    def save_checkpoint(self, name: str = "last.pt", unless_current: bool = False) -> Path:
        """Write ``name`` atomically (rank 0), then call ``on_checkpoint`` on every rank (:class:`Checkpointer` calls it).

        Args:
            name: File name in the run folder.
            unless_current: Skip the write when ``last.pt`` already holds this step (nothing changed since).
        """
        path = self.out / name
        if unless_current and (self._saved_step, self._saved_epoch) == (self.state.global_step, self.state.epoch):
            return path
        if self.ctx.is_main:
            atomic_save(self.checkpoint_state(), path)
        if name == "last.pt":
            self.last_checkpoint = path
            self._saved_step, self._saved_epoch = self.state.global_step, self.state.epoch
        self.emit("on_checkpoint", path)
        return path

    def autocast(self):
        """The run's mixed precision context (:func:`xbn_queue.training.precision.autocast`)."""
        return autocast(self.amp, self.device)

    def backward_step(self, loss: torch.Tensor) -> None:
        """Backward and optimiser step of ``self.optimizer`` through the run's one loss scaler (float16 AMP)."""
        backward_step(loss, self.optimizer, self.scaler)

    def check_finite(self, what: str, *tensors: torch.Tensor) -> None:
        """Stop every rank when any rank's ``tensors`` hold a NaN or Inf (one all-reduce; one host read).

        A trainer calls it on the embeddings before the memory is adapted and on the loss before the
        batch is written into the memory (``deferred_enqueue()``) and before the optimiser step, so a
        stopped run's memory holds no non-finite row and not the bad batch.

        Raises:
            NonFiniteError: on every rank, naming ``what``, the step and the checkpoint kept.
        """
        if not all_finite(self.ctx, *tensors):
            raise self.non_finite(what)

    def non_finite(self, what: str) -> NonFiniteError:
        """The error for a non-finite ``what`` at the step being taken, naming the checkpoint kept."""
        kept = (f"the last good checkpoint {self.last_checkpoint} is kept" if self.last_checkpoint
                else "no checkpoint had been written yet")
        return NonFiniteError(f"non-finite {what} at step {self.state.global_step + 1} (epoch {self.state.epoch + 1}) "
                              f"on at least one rank; stopped before the optimiser step and before the batch reached "
                              f"the memory (it holds no NaN/Inf): {kept}. Lower --lr or check the input data.")

    def finish(self, reason: Stop, seconds: float) -> RunSummary:
        """Every rank agrees (on the model's buffers); ``on_run_end`` (logger closed, plot); rank 0's final line."""
        if self.model is not None:
            broadcast_buffers(self.model, self.ctx)
        self.ctx.barrier()
        st = self.state
        summary = RunSummary(str(self.out), st.global_step, stopped=reason,
                             signal=(self.stop.signum or 15) if reason == "signal" else None, seconds=seconds,
                             best=st.best, last=st.last, values=st.values())
        self.emit("on_run_end", summary)
        if self.ctx.is_main:
            state = {"signal": "stopped by a signal", "max_steps": f"stopped at --max-steps {self.max_steps}"}
            self.say(f"{state.get(reason or '', 'finished')} at step {st.global_step}; run folder: {self.out}")
        return summary

    def say(self, message: str) -> None:
        """One line on stderr, prefixed with the command's name."""
        print(f"[{self.prog}] {message}", file=sys.stderr, flush=True)
