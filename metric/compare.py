"""``xbn-metric compare``: train every method with every seed and tabulate mean +- std (the paper's Table 1).

Each run goes to ``OUTPUT_DIR/<method>-seed<seed>/`` (a full run folder); its score is its best
evaluation by Recall@1 (the paper selects the best epoch by Recall@1 on the validation set). The table
shows, per method, the mean and the sample standard deviation (ddof=1) over seeds of Recall@K and
MAP@R in percent (one seed: the value alone), after two baselines on the same evaluation split (raw
pixels and the untrained network, :mod:`metric.baselines`), and is written to ``OUTPUT_DIR/compare.md`` and
``OUTPUT_DIR/compare.json``; ``OUTPUT_DIR/compare.png`` shows Recall@1 and feature drift per epoch
(mean ± std band over seeds). Seeds are ``seed, seed + 1, ...``.

The runs are driven by :func:`xbn_queue.training.series.run_series`: SIGINT / SIGTERM stop the whole
comparison after the current run's checkpoint (exit 130 / 143, the resume command printed), a table
never counts an unfinished run (``compare.md`` then starts with an ``INCOMPLETE:`` line, and every run
in ``compare.json`` has a ``complete`` flag), and ``compare --resume`` finishes the missing runs (a
finished run is not trained again) and writes the full table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from xbn_queue.training.series import (PlannedRun, RunOutcome, SeriesReport, check_series_dir, format_mean_std,
                                       incomplete_banner, mean_std, run_series)

from .config import METHODS, MetricConfig, resolve_config

__all__ = ["add_compare_args", "run_compare", "compare_main", "format_table", "plan_runs", "series_trainer", "run_rows",
           "metric_keys", "baselines_for"]

PROG = "xbn-metric"

#: The paper's names of the methods.
PAPER_NAMES = {"none": "No-XBM", "xbm": "XBM", "xbm-batch": "XBM*", "xbn": "XBN", "axbn": "AXBN",
               "raw-pixels": "Raw pixels", "untrained": "Untrained net"}

DESCRIPTION = f"""Train every method of --methods with --seeds seeds each (seeds --seed, --seed + 1, ...) and
tabulate, per method, mean ± std over seeds of the best epoch's Recall@K and MAP@R, in %.

Every training option below is passed through to each run unchanged, except --method, --seed and
--output-dir, which compare sets per run: run <method>-seed<seed> goes to OUTPUT_DIR/<method>-seed<seed>/.
OUTPUT_DIR gets compare.md, compare.json and compare.png (default OUTPUT_DIR: a new folder
runs/metric/compare-<dataset>-<timestamp>).

Ctrl-C / SIGTERM stop the whole comparison after the current run's checkpoint (exit 130 / 143) and
print the command that finishes it (compare --resume --output-dir OUTPUT_DIR): finished runs are
kept, the missing ones are trained, and then the full table is written. A table never counts an
unfinished run."""


def add_compare_args(p: argparse.ArgumentParser) -> None:
    """The options of ``compare`` that are not training options."""
    g = p.add_argument_group("compare")
    g.add_argument("--methods", default="none,xbm,xbn,axbn",
                   help=f"comma-separated methods to compare, among {', '.join(METHODS)} (default: none,xbm,xbn,axbn)")
    g.add_argument("--seeds", type=int, default=3,
                   help="runs per method, with seeds --seed, --seed + 1, ... (default: 3) [valid: >= 1]")


def _parse_methods(methods: str) -> List[str]:
    from xbn_queue.training.cli import parse_choices

    return parse_choices("--methods", methods, METHODS)


def plan_runs(methods: Sequence[str], seed: int, seeds: int) -> List[PlannedRun]:
    """One :class:`PlannedRun` per (method, seed): ``<method>-seed<seed>`` with ``{"method", "seed"}``."""
    return [PlannedRun(f"{m}-seed{seed + i}", {"method": m, "seed": seed + i}) for m in methods for i in range(seeds)]


def format_table(summary: Dict[str, Dict[str, Dict[str, float]]], keys: List[str]) -> str:
    """Markdown table: one row per method, ``mean ± std`` in percent per metric (one seed: the value)."""
    head = "| Method | " + " | ".join(k.replace("recall@", "R@").replace("map@r", "MAP@R") for k in keys) + " |"
    lines = [head, "|---|" + "---|" * len(keys)]
    for method, stats in summary.items():
        cells = [format_mean_std(stats.get(k)) for k in keys]
        lines.append(f"| {PAPER_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Per-epoch curves drawn in ``compare.png``: (metrics.jsonl key, axis label, scale).
_CURVES = [("recall@1", "Recall@1 (%)", 100.0), ("drift_mean", "feature drift, mean L2 (Eq. 5)", 1.0)]


def _curves(metrics_jsonl: Path) -> Dict[str, Dict[float, float]]:
    """``{key: {epoch: value}}`` for the keys of ``_CURVES`` from one run's ``metrics.jsonl``."""
    from xbn_queue.training.tracking import read_metrics

    records = read_metrics(metrics_jsonl)
    return {key: {r["epoch"]: scale * r[key] for r in records if "epoch" in r and isinstance(r.get(key), (int, float))}
            for key, _, scale in _CURVES}


