"""``xbn-metric compare``: train every method with every seed and tabulate mean +- std (the paper's Table 1).

Each run goes to ``OUTPUT_DIR/<method>-seed<seed>/`` (a full run folder). Its scores are read from its
``metrics.jsonl`` (:func:`run_scores`): Recall@1 at an early epoch (``--early-epoch``, default the
first epoch after the warm-up, where the network changes fastest and an adapted memory matters most),
the best evaluation by Recall@1 (the paper selects the best epoch by Recall@1 on the validation set)
and the last evaluation (the best is chosen on the evaluation split itself, which flatters trained
runs against the baselines' single evaluation, so the last stands next to it). The table shows, per
method, the mean and the sample standard deviation (ddof=1) over seeds in percent (one seed: the
value alone) of R@1 early / best / last and MAP@R best / last, after two baselines on the same
evaluation split (raw pixels and the untrained network, :mod:`metric.experiments.baselines`). Under it, a second
table gives the **paired gains** of every adapted memory (XBN, AXBN, and XBN* / AXBN* when compared) over
XBM, XBM* and No-XBM, whichever the comparison holds: per seed the run minus the baseline's run of the
same seed (same initialisation, same batches), mean ± sample std over seeds, at the early and at the
best epoch (:func:`paired_gains`). Both are written to
``OUTPUT_DIR/compare.md`` and ``OUTPUT_DIR/compare.json`` (which also holds Recall@K for every K);
``OUTPUT_DIR/compare.png`` shows Recall@1 and feature drift per epoch (mean ± std band over seeds,
the baselines as dashed lines). Seeds are ``seed, seed + 1, ...``. Running a finished comparison
again (``--resume``) prints the same table.

The runs are driven by :func:`xbn_queue.training.series.run_series`, one after the other in this
process, or with ``--jobs N`` N at a time, each in its own ``python -m metric train`` process
(:func:`series_command`: the cores split between them, one GPU each on a machine with several; the same
numbers as one after the other at the same thread count). SIGINT / SIGTERM stop the whole
comparison after the running runs' checkpoints (exit 130 / 143, the resume command printed), a table
never counts an unfinished run (``compare.md`` then starts with an ``INCOMPLETE:`` line, and every run
in ``compare.json`` has a ``complete`` flag), and ``compare --resume`` finishes the missing runs (a
finished run is not trained again) and writes the full table.

With ``--wandb-mode online|offline`` the runs form one W&B group (the comparison folder's name, or
``--wandb-group``), each with the method as its job type, the tags ``method=``, ``seed=``, ``dataset=``,
the best and last Recall@1 / MAP@R in its summary and, with ``--wandb-log-model``, its ``best.pt`` as a
model artifact (:func:`~xbn_queue.training.series.series_wandb`,
:class:`~xbn_queue.training.tracking.WandbReport`; docs/cli.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from xbn_queue.training.config import config_to_argv
from xbn_queue.training.series import (JobSlot, PlannedRun, RunOutcome, SeriesReport, check_series_dir, format_mean_std,
                                       lock_series_dir, mean_std, run_series, seed_plan, series_run_config, table_title,
                                       write_series)

from ..config import METHODS, MetricConfig, resolve_config, validate_config

__all__ = ["add_compare_args", "run_compare", "compare_main", "format_table", "table_columns", "plan_runs", "series_trainer",
           "run_rows", "run_records", "run_scores", "summarize_runs", "metric_keys", "baselines_for", "early_epoch_of",
           "paired_gains", "gain_targets", "format_gain_table", "GAIN_BASELINES"]

PROG = "xbn-metric"

#: The paper's names of the methods.
PAPER_NAMES = {"none": "No-XBM", "xbm": "XBM", "xbm-batch": "XBM*", "xbn": "XBN", "xbn-batch": "XBN*", "axbn": "AXBN",
               "axbn-batch": "AXBN*", "xbn-cov-batch": "xbn-cov*", "raw-pixels": "Raw pixels", "untrained": "Untrained net"}

DESCRIPTION = """Train every method of --methods with --seeds seeds each (seeds --seed, --seed + 1, ...) and
tabulate, per method, mean ± std over seeds of Recall@1 at an early epoch (--early-epoch), at the best
epoch (highest Recall@1) and at the last epoch, and MAP@R at the best and the last, in %, after the
raw-pixel and untrained-network baselines. A second table gives the paired gains of the adapted memories
(xbn, axbn, xbn-batch, axbn-batch, ...) over xbm (XBM), xbm-batch (XBM*) and none (No-XBM), whichever
--methods holds: per seed the run minus the baseline's run of the same seed (same initialisation and
batches), mean ± std over seeds, at the early and the best epoch.

