"""Run a series of training runs (``compare``, sweeps) that a signal stops cleanly and ``--resume`` finishes.

A series is a list of :class:`PlannedRun` (a sub-folder name and the settings that vary). Each run goes
to ``OUTPUT_DIR/<name>/``, a full run folder. :func:`run_series` trains them in order through a callback
and guarantees:

- SIGINT / SIGTERM stop the *whole* series: the run in progress writes its checkpoint and returns
  (the trainer's own signal handling), no later run starts, and the report says which signal stopped
  it (:attr:`SeriesReport.exit_code` is ``128 + N``);
- every run has a ``complete`` flag; runs never started count as incomplete;
- with ``resume=True`` each run continues from its ``last.pt`` and a finished run is not trained
  again (the trainer says "already complete" and returns its results), so ``--resume`` finishes
  exactly the missing work.

With W&B on, :func:`series_wandb` gives each run's configuration its W&B group (the series folder's
name, or ``--wandb-group``) and the tags of the values it varies, so that a dashboard puts a method's
seeds together (the run itself adds its job type, the method, and the tags ``method=``, ``seed=``,
``dataset=``: :class:`~xbn_queue.training.tracking.WandbReport`).

Aggregation helpers (:func:`mean_std`, :func:`format_mean_std`, :func:`table_title`) let every table say
the same thing the same way: percentages, no ``± 0.00`` with one seed, and a first line naming
incomplete runs; :func:`write_series` writes the table, its JSON and its figures (none while runs are
missing). ``xbn-metric compare`` / ``sweep`` and ``xbn-selfsup compare`` are this skeleton::

    plan = seed_plan("method", methods, cfg.seed, seeds)          # "<method>-seed<S>": {"method", "seed"}
    check_series_dir(out, plan, resume=..., overwrite=...)       # before anything is written

    def train_one(run: PlannedRun, run_dir: Path) -> RunOutcome:
        return RunOutcome.of_summary(train(series_run_config(cfg, run, run_dir, resume, wandb_name=...)))

    with lock_series_dir(out, plan, resume=..., overwrite=...):  # the first write; each run locks its own folder
        report = run_series(plan, out, train_one)
        done = report.completed()                                # only these go into a table
        markdown = table_title(title, report.incomplete(), resume_cmd) + ...
        write_series(out, "compare", markdown, result, report.incomplete(), resume_cmd, {"compare.png": draw})
    return report.exit_code                                      # 0, or 130 / 143
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Optional, Union

from xbn_queue.training.cli import FolderLock, RunError, UsageError, available_cores, check_output_dir, holds_run

__all__ = ["PlannedRun", "RunOutcome", "RunRecord", "SeriesReport", "JobSlot", "job_slots", "visible_gpus", "run_series",
           "check_series_dir", "lock_series_dir", "holds_series", "mean_std", "format_mean_std", "incomplete_banner",
           "paired_differences", "series_wandb", "seed_plan", "series_run_config", "table_title", "write_series"]


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a series.

    Attributes:
        name: Sub-folder name inside the series folder (e.g. ``"xbn-seed0"``).
        settings: The configuration fields that differ between runs (e.g. ``{"method": "xbn", "seed": 0}``).
    """

    name: str
    settings: Mapping[str, Any]


def series_wandb(cfg: Any, out: Union[str, os.PathLike], run: PlannedRun, varied: Sequence[str] = ()) -> dict[str, Any]:
    """The W&B fields of a series run's configuration: its group and the tags of what it varies.

    Args:
        cfg: The series' configuration (``wandb_mode``, ``wandb_group``, ``wandb_tags``).
        out: The series folder; its name is the group unless ``cfg.wandb_group`` is set.
        run: The planned run.
        varied: The settings of ``run`` tagged ``name=value`` (a sweep's options; the method and the
            seed are tagged by every run anyway).

    Returns:
        ``{"wandb_group": ..., "wandb_tags": [...]}`` (the user's tags first), or ``{}`` with W&B off.
    """
    from xbn_queue.training.tracking import wandb_tag

    if cfg.wandb_mode == "disabled":
        return {}
    tags = [*(cfg.wandb_tags or []), *(wandb_tag(k, run.settings[k]) for k in varied)]
    return {"wandb_group": cfg.wandb_group or Path(out).name, "wandb_tags": list(dict.fromkeys(tags)) or None}