def _plot(curves: Dict[str, List[Dict[str, Dict[float, float]]]], png: Path, title: str) -> None:
    """``compare.png``: Recall@1 and drift per epoch, mean ± std band over seeds, one line per method."""
    from xbn_queue.training.tracking import plot_compare

    panels = [(label, {PAPER_NAMES.get(m, m): [run[key] for run in runs] for m, runs in curves.items()})
              for key, label, _ in _CURVES]
    try:
        plot_compare(panels, png, title=title)
    except ValueError:  # no evaluation recorded (e.g. runs cut short by --max-steps)
        print(f"[compare] no per-epoch metrics recorded: {png.name} not written", file=sys.stderr)


def default_series_dir(cfg: MetricConfig, resume: bool, kind: str = "compare") -> MetricConfig:
    """``output_dir`` of a comparison or sweep: as given, else a new ``runs/metric/<kind>-<dataset>-<timestamp>``.

    Raises:
        UsageError: ``--resume`` without ``--output-dir``.
    """
    from xbn_queue.training.cli import series_output_dir

    from .train import DEFAULT_RUNS

    return dataclasses.replace(cfg, output_dir=series_output_dir(cfg.output_dir, resume, DEFAULT_RUNS, kind, cfg.dataset))


def series_trainer(cfg: MetricConfig, resume: bool) -> Callable[[PlannedRun, Path], RunOutcome]:
    """The ``train_one`` callback of :func:`~xbn_queue.training.series.run_series` for metric runs.

    Each planned run trains ``cfg`` with the run's settings (``method``, ``seed``, and for ``sweep``
    ``batch_size``, ``m_per_class``, ``memory_size``) in its own folder; with ``resume`` it continues
    from the folder's ``last.pt``, and a finished run is not trained again.
    """
    from .train import train

    def train_one(run: PlannedRun, run_dir: Path) -> RunOutcome:
        run_cfg = dataclasses.replace(cfg, **run.settings, output_dir=str(run_dir), resume="auto" if resume else "",
                                      wandb_name=f"{cfg.wandb_name or cfg.dataset}-{run.name}")
        t = time.time()
        res = train(run_cfg)
        res["seconds"] = round(time.time() - t, 1)
        return RunOutcome(complete=res.get("stopped") != "signal", signal=res.get("signal"), result=res)

    return train_one


def run_rows(report: SeriesReport) -> List[Dict[str, Any]]:
    """One row per planned run: its settings, ``complete``, and (when it ran) ``seconds``, ``best_epoch``
    and the best evaluation's Recall@K / MAP@R (fractions)."""
    rows: List[Dict[str, Any]] = []
    for rec in report.records:
        entry: Dict[str, Any] = {**rec.run.settings, "complete": rec.complete}
        res = rec.outcome.result if rec.outcome is not None else None
        if res is not None:
            best = res.get("best") or {}
            entry.update({"seconds": res.get("seconds"), "best_epoch": best.get("epoch"),
                          **{k: v for k, v in best.items() if k.startswith(("recall@", "map@r"))}})
        rows.append(entry)
    return rows


def metric_keys(cfg: MetricConfig) -> List[str]:
    """The table's columns: ``recall@K`` for each K, then ``map@r`` (``cfg`` resolved)."""
    return [f"recall@{k}" for k in cfg.recall_ks] + ["map@r"]


def baselines_for(cfg: MetricConfig, seeds: List[int], out: Path, tag: str = "compare") -> Dict[str, Any]:
    """Raw-pixel and untrained-network baselines (:mod:`metric.baselines`), printed; ``{}`` off rank 0."""
    from .baselines import BASELINES, load_or_compute_baselines, summarize_baselines

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return {}
    results = load_or_compute_baselines(cfg, seeds, out)
    summary = summarize_baselines(results, metric_keys(cfg))
    for name, stats in summary.items():
        shown = ", ".join(f"{k} {100 * v['mean']:.2f}" for k, v in stats.items())
        print(f"[{tag}] baseline {BASELINES[name].lower()}: {shown}", file=sys.stderr, flush=True)
    return {"summary": summary, "runs": results}