Every training option below is passed through to each run unchanged, except --method, --seed and
--output-dir, which compare sets per run: run <method>-seed<seed> goes to OUTPUT_DIR/<method>-seed<seed>/.
OUTPUT_DIR gets compare.md, compare.json and compare.png (default OUTPUT_DIR: a new folder
runs/metric/compare-<dataset>-<timestamp>).

--jobs N trains N runs side by side, each in its own process (same results as one after the other).
Ctrl-C / SIGTERM stop the whole comparison after the running runs' checkpoints (exit 130 / 143) and
print the command that finishes it (compare --resume --output-dir OUTPUT_DIR): finished runs are
kept, the missing ones are trained, and then the full table is written. A table never counts an
unfinished run."""


def add_compare_args(p: argparse.ArgumentParser) -> None:
    """The options of ``compare`` that are not training options."""
    g = p.add_argument_group("compare")
    g.add_argument("--methods", default="none,xbm,xbn,axbn",
                   help=f"comma-separated methods to compare, among {', '.join(METHODS)} (default: none,xbm,xbn,axbn); "
                        "the table names them No-XBM, XBM, XBM* (xbm-batch), XBN, XBN* (xbn-batch), AXBN, AXBN* (axbn-batch)")
    g.add_argument("--seeds", type=int, default=3,
                   help="runs per method, with seeds --seed, --seed + 1, ... (default: 3) [valid: >= 1]")
    add_jobs_arg(g)
    g.add_argument("--early-epoch", type=int, default=None, metavar="E",
                   help="the table's early Recall@1 column: the first evaluation at epoch >= E, epochs numbered as in "
                        "metrics.jsonl, the warm-up included (default: the first epoch after the warm-up) "
                        "[valid: 1 .. warm-up + epochs]")


def add_jobs_arg(g: Any) -> None:
    """``--jobs N`` (compare and sweep)."""
    g.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs side by side, each in its own process, the CPU cores split between them "
                        "(--threads: cores // N unless given) and one GPU each on a machine with several; the same "
                        "results, interrupt and --resume as one after the other (default: 1) [valid: >= 1]")


def _parse_methods(methods: str) -> List[str]:
    from xbn_queue.training.cli import parse_choices

    return parse_choices("--methods", methods, METHODS)


def plan_runs(methods: Sequence[str], seed: int, seeds: int) -> List[PlannedRun]:
    """One :class:`PlannedRun` per (method, seed): ``<method>-seed<seed>`` with ``{"method", "seed"}``.

    Raises:
        UsageError: ``seeds < 1``.
    """
    return seed_plan("method", methods, seed, seeds)


def table_columns(early_label: str) -> List[Tuple[str, str]]:
    """The table's columns ``(key, header)``: R@1 at the early epoch, at the best and at the last epoch,
    then MAP@R and R-Precision at the best and at the last epoch (keys as in :func:`run_scores`)."""
    return [("early_recall@1", early_label), ("recall@1", "R@1 best"), ("last_recall@1", "R@1 last"),
            ("map@r", "MAP@R best"), ("last_map@r", "MAP@R last"), ("r_precision", "R-Prec best"),
            ("last_r_precision", "R-Prec last")]


def format_table(summary: Dict[str, Dict[str, Dict[str, float]]], columns: Sequence[Tuple[str, str]]) -> str:
    """Markdown table: one row per method (baselines first), ``mean ± std`` in percent per column
    (one seed: the value).

    A baseline (a single evaluation, no epochs) has only the plain keys (``recall@1``, ``map@r``): its
    value fills every column of that metric (early, best and last alike).
    """
    lines = ["| Method | " + " | ".join(h for _, h in columns) + " |", "|---|" + "---|" * len(columns)]
    for method, stats in summary.items():
        cells = [format_mean_std(stats.get(k, stats.get(_plain_key(k))) if method in BASELINE_ROWS else stats.get(k))
                 for k, _ in columns]
        lines.append(f"| {PAPER_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Row names of the baselines (one evaluation of an untrained model, no epochs).
BASELINE_ROWS = ("raw-pixels", "untrained")

#: The methods an adapted memory's gain is measured against (in the tables' order): the plain memory, the
#: plain memory with the batch loss (the strongest baseline, XBM*) and no memory.
GAIN_BASELINES = ("xbm", "xbm-batch", "none")


def gain_targets(methods: Sequence[str]) -> List[str]:
    """The methods with an adapted memory among ``methods`` (XBN, AXBN, their ``-batch`` variants, xbn-cov)."""
    from ..config import method_memory

    return [m for m in methods if method_memory(m)[0] not in (None, "none")]


def paired_gains(runs: Sequence[Dict[str, Any]], methods: Sequence[str], keys: Sequence[str],
                 pair_on: Sequence[str] = ("seed",)) -> Dict[str, Dict[str, Dict[str, Dict[str, float]]]]:
    """The gain of every adapted method over each baseline of :data:`GAIN_BASELINES` the series holds, paired.

    For target ``T``, baseline ``B`` and score ``k``: the differences ``T[k] - B[k]`` of the finished runs
    with the same ``pair_on`` values (the seed: the same initialisation and batches), their mean, sample
    standard deviation (ddof=1; 0 for one pair) and number of pairs
    (:func:`xbn_queue.training.series.paired_differences`).

    Returns:
        ``{T: {B: {k: {"mean", "std", "n"}}}}`` (fractions), for the targets of :func:`gain_targets` and
        the baselines among ``methods``; a score no pair has is left out.
    """
    from xbn_queue.training.series import paired_differences

    out: Dict[str, Dict[str, Dict[str, Dict[str, float]]]] = {}
    for target in gain_targets(methods):
        for base in (b for b in GAIN_BASELINES if b in methods):
            stats = {k: mean_std(d) for k in keys if (d := paired_differences(runs, target, base, k, pair_on))}
            if stats:
                out.setdefault(target, {})[base] = stats
    return out


def signed(stat: Optional[Dict[str, float]]) -> str:
    """``+1.23 ± 0.45`` in points of % (``format_mean_std`` with the sign of a gain)."""
    text = format_mean_std(stat)
    return text if text == "n/a" or text.startswith("-") else "+" + text


def format_gain_table(gains: Dict[str, Dict[str, Dict[str, Dict[str, float]]]], columns: Sequence[Tuple[str, str]]) -> str:
    """Markdown table of :func:`paired_gains`: a row per target and baseline (``XBN − XBM*``), a column per score."""
    lines = ["| Paired gain | " + " | ".join(h for _, h in columns) + " |", "|---|" + "---|" * len(columns)]
    for target, per_base in gains.items():
        for base, stats in per_base.items():
            lines.append(f"| {PAPER_NAMES.get(target, target)} − {PAPER_NAMES.get(base, base)} | "
                         + " | ".join(signed(stats.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def gain_columns(early_label: str) -> List[Tuple[str, str]]:
    """The paired-gain table's columns: Recall@1 at the early epoch and at the best epoch."""
    return [("early_recall@1", early_label), ("recall@1", "R@1 best")]