def seed_plan(key: str, values: Sequence[Any], seed: int, seeds: int) -> list[PlannedRun]:
    """The plan of a comparison: one run per value and seed, ``<value>-seed<S>`` with ``{key: value, "seed": S}``.

    Args:
        key: The configuration field compared (``"method"``, ``"adaptation"``).
        values: Its values, in table order.
        seed: The first seed; the runs use ``seed, seed + 1, ..., seed + seeds - 1``.
        seeds: Runs per value.

    Raises:
        UsageError: ``seeds < 1`` (naming ``--seeds``).
    """
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: expected an integer >= 1")
    return [PlannedRun(f"{v}-seed{seed + i}", {key: v, "seed": seed + i}) for v in values for i in range(seeds)]


def series_run_config(cfg: Any, run: PlannedRun, run_dir: Path, resume: bool, wandb_name: Optional[str],
                      varied: Sequence[str] = ()) -> Any:
    """The configuration of one planned run: ``cfg`` (a trainer's config dataclass) with the run's settings, in
    ``run_dir``, continuing from its ``last.pt`` when ``resume``, named ``wandb_name`` in the series' W&B group
    (:func:`series_wandb`; ``varied``: the settings tagged)."""
    return dataclasses.replace(cfg, **run.settings, output_dir=str(run_dir), resume="auto" if resume else "",
                               wandb_name=wandb_name, **series_wandb(cfg, run_dir.parent, run, varied))


@dataclasses.dataclass
class RunOutcome:
    """What the per-run callback returns.

    Attributes:
        complete: The run trained to its end (or was already complete).
        signal: The signal number that stopped it, or ``None``.
        result: Anything the caller wants back (e.g. the trainer's summary).
    """

    complete: bool
    signal: Optional[int] = None
    result: Any = None

    @classmethod
    def of_summary(cls, summary: Mapping[str, Any]) -> "RunOutcome":
        """The outcome of a trainer's summary (``stopped``, ``signal``): complete unless a signal stopped it."""
        return cls(complete=summary.get("stopped") != "signal", signal=summary.get("signal"), result=summary)


@dataclasses.dataclass
class RunRecord:
    """A planned run and what became of it (``outcome`` is ``None`` for a run never started)."""

    run: PlannedRun
    output_dir: Path
    outcome: Optional[RunOutcome] = None

    @property
    def complete(self) -> bool:
        return self.outcome is not None and self.outcome.complete


@dataclasses.dataclass
class SeriesReport:
    """The result of :func:`run_series`.

    Attributes:
        records: One per planned run, in plan order.
        signal: The signal that stopped the series, or ``None``.
    """

    records: list[RunRecord]
    signal: Optional[int] = None

    @property
    def complete(self) -> bool:
        """Every planned run finished."""
        return all(r.complete for r in self.records)

    def completed(self) -> list[RunRecord]:
        """The finished runs (the only ones a table may count)."""
        return [r for r in self.records if r.complete]

    def incomplete(self) -> list[str]:
        """Names of the runs that did not finish (interrupted or never started)."""
        return [r.run.name for r in self.records if not r.complete]

    @property
    def exit_code(self) -> int:
        """``0`` when complete, ``128 + signal`` when a signal stopped the series (``1`` otherwise)."""
        if self.complete:
            return 0
        return 128 + self.signal if self.signal else 1


def holds_series(path: Union[str, os.PathLike], plan: Sequence[PlannedRun] = ()) -> bool:
    """True when ``path`` holds a series' table or any planned run."""
    p = Path(path)
    return p.is_dir() and (any((p / f).exists() for f in ("compare.json", "compare.md", "sweep.json", "sweep.md"))
                           or holds_run(p) or any(holds_run(p / r.name) for r in plan))