def run_compare(cfg: MetricConfig, methods: str, seeds: int, resume_cmd: str = "") -> Dict[str, Any]:
    """Train ``methods`` x ``seeds`` runs with ``cfg`` and print / write the table.

    ``cfg.resume`` (any non-empty value) continues every run from its ``last.pt`` and keeps finished
    runs; ``cfg.overwrite`` replaces runs the folder holds. Without either, a folder that holds a
    comparison is refused before anything is written.

    Args:
        cfg: Training options shared by all runs (``method``, ``seed``, ``output_dir`` are set per run).
        methods: Comma-separated methods.
        seeds: Runs per method.
        resume_cmd: The command that finishes an interrupted comparison (printed and written when one is).

    Returns:
        The content of ``compare.json`` plus ``"exit_code"`` (0, or 128 + the signal that stopped it).

    Raises:
        UsageError: unknown method, ``seeds < 1``, bad options or an unusable output folder.
    """
    from xbn_queue.training.cli import UsageError

    todo = _parse_methods(methods)
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: expected an integer >= 1")
    resume = bool(cfg.resume)
    cfg = default_series_dir(resolve_config(cfg), resume)
    out = Path(cfg.output_dir)
    plan = plan_runs(todo, cfg.seed, seeds)
    check_series_dir(out, plan, resume=resume, overwrite=cfg.overwrite)
    main = int(os.environ.get("RANK", "0") or 0) == 0  # torchrun rank (each run sets up its own process group)
    if main:
        print(f"[compare] comparison folder: {out}", file=sys.stderr, flush=True)
    t0 = time.time()

    baselines = baselines_for(cfg, [cfg.seed + i for i in range(seeds)], out)
    report: SeriesReport = run_series(plan, out, series_trainer(cfg, resume), verbose=main)
    runs = run_rows(report)
    curves: Dict[str, List[Dict[str, Dict[float, float]]]] = {}
    for rec, entry in zip(report.records, runs):
        if rec.complete and main:
            curves.setdefault(entry["method"], []).append(_curves(rec.output_dir / "metrics.jsonl"))
            shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in entry.items() if k.startswith(("recall@", "map@r")))
            print(f"[compare] {rec.run.name}: {shown}", file=sys.stderr, flush=True)
    keys = metric_keys(cfg)
    done = [r for r in runs if r["complete"]]
    summary = {m: {k: mean_std([r[k] for r in done if r["method"] == m and k in r]) for k in keys
                   if any(k in r for r in done if r["method"] == m)} for m in todo}
    wall = time.time() - t0
    table = format_table({**baselines.get("summary", {}), **summary}, keys)
    incomplete = report.incomplete()
    result = {"dataset": cfg.dataset, "methods": todo, "seeds": seeds, "complete": not incomplete,
              "incomplete_runs": incomplete, "wall_seconds": round(wall, 1),
              "machine": f"{platform.machine()} {platform.processor()}".strip(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "summary": summary, "baselines": baselines, "runs": runs}
    if main:
        if incomplete:
            banner = incomplete_banner(incomplete, resume_cmd or None)
            header = f"{banner}\n\n{cfg.dataset}: finished runs only, best epoch (by Recall@1), in %"
            print(banner, file=sys.stderr)
        else:
            spread = "one seed" if seeds == 1 else f"mean ± std over {seeds} seed(s)"
            header = (f"{cfg.dataset}: {spread} of the best epoch (by Recall@1), in %; "
                      f"{len(runs)} runs in {wall:.0f} s")
            print(header)
            print(table)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(f"{header}\n\n{table}\n")
        (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
        if incomplete:
            (out / "compare.png").unlink(missing_ok=True)
        else:
            _plot(curves, out / "compare.png", f"{cfg.dataset}: mean ± std over {seeds} seed(s)")
    result["exit_code"] = report.exit_code
    return result


def compare_main(argv: List[str]) -> int:
    """``xbn-metric compare ...`` (``argv`` starts with ``compare``); returns the exit status."""
    from xbn_queue.training.cli import resume_command
    from xbn_queue.training.config import parse_config

    cfg, extras = parse_config(MetricConfig, argv[1:], prog=f"{PROG} compare", extra_args=add_compare_args,
                               description=DESCRIPTION)
    resume = bool(cfg.resume)
    out = default_series_dir(resolve_config(cfg), resume).output_dir
    cfg = dataclasses.replace(cfg, output_dir=out)
    result = run_compare(cfg, extras.methods, extras.seeds, resume_cmd=resume_command(PROG, "metric", argv, out))
    return int(result["exit_code"])