def _plain_key(key: str) -> str:
    """``last_recall@1`` / ``early_recall@1`` -> ``recall@1``."""
    return key.split("_", 1)[1] if key.startswith(("last_", "early_")) else key


def _is_score(key: str) -> bool:
    from ..evaluate import SCORE_PREFIXES

    return _plain_key(key).startswith(SCORE_PREFIXES)


def run_scores(records: Sequence[Dict[str, Any]], early_epoch: int = 1) -> Dict[str, Any]:
    """What the tables take from one run's evaluations (the records of its ``metrics.jsonl``).

    The best evaluation is the first one with the highest Recall@1 (as the trainer picks ``best.pt``);
    the last is the final one; the early one is the first evaluation at epoch ``>= early_epoch``
    (epochs numbered as in ``metrics.jsonl``, the warm-up included).

    Returns:
        The best evaluation's ``recall@K`` / ``map@r`` (fractions) and ``best_epoch``; the last one's
        as ``last_recall@K`` / ``last_map@r`` with ``last_epoch`` and its ``staleness_cosine`` (when
        logged); ``early_recall@1`` and ``early_epoch``. ``{}`` when no evaluation was recorded.
    """
    evals = [r for r in records if "epoch" in r and isinstance(r.get("recall@1"), (int, float))
             and not math.isnan(r["recall@1"])]
    if not evals:
        return {}
    best = evals[0]
    for r in evals[1:]:
        if r["recall@1"] > best["recall@1"]:
            best = r
    last = evals[-1]
    out: Dict[str, Any] = {"best_epoch": best["epoch"], **{k: v for k, v in best.items() if _is_score(k)},
                           "last_epoch": last["epoch"], **{f"last_{k}": v for k, v in last.items() if _is_score(k)}}
    if isinstance(last.get("staleness_cosine"), (int, float)):
        out["staleness_cosine"] = last["staleness_cosine"]
    early = next((r for r in evals if r["epoch"] >= early_epoch), None)
    if early is not None:
        out.update({"early_epoch": early["epoch"], "early_recall@1": early["recall@1"]})
    return out