def check_series_dir(path: Union[str, os.PathLike], plan: Sequence[PlannedRun], resume: bool, overwrite: bool) -> None:
    """:func:`~xbn_queue.training.cli.check_output_dir` for a series folder (nothing is written).

    Raises:
        UsageError: unusable folder, or one that holds results without ``--resume`` / ``--overwrite``,
            or two planned runs with the same name.
    """
    names = [r.name for r in plan]
    if len(set(names)) != len(names):
        raise UsageError(f"the series has duplicate runs: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    check_output_dir(path, resume=resume, overwrite=overwrite, holds=lambda p: holds_series(p, plan))


def lock_series_dir(path: Union[str, os.PathLike], plan: Sequence[PlannedRun], resume: bool, overwrite: bool,
                    what: str = "a series", enabled: bool = True) -> FolderLock:
    """Lock a series folder before its first write (its runs lock their own folders below it), then check it
    again under the lock (another series may have written there since :func:`check_series_dir`).

    Args:
        path: The series folder.
        plan, resume, overwrite: As for :func:`check_series_dir`.
        what: What holds it, for another process's message (``"an xbn-metric compare"``).
        enabled: ``False`` on the ranks other than 0 of a ``torchrun`` series: nothing is locked.

    Returns:
        The held lock (release it when the series has written its last file), or an unheld one.

    Raises:
        UsageError: the folder is in use by another process (naming it), or holds results now.
    """
    lock = FolderLock(path, "--output-dir", what=what)
    if not enabled:
        return lock
    lock.acquire()
    try:
        check_series_dir(path, plan, resume=resume, overwrite=overwrite)
    except UsageError:
        lock.release()
        raise
    return lock


@dataclasses.dataclass(frozen=True)
class JobSlot:
    """The share of the machine of one of the runs that train side by side.

    Attributes:
        index: 0 .. jobs - 1.
        threads: CPU threads the run may use (the cores split between the jobs, at least 1).
        gpu: The value of ``CUDA_VISIBLE_DEVICES`` for the run (one GPU per job on a machine with
            several), or ``None`` to leave the environment as it is.
    """

    index: int
    threads: int
    gpu: Optional[str] = None


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (``[]`` without CUDA)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch / no driver: no GPU
        return []


def job_slots(jobs: int, cores: Optional[int] = None, gpus: Optional[Sequence[str]] = None) -> list[JobSlot]:
    """Split the machine between ``jobs`` runs: ``cores // jobs`` threads each (at least 1), and with
    more than one GPU, GPU ``i % len(gpus)`` for job ``i``.

    Args:
        jobs: Runs side by side (>= 1).
        cores: CPU cores to split (default: :func:`~xbn_queue.training.cli.available_cores`).
        gpus: ``CUDA_VISIBLE_DEVICES`` entries to hand out (default: :func:`visible_gpus`).
    """
    cores = available_cores() if cores is None else cores
    gpus = visible_gpus() if gpus is None else list(gpus)
    return [JobSlot(i, max(1, cores // jobs), gpus[i % len(gpus)] if len(gpus) > 1 else None) for i in range(jobs)]


def run_series(plan: Sequence[PlannedRun], out: Union[str, os.PathLike],
               train_one: Callable[[PlannedRun, Path], RunOutcome], verbose: bool = True,
               prog: str = "compare", jobs: int = 1,
               command: Optional[Callable[[PlannedRun, Path, JobSlot], list[str]]] = None,
               env: Optional[Mapping[str, str]] = None) -> SeriesReport:
    """Train the planned runs, in order or ``jobs`` at a time, stopping the whole series on SIGINT / SIGTERM.

    With ``jobs == 1`` each run is ``train_one`` in this process. Signals that arrive while a run
    trains are handled by the trainer (checkpoint, then it returns an outcome with ``signal`` set);
    signals that arrive between runs are caught here. Either way no further run starts. A second
    Ctrl-C raises ``KeyboardInterrupt`` at once.

    With ``jobs > 1`` each run is its own process, ``command(run, run_dir, slot)``, started in plan
    order as soon as one of the ``jobs`` slots (:func:`job_slots`) is free, in its own session (so a
    Ctrl-C at the terminal reaches this process only), with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``
    set to the slot's threads and ``CUDA_VISIBLE_DEVICES`` to its GPU. Its output lines are copied
    to stderr behind ``[<run name>]``. The process must exit 0 when the run finished and 128 + N
    when signal N stopped it after its checkpoint (2: bad input, else: failed). A signal here is
    passed on to every running process as SIGTERM, which checkpoints and stops (a process still
    starting up ends at once, before it wrote anything); no further run starts, and the series
    reports the signal it received. A second Ctrl-C passes SIGINT on (a trainer then stops without
    its checkpoint) and raises ``KeyboardInterrupt``. When a run fails, no further run starts, the running ones finish, and
    the failure is raised.

    Args:
        plan: The runs.
        out: The series folder; run ``r`` goes to ``out / r.name``.
        train_one: ``(run, run_dir) -> RunOutcome``; it decides fresh / resume / overwrite.
        verbose: Print one line per run to stderr.
        prog: Prefix of those lines.
        jobs: Runs side by side (``command`` is required when > 1).
        command: ``(run, run_dir, slot) -> argv`` of a process that trains ``run`` in ``run_dir``.
        env: Further environment variables of those processes.

    Returns:
        A :class:`SeriesReport` (one record per planned run).

    Raises:
        UsageError: ``jobs < 1``, or ``jobs > 1`` without ``command``; a run's process exited 2.
        RunError: a run's process failed (exit status 1, or killed).
    """
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: expected an integer >= 1")
    out = Path(out)
    records = [RunRecord(r, out / r.name) for r in plan]
    if jobs > 1 and records:
        if command is None:
            raise UsageError("run_series: jobs > 1 needs a command that trains one run in its own process")
        return _run_parallel(records, command, job_slots(min(jobs, len(records))), dict(env or {}), verbose, prog)
    return _run_in_order(records, train_one, verbose, prog)


def _run_in_order(records: list[RunRecord], train_one: Callable[[PlannedRun, Path], RunOutcome], verbose: bool,
                  prog: str) -> SeriesReport:
    """:func:`run_series` in this process, one run after the other, until a signal stops a run or arrives between two."""
    from xbn_queue.training.signals import GracefulExit

    signal_number: Optional[int] = None
    with GracefulExit(enabled=True, verbose=verbose) as stop:
        for i, rec in enumerate(records):
            if stop.requested:
                signal_number = stop.signum
                break
            if verbose:
                print(f"[{prog}] run {i + 1}/{len(records)}: {rec.run.name} -> {rec.output_dir}", file=sys.stderr, flush=True)
            rec.outcome = train_one(rec.run, rec.output_dir)
            if rec.outcome.signal is not None:
                signal_number = rec.outcome.signal
                break
        if signal_number is None and stop.requested:
            signal_number = stop.signum
    return SeriesReport(records, signal_number)


class _Job:
    """One run's process and the threads that copy its output."""

    def __init__(self, rec: RunRecord, slot: JobSlot, argv: list[str], env: Mapping[str, str]) -> None:
        self.rec, self.slot, self.t0 = rec, slot, time.time()
        self.tail: collections.deque[str] = collections.deque(maxlen=5)
        self.proc = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     bufsize=1, start_new_session=True)
        self.copiers = [threading.Thread(target=self._copy, args=(stream, keep), daemon=True)
                        for stream, keep in ((self.proc.stdout, False), (self.proc.stderr, True))]
        for t in self.copiers:
            t.start()

    def _copy(self, stream: IO[str], keep: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            if keep and line.strip():
                self.tail.append(line)
            print(f"[{self.rec.run.name}] {line}", file=sys.stderr, flush=True)

    def finish(self) -> int:
        for t in self.copiers:
            t.join()
        return int(self.proc.wait())


def _job_env(slot: JobSlot, env: Mapping[str, str]) -> dict[str, str]:
    out = {**os.environ, **env, "OMP_NUM_THREADS": str(slot.threads), "MKL_NUM_THREADS": str(slot.threads)}
    if slot.gpu is not None:
        out["CUDA_VISIBLE_DEVICES"] = slot.gpu
    return out


def _run_parallel(records: list[RunRecord], command: Callable[[PlannedRun, Path, JobSlot], list[str]],
                  slots: list[JobSlot], env: Mapping[str, str], verbose: bool, prog: str) -> SeriesReport:
    """:func:`run_series` with one process per run, ``len(slots)`` at a time."""
    from xbn_queue.training.signals import GracefulExit

    pending = collections.deque(enumerate(records))
    free = list(reversed(slots))
    running: list[_Job] = []
    failure: Optional[Exception] = None
    passed_on = False
    with GracefulExit(enabled=True, verbose=verbose) as stop:
        try:
            while running or (pending and not stop.requested and failure is None):
                if stop.requested and not passed_on:
                    for job in running:  # SIGTERM: checkpoint and stop (no traceback from one still starting up)
                        job.proc.send_signal(signal.SIGTERM)
                    passed_on = True
                while pending and free and not stop.requested and failure is None:
                    i, rec = pending.popleft()
                    slot = free.pop()
                    if verbose:
                        gpu = f", GPU {slot.gpu}" if slot.gpu is not None else ""
                        print(f"[{prog}] run {i + 1}/{len(records)}: {rec.run.name} -> {rec.output_dir} (job "
                              f"{slot.index + 1}/{len(slots)}, {slot.threads} thread(s){gpu})", file=sys.stderr, flush=True)
                    running.append(_Job(rec, slot, command(rec.run, rec.output_dir, slot), _job_env(slot, env)))
                if not pending or not free or stop.requested or failure is not None:
                    time.sleep(0.05)
                for job in [j for j in running if j.proc.poll() is not None]:
                    running.remove(job)
                    free.append(job.slot)
                    outcome, err = _job_outcome(job, job.finish(), passed_on)
                    job.rec.outcome = outcome
                    failure = failure or err
                    if outcome is not None and outcome.signal is not None and not stop.requested:
                        stop.request(outcome.signal)  # a run stopped by a signal stops the series, as one after the other
        except BaseException:  # a second Ctrl-C (or an error here): stop every run now, then let it rise
            for job in running:
                if job.proc.poll() is None:
                    job.proc.send_signal(signal.SIGINT)
            for job in running:
                try:
                    job.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    job.proc.kill()
                    job.proc.wait()
            raise
    if failure is not None:
        raise failure
    return SeriesReport(records, stop.signum if stop.requested else None)


def _job_outcome(job: _Job, code: int, passed_on: bool) -> tuple[Optional[RunOutcome], Optional[Exception]]:
    """The outcome of a run's process from its exit status, or the error its failure raises.

    ``passed_on``: this series sent the process SIGTERM; one that it ended before the trainer's
    handler was installed (status ``-15``) counts as stopped by that signal.
    """
    result = {"seconds": round(time.time() - job.t0, 1)}
    last = re.sub(r"^\S+: error: ", "", job.tail[-1]) if job.tail else "no output"
    name = job.rec.run.name
    if code == 0:
        return RunOutcome(complete=True, result=result), None
    if code > 128 and code - 128 in {s.value for s in signal.Signals}:
        return RunOutcome(complete=False, signal=code - 128, result=result), None
    if passed_on and code == -signal.SIGTERM:
        return RunOutcome(complete=False, signal=signal.SIGTERM, result=result), None
    if code == 2:
        return None, UsageError(f"run {name}: {last}")
    why = f"was killed by signal {-code}" if code < 0 else f"failed (exit status {code})"
    return None, RunError(f"run {name} {why}: {last}")


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std" (sample, ddof=1; 0 for one value), "n"}``."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def paired_differences(runs: Sequence[Mapping[str, Any]], target: str, baseline: str, key: str,
                       pair_on: Sequence[str] = ("seed",), by: str = "method") -> list[float]:
    """Per-pair differences ``target[key] - baseline[key]`` of two methods' runs with the same ``pair_on`` values.

    Runs of the same seed share the initialisation and the batches, so their difference cancels what the
    seed alone decides; :func:`mean_std` of the result is the paired gain and its spread over seeds.
    Only finished runs (``complete``, true when absent) that both have ``key`` are paired.

    Args:
        runs: One mapping per run: ``by`` (the method), the ``pair_on`` fields, ``key``.
        target, baseline: The two values of ``by``.
        key: The score (e.g. ``recall@1``).
        pair_on: The fields that must agree (``seed``; a sweep adds the swept options).
        by: The field naming the method.

    Returns:
        The differences, in the order of the target's runs.

    Raises:
        ValueError: two finished baseline runs with the same ``pair_on`` values.
    """
    def done(r: Mapping[str, Any]) -> bool:
        return bool(r.get("complete", True)) and isinstance(r.get(key), (int, float))

    def where(r: Mapping[str, Any]) -> tuple:
        return tuple(repr(r.get(name)) for name in pair_on)

    base: dict[tuple, float] = {}
    for r in runs:
        if r.get(by) == baseline and done(r):
            if where(r) in base:
                raise ValueError(f"paired_differences: two {baseline} runs with {dict(zip(pair_on, where(r)))}")
            base[where(r)] = float(r[key])
    return [float(r[key]) - base[where(r)] for r in runs if r.get(by) == target and done(r) and where(r) in base]


def format_mean_std(stat: Optional[Mapping[str, float]], scale: float = 100.0, digits: int = 2, pm: str = "±") -> str:
    """``"98.89 ± 0.12"``; a single value (``n == 1``) without ``± 0.00``; ``"n/a"`` when missing."""
    if not stat or not stat.get("n"):
        return "n/a"
    text = f"{scale * stat['mean']:.{digits}f}"
    return text if stat["n"] == 1 else f"{text} {pm} {scale * stat['std']:.{digits}f}"


def incomplete_banner(names: Sequence[str], resume_cmd: Optional[str] = None) -> str:
    """First line of a table that leaves out unfinished runs."""
    line = f"INCOMPLETE: {len(names)} run(s) did not finish and are not counted: {', '.join(names)}"
    return line + (f"; finish with: {resume_cmd}" if resume_cmd else "")


def table_title(title: str, incomplete: Sequence[str], resume_cmd: str = "", partial: Optional[str] = None) -> str:
    """The first lines of a series' table: ``title`` when every run finished; else :func:`incomplete_banner`,
    a blank line and ``partial`` (default: ``title`` + ``"; finished runs only"``)."""
    if not incomplete:
        return title
    return f"{incomplete_banner(incomplete, resume_cmd or None)}\n\n{title + '; finished runs only' if partial is None else partial}"


def write_series(out: Union[str, os.PathLike], kind: str, markdown: str, result: Mapping[str, Any],
                 incomplete: Sequence[str] = (), resume_cmd: str = "",
                 figures: Optional[Mapping[str, Callable[[Path], Any]]] = None) -> None:
    """Write a series' table and figures: ``<kind>.md``, ``<kind>.json`` and each figure of ``figures``.

    A figure shows finished runs only when every run finished: with runs missing every figure is removed
    (a figure of an earlier, complete state would disagree with the table) and the
    :func:`incomplete_banner` goes to stderr. A figure with nothing to draw (its function raises
    ``ValueError``: no evaluation recorded) is left out with one line on stderr.

    Args:
        out: The series folder (created if needed).
        kind: The name of the table files (``"compare"``, ``"sweep"``).
        markdown: The content of ``<kind>.md``, as written.
        result: The content of ``<kind>.json`` (indented, one trailing newline).
        incomplete: The names of the runs that did not finish (:meth:`SeriesReport.incomplete`).
        resume_cmd: The command that finishes the series, for the banner.
        figures: ``{file name: draw(png_path)}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{kind}.md").write_text(markdown)
    (out / f"{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, draw in (figures or {}).items():
        (out / name).unlink(missing_ok=True)
        if incomplete:
            continue
        try:
            draw(out / name)
        except ValueError:  # nothing to draw (no evaluation recorded, or no run to compare with)
            print(f"[{kind}] nothing to plot: {name} not written", file=sys.stderr, flush=True)
    if incomplete:
        print(incomplete_banner(incomplete, resume_cmd or None), file=sys.stderr, flush=True)
