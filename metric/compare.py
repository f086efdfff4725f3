"""``xbn-metric compare``: train every method with every seed and tabulate mean +- std (the paper's Table 1).

Each run goes to ``OUTPUT_DIR/<method>-seed<seed>/`` (a full run folder); its score is its best
evaluation by Recall@1 (the paper selects the best epoch by Recall@1 on the validation set). The table
shows, per method, the mean and the sample standard deviation (ddof=1) over seeds of Recall@K and
MAP@R in percent, after two baselines on the same evaluation split (raw pixels and the untrained
network, :mod:`metric.baselines`), and is written to ``OUTPUT_DIR/compare.md`` and ``OUTPUT_DIR/compare.json``;
``OUTPUT_DIR/compare.png`` shows Recall@1 and feature drift per epoch (mean ± std band over seeds).
Seeds are ``seed, seed + 1, ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .config import METHODS, MetricConfig, resolve_config

__all__ = ["add_compare_args", "run_compare", "run_configs", "format_table", "metric_keys", "baselines_for"]


#: The paper's names of the methods.
PAPER_NAMES = {"none": "No-XBM", "xbm": "XBM", "xbm-batch": "XBM*", "xbn": "XBN", "axbn": "AXBN",
               "raw-pixels": "Raw pixels", "untrained": "Untrained net"}


def add_compare_args(p: argparse.ArgumentParser) -> None:
    """The options of ``compare`` that are not training options."""
    p.add_argument("--methods", default="none,xbm,xbn,axbn",
                   help=f"comma-separated methods among {', '.join(METHODS)} (default: none,xbm,xbn,axbn)")
    p.add_argument("--seeds", type=int, default=3, help="runs per method (default: 3)")


def _mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def format_table(summary: Dict[str, Dict[str, Dict[str, float]]], keys: List[str]) -> str:
    """Markdown table: one row per method, ``mean ± std`` in percent per metric."""
    head = "| Method | " + " | ".join(k.replace("recall@", "R@").replace("map@r", "MAP@R") for k in keys) + " |"
    lines = [head, "|---|" + "---|" * len(keys)]
    for method, stats in summary.items():
        cells = []
        for k in keys:
            s = stats.get(k)
            cells.append("n/a" if s is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
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


def run_configs(jobs: List[Tuple[Dict[str, Any], MetricConfig]], tag: str = "compare") -> Tuple[List[Dict[str, Any]], List[Dict[str, Dict[float, float]]]]:
    """Train each job's configuration in order (each in its own run folder) and collect its best evaluation.

    A job whose run folder holds a finished run is not trained again when its configuration has
    ``resume`` set (:func:`metric.train.train` then only reads the checkpoint back).

    Args:
        jobs: ``(labels, cfg)`` pairs; ``labels`` (e.g. ``{"method": "xbn", "seed": 0}``) are copied
            into the run's row.
        tag: prefix of the progress lines.

    Returns:
        ``(rows, curves)``: per job, ``labels`` + ``seconds``, ``best_epoch`` and the best evaluation's
        Recall@K / MAP@R (fractions); and its per-epoch curves (:data:`_CURVES`; empty off rank 0).
    """
    from .train import train

    main = int(os.environ.get("RANK", "0") or 0) == 0  # torchrun rank (each run sets up its own process group)
    rows: List[Dict[str, Any]] = []
    curves: List[Dict[str, Dict[float, float]]] = []
    for labels, run_cfg in jobs:
        t = time.time()
        res = train(run_cfg)
        curves.append(_curves(Path(run_cfg.output_dir) / "metrics.jsonl") if main else {})
        best = res["best"]
        rows.append({**labels, "seconds": round(time.time() - t, 1), "best_epoch": best.get("epoch"),
                     **{k: v for k, v in best.items() if k.startswith(("recall@", "map@r"))}})
        if main:
            name = " ".join(f"{v}" if k == "method" else f"{k} {v}" for k, v in labels.items())
            shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in rows[-1].items() if k.startswith(("recall@", "map@r")))
            print(f"[{tag}] {name}: {shown} ({rows[-1]['seconds']} s)", file=sys.stderr, flush=True)
    return rows, curves


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


def run_compare(cfg: MetricConfig, methods: str, seeds: int) -> Dict[str, Any]:
    """Train ``methods`` x ``seeds`` runs with ``cfg`` and print / write the table.

    The table starts with the two baselines (raw pixels, untrained network; :mod:`metric.baselines`).

    Returns:
        The content of ``compare.json``.

    Raises:
        ValueError: unknown method or seeds < 1.
    """
    todo = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in todo if m not in METHODS]
    if unknown or not todo:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(METHODS)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    cfg = resolve_config(cfg)
    out = Path(cfg.output_dir)
    main = int(os.environ.get("RANK", "0") or 0) == 0  # torchrun rank (each run sets up its own process group)
    t0 = time.time()
    keys = metric_keys(cfg)
    baselines = baselines_for(cfg, [cfg.seed + i for i in range(seeds)], out)
    jobs = []
    for method in todo:
        for i in range(seeds):
            seed = cfg.seed + i
            run_cfg = dataclasses.replace(cfg, method=method, seed=seed, output_dir=str(out / f"{method}-seed{seed}"),
                                          wandb_name=f"{cfg.wandb_name or cfg.dataset}-{method}-seed{seed}")
            jobs.append(({"method": method, "seed": seed}, run_cfg))
    runs, run_curves = run_configs(jobs)
    curves: Dict[str, List[Dict[str, Dict[float, float]]]] = {}
    for (labels, _), c in zip(jobs, run_curves):
        curves.setdefault(labels["method"], []).append(c)
    summary = {m: {k: _mean_std([r[k] for r in runs if r["method"] == m and k in r]) for k in keys
                   if any(k in r for r in runs if r["method"] == m)} for m in todo}
    wall = time.time() - t0
    table = format_table({**baselines.get("summary", {}), **summary}, keys)
    result = {"dataset": cfg.dataset, "methods": todo, "seeds": seeds, "wall_seconds": round(wall, 1),
              "machine": f"{platform.machine()} {platform.processor()}".strip(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "summary": summary, "baselines": baselines, "runs": runs}
    if main:
        header = (f"{cfg.dataset}: mean ± std over {seeds} seed(s) of the best epoch (by Recall@1), in %; "
                  f"{len(runs)} runs in {wall:.0f} s")
        print(header)
        print(table)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(f"{header}\n\n{table}\n")
        (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
        _plot(curves, out / "compare.png", f"{cfg.dataset}: mean ± std over {seeds} seed(s)")
    return result