#: Per-epoch curves drawn in ``compare.png``: (metrics.jsonl key, axis label, scale).
_CURVES = [("recall@1", "Recall@1 (%)", 100.0), ("drift_mean", "feature drift, mean L2 (Eq. 5)", 1.0)]


def _curves(records: Sequence[Dict[str, Any]]) -> Dict[str, Dict[float, float]]:
    """``{key: {epoch: value}}`` for the keys of ``_CURVES`` from one run's ``metrics.jsonl`` records."""
    return {key: {r["epoch"]: scale * r[key] for r in records if "epoch" in r and isinstance(r.get(key), (int, float))}
            for key, _, scale in _CURVES}


def _plot(curves: Dict[str, List[Dict[str, Dict[float, float]]]], png: Path, title: str,
          baselines: Dict[str, Dict[str, Dict[str, float]]]) -> None:
    """``compare.png``: Recall@1 and drift per epoch, mean ± std band over seeds, one line per method;
    the baselines' Recall@1 as horizontal lines.

    Raises:
        ValueError: no evaluation recorded (e.g. runs cut short by ``--max-steps``).
    """
    from xbn_queue.training.tracking import plot_compare

    panels = [(label, {PAPER_NAMES.get(m, m): [run[key] for run in runs] for m, runs in curves.items()})
              for key, label, _ in _CURVES]
    hlines = {_CURVES[0][1]: {PAPER_NAMES.get(n, n): 100 * s["recall@1"]["mean"] for n, s in baselines.items()
                              if s.get("recall@1", {}).get("n")}}
    plot_compare(panels, png, title=title, hlines=hlines)


def default_series_dir(cfg: MetricConfig, resume: bool, kind: str = "compare") -> MetricConfig:
    """``output_dir`` of a comparison or sweep: as given, else a new ``runs/metric/<kind>-<dataset>-<timestamp>``.

    Raises:
        UsageError: ``--resume`` without ``--output-dir``.
    """
    from xbn_queue.training.cli import series_output_dir

    from ..train import DEFAULT_RUNS

    return dataclasses.replace(cfg, output_dir=series_output_dir(cfg.output_dir, resume, DEFAULT_RUNS, kind, cfg.dataset))


