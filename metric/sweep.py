"""``xbn-metric sweep``: the paper's Figure 1 as a command (Recall@1 against batch size and memory size).

Two sweeps over the same methods and seeds (seeds ``--seed, --seed + 1, ...``):

* **batch size**: every ``--batch-sizes`` value with the memory size fixed at ``--memory-size`` (the
  dataset default when not given: 50 % of the training set, 100 % for DeepFashion2, as in the paper);
* **memory size**: every ``--memory-sizes`` value with the batch size fixed at ``--batch-size``
  (the dataset default when not given; the paper fixes 64).

Every (method, batch size, memory size, seed) is one run in ``OUTPUT_DIR/<method>-b<B>-m<M>-seed<S>/``,
trained by :func:`metric.compare.run_configs` (the machinery of ``compare``); a point shared by both
sweeps (the fixed batch size with the fixed memory size) is trained once. With ``--resume`` a
finished run is never re-run and a cut-short one continues from its checkpoint. Each run's score is
its best evaluation by Recall@1, as in ``compare``.

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
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import METHODS, MetricConfig, memory_rows, resolve_config

__all__ = ["add_sweep_args", "run_sweep", "sweep_jobs", "sweep_points", "format_sweep_tables", "plot_sweep"]

#: ``--methods`` default: the paper's Figure 1 compares XBM (plain memory) with XBN and AXBN.
DEFAULT_METHODS = "xbm,xbn,axbn"


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """The options of ``sweep`` that are not training options."""
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated methods among {', '.join(METHODS)} (default: {DEFAULT_METHODS}; "
                        "xbm = plain memory, adaptation none)")
    p.add_argument("--batch-sizes", default="16,32,64",
                   help="batch sizes of the first sweep, memory fixed at --memory-size (default: 16,32,64)")
    p.add_argument("--memory-sizes", default="0.1,0.25,0.5,1.0",
                   help="memory sizes of the second sweep (fractions of the training set or row counts), batch "
                        "fixed at --batch-size (default: 0.1,0.25,0.5,1.0)")
    p.add_argument("--seeds", type=int, default=3, help="runs per point (default: 3)")
    p.add_argument("--classes-per-batch", type=int, default=None,
                   help="set --m-per-class to B / K for each batch size B (default: keep --m-per-class)")


def _int_list(text: str, option: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{option}: expected integers >= 1, got {text!r}")
    return list(dict.fromkeys(values))


def _memory_list(text: str) -> List[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(f"--memory-sizes: expected comma-separated sizes, got {text!r}")
    for v in values:
        memory_rows(v, 1)  # raises ValueError naming the value
    return list(dict.fromkeys(values))


def sweep_jobs(cfg: MetricConfig, methods: Sequence[str], batch_sizes: Sequence[int], memory_sizes: Sequence[str],
               seeds: int, classes_per_batch: Optional[int] = None) -> Tuple[List[Tuple[Dict[str, Any], MetricConfig]], Dict[str, Any]]:
    """The runs of both sweeps, each once, in a stable order.

    Args:
        cfg: the resolved base configuration (its batch and memory sizes are the fixed values).
        methods, batch_sizes, memory_sizes, seeds, classes_per_batch: see ``xbn-metric sweep --help``.

    Returns:
        ``(jobs, fixed)``: ``(labels, cfg)`` per run with labels ``method``, ``batch_size``,
        ``memory_size``, ``seed``; and ``{"batch_size": B0, "memory_size": M0}``.

    Raises:
        ValueError: a batch size that is not a multiple of its images per class.
    """
    out = Path(cfg.output_dir)
    fixed = {"batch_size": cfg.batch_size, "memory_size": str(cfg.memory_size)}
    points = [(b, fixed["memory_size"]) for b in batch_sizes] + [(fixed["batch_size"], m) for m in memory_sizes]
    points = list(dict.fromkeys(points))
    jobs = []
    for method in methods:
        for b, m in points:
            m_per_class = cfg.m_per_class if classes_per_batch is None else max(1, b // classes_per_batch)
            if b % m_per_class != 0:
                why = f"--m-per-class {m_per_class}" if classes_per_batch is None else f"--classes-per-batch {classes_per_batch}"
                raise ValueError(f"--batch-sizes: {b} is not a multiple of the images per class ({why})")
            for i in range(seeds):
                seed = cfg.seed + i
                name = f"{method}-b{b}-m{m}-seed{seed}"
                run_cfg = dataclasses.replace(cfg, method=method, batch_size=b, m_per_class=m_per_class, memory_size=m,
                                              seed=seed, output_dir=str(out / name),
                                              wandb_name=f"{cfg.wandb_name or cfg.dataset}-{name}")
                jobs.append(({"method": method, "batch_size": b, "memory_size": m, "seed": seed}, run_cfg))
    return jobs, fixed


def _check_data(cfg: MetricConfig, jobs: Sequence[Tuple[Dict[str, Any], MetricConfig]]) -> None:
    """Refuse, before any run starts, points the training set cannot give (memory rows, classes per batch)."""
    import numpy as np

    from .data import load_dataset

    data = load_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.train_fraction, cfg.split_seed, max_per_class=cfg.max_per_class)
    n, classes = len(data.train), int(np.unique(data.train.labels).size)
    for labels, c in jobs:
        if c.batch_size // c.m_per_class > classes:
            raise ValueError(f"batch size {c.batch_size} with {c.m_per_class} images per class needs "
                             f"{c.batch_size // c.m_per_class} classes, the training set has {classes}: "
                             f"use --classes-per-batch or lower --batch-sizes")
        if c.method != "none" and memory_rows(c.memory_size, n) < c.batch_size:
            raise ValueError(f"memory size {c.memory_size} gives {memory_rows(c.memory_size, n)} rows of {n} training "
                             f"images, fewer than the batch size {c.batch_size}")


def _stats(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def sweep_points(runs: Sequence[Dict[str, Any]], methods: Sequence[str], batch_sizes: Sequence[int],
                 memory_sizes: Sequence[str], fixed: Dict[str, Any], keys: Sequence[str]) -> Dict[str, List[Dict[str, Any]]]:
    """Mean / std / n over seeds for every point of both sweeps.

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
                rows = [r for r in runs if r["method"] == method and r["batch_size"] == b and r["memory_size"] == m]
                point: Dict[str, Any] = {"method": method, "value": v}
                for k in keys:
                    vals = [r[k] for r in rows if k in r]
                    if vals:
                        point[k] = _stats(vals)
                out[sweep].append(point)
    return out


