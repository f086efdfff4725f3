"""``xbn-metric sweep``: the paper's Figure 1 as a command (Recall@1 against batch size and memory size).

Two sweeps over the same methods and seeds (seeds ``--seed, --seed + 1, ...``):

* **batch size**: every ``--batch-sizes`` value with the memory size fixed at ``--memory-size`` (the
  dataset default when not given: 50 % of the training set, 100 % for DeepFashion2, as in the paper);
* **memory size**: every ``--memory-sizes`` value with the batch size fixed at ``--batch-size``
  (the dataset default when not given; the paper fixes 64).

Every (method, batch size, memory size, seed) is one run in ``OUTPUT_DIR/<method>-b<B>-m<M>-seed<S>/``,
planned as a :class:`~xbn_queue.training.series.PlannedRun` and trained by
:func:`~xbn_queue.training.series.run_series` with ``compare``'s callback
(:func:`metric.compare.series_trainer`); a point shared by both sweeps (the fixed batch size with the
fixed memory size) is trained once. So a sweep behaves as ``compare`` does: a folder that holds one is
refused without ``--resume`` / ``--overwrite``; SIGINT / SIGTERM stop the whole sweep after the current
run's checkpoint (exit 130 / 143, the resume command printed); ``--resume`` never re-runs a finished run
and continues a cut-short one; tables count finished runs only (``sweep.md`` then starts with an
``INCOMPLETE:`` line). Each run's score is its best evaluation by Recall@1, as in ``compare``.

Outputs in ``OUTPUT_DIR``: ``sweep.json`` (every run, mean / std / n per point, the baselines),
``sweep.md`` (Recall@1 and MAP@R tables, methods x values, mean ± std in %) and ``sweep.png`` (the
layout of Figure 1: one panel per sweep, mean line and std band per method, the raw-pixel and
untrained-network baselines as dashed lines).

With few training classes (a class split of 5 classes), ``--classes-per-batch K`` sets
``--m-per-class`` to ``B / K`` for every batch size ``B`` (the paper keeps 4 images per class, which
needs ``B / 4`` classes per batch).
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
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from xbn_queue.training.cli import UsageError
from xbn_queue.training.series import PlannedRun, check_series_dir, format_mean_std, incomplete_banner, mean_std, run_series

from .config import METHODS, MetricConfig, memory_rows, resolve_config

__all__ = ["add_sweep_args", "run_sweep", "sweep_main", "sweep_plan", "sweep_points", "format_sweep_tables", "plot_sweep"]

PROG = "xbn-metric"

DESCRIPTION = """The paper's Figure 1: Recall@1 against the batch size (memory fixed at --memory-size) and
against the memory size (batch fixed at --batch-size), for every method of --methods, --seeds seeds
each. Every training option below is passed through to each run unchanged, except --method, --seed,
--batch-size (and --m-per-class with --classes-per-batch), --memory-size and --output-dir, which sweep
sets per run: run <method>-b<B>-m<M>-seed<S> goes to OUTPUT_DIR/<method>-b<B>-m<M>-seed<S>/. OUTPUT_DIR
gets sweep.md, sweep.json and sweep.png (default OUTPUT_DIR: a new folder
runs/metric/sweep-<dataset>-<timestamp>).