def _run_config(cfg: MetricConfig, run: PlannedRun, run_dir: Path, resume: bool, varied: Sequence[str] = ()) -> MetricConfig:
    """The configuration of one planned run: ``cfg`` with the run's settings, in its own folder; with W&B on,
    in the series' W&B group with the ``varied`` settings as tags (:func:`~xbn_queue.training.series.series_wandb`)."""
    return series_run_config(cfg, run, run_dir, resume, f"{cfg.wandb_name or cfg.dataset}-{run.name}", varied)


def series_trainer(cfg: MetricConfig, resume: bool, varied: Sequence[str] = ()) -> Callable[[PlannedRun, Path], RunOutcome]:
    """The ``train_one`` callback of :func:`~xbn_queue.training.series.run_series` for metric runs.

    Each planned run trains ``cfg`` with the run's settings (``method``, ``seed``, and for ``sweep``
    the varied options) in its own folder; with ``resume`` it continues from the folder's
    ``last.pt``, and a finished run is not trained again. ``varied``: the settings tagged in W&B.
    """
    from ..train import train

    def train_one(run: PlannedRun, run_dir: Path) -> RunOutcome:
        t = time.time()
        res = train(_run_config(cfg, run, run_dir, resume, varied))
        res["seconds"] = round(time.time() - t, 1)
        return RunOutcome.of_summary(res)

    return train_one


def series_command(cfg: MetricConfig, resume: bool, threads_given: bool,
                   varied: Sequence[str] = ()) -> Callable[[PlannedRun, Path, JobSlot], List[str]]:
    """The ``command`` of :func:`~xbn_queue.training.series.run_series` with ``--jobs N``: ``python -m
    metric train`` with the run's configuration (as :func:`series_trainer` trains it).

    Unless the user set ``--threads``, a run uses at most its slot's share of the cores (a default of
    0, torch's choice, becomes the share). On CPU, results equal those of the runs one after the
    other whenever the thread count is the same (floating-point sums depend on it).
    """

    def command(run: PlannedRun, run_dir: Path, slot: JobSlot) -> List[str]:
        run_cfg = _run_config(cfg, run, run_dir, resume, varied)
        if not threads_given:
            run_cfg = dataclasses.replace(run_cfg, threads=min(run_cfg.threads or slot.threads, slot.threads))
        return [sys.executable, "-m", "metric", "train", *config_to_argv(run_cfg, only_changed=True)]

    return command


