"""The run loop both trainers share: named steps, a typed run state, callbacks.

A run reads top to bottom in :meth:`RunLoop.fit`::

    setup()                    # check everything (nothing written), then build data, model, memory, optimiser
    resume_if_asked()          # model, memory, optimiser, RNG and position from last.pt
    prepare_run_folder()       # the first write (rank 0), between two barriers: lock the folder, config.yaml
    for each epoch:
        start_epoch()          # per-epoch setup (a phase change, a fresh optimiser)
        train_one_epoch()      # per batch: fill_memory_if_due(), train_step(); periodic checkpoints; stop checks
        end_epoch()            # evaluation when due, the epoch's record, best checkpoint
        save_checkpoint()      # last.pt
    finish()                   # the final line, the plot; returns a RunSummary

A trainer is a subclass that supplies only what differs: :meth:`check`, :meth:`build`,
:meth:`batches`, :meth:`train_step`, :meth:`end_epoch` and its checkpoint contents
(:meth:`checkpoint_state` / :meth:`load_state`). Everything a rank must agree on (the stop flag, the
finiteness of a step's embeddings and loss, :meth:`check_finite`; the BatchNorm statistics before an
evaluation) and everything written (run folder, checkpoints, the final line) is done here once. An
error after the run folder was written is marked (:func:`~xbn_queue.training.cli.mark_started`), so
that the command line never reports it as bad input.

Tests and users reach into a run through :class:`Callback` (``on_step_end``, ``on_checkpoint``,
``on_run_end``), never through environment variables.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from xbn_queue.training.checkpoint import CheckpointError, atomic_save, load_checkpoint, resolve_resume
from xbn_queue.training.cli import (FolderLock, UsageError, check_output_dir, choose_output_dir, mark_started,
                                   one_line, prepare_output_dir)
from xbn_queue.training.config import config_to_dict, save_config
from xbn_queue.training.distributed import DistContext, init_distributed
from xbn_queue.training.precision import amp_dtype, amp_enabled, autocast, backward_step, grad_scaler
from xbn_queue.training.progress import progress
from xbn_queue.training.signals import GracefulExit
from xbn_queue.training.tracking import RunLogger

__all__ = ["RunLoop", "RunState", "RunSummary", "Callback", "NonFiniteError", "with_output_dir", "autocast",
           "amp_dtype", "wrap_ddp", "any_rank", "all_finite", "broadcast_buffers", "Reason"]

#: Why an epoch ended early: ``None`` (it did not), ``"signal"`` or ``"max_steps"``.
Reason = Optional[str]


class NonFiniteError(RuntimeError):
    """A non-finite embedding or loss; the run stopped, the message names the step and the checkpoint kept."""


@dataclasses.dataclass
class RunState:
    """Where a run stands; every field goes into the checkpoint.

    Attributes:
        epoch: The epoch being trained (0-based); equals the number of finished epochs between epochs.
        step_in_epoch: Steps of ``epoch`` already taken.
        global_step: Steps taken in the whole run.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def advance(self) -> None:
        """One more step taken."""
        self.global_step += 1
        self.step_in_epoch += 1

    def next_epoch(self) -> None:
        """The epoch is finished: the position moves to the start of the next one."""
        self.epoch += 1
        self.step_in_epoch = 0


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
    stopped: Reason = None
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


