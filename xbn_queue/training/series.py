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

Aggregation helpers (:func:`mean_std`, :func:`format_mean_std`, :func:`incomplete_banner`) let every
table say the same thing the same way: percentages, no ``± 0.00`` with one seed, and a first line
naming incomplete runs. Use::

    plan = [PlannedRun(f"{m}-seed{s}", {"method": m, "seed": s}) for m in methods for s in seeds]
    check_series_dir(out, plan, resume=..., overwrite=...)       # before anything is written

    def train_one(run: PlannedRun, run_dir: Path) -> RunOutcome:
        res = train(replace(cfg, **run.settings, output_dir=str(run_dir), resume="auto" if resume else ""))
        return RunOutcome(complete=res["stopped"] != "signal", signal=res.get("signal"), result=res)

    report = run_series(plan, out, train_one)
    done = report.completed()                                    # only these go into a table
    ...
    return report.exit_code                                      # 0, or 130 / 143
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from xbn_queue.training.cli import UsageError, check_output_dir, holds_run

__all__ = ["PlannedRun", "RunOutcome", "RunRecord", "SeriesReport", "run_series", "check_series_dir",
           "holds_series", "mean_std", "format_mean_std", "incomplete_banner"]


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a series.

    Attributes:
        name: Sub-folder name inside the series folder (e.g. ``"xbn-seed0"``).
        settings: The configuration fields that differ between runs (e.g. ``{"method": "xbn", "seed": 0}``).
    """

    name: str
    settings: Mapping[str, Any]


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


def run_series(plan: Sequence[PlannedRun], out: Union[str, os.PathLike],
               train_one: Callable[[PlannedRun, Path], RunOutcome], verbose: bool = True,
               prog: str = "compare") -> SeriesReport:
    """Train the planned runs in order, stopping the whole series on SIGINT / SIGTERM.

    Signals that arrive while a run trains are handled by the trainer (checkpoint, then it returns an
    outcome with ``signal`` set); signals that arrive between runs are caught here. Either way no
    further run starts. A second Ctrl-C raises ``KeyboardInterrupt`` at once.

    Args:
        plan: The runs.
        out: The series folder; run ``r`` goes to ``out / r.name``.
        train_one: ``(run, run_dir) -> RunOutcome``; it decides fresh / resume / overwrite.
        verbose: Print one line per run to stderr.
        prog: Prefix of those lines.

    Returns:
        A :class:`SeriesReport` (one record per planned run).
    """
    from xbn_queue.training.signals import GracefulExit

    out = Path(out)
    records = [RunRecord(r, out / r.name) for r in plan]
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


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std" (sample, ddof=1; 0 for one value), "n"}``."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


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