#: The environment of a run's process: it imports this very ``metric`` package.
def _child_env() -> Dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return {"PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}


def check_jobs(jobs: int) -> None:
    """Refuse ``--jobs`` below 1, or above 1 under ``torchrun`` (each run is already spread over the processes).

    Raises:
        UsageError: naming ``--jobs``.
    """
    from xbn_queue.training.cli import UsageError

    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: expected an integer >= 1")
    if jobs > 1 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UsageError(f"--jobs {jobs}: runs side by side are not for torchrun (each run already uses every process); "
                         "use --jobs 1")


def run_series_of(cfg: MetricConfig, plan: Sequence[PlannedRun], out: Path, resume: bool, jobs: int, threads_given: bool,
                  verbose: bool, prog: str, varied: Sequence[str] = ()) -> SeriesReport:
    """:func:`~xbn_queue.training.series.run_series` for metric runs: in this process, or ``jobs`` processes
    (``varied``: the settings a sweep varies, tagged in W&B)."""
    return run_series(plan, out, series_trainer(cfg, resume, varied), verbose=verbose, prog=prog, jobs=jobs,
                      command=series_command(cfg, resume, threads_given, varied), env=_child_env())


def _shown(entry: Dict[str, Any]) -> str:
    """A run's table numbers on one line: ``R@1 best 87.08 (epoch 2), last 87.08, ...``."""
    cells = [("R@1 best", "recall@1"), ("last", "last_recall@1"), (f"epoch {entry.get('early_epoch')}", "early_recall@1"),
             ("MAP@R best", "map@r"), ("last", "last_map@r"), ("R-Prec best", "r_precision"), ("last", "last_r_precision")]
    return ", ".join(f"{name} {100 * entry[k]:.2f}" for name, k in cells if k in entry)


def run_records(run_dir: Path) -> List[Dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (``[]`` when the run logged nothing)."""
    from xbn_queue.training.tracking import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def run_rows(report: SeriesReport, early_epoch: int = 1) -> List[Dict[str, Any]]:
    """One row per planned run: its settings, ``complete``, ``seconds`` (when it ran in this call) and,
    for a finished run, :func:`run_scores` of its ``metrics.jsonl`` (so that rerunning a finished
    comparison gives the same numbers)."""
    rows: List[Dict[str, Any]] = []
    for rec in report.records:
        entry: Dict[str, Any] = {**rec.run.settings, "complete": rec.complete}
        res = rec.outcome.result if rec.outcome is not None else None
        if isinstance(res, dict) and res.get("seconds") is not None:
            entry["seconds"] = res["seconds"]
        if rec.complete:
            entry.update(run_scores(run_records(rec.output_dir), early_epoch))
        rows.append(entry)
    return rows


def metric_keys(cfg: MetricConfig) -> List[str]:
    """The best evaluation's keys: ``recall@K`` for each K, then ``map@r`` and ``r_precision`` (``cfg`` resolved)."""
    return [f"recall@{k}" for k in cfg.recall_ks] + ["map@r", "r_precision"]


def summarize_runs(runs: Sequence[Dict[str, Any]], methods: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{method: {key: mean_std}}`` over the finished runs, for every score key (best, ``last_``,
    ``early_``) and ``staleness_cosine`` the runs have."""
    done = [r for r in runs if r.get("complete")]
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for m in methods:
        mine = [r for r in done if r["method"] == m]
        keys = list(dict.fromkeys(k for r in mine for k in r if _is_score(k) or k == "staleness_cosine"))
        out[m] = {k: mean_std([r[k] for r in mine if k in r]) for k in keys}
    return out


def baselines_for(cfg: MetricConfig, seeds: List[int], out: Path, tag: str = "compare") -> Dict[str, Any]:
    """Raw-pixel and untrained-network baselines (:mod:`metric.experiments.baselines`), printed; ``{}`` off rank 0."""
    from .baselines import BASELINES, load_or_compute_baselines, summarize_baselines

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return {}
    results = load_or_compute_baselines(cfg, seeds, out)
    summary = summarize_baselines(results, metric_keys(cfg))
    for name, stats in summary.items():
        shown = ", ".join(f"{k} {100 * v['mean']:.2f}" for k, v in stats.items())
        print(f"[{tag}] baseline {BASELINES[name].lower()}: {shown}", file=sys.stderr, flush=True)
    return {"summary": summary, "runs": results}


def early_epoch_of(cfg: MetricConfig, early_epoch: Optional[int]) -> int:
    """The epoch of the table's early column: ``early_epoch``, or the first epoch after the warm-up.

    Epochs are numbered as in ``metrics.jsonl`` (the warm-up included); ``cfg`` is resolved.

    Raises:
        UsageError: an epoch outside ``[1, warm-up + epochs]``.
    """
    from xbn_queue.training.cli import UsageError

    total = int(cfg.warmup_epochs) + int(cfg.epochs)
    if early_epoch is None:
        return min(int(cfg.warmup_epochs) + 1, total)
    if not 1 <= early_epoch <= total:
        raise UsageError(f"--early-epoch {early_epoch}: expected an epoch in [1, {total}] "
                         f"(--warmup-epochs {cfg.warmup_epochs} + --epochs {cfg.epochs})")
    return early_epoch


def early_label(runs: Sequence[Dict[str, Any]], early_epoch: int) -> str:
    """Header of the early column: ``R@1 ep E`` with the epoch the finished runs have there."""
    epochs = {r["early_epoch"] for r in runs if r.get("complete") and "early_epoch" in r}
    return f"R@1 ep {epochs.pop()}" if len(epochs) == 1 else f"R@1 ep >={early_epoch}"


def gain_header(seeds: int) -> str:
    """The line above the paired-gain table: what its numbers are."""
    spread = ("one seed: the difference of the two runs" if seeds == 1 else
              f"mean ± std (sample, ddof=1) over the {seeds} seeds of the per-seed differences")
    return (f"Paired gains of the adapted memories, in points of Recall@1 (%): each run minus the baseline's run of the "
            f"same seed (same initialisation and batches), {spread}")


def run_compare(cfg: MetricConfig, methods: str, seeds: int, resume_cmd: str = "",
                early_epoch: Optional[int] = None, jobs: int = 1) -> Dict[str, Any]:
    """Train ``methods`` x ``seeds`` runs with ``cfg`` and print / write the table.

    ``cfg.resume`` (any non-empty value) continues every run from its ``last.pt`` and keeps finished
    runs; ``cfg.overwrite`` replaces runs the folder holds. Without either, a folder that holds a
    comparison is refused before anything is written. The table is computed from the runs'
    ``metrics.jsonl``, so running a finished comparison again prints the same table.

    Args:
        cfg: Training options shared by all runs (``method``, ``seed``, ``output_dir`` are set per run).
        methods: Comma-separated methods.
        seeds: Runs per method.
        resume_cmd: The command that finishes an interrupted comparison (printed and written when one is).
        early_epoch: Epoch of the early Recall@1 column (default: the first after the warm-up).
        jobs: Runs side by side, each in its own process (:func:`series_command`).

    Returns:
        The content of ``compare.json`` plus ``"exit_code"`` (0, or 128 + the signal that stopped it).

    Raises:
        UsageError: unknown method, ``seeds < 1``, bad options or an unusable output folder.
    """
    todo = _parse_methods(methods)
    plan = plan_runs(todo, cfg.seed, seeds)
    check_jobs(jobs)
    resume, threads_given = bool(cfg.resume), cfg.threads is not None
    cfg = default_series_dir(resolve_config(cfg), resume)
    for method in todo:  # options that some method refuses (--prefill with none): before anything is written
        validate_config(dataclasses.replace(cfg, method=method))
    early = early_epoch_of(cfg, early_epoch)
    out = Path(cfg.output_dir)
    check_series_dir(out, plan, resume=resume, overwrite=cfg.overwrite)
    main = int(os.environ.get("RANK", "0") or 0) == 0  # torchrun rank (each run sets up its own process group)
    lock = lock_series_dir(out, plan, resume=resume, overwrite=cfg.overwrite, what=f"an {PROG} compare", enabled=main)
    try:
        if main:
            print(f"[compare] comparison folder: {out}", file=sys.stderr, flush=True)
        t0 = time.time()
        baselines = baselines_for(cfg, [cfg.seed + i for i in range(seeds)], out)
        report = run_series_of(cfg, plan, out, resume, jobs, threads_given, verbose=main, prog="compare")
        runs = run_rows(report, early)
        if main:
            print_finished(report, runs, "compare")
        result, table = compare_result(cfg, todo, seeds, early, runs, baselines, report.incomplete(), time.time() - t0)
        if main:
            write_compare(out, result, table, method_curves(report, runs), resume_cmd)
        result["exit_code"] = report.exit_code
        return result
    finally:
        lock.release()


def print_finished(report: SeriesReport, runs: Sequence[Dict[str, Any]], prog: str) -> None:
    """One line per finished run on stderr: its table numbers (:func:`_shown`)."""
    for rec, entry in zip(report.records, runs):
        if rec.complete:
            print(f"[{prog}] {rec.run.name}: {_shown(entry)}", file=sys.stderr, flush=True)


def method_curves(report: SeriesReport, runs: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Dict[float, float]]]]:
    """The per-epoch curves of the finished runs for ``compare.png``: ``{method: [curves of each seed]}`` (:func:`_curves`)."""
    curves: Dict[str, List[Dict[str, Dict[float, float]]]] = {}
    for rec, entry in zip(report.records, runs):
        if rec.complete:
            curves.setdefault(entry["method"], []).append(_curves(run_records(rec.output_dir)))
    return curves


def compare_result(cfg: MetricConfig, todo: Sequence[str], seeds: int, early: int, runs: List[Dict[str, Any]],
                   baselines: Dict[str, Any], incomplete: List[str], wall: float) -> Tuple[Dict[str, Any], str]:
    """The content of ``compare.json`` and the markdown tables (methods, then the paired gains when any).

    Args:
        cfg: The resolved shared configuration.
        todo: The methods, in table order.
        seeds: Runs per method.
        early: The epoch of the early column (:func:`early_epoch_of`).
        runs: :func:`run_rows` of the series.
        baselines: :func:`baselines_for` (``{}`` off rank 0).
        incomplete: The runs that did not finish (:meth:`~xbn_queue.training.series.SeriesReport.incomplete`).
        wall: Seconds the comparison took.

    Returns:
        ``(result, table)``.
    """
    summary = summarize_runs(runs, todo)
    label = early_label(runs, early)
    table = format_table({**baselines.get("summary", {}), **summary}, table_columns(label))
    gains = paired_gains(runs, todo, [k for k, _ in gain_columns(label)])
    if gains:
        table += "\n\n" + gain_header(seeds) + "\n\n" + format_gain_table(gains, gain_columns(label))
    result = {"dataset": cfg.dataset, "methods": list(todo), "seeds": seeds, "early_epoch": early, "complete": not incomplete,
              "incomplete_runs": incomplete, "wall_seconds": round(wall, 1),
              "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "summary": summary, "gains": gains, "baselines": baselines, "runs": runs}
    return result, table


def write_compare(out: Path, result: Dict[str, Any], table: str, curves: Dict[str, List[Dict[str, Dict[float, float]]]],
                  resume_cmd: str = "") -> None:
    """Print the table (or the incomplete banner) and write ``compare.md``, ``compare.json`` and ``compare.png``
    (:func:`~xbn_queue.training.series.write_series`)."""
    dataset, seeds, incomplete = result["dataset"], result["seeds"], result["incomplete_runs"]
    spread = "one seed" if seeds == 1 else f"mean ± std over {seeds} seeds"
    what = ("Recall@1 at an early epoch, at the best epoch (highest Recall@1 on the evaluation split) and at "
            "the last epoch, MAP@R at the best and the last, in %")
    header = table_title(f"{dataset}: {spread}; {what}", incomplete, resume_cmd, f"{dataset}: finished runs only; {what}")
    if not incomplete:
        print(header)
        print(table)
        print(f"[compare] {len(result['runs'])} runs in {result['wall_seconds']:.0f} s", file=sys.stderr)
    base = result["baselines"].get("summary", {})
    write_series(out, "compare", f"{header}\n\n{table}\n", result, incomplete, resume_cmd,
                 {"compare.png": lambda png: _plot(curves, png, f"{dataset}: mean ± std over {seeds} seed(s)", base)})


def compare_main(argv: List[str]) -> int:
    """``xbn-metric compare ...`` (``argv`` starts with ``compare``); returns the exit status."""
    from xbn_queue.training.cli import resume_command
    from xbn_queue.training.config import parse_config

    cfg, extras = parse_config(MetricConfig, argv[1:], prog=f"{PROG} compare", extra_args=add_compare_args,
                               description=DESCRIPTION)
    resume = bool(cfg.resume)
    out = default_series_dir(resolve_config(cfg), resume).output_dir
    cfg = dataclasses.replace(cfg, output_dir=out)
    result = run_compare(cfg, extras.methods, extras.seeds, resume_cmd=resume_command(PROG, "metric", argv, out),
                         early_epoch=extras.early_epoch, jobs=extras.jobs)
    return int(result["exit_code"])