Ctrl-C / SIGTERM stop the whole sweep after the current run's checkpoint (exit 130 / 143) and print
the command that finishes it (sweep --resume --output-dir OUTPUT_DIR): finished runs are never
trained again."""

#: ``--methods`` default: the paper's Figure 1 compares XBM (plain memory) with XBN and AXBN.
DEFAULT_METHODS = "xbm,xbn,axbn"


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    """The options of ``sweep`` that are not training options."""
    p = parser.add_argument_group("sweep")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated methods among {', '.join(METHODS)} (default: {DEFAULT_METHODS}; "
                        "xbm = plain memory, adaptation none)")
    p.add_argument("--batch-sizes", default="16,32,64",
                   help="batch sizes of the first sweep, memory fixed at --memory-size (default: 16,32,64)")
    p.add_argument("--memory-sizes", default="0.1,0.25,0.5,1.0",
                   help="memory sizes of the second sweep (fractions of the training set or row counts), batch "
                        "fixed at --batch-size (default: 0.1,0.25,0.5,1.0)")
    p.add_argument("--seeds", type=int, default=3,
                   help="runs per point, with seeds --seed, --seed + 1, ... (default: 3) [valid: >= 1]")
    p.add_argument("--classes-per-batch", type=int, default=None,
                   help="set --m-per-class to B / K for each batch size B (default: keep --m-per-class) [valid: >= 1]")


def _int_list(text: str, option: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {text}: expected comma-separated integers") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{option} {text}: expected comma-separated integers >= 1")
    if len(set(values)) != len(values):
        raise UsageError(f"{option} {text}: a value is listed twice")
    return values


def _memory_list(text: str) -> List[Union[int, float]]:
    """``--memory-sizes``: integers are row counts, decimals fractions (as ``--memory-size``)."""
    values: List[Union[int, float]] = []
    for v in (v.strip() for v in text.split(",")):
        if not v:
            continue
        try:
            value: Union[int, float] = int(v)
        except ValueError:
            try:
                value = float(v)
            except ValueError:
                raise UsageError(f"--memory-sizes {text}: {v!r} is neither a row count nor a fraction in (0, 1]") from None
        try:
            memory_rows(value, None)
        except UsageError as err:
            raise UsageError(f"--memory-sizes {text}: {err}") from None
        values.append(value)
    if not values:
        raise UsageError(f"--memory-sizes {text}: expected comma-separated sizes")
    if len({str(v) for v in values}) != len(values):
        raise UsageError(f"--memory-sizes {text}: a value is listed twice")
    return values


def sweep_plan(cfg: MetricConfig, methods: Sequence[str], batch_sizes: Sequence[int], memory_sizes: Sequence[Union[int, float]],
               seeds: int, classes_per_batch: Optional[int] = None) -> Tuple[List[PlannedRun], Dict[str, Any]]:
    """The runs of both sweeps, each once, in a stable order.

    Args:
        cfg: the resolved base configuration (its batch and memory sizes are the fixed values).
        methods, batch_sizes, memory_sizes, seeds, classes_per_batch: see ``xbn-metric sweep --help``.

    Returns:
        ``(plan, fixed)``: a :class:`PlannedRun` per run, named ``<method>-b<B>-m<M>-seed<S>``, with the
        settings ``method``, ``batch_size``, ``m_per_class``, ``memory_size``, ``seed``; and
        ``{"batch_size": B0, "memory_size": M0}``.

    Raises:
        UsageError: a batch size that is not a multiple of its images per class.
    """
    fixed = {"batch_size": cfg.batch_size, "memory_size": cfg.memory_size}
    points = [(b, fixed["memory_size"]) for b in batch_sizes] + [(fixed["batch_size"], m) for m in memory_sizes]
    points = list(dict.fromkeys((b, m) for b, m in points))
    plan = []
    for method in methods:
        for b, m in points:
            m_per_class = cfg.m_per_class if classes_per_batch is None else max(1, b // classes_per_batch)
            if b % m_per_class != 0:
                why = f"--m-per-class {m_per_class}" if classes_per_batch is None else f"--classes-per-batch {classes_per_batch}"
                raise UsageError(f"--batch-sizes: {b} is not a multiple of the images per class ({why})")
            for i in range(seeds):
                seed = cfg.seed + i
                plan.append(PlannedRun(f"{method}-b{b}-m{m}-seed{seed}", {"method": method, "batch_size": b, "m_per_class": m_per_class,
                                                                          "memory_size": m, "seed": seed}))
    return plan, fixed


def _check_plan(cfg: MetricConfig, plan: Sequence[PlannedRun]) -> None:
    """Refuse, before any run starts, points the options or the training set cannot give.

    Each run's configuration goes through :func:`metric.config.resolve_config` and the data checks of
    :func:`metric.train.train` (memory rows, classes per batch), with the data read once.
    """
    from .data import load_dataset
    from .train import _check_data

    data = load_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.train_fraction, cfg.split_seed, max_per_class=cfg.max_per_class)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    for run in plan:
        try:
            _check_data(resolve_config(dataclasses.replace(cfg, **run.settings)), data, world)
        except UsageError as err:
            raise UsageError(f"sweep point {run.name}: {err}") from None


def sweep_points(runs: Sequence[Dict[str, Any]], methods: Sequence[str], batch_sizes: Sequence[int],
                 memory_sizes: Sequence[Union[int, float]], fixed: Dict[str, Any], keys: Sequence[str]) -> Dict[str, List[Dict[str, Any]]]:
    """Mean / std / n over the seeds of the finished runs (``complete``) for every point of both sweeps.

    Returns:
        ``{"batch_size": [...], "memory_size": [...]}``, each a list of ``{"method", "value", key:
        {"mean", "std", "n"} for each metric key}`` (fractions), in the order of ``methods`` x values.
    """
    out: Dict[str, List[Dict[str, Any]]] = {"batch_size": [], "memory_size": []}
    for sweep, values in (("batch_size", batch_sizes), ("memory_size", memory_sizes)):
        for method in methods:
            for v in values:
                b = v if sweep == "batch_size" else fixed["batch_size"]
                m = fixed["memory_size"] if sweep == "batch_size" else v
                rows = [r for r in runs if r["method"] == method and r["batch_size"] == b and r["memory_size"] == m
                        and r.get("complete", True)]
                point: Dict[str, Any] = {"method": method, "value": v}
                for k in keys:
                    vals = [r[k] for r in rows if k in r]
                    if vals:
                        point[k] = mean_std(vals)
                out[sweep].append(point)
    return out


def _value_label(sweep: str, v: Any) -> str:
    if sweep == "memory_size" and isinstance(v, float):
        return f"{100 * float(v):g} %"
    return str(v)


def format_sweep_tables(points: Dict[str, List[Dict[str, Any]]], fixed: Dict[str, Any], key: str = "recall@1") -> str:
    """Two Markdown tables (one per sweep): a row per method, a column per value, ``mean ± std`` in %."""
    from .compare import PAPER_NAMES

    metric = key.replace("recall@", "R@").replace("map@r", "MAP@R")
    parts = []
    for sweep, title in (("batch_size", f"{metric} vs batch size (memory {_value_label('memory_size', fixed['memory_size'])})"),
                         ("memory_size", f"{metric} vs memory size (batch {fixed['batch_size']})")):
        values = list(dict.fromkeys(p["value"] for p in points[sweep]))
        lines = [f"**{title}**", "", "| Method | " + " | ".join(_value_label(sweep, v) for v in values) + " |",
                 "|---|" + "---|" * len(values)]
        for method in dict.fromkeys(p["method"] for p in points[sweep]):
            cells = []
            for v in values:
                p = next(p for p in points[sweep] if p["method"] == method and p["value"] == v)
                s = p.get(key)
                cells.append(format_mean_std(s))
            lines.append(f"| {PAPER_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_sweep(points: Dict[str, List[Dict[str, Any]]], fixed: Dict[str, Any], png: Path, title: str,
               baselines: Optional[Dict[str, Dict[str, Dict[str, float]]]] = None, key: str = "recall@1") -> Path:
    """``sweep.png`` in the layout of the paper's Figure 1: R@1 vs batch size (top), vs memory size (bottom).

    Each method is its mean line over seeds with a ± std band; baselines are dashed horizontal lines.

    Raises:
        ValueError: no point has a value.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .baselines import BASELINES
    from .compare import PAPER_NAMES

    if not any(key in p for ps in points.values() for p in ps):
        raise ValueError("plot_sweep: no point has a value")
    fig = Figure(figsize=(6.5, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    xlabels = {"batch_size": f"batch size (memory {_value_label('memory_size', fixed['memory_size'])})",
               "memory_size": f"memory size (batch {fixed['batch_size']})"}
    for i, sweep in enumerate(("batch_size", "memory_size")):
        ax = fig.add_subplot(2, 1, i + 1)
        values = list(dict.fromkeys(p["value"] for p in points[sweep]))
        numeric = [float(v) for v in values]
        fractions = sweep == "memory_size" and all(isinstance(v, float) for v in values)
        xs_all = [100 * x for x in numeric] if fractions else numeric
        for method in dict.fromkeys(p["method"] for p in points[sweep]):
            pts = [(x, p[key]) for x, v in zip(xs_all, values) for p in points[sweep]
                   if p["method"] == method and p["value"] == v and key in p]
            if not pts:
                continue
            xs = [x for x, _ in pts]
            mean = [100 * s["mean"] for _, s in pts]
            std = [100 * s["std"] for _, s in pts]
            n = max(s["n"] for _, s in pts)
            (line,) = ax.plot(xs, mean, marker="o", markersize=4, label=f"{PAPER_NAMES.get(method, method)} (n={n})")
            if n > 1:
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        for name, stats in (baselines or {}).items():
            if key in stats:
                ax.axhline(100 * stats[key]["mean"], linestyle="--", linewidth=1,
                           color="grey" if name == "raw-pixels" else "black", label=BASELINES.get(name, name))
        if sweep == "batch_size":
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all)
        ax.set_xticklabels([_value_label(sweep, v) for v in values])
        ax.set_xlabel(xlabels[sweep] if sweep == "batch_size" else
                      f"memory size, {'% of the training set' if fractions else 'rows'} (batch {fixed['batch_size']})")
        ax.set_ylabel(key.replace("recall@", "Recall@") + " (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, format="png", dpi=100)
    return png


def run_sweep(cfg: MetricConfig, methods: str, batch_sizes: str, memory_sizes: str, seeds: int,
              classes_per_batch: Optional[int] = None, resume_cmd: str = "") -> Dict[str, Any]:
    """Run both sweeps, then print and write ``sweep.md`` / ``sweep.json`` / ``sweep.png``.

    Every option is checked (and the data read once to check each point's memory rows and classes per
    batch) before anything is written or trained.

    Args:
        cfg: Training options shared by all runs.
        methods, batch_sizes, memory_sizes: comma-separated lists, as on the command line.
        seeds: Runs per point.
        classes_per_batch: With a value K, ``m_per_class = B / K`` for each batch size B.
        resume_cmd: The command that finishes an interrupted sweep (printed and written when one is).

    Returns:
        The content of ``sweep.json`` plus ``"exit_code"`` (0, or 128 + the signal that stopped it).

    Raises:
        UsageError: an unknown method, a malformed list, seeds < 1, a point the data cannot give, or an
            unusable output folder.
    """
    from .compare import _parse_methods, baselines_for, default_series_dir, metric_keys, run_rows, series_trainer

    todo = _parse_methods(methods)
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: expected an integer >= 1")
    if classes_per_batch is not None and classes_per_batch < 1:
        raise UsageError(f"--classes-per-batch {classes_per_batch}: expected an integer >= 1")
    bs = _int_list(batch_sizes, "--batch-sizes")
    ms = _memory_list(memory_sizes)
    resume = bool(cfg.resume)
    cfg = default_series_dir(resolve_config(cfg), resume, "sweep")
    plan, fixed = sweep_plan(cfg, todo, bs, ms, seeds, classes_per_batch)
    out = Path(cfg.output_dir)
    check_series_dir(out, plan, resume=resume, overwrite=cfg.overwrite)
    _check_plan(cfg, plan)
    main = int(os.environ.get("RANK", "0") or 0) == 0
    if main:
        print(f"[sweep] sweep folder: {out}; {len(plan)} runs ({len(todo)} method(s) x "
              f"{len(plan) // (len(todo) * seeds)} point(s) x {seeds} seed(s))", file=sys.stderr, flush=True)
    t0 = time.time()
    keys = metric_keys(cfg)
    baselines = baselines_for(cfg, [cfg.seed + i for i in range(seeds)], out, tag="sweep")
    report = run_series(plan, out, series_trainer(cfg, resume), verbose=main, prog="sweep")
    runs = run_rows(report)
    if main:
        for rec, entry in zip(report.records, runs):
            if rec.complete:
                shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in entry.items() if k.startswith(("recall@", "map@r")))
                print(f"[sweep] {rec.run.name}: {shown}", file=sys.stderr, flush=True)
    points = sweep_points(runs, todo, bs, ms, fixed, keys)
    wall = time.time() - t0
    incomplete = report.incomplete()
    result = {"dataset": cfg.dataset, "methods": todo, "seeds": seeds, "batch_sizes": bs, "memory_sizes": ms,
              "fixed": fixed, "complete": not incomplete, "incomplete_runs": incomplete, "wall_seconds": round(wall, 1),
              "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "points": points, "baselines": baselines, "runs": runs}
    if main:
        base = baselines.get("summary", {})
        spread = "one seed" if seeds == 1 else f"mean ± std over {seeds} seed(s)"
        header = (f"{cfg.dataset}: {spread} of the best epoch (by Recall@1), in %; "
                  f"{len(runs)} runs in {wall:.0f} s")
        if incomplete:
            banner = incomplete_banner(incomplete, resume_cmd or None)
            header = f"{banner}\n\n{cfg.dataset}: finished runs only, best epoch (by Recall@1), in %"
            print(banner, file=sys.stderr)
        from .baselines import BASELINES

        shown = "; ".join(f"{BASELINES[n]}: R@1 {format_mean_std(s.get('recall@1'))}, MAP@R {format_mean_std(s.get('map@r'))}"
                          for n, s in base.items())
        text = "\n\n".join([header] + ([f"Baselines (same evaluation split): {shown}"] if shown else [])
                           + [format_sweep_tables(points, fixed, "recall@1"), format_sweep_tables(points, fixed, "map@r")])
        if not incomplete:
            print(text)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.md").write_text(text + "\n")
        (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        if incomplete:
            (out / "sweep.png").unlink(missing_ok=True)
        else:
            try:
                plot_sweep(points, fixed, out / "sweep.png", f"{cfg.dataset}: Recall@1, {spread}", base)
            except ValueError:  # no evaluation recorded (e.g. runs cut short by --max-steps)
                print("[sweep] no evaluation recorded: sweep.png not written", file=sys.stderr)
    result["exit_code"] = report.exit_code
    return result


def sweep_main(argv: List[str]) -> int:
    """``xbn-metric sweep ...`` (``argv`` starts with ``sweep``); returns the exit status."""
    from xbn_queue.training.cli import resume_command
    from xbn_queue.training.config import parse_config

    from .compare import default_series_dir

    cfg, extras = parse_config(MetricConfig, argv[1:], prog=f"{PROG} sweep", extra_args=add_sweep_args,
                               description=DESCRIPTION)
    out = default_series_dir(resolve_config(cfg), bool(cfg.resume), "sweep").output_dir
    cfg = dataclasses.replace(cfg, output_dir=out)
    result = run_sweep(cfg, extras.methods, extras.batch_sizes, extras.memory_sizes, extras.seeds, extras.classes_per_batch,
                       resume_cmd=resume_command(PROG, "metric", argv, out))
    return int(result["exit_code"])