class Callback:
    """Hooks into a run; every method is optional. Called on every rank.

    ``loop.state`` is the live :class:`RunState`; ``loop.stop`` the run's
    :class:`~xbn_queue.training.signals.GracefulExit` (``loop.stop.requested``).
    """

    def on_step_end(self, loop: "RunLoop") -> None:
        """After each optimiser step (``loop.state.global_step`` counts it)."""

    def on_checkpoint(self, loop: "RunLoop", path: Path) -> None:
        """After a checkpoint was written (rank 0 writes; every rank is called)."""

    def on_run_end(self, loop: "RunLoop", summary: RunSummary) -> None:
        """After the last checkpoint, before the process group is released."""


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

    Args:
        cfg: The trainer's configuration dataclass (``output_dir``, ``resume``, ``overwrite``,
            ``checkpoint_every``, ``wandb_*``, ``device`` are read here).
        callbacks: Hooks called during the run.

    Class attributes a subclass sets: ``prog`` (the command, e.g. ``"xbn-metric"``, also the checkpoint
    kind), ``checkpoint_keys`` (keys every checkpoint of the trainer has).
    """

    prog: str = "xbn-queue"
    checkpoint_keys: Sequence[str] = ()

    def __init__(self, cfg: Any, callbacks: Iterable[Callback] = ()) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.callbacks: List[Callback] = list(callbacks)
        self.state = RunState()
        self.stop = GracefulExit(enabled=False)
        self.resumed_from: Optional[Path] = None
        self.last_checkpoint: Optional[Path] = None
        self.logger: Optional[RunLogger] = None
        self._ready = False
        self._saved_step = self._saved_epoch = -1
        self._resumed_stamp: Optional[tuple] = None
        #: Held by rank 0 from :meth:`prepare_run_folder` to the end of :meth:`fit`.
        self.folder_lock = FolderLock(self.out, "--output-dir", what=f"an {self.prog} run", prog=self.prog)
        #: Set by :meth:`build`: optimiser steps per epoch and the number of epochs.
        self.steps_per_epoch = 0
        self.total_epochs = 0
        #: Set by :meth:`build`: the optimiser :meth:`backward_step` steps.
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # ----------------------------------------------------------------------------------- the run
    def fit(self) -> RunSummary:
        """Train (or resume) to the end, a signal or ``--max-steps``; see the module docstring."""
        self.setup()
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
        """The epochs, from where the state stands to the end, a signal or ``--max-steps``."""
        reason: Reason = None
        t_start = time.time()
        with GracefulExit(enabled=True, verbose=self.ctx.is_main) as self.stop, self.open_logger() as self.logger:
            while reason is None and not self.finished():
                self.start_epoch()
                reason = self.train_one_epoch()
                if reason != "signal":
                    reason = self.end_epoch(reason)
                self.save_checkpoint(unless_current=reason == "signal")  # a periodic one may hold this very step
                if reason is None and not self.finished() and self.stop_requested():
                    reason = "signal"
        return self.finish(reason, time.time() - t_start)

    def where_stopped(self) -> str:
        """What a failed run left: its folder, the step, the checkpoint and how to continue."""
        kept = (f"{self.last_checkpoint} holds step {self._saved_step}" if self.last_checkpoint
                else "no checkpoint was written yet")
        return (f"the run in {self.out} stopped after step {self.state.global_step} ({kept}): continue it with "
                f"--resume once fixed")

    def setup(self) -> None:
        """Check everything (nothing is written), then build; runs once."""
        if self._ready:
            return
        self.ctx = init_distributed(self.cfg.device)
        self.device = self.ctx.device
        self.amp = amp_enabled(self.cfg.amp, self.device)  # --amp on CUDA (xbn_queue.training.precision)
        self.scaler = grad_scaler(self.cfg.amp, self.device)  # the run's one loss scaler (float16 only)
        self.check()
        self.build()
        self._ready = True

    def close(self) -> None:
        """Release the process group (if this run created it)."""
        if hasattr(self, "ctx"):
            self.ctx.cleanup()

    # ------------------------------------------------------------------- steps a trainer supplies
    def check(self) -> None:
        """Every check of options, folder, data and memory; raises before anything is written."""
        raise NotImplementedError

    def build(self) -> None:
        """Data pipeline, model, memory, optimiser."""
        raise NotImplementedError

    def finished(self) -> bool:
        """True when nothing is left to train."""
        raise NotImplementedError

    def fill_memory_if_due(self) -> None:
        """Before every step: fill the memory when it is due (``--prefill``: once, right before the first step
        whose loss uses the memory); nothing by default. A trainer records the fill in its run state, so
        that a resumed run does not fill again."""

    def start_epoch(self) -> None:
        """Per-epoch setup before the first batch (e.g. a phase change); nothing by default."""

    def batches(self) -> Iterator[Any]:
        """The remaining batches of ``state.epoch`` from ``state.step_in_epoch`` on."""
        raise NotImplementedError

    def train_step(self, batch: Any) -> float:
        """One step; returns the loss. The order: embeddings, ``check_finite(embeddings)``, the loss with the
        batch held back from the memory (adapt, loss), ``check_finite(loss)``, the batch into the memory,
        backward and optimiser step."""
        raise NotImplementedError

    def after_step(self, loss: float) -> None:
        """Per-step bookkeeping after the position advanced (e.g. a step record); nothing by default."""

    def stop_after_step(self, end_of_epoch: bool) -> Reason:
        """Why to stop after this step (``"signal"``, ``"max_steps"``) or ``None`` to go on."""
        raise NotImplementedError

    def end_epoch(self, reason: Reason) -> Reason:
        """After the epoch's last step (or ``--max-steps``): evaluation when due, the record, best checkpoint.

        Returns:
            The reason the run stops after this epoch (``reason`` or a new one), ``None`` to go on.
        """
        raise NotImplementedError

    def checkpoint_state(self) -> Dict[str, Any]:
        """Everything ``last.pt`` holds."""
        raise NotImplementedError

    def check_checkpoint(self, ckpt: Dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint of another configuration (``ValueError`` naming the keys that differ)."""
        raise NotImplementedError

    def load_state(self, ckpt: Dict[str, Any]) -> None:
        """Restore model, memory, optimiser, RNG and position from a checkpoint that passed :meth:`check_checkpoint`."""
        raise NotImplementedError

    def recipe(self) -> str:
        """One line naming what this run trains (printed when the run folder is prepared)."""
        return ""

    def summary_values(self) -> Dict[str, Any]:
        """The trainer's headline numbers for :class:`RunSummary` ``values``."""
        return {}

    def best_and_last(self) -> tuple:
        """``(best record, last record)`` for :class:`RunSummary`."""
        return {}, {}

    def plot(self) -> None:
        """Draw the run's history (rank 0, after the loop); nothing by default."""

    def before_finish(self) -> None:
        """Last work of every rank after the loop (e.g. agree on BatchNorm statistics)."""

    # ------------------------------------------------------------------------- the shared steps
    def train_one_epoch(self) -> Reason:
        """Train the remaining steps of the epoch; ``None`` at its end, else why it stopped early."""
        self.epoch_started = time.perf_counter()
        self.steps_this_epoch = 0
        bar = progress(self.batches(), total=self.steps_per_epoch - self.state.step_in_epoch,
                       desc=self.epoch_description(), enabled=self.cfg.progress, leave=False)
        for batch in bar:
            self.fill_memory_if_due()
            loss = self.train_step(batch)
            bar.set_postfix(loss=f"{loss:.4f}")
            self.state.advance()
            self.steps_this_epoch += 1
            self.after_step(loss)
            for cb in self.callbacks:
                cb.on_step_end(self)
            end_of_epoch = self.state.step_in_epoch >= self.steps_per_epoch
            reason = self.stop_after_step(end_of_epoch)
            if reason is None and not end_of_epoch and self.checkpoint_due():
                self.save_checkpoint()
                reason = self.stop_after_step(end_of_epoch)  # a signal during the checkpoint's callbacks
            if reason is not None:
                bar.close()
                return reason
        bar.close()
        return None

    def epoch_description(self) -> str:
        """The progress bar's label."""
        return f"epoch {self.state.epoch + 1}/{self.total_epochs}"

    def checkpoint_due(self) -> bool:
        """``--checkpoint-every N``: a checkpoint after every N-th step."""
        every = self.cfg.checkpoint_every or 0
        return every > 0 and self.state.global_step % every == 0

    def stop_requested(self) -> bool:
        """True when any rank received a signal (every rank stops at the same step)."""
        return any_rank(self.ctx, self.stop.requested)[0]

    def resume_if_asked(self) -> None:
        """With ``--resume``: restore the run from its checkpoint (``resumed_from`` is set)."""
        path = resolve_resume(self.cfg.resume, self.out) if self.cfg.resume else None
        if path is not None:
            self.restore(path)
            self.resumed_from = Path(path)
        elif self.cfg.resume and self.ctx.is_main:
            self.say(f"--resume: no checkpoint in {self.out}, starting a new run")

    def restore(self, path: Path) -> None:
        """Model, memory, optimiser, RNG and position from the checkpoint at ``path``.

        Raises:
            CheckpointError: not a readable checkpoint of this trainer (one line).
            ValueError: a checkpoint of an incompatible configuration (one line naming the keys).
        """
        ckpt = load_checkpoint(path, map_location="cpu", kind=self.prog, required_keys=tuple(self.checkpoint_keys))
        self.check_checkpoint(ckpt, path)
        try:
            self.load_state(ckpt)
        except (RuntimeError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable {self.prog} checkpoint (the state does not load: "
                                  f"{one_line(err)[:160]})") from None
        self.last_checkpoint = Path(path)
        self._saved_step, self._saved_epoch = self.state.global_step, self.state.epoch
        self._resumed_stamp = _file_stamp(Path(path))

    def already_complete(self) -> RunSummary:
        """``--resume`` found a finished run: say so, write nothing."""
        if self.ctx.is_main:
            self.say(f"{self.out} is already complete (epoch {self.state.epoch} of {self.total_epochs}, step "
                     f"{self.state.global_step}): nothing to train")
        best, last = self.best_and_last()
        return RunSummary(str(self.out), self.state.global_step, already_complete=True, best=best, last=last,
                          values=self.summary_values())

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
            if self.recipe():
                self.say(self.recipe())
            if self.resumed_from is not None:
                self.say(f"resumed from {self.resumed_from} at epoch {self.state.epoch + 1}, step {self.state.global_step}")
        self.ctx.barrier()

    def open_logger(self) -> RunLogger:
        """``metrics.jsonl`` and W&B (rank 0); a resumed run drops records after its checkpoint's step."""
        cfg = self.cfg
        return RunLogger(self.out, config_to_dict(cfg), project=cfg.wandb_project or self.prog, mode=cfg.wandb_mode,
                         enabled=self.ctx.is_main, name=cfg.wandb_name or self.out.name,
                         resume_step=self.state.global_step if self.resumed_from is not None else None)

    def log(self, record: Dict[str, Any]) -> None:
        """One record at the current step (rank 0 writes)."""
        assert self.logger is not None
        self.logger.log(record, step=self.state.global_step)

    def save_checkpoint(self, name: str = "last.pt", unless_current: bool = False) -> Path:
        """Write ``name`` atomically (rank 0), then call ``on_checkpoint`` on every rank.

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
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)
        return path

    def autocast(self):
        """The run's mixed precision context (:func:`xbn_queue.training.precision.autocast`)."""
        return autocast(self.amp, self.device)

    def backward_step(self, loss: torch.Tensor) -> None:
        """Backward and optimiser step of ``self.optimizer`` through the run's one loss scaler."""
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

    def finish(self, reason: Reason, seconds: float) -> RunSummary:
        """Every rank agrees, the logger closes, rank 0 plots and prints the final line; callbacks run."""
        self.before_finish()
        self.ctx.barrier()
        if self.ctx.is_main:
            try:
                self.plot()
            except Exception as err:  # plotting must never kill a run
                self.say(f"warning: could not plot: {one_line(err)}")
            state = {"signal": "stopped by a signal", "max_steps": f"stopped at --max-steps {self.cfg.max_steps}"}
            self.say(f"{state.get(reason or '', 'finished')} at step {self.state.global_step}; run folder: {self.out}")
        best, last = self.best_and_last()
        summary = RunSummary(str(self.out), self.state.global_step, stopped=reason,
                             signal=(self.stop.signum or 15) if reason == "signal" else None, seconds=seconds,
                             best=best, last=last, values=self.summary_values())
        for cb in self.callbacks:
            cb.on_run_end(self, summary)
        return summary

    def say(self, message: str) -> None:
        """One line on stderr, prefixed with the command's name."""
        print(f"[{self.prog}] {message}", file=sys.stderr, flush=True)