def _value_label(sweep: str, v: Any) -> str:
    if sweep == "memory_size" and "." in str(v):
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
                cells.append("n/a" if s is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
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
        fractions = sweep == "memory_size" and all("." in str(v) for v in values)
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
        ax.set_xlabel(xlabels[sweep] + (" (% of the training set)" if fractions else ""))
        ax.set_ylabel(key.replace("recall@", "Recall@") + " (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, format="png", dpi=100)
    return png


def run_sweep(cfg: MetricConfig, methods: str, batch_sizes: str, memory_sizes: str, seeds: int,
              classes_per_batch: Optional[int] = None) -> Dict[str, Any]:
    """Run both sweeps, then print and write ``sweep.md`` / ``sweep.json`` / ``sweep.png``.

    Every option is checked (and the data read once to check memory rows and classes per batch)
    before the first run starts.

    Returns:
        The content of ``sweep.json``.

    Raises:
        ValueError: an unknown method, a malformed list, seeds < 1, or a point the data cannot give.
    """
    import os

    from .compare import baselines_for, metric_keys, run_configs

    todo = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in todo if m not in METHODS]
    if unknown or not todo:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(METHODS)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if classes_per_batch is not None and classes_per_batch < 1:
        raise ValueError(f"--classes-per-batch must be >= 1, got {classes_per_batch}")
    bs = _int_list(batch_sizes, "--batch-sizes")
    ms = _memory_list(memory_sizes)
    cfg = resolve_config(cfg)
    jobs, fixed = sweep_jobs(cfg, todo, bs, ms, seeds, classes_per_batch)
    _check_data(cfg, jobs)
    out = Path(cfg.output_dir)
    main = int(os.environ.get("RANK", "0") or 0) == 0
    t0 = time.time()
    keys = metric_keys(cfg)
    baselines = baselines_for(cfg, [cfg.seed + i for i in range(seeds)], out, tag="sweep")
    print(f"[sweep] {len(jobs)} runs: {len(todo)} method(s) x {len(jobs) // (len(todo) * seeds)} point(s) x {seeds} seed(s)",
          file=sys.stderr, flush=True)
    runs, _ = run_configs(jobs, tag="sweep")
    points = sweep_points(runs, todo, bs, ms, fixed, keys)
    wall = time.time() - t0
    result = {"dataset": cfg.dataset, "methods": todo, "seeds": seeds, "batch_sizes": bs, "memory_sizes": ms,
              "fixed": fixed, "wall_seconds": round(wall, 1),
              "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "points": points, "baselines": baselines, "runs": runs}
    if main:
        base = baselines.get("summary", {})
        header = (f"{cfg.dataset}: mean ± std over {seeds} seed(s) of the best epoch (by Recall@1), in %; "
                  f"{len(runs)} runs in {wall:.0f} s")
        shown = "; ".join(f"{n}: R@1 {100 * s['recall@1']['mean']:.2f}, MAP@R {100 * s['map@r']['mean']:.2f}"
                          for n, s in base.items() if "recall@1" in s and "map@r" in s)
        text = "\n\n".join([header] + ([f"Baselines ({shown})"] if shown else [])
                           + [format_sweep_tables(points, fixed, "recall@1"), format_sweep_tables(points, fixed, "map@r")])
        print(text)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.md").write_text(text + "\n")
        (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_sweep(points, fixed, out / "sweep.png", f"{cfg.dataset}: Recall@1, mean ± std over {seeds} seed(s)", base)
    return result
