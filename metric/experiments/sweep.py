"""``xbn-metric sweep``: Recall@1 and the gain of an adapted memory against any training option.

Each sweep varies one training option with every other at its value, over the same methods and seeds
(seeds ``--seed, --seed + 1, ...``):

* ``--vary OPTION=V1,V2,...`` (repeatable): any :class:`~metric.config.MetricConfig` field, e.g.
  ``--vary lr=3e-4,1e-3,3e-3 --vary batch-size=8,16,32``; each value is checked as ``--OPTION V`` is;
* ``--batch-sizes`` / ``--memory-sizes``: the same as ``--vary batch-size=...`` / ``--vary
  memory-size=...``; without any ``--vary`` both run (defaults 16,32,64 and 0.1,0.25,0.5,1.0): the
  paper's Figure 1, the memory fixed at ``--memory-size`` (the dataset default: 50 % of the training
  set, 100 % for DeepFashion2) in the first, the batch at ``--batch-size`` in the second.

Every (method, point, seed) is one run in ``OUTPUT_DIR/<method>-<option><value>...-seed<S>/`` (``b`` and
``m`` for batch and memory size: ``xbm-b16-m0.5-seed0``), planned as a
:class:`~xbn_queue.training.series.PlannedRun` and trained by :func:`~xbn_queue.training.series.run_series`
as in ``compare`` (``--jobs N``: N at a time, each in its own process); a point shared by two sweeps
(the base point) is trained once. So a sweep behaves as ``compare`` does: a folder that holds one is
refused without ``--resume`` / ``--overwrite``; SIGINT / SIGTERM stop the whole sweep after the running
runs' checkpoints (exit 130 / 143, the resume command printed); ``--resume`` never re-runs a finished
run and continues a cut-short one; tables count finished runs only (``sweep.md`` then starts with an
``INCOMPLETE:`` line). Each run's scores are read from its ``metrics.jsonl``: the best evaluation by
Recall@1 and the last one, as in ``compare``.

With ``xbm``, ``xbm-batch`` (XBM*) or ``none`` (No-XBM) among the methods, every run of another method
gets its **paired gain** over each of them (:func:`add_gains`): its Recall@1 at the early epoch (the
first after the warm-up, as in ``compare``), at the best and at the last epoch and its MAP@R (best and
last) minus those of the baseline's run of the same point and seed (same initialisation and batches);
``sweep.md`` shows them as mean ± std over seeds (every method over XBM; the adapted memories over XBM*
and No-XBM), with the **staleness** of the XBM run's memory (``staleness_cosine`` of its last
evaluation: the cosine of stored rows with fresh embeddings of the same images; lower is staler) next
to its own.

Outputs in ``OUTPUT_DIR``: ``sweep.json`` (every run, mean / std / n per point, the baselines),
``sweep.csv`` (one row per run: settings, scores, gains), ``sweep.md`` (per sweep: Recall@1 and MAP@R,
best / last epoch, methods x values, mean ± std in %; the gains over XBM and the staleness),
``sweep.png`` (one panel per sweep, mean line and std band per method, the raw-pixel and
untrained-network baselines as dashed lines: for batch and memory size the layout of Figure 1),
``gain.png`` (the Recall@1 gain over XBM against each swept option) and ``gain_staleness.png`` (every
run's gain against its XBM twin's staleness).

With W&B on, the runs are grouped as ``compare``'s are, and each run is also tagged with its swept values
(``lr=0.001``), so that a W&B filter on a tag picks one point.

With few training classes (a class split of 5 classes), ``--classes-per-batch K`` sets
``--m-per-class`` to ``B / K`` for every batch size ``B`` (the paper keeps 4 images per class, which
needs ``B / 4`` classes per batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from xbn_queue.training.cli import UsageError
from xbn_queue.training.memory import memory_rows
from xbn_queue.training.series import (PlannedRun, check_series_dir, format_mean_std, lock_series_dir, mean_std,
                                       table_title, write_series)

from ..config import METHODS, MetricConfig, resolve_config

__all__ = ["add_sweep_args", "run_sweep", "sweep_main", "sweep_plan", "sweep_points", "sweep_axes", "parse_vary", "Axis",
           "add_gains", "format_sweep_tables", "format_gain_tables", "plot_sweep", "plot_gain_vs_staleness", "write_runs_csv"]

PROG = "xbn-metric"

DESCRIPTION = """Recall@1 and MAP@R (best and last epoch) against any training option, for every method of
--methods, --seeds seeds each, the paired gains (same point and seed) over XBM, XBM* (xbm-batch) and
No-XBM (none), whichever --methods holds, and the staleness of the memory.
Each --vary OPTION=V1,V2,... is one sweep of that option, the others at their values; without --vary,
the paper's Figure 1: --batch-sizes (memory fixed at --memory-size) and --memory-sizes (batch fixed at
--batch-size). Every training option below is passed through to each run unchanged, except --method,
--seed, the swept options (and --m-per-class with --classes-per-batch) and --output-dir, which sweep
sets per run: run <method>-<option><value>...-seed<S> goes to OUTPUT_DIR/<that name>/. OUTPUT_DIR gets
sweep.md, sweep.json, sweep.csv, sweep.png, gain.png and gain_staleness.png (default OUTPUT_DIR: a new
folder runs/metric/sweep-<dataset>-<timestamp>).

Ctrl-C / SIGTERM stop the whole sweep after the running runs' checkpoints (exit 130 / 143) and print
the command that finishes it (sweep --resume --output-dir OUTPUT_DIR): finished runs are never
trained again."""

#: ``--methods`` default: the paper's Figure 1 compares XBM (plain memory) with XBN and AXBN.
DEFAULT_METHODS = "xbm,xbn,axbn"


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    """The options of ``sweep`` that are not training options."""
    from .compare import add_jobs_arg

    p = parser.add_argument_group("sweep")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated methods among {', '.join(METHODS)} (default: {DEFAULT_METHODS}; "
                        "xbm = plain memory, adaptation none)")
    p.add_argument("--vary", action="append", default=[], metavar="OPTION=V1,V2,...",
                   help="a sweep over any training option (repeatable: each --vary is its own sweep, the other "
                        "options at their values), e.g. --vary lr=3e-4,1e-3,3e-3 --vary batch-size=8,16,32")
    p.add_argument("--batch-sizes", default=None,
                   help="= --vary batch-size=...: batch sizes, memory fixed at --memory-size (default without "
                        "--vary: 16,32,64)")
    p.add_argument("--memory-sizes", default=None,
                   help="= --vary memory-size=...: memory sizes (fractions of the training set, above 1.0 more than an epoch, or row counts), batch "
                        "fixed at --batch-size (default without --vary: 0.1,0.25,0.5,1.0)")
    p.add_argument("--seeds", type=int, default=3,
                   help="runs per point, with seeds --seed, --seed + 1, ... (default: 3) [valid: >= 1]")
    p.add_argument("--classes-per-batch", type=int, default=None,
                   help="set --m-per-class to B / K for each batch size B (default: keep --m-per-class) [valid: >= 1]")
    add_jobs_arg(p)


@dataclasses.dataclass(frozen=True)
class Axis:
    """One sweep: a training option (a :class:`~metric.config.MetricConfig` field) and its values.

    Attributes:
        name: The field (``batch_size``).
        values: Its values, parsed.
        option: How the user gave it, for messages (``--batch-sizes``, ``--vary lr=...``).
    """

    name: str
    values: Tuple[Any, ...]
    option: str


#: Options a sweep sets itself, with the option to use instead.
_SET_BY_SWEEP = {"method": "--methods", "seed": "--seeds", "output_dir": "--output-dir", "resume": "--resume",
                 "overwrite": "--overwrite"}
#: Options that define the evaluation data (every point and the baselines must score the same images).
_EVALUATION = ("dataset", "data_root", "split", "train_fraction", "split_seed", "max_per_class", "recall_ks",
               "omniglot_rotations")
#: Short names of options in run folder names (``xbm-b16-m0.5-seed0``).
_SHORT = {"batch_size": "b", "memory_size": "m"}
DEFAULT_BATCH_SIZES = "16,32,64"
DEFAULT_MEMORY_SIZES = "0.1,0.25,0.5,1.0"


def parse_vary(text: str, base: MetricConfig) -> Axis:
    """``OPTION=V1,V2,...`` -> an :class:`Axis`; each value converted and range-checked as ``--OPTION V``.

    Raises:
        UsageError: no ``=``, an unknown option, one a sweep sets itself or that defines the evaluation
            data, a value the option does not take, an empty or repeated value.
    """
    from xbn_queue.training.cli import check_ranges
    from xbn_queue.training.config import parse_option_value

    option, eq, listed = text.partition("=")
    name = option.strip().lstrip("-").replace("-", "_")
    flag = "--" + name.replace("_", "-")
    if not eq or not name:
        raise UsageError(f"--vary {text}: expected OPTION=V1,V2,... (e.g. --vary lr=3e-4,1e-3)")
    if name not in {f.name for f in dataclasses.fields(MetricConfig)}:
        raise UsageError(f"--vary {text}: unknown option {flag} (see xbn-metric --help)")
    if name in _SET_BY_SWEEP:
        raise UsageError(f"--vary {text}: the sweep sets {flag} itself; use {_SET_BY_SWEEP[name]}")
    if name in _EVALUATION:
        raise UsageError(f"--vary {text}: {flag} defines the evaluation data, which every point must share; "
                         "run one sweep per value")
    def parse(v: str) -> Any:
        try:
            return parse_option_value(MetricConfig, name, v)
        except ValueError as err:
            raise UsageError(f"--vary {text}: {flag} {v}: {err}") from None

    def check(value: Any) -> None:
        check_ranges(dataclasses.replace(base, **{name: value}))
        if name == "memory_size":
            memory_rows(value, None)

    values = _value_list(listed, f"--vary {text}", parse, check)
    return Axis(name, tuple(values), f"--vary {option.strip()}")


def sweep_axes(base: MetricConfig, vary: Sequence[str], batch_sizes: Optional[str], memory_sizes: Optional[str]) -> List[Axis]:
    """The sweeps: ``--batch-sizes``, ``--memory-sizes`` (without ``--vary``, both, the one not given at its
    default: the paper's Figure 1), then every ``--vary``, in that order.

    Raises:
        UsageError: a malformed list, or an option swept twice.
    """
    if not vary:
        batch_sizes = DEFAULT_BATCH_SIZES if batch_sizes is None else batch_sizes
        memory_sizes = DEFAULT_MEMORY_SIZES if memory_sizes is None else memory_sizes
    axes: List[Axis] = []
    if batch_sizes is not None:
        axes.append(Axis("batch_size", tuple(_int_list(batch_sizes, "--batch-sizes")), "--batch-sizes"))
    if memory_sizes is not None:
        axes.append(Axis("memory_size", tuple(_memory_list(memory_sizes)), "--memory-sizes"))
    for text in vary:
        axis = parse_vary(text, base)
        twice = next((a for a in axes if a.name == axis.name), None)
        if twice is not None:
            raise UsageError(f"{axis.option}: --{axis.name.replace('_', '-')} is already swept by {twice.option}")
        axes.append(axis)
    return axes


def _key(v: Any) -> Tuple[str, str]:
    """A value with its type: ``1`` (rows) and ``1.0`` (the whole training set) are different points."""
    return (type(v).__name__, repr(v))


def _same(a: Any, b: Any) -> bool:
    return _key(a) == _key(b)


def _slug(v: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(v))


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
    def parse(v: str) -> Union[int, float]:
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                raise UsageError(f"--memory-sizes {text}: {v!r} is neither a row count nor a fraction of the training set") from None

    return _value_list(text, f"--memory-sizes {text}", parse, lambda value: memory_rows(value, None))


def _value_list(listed: str, shown: str, parse: Callable[[str], Any], check: Callable[[Any], Any]) -> List[Any]:
    """The comma-separated values of ``listed``, each parsed and checked; messages start with ``shown``.

    Raises:
        UsageError: from ``parse``; ``check``'s error behind ``shown``; no value; a value listed twice.
    """
    values: List[Any] = []
    for v in (v.strip() for v in listed.split(",")):
        if not v:
            continue
        value = parse(v)
        try:
            check(value)
        except UsageError as err:
            raise UsageError(f"{shown}: {err}") from None
        values.append(value)
    if not values:
        raise UsageError(f"{shown}: expected comma-separated values")
    if len({_key(v) for v in values}) != len(values):
        raise UsageError(f"{shown}: a value is listed twice")
    return values


def sweep_plan(cfg: MetricConfig, methods: Sequence[str], axes: Sequence[Axis], seeds: int,
               classes_per_batch: Optional[int] = None) -> Tuple[List[PlannedRun], Dict[str, Any]]:
    """The runs of every sweep, each once, in a stable order.

    Each sweep varies its option with the others at the base configuration's values; a point shared
    by two sweeps (the base point) is trained once.

    Args:
        cfg: the resolved base configuration (its values of the swept options are the fixed ones).
        methods, seeds, classes_per_batch: see ``xbn-metric sweep --help``.
        axes: the sweeps (:func:`sweep_axes`).

    Returns:
        ``(plan, fixed)``: a :class:`PlannedRun` per run, named ``<method>-<option><value>...-seed<S>``
        (``b`` for the batch size, ``m`` for the memory size, the option's name otherwise), with the
        settings ``method``, every swept option, ``m_per_class``, ``seed``; and ``{option: base value}``.

    Raises:
        UsageError: a batch size that is not a multiple of its images per class; ``--classes-per-batch``
            with ``--vary m-per-class``.
    """
    fixed = {a.name: getattr(cfg, a.name) for a in axes}
    if classes_per_batch is not None and "m_per_class" in fixed:
        raise UsageError("--classes-per-batch: sets --m-per-class from the batch size; it excludes --vary m-per-class")
    points: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
    for axis in axes:
        for v in axis.values:
            point = dict(fixed, **{axis.name: v})
            points.setdefault(tuple(_key(point[a.name]) for a in axes), point)
    plan = []
    for method in methods:
        for point in points.values():
            b = point.get("batch_size", cfg.batch_size)
            m_per_class = point.get("m_per_class", cfg.m_per_class if classes_per_batch is None else max(1, b // classes_per_batch))
            if b % m_per_class != 0:
                why = f"--m-per-class {m_per_class}" if classes_per_batch is None else f"--classes-per-batch {classes_per_batch}"
                where = next((a.option for a in axes if a.name in ("batch_size", "m_per_class")), "--batch-size")
                raise UsageError(f"{where}: {b} is not a multiple of the images per class ({why})")
            parts = "-".join(f"{_SHORT.get(a.name, a.name.replace('_', '-'))}{_slug(point[a.name])}" for a in axes)
            for i in range(seeds):
                seed = cfg.seed + i
                plan.append(PlannedRun(f"{method}-{parts}-seed{seed}",
                                       {"method": method, **point, "m_per_class": m_per_class, "seed": seed}))
    return plan, fixed


def _check_plan(cfg: MetricConfig, plan: Sequence[PlannedRun]) -> None:
    """Refuse, before any run starts, points the options or the training set cannot give.

    Each run's configuration goes through :func:`metric.config.resolve_config` and the data checks of
    :func:`metric.train.train` (memory rows, classes per batch), with the data read once.
    """
    from ..data import load_dataset
    from ..train import _check_data

    data = load_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.train_fraction, cfg.split_seed, max_per_class=cfg.max_per_class,
                        omniglot_rotations=cfg.omniglot_rotations)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    for run in plan:
        try:
            _check_data(resolve_config(dataclasses.replace(cfg, **run.settings)), data, world)
        except UsageError as err:
            raise UsageError(f"sweep point {run.name}: {err}") from None


#: Score keys of a sweep's points: best and last Recall@1 / MAP@R / R-Precision, staleness, and the gains over XBM.
SWEEP_KEYS = ["recall@1", "last_recall@1", "map@r", "last_map@r", "r_precision", "last_r_precision", "staleness_cosine"]
#: The scores a gain is computed for: Recall@1 at the early epoch, R@1 and MAP@R at the best and the last.
GAIN_SCORES = ("early_recall@1", "recall@1", "last_recall@1", "map@r", "last_map@r")


def gain_prefix(baseline: str) -> str:
    """Prefix of a run's gain over ``baseline``: ``gain_`` over XBM (the first sweeps' name),
    ``gain_over_<baseline>_`` over the others (``gain_over_xbm-batch_recall@1``)."""
    return "gain_" if baseline == "xbm" else f"gain_over_{baseline}_"


GAIN_KEYS = ["gain_recall@1", "gain_last_recall@1", "gain_map@r", "gain_last_map@r", "xbm_staleness_cosine",
             "gain_early_recall@1"] + [gain_prefix(b) + k for b in ("xbm-batch", "none") for k in GAIN_SCORES]


def add_gains(runs: Sequence[Dict[str, Any]], axes: Sequence[Axis]) -> None:
    """Give every finished run its gains over each baseline of :data:`metric.experiments.compare.GAIN_BASELINES` (XBM,
    XBM*, No-XBM) the sweep holds, paired: ``<gain_prefix(B)><key> = run[key] - B[key]`` with ``B``'s run
    of the same point and seed (same initialisation and batches), for the :data:`GAIN_SCORES`
    (fractions); and the ``xbm_staleness_cosine`` of its XBM twin. A run gets no gain over its own
    method, nor over a baseline without a finished twin."""
    from .compare import GAIN_BASELINES

    def where(r: Dict[str, Any]) -> Tuple[Any, ...]:
        return tuple(_key(r.get(a.name)) for a in axes) + (r["seed"],)

    for base in GAIN_BASELINES:
        twins = {where(r): r for r in runs if r["method"] == base and r.get("complete")}
        for r in runs:
            twin = twins.get(where(r))
            if r["method"] == base or twin is None or not r.get("complete"):
                continue
            for k in GAIN_SCORES:
                if k in r and k in twin:
                    r[gain_prefix(base) + k] = r[k] - twin[k]
            if base == "xbm" and "staleness_cosine" in twin:
                r["xbm_staleness_cosine"] = twin["staleness_cosine"]


def sweep_points(runs: Sequence[Dict[str, Any]], methods: Sequence[str], axes: Sequence[Axis], fixed: Dict[str, Any],
                 keys: Sequence[str]) -> Dict[str, List[Dict[str, Any]]]:
    """Mean / std / n over the seeds of the finished runs (``complete``) for every point of every sweep.

    Returns:
        ``{option: [...]}`` per sweep, each a list of ``{"method", "value", key: {"mean", "std", "n"}
        for each key the runs have}`` (fractions), in the order of ``methods`` x values.
    """
    out: Dict[str, List[Dict[str, Any]]] = {}
    for axis in axes:
        out[axis.name] = []
        for method in methods:
            for v in axis.values:
                want = dict(fixed, **{axis.name: v})
                rows = [r for r in runs if r["method"] == method and r.get("complete", True)
                        and all(_same(r.get(name), value) for name, value in want.items())]
                point: Dict[str, Any] = {"method": method, "value": v}
                for k in keys:
                    vals = [r[k] for r in rows if k in r]
                    if vals:
                        point[k] = mean_std(vals)
                out[axis.name].append(point)
    return out


def _value_label(sweep: str, v: Any) -> str:
    if sweep == "memory_size" and isinstance(v, float):
        return f"{100 * float(v):g} %"
    return str(v)


def _title(sweep: str, fixed: Dict[str, Any]) -> str:
    """``batch size (memory 50 %)``: the swept option and the values the others are fixed at."""
    others = ", ".join(f"{_SHORT_LABEL.get(k, k.replace('_', '-'))} {_value_label(k, v)}" for k, v in fixed.items() if k != sweep)
    return _SHORT_LABEL.get(sweep, "--" + sweep.replace("_", "-")).replace("batch", "batch size").replace(
        "memory", "memory size") + (f" ({others})" if others else "")


_SHORT_LABEL = {"batch_size": "batch", "memory_size": "memory"}


def _cell(point: Dict[str, Any], key: str, last: bool = True) -> str:
    best = format_mean_std(point.get(key))
    return f"{best} / {format_mean_std(point.get('last_' + key))}" if last and ("last_" + key) in point else best


def format_sweep_tables(points: Dict[str, List[Dict[str, Any]]], fixed: Dict[str, Any], key: str = "recall@1") -> str:
    """One Markdown table per sweep: a row per method, a column per value, ``best / last`` epoch as
    ``mean ± std`` in % (``best`` alone when the runs have no last evaluation)."""
    from .compare import PAPER_NAMES

    metric = key.replace("recall@", "R@").replace("map@r", "MAP@R").replace("r_precision", "R-Precision")
    parts = []
    for sweep, pts in points.items():
        values = list({_key(p["value"]): p["value"] for p in pts}.values())
        last = any(("last_" + key) in p for p in pts)
        lines = [f"**{metric}{' (best / last epoch)' if last else ''} vs {_title(sweep, fixed)}**", "",
                 "| Method | " + " | ".join(_value_label(sweep, v) for v in values) + " |", "|---|" + "---|" * len(values)]
        for method in dict.fromkeys(p["method"] for p in pts):
            cells = [_cell(next(p for p in pts if p["method"] == method and _same(p["value"], v)), key, last) for v in values]
            lines.append(f"| {PAPER_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _signed(stat: Optional[Dict[str, float]]) -> str:
    text = format_mean_std(stat)
    return text if text == "n/a" or text.startswith("-") else "+" + text


def format_gain_tables(points: Dict[str, List[Dict[str, Any]]], fixed: Dict[str, Any], early_label: str = "R@1 early") -> str:
    """One Markdown table per sweep of the paired gains (points of %, mean ± std over seeds of the per-seed
    differences with the baseline's run of the same point and seed), and the memory staleness (cosine of
    stored rows with fresh embeddings of the same images, last evaluation) per method.

    Over XBM: every other method, R@1 at the early epoch, best and last, MAP@R best. Over XBM* and
    No-XBM (when the sweep holds them): the adapted memories (XBN, AXBN, XBN*, AXBN*, ...), R@1 at the
    early and at the best epoch.
    """
    from .compare import GAIN_BASELINES, PAPER_NAMES, gain_targets

    parts = []
    for sweep, pts in points.items():
        values = list({_key(p["value"]): p["value"] for p in pts}.values())
        lines = [f"**Paired gains (points of %; each run minus the baseline's run of the same point and seed, mean ± std "
                 f"over seeds) and memory staleness (cosine) vs {_title(sweep, fixed)}**", "",
                 "| | " + " | ".join(_value_label(sweep, v) for v in values) + " |", "|---|" + "---|" * len(values)]
        methods = list(dict.fromkeys(p["method"] for p in pts))

        def at(method: str, v: Any) -> Dict[str, Any]:
            return next(p for p in pts if p["method"] == method and _same(p["value"], v))

        for base in (b for b in GAIN_BASELINES if b in methods):
            targets = [m for m in methods if m != base] if base == "xbm" else gain_targets(methods)
            scores = [("early_recall@1", early_label), ("recall@1", "R@1 best")]
            if base == "xbm":
                scores += [("last_recall@1", "R@1 last"), ("map@r", "MAP@R best")]
            for method in targets:
                name = f"{PAPER_NAMES.get(method, method)} − {PAPER_NAMES.get(base, base)}"
                for k, label in scores:
                    key = gain_prefix(base) + k
                    if any(key in at(method, v) for v in values):
                        lines.append(f"| {name}, {label} | " + " | ".join(_signed(at(method, v).get(key)) for v in values) + " |")
        for method in methods:
            if any("staleness_cosine" in at(method, v) for v in values):
                lines.append(f"| staleness {PAPER_NAMES.get(method, method)} | " + " | ".join(
                    format_mean_std(at(method, v).get("staleness_cosine"), scale=1.0, digits=3) for v in values) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _positions(sweep: str, values: Sequence[Any]) -> Tuple[List[float], List[str], Optional[int]]:
    """x positions, tick labels and log base (``None``: linear) of a sweep's values."""
    labels = [_value_label(sweep, v) for v in values]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(i) for i in range(len(values))], labels, None  # categories
    xs = [100 * float(v) if sweep == "memory_size" and all(isinstance(u, float) for u in values) else float(v) for v in values]
    spread = min(xs) > 0 and max(xs) / min(xs) >= 8
    return xs, labels, (2 if all(isinstance(v, int) for v in values) else 10) if spread else None


def plot_sweep(points: Dict[str, List[Dict[str, Any]]], fixed: Dict[str, Any], png: Path, title: str,
               baselines: Optional[Dict[str, Dict[str, Dict[str, float]]]] = None, key: str = "recall@1",
               ylabel: Optional[str] = None, zero_line: bool = False) -> Path:
    """One panel per sweep (the layout of the paper's Figure 1 for batch and memory size): ``key`` against
    the swept option, a mean line over seeds with a ± std band per method; baselines as dashed lines.

    Raises:
        ValueError: no point has a value.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .baselines import BASELINES
    from .compare import PAPER_NAMES

    if not any(key in p for ps in points.values() for p in ps):
        raise ValueError("plot_sweep: no point has a value")
    fig = Figure(figsize=(6.5, 3.25 * len(points)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (sweep, pts) in enumerate(points.items()):
        ax = fig.add_subplot(len(points), 1, i + 1)
        values = list({_key(p["value"]): p["value"] for p in pts}.values())
        xs_all, labels, base = _positions(sweep, values)
        for method in dict.fromkeys(p["method"] for p in pts):
            got = [(x, p[key]) for x, v in zip(xs_all, values) for p in pts
                   if p["method"] == method and _same(p["value"], v) and key in p]
            if not got:
                continue
            xs = [x for x, _ in got]
            mean = [100 * s["mean"] for _, s in got]
            std = [100 * s["std"] for _, s in got]
            n = max(s["n"] for _, s in got)
            (line,) = ax.plot(xs, mean, marker="o", markersize=4, label=f"{PAPER_NAMES.get(method, method)} (n={n})")
            if n > 1:
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        for name, stats in (baselines or {}).items():
            if key in stats:
                ax.axhline(100 * stats[key]["mean"], linestyle="--", linewidth=1,
                           color="grey" if name == "raw-pixels" else "black", label=BASELINES.get(name, name))
        if zero_line:
            ax.axhline(0.0, color="black", linewidth=0.8)
        if base is not None:
            ax.set_xscale("log", base=base)
        ax.set_xticks(xs_all)
        ax.set_xticklabels(labels)
        ax.set_xlabel(_title(sweep, fixed))
        ax.set_ylabel(ylabel or key.replace("recall@", "Recall@") + " (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    return _save_figure(fig, png, title)


def _save_figure(fig: Any, png: Path, title: str) -> Path:
    fig.suptitle(title)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, format="png", dpi=100)
    return png


def plot_gain_vs_staleness(runs: Sequence[Dict[str, Any]], png: Path, title: str) -> Path:
    """Scatter of every run's Recall@1 gain over XBM (same point and seed) against the staleness of that
    XBM run's memory (cosine of stored rows with fresh embeddings, last evaluation), one colour per method.

    Raises:
        ValueError: no run has both numbers.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .compare import PAPER_NAMES

    pts = [(r["method"], r["xbm_staleness_cosine"], 100 * r["gain_recall@1"]) for r in runs
           if "gain_recall@1" in r and "xbm_staleness_cosine" in r]
    if not pts:
        raise ValueError("plot_gain_vs_staleness: no run has a gain and a staleness")
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method in dict.fromkeys(m for m, _, _ in pts):
        ax.scatter([x for m, x, _ in pts if m == method], [y for m, _, y in pts if m == method], s=18,
                   label=PAPER_NAMES.get(method, method))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("XBM memory staleness: cosine of stored rows with fresh embeddings (lower = staler)")
    ax.set_ylabel("Recall@1 gain over XBM (points)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save_figure(fig, png, title)


#: Columns of ``sweep.csv`` after the run's settings.
_CSV_SCORES = ["complete", "seconds", "best_epoch", "recall@1", "last_epoch", "last_recall@1", "map@r", "last_map@r",
               "early_epoch", "early_recall@1", "staleness_cosine", *GAIN_KEYS]


def write_runs_csv(runs: Sequence[Dict[str, Any]], axes: Sequence[Axis], path: Path) -> None:
    """``sweep.csv``: one row per run (settings, scores as fractions, gains over XBM)."""
    import csv

    fields = ["method", "seed", *(a.name for a in axes if a.name != "m_per_class"), "m_per_class", *_CSV_SCORES]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(runs)


def run_sweep(cfg: MetricConfig, methods: str, batch_sizes: Optional[str] = None, memory_sizes: Optional[str] = None,
              seeds: int = 3, classes_per_batch: Optional[int] = None, resume_cmd: str = "", vary: Sequence[str] = (),
              jobs: int = 1) -> Dict[str, Any]:
    """Run every sweep, then print and write ``sweep.md`` / ``sweep.json`` / ``sweep.csv`` / ``sweep.png``
    / ``gain.png`` / ``gain_staleness.png``.

    Every option is checked (and the data read once to check each point's memory rows and classes per
    batch) before anything is written or trained.

    Args:
        cfg: Training options shared by all runs.
        methods: comma-separated methods.
        batch_sizes: ``--batch-sizes`` as on the command line (``None``: not given).
        memory_sizes: ``--memory-sizes`` as on the command line (``None``: not given).
        seeds: Runs per point.
        classes_per_batch: With a value K, ``m_per_class = B / K`` for each batch size B.
        resume_cmd: The command that finishes an interrupted sweep (printed and written when one is).
        vary: ``OPTION=V1,V2,...`` sweeps.
        jobs: Runs side by side, each in its own process.

    Returns:
        The content of ``sweep.json`` plus ``"exit_code"`` (0, or 128 + the signal that stopped it).

    Raises:
        UsageError: an unknown method or option, a malformed list, seeds < 1, a point the data cannot
            give, or an unusable output folder.
    """
    from .compare import (baselines_for, default_series_dir, early_epoch_of, early_label, print_finished, run_rows,
                          run_series_of)

    todo = _check_sweep_options(methods, seeds, classes_per_batch, jobs)
    axes = sweep_axes(cfg, vary, batch_sizes, memory_sizes)
    resume, threads_given = bool(cfg.resume), cfg.threads is not None
    cfg = default_series_dir(resolve_config(cfg), resume, "sweep")
    plan, fixed = sweep_plan(cfg, todo, axes, seeds, classes_per_batch)
    out = Path(cfg.output_dir)
    check_series_dir(out, plan, resume=resume, overwrite=cfg.overwrite)
    _check_plan(cfg, plan)
    main = int(os.environ.get("RANK", "0") or 0) == 0
    lock = lock_series_dir(out, plan, resume=resume, overwrite=cfg.overwrite, what=f"an {PROG} sweep", enabled=main)
    try:
        if main:
            print(f"[sweep] sweep folder: {out}; {len(plan)} runs ({len(todo)} method(s) x "
                  f"{len(plan) // (len(todo) * seeds)} point(s) x {seeds} seed(s))", file=sys.stderr, flush=True)
        t0 = time.time()
        baselines = baselines_for(cfg, [cfg.seed + i for i in range(seeds)], out, tag="sweep")
        report = run_series_of(cfg, plan, out, resume, jobs, threads_given, verbose=main, prog="sweep",
                               varied=[a.name for a in axes])
        early = early_epoch_of(cfg, None)  # as compare: the first epoch after the warm-up
        runs = run_rows(report, early)
        add_gains(runs, axes)
        if main:
            print_finished(report, runs, "sweep")
        result = sweep_result(cfg, todo, seeds, axes, fixed, runs, baselines, report.incomplete(), time.time() - t0)
        if main:
            write_sweep(out, result, axes, early_label(runs, early), resume_cmd)
        result["exit_code"] = report.exit_code
        return result
    finally:
        lock.release()


def _check_sweep_options(methods: str, seeds: int, classes_per_batch: Optional[int], jobs: int) -> List[str]:
    """The methods of ``--methods``, after checking the sweep's own options (not the training options).

    Raises:
        UsageError: an unknown method, ``--seeds`` or ``--classes-per-batch`` below 1, or a refused ``--jobs``.
    """
    from .compare import _parse_methods, check_jobs

    todo = _parse_methods(methods)
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: expected an integer >= 1")
    if classes_per_batch is not None and classes_per_batch < 1:
        raise UsageError(f"--classes-per-batch {classes_per_batch}: expected an integer >= 1")
    check_jobs(jobs)
    return todo


def sweep_result(cfg: MetricConfig, todo: Sequence[str], seeds: int, axes: Sequence[Axis], fixed: Dict[str, Any],
                 runs: List[Dict[str, Any]], baselines: Dict[str, Any], incomplete: List[str], wall: float) -> Dict[str, Any]:
    """The content of ``sweep.json``: every run, the points (mean / std / n, :func:`sweep_points`), the baselines.

    Args:
        cfg: The resolved base configuration.
        todo: The methods.
        seeds: Runs per point.
        axes, fixed: The sweeps and the base point (:func:`sweep_plan`).
        runs: The runs' rows with their gains (:func:`add_gains`).
        baselines: ``baselines_for`` (``{}`` off rank 0).
        incomplete: The runs that did not finish.
        wall: Seconds the sweep took.
    """
    from .compare import metric_keys

    keys = list(dict.fromkeys([*metric_keys(cfg), *SWEEP_KEYS, *GAIN_KEYS]))
    points = sweep_points(runs, todo, axes, fixed, keys)
    result = {"dataset": cfg.dataset, "methods": list(todo), "seeds": seeds,
              "sweeps": {a.name: list(a.values) for a in axes}, "fixed": fixed, "complete": not incomplete,
              "incomplete_runs": incomplete, "wall_seconds": round(wall, 1),
              "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "points": points, "baselines": baselines, "runs": runs}
    for a in axes:  # the names of the first versions of sweep.json
        if a.name in ("batch_size", "memory_size"):
            result[a.name + "s"] = list(a.values)
    return result


def sweep_markdown(result: Dict[str, Any], early_label: str, resume_cmd: str = "") -> str:
    """The content of ``sweep.md`` (without its last newline): the title (or the incomplete banner), the
    baselines, Recall@1 / MAP@R / R-Precision per sweep and, with a baseline method among others, the gains."""
    from .baselines import BASELINES
    from .compare import GAIN_BASELINES

    dataset, todo, points, fixed = result["dataset"], result["methods"], result["points"], result["fixed"]
    spread = "one seed" if result["seeds"] == 1 else f"mean ± std over {result['seeds']} seeds"
    header = table_title(f"{dataset}: {spread}; best epoch (highest Recall@1) / last epoch, in %", result["incomplete_runs"],
                         resume_cmd, f"{dataset}: finished runs only; best epoch / last epoch, in %")
    shown = "; ".join(f"{BASELINES[n]}: R@1 {format_mean_std(s.get('recall@1'))}, MAP@R {format_mean_std(s.get('map@r'))}"
                      for n, s in result["baselines"].get("summary", {}).items())
    has_baseline = any(b in todo for b in GAIN_BASELINES) and len(todo) > 1
    gains = format_gain_tables(points, fixed, early_label) if has_baseline else ""
    return "\n\n".join([header] + ([f"Baselines (same evaluation split): {shown}"] if shown else [])
                        + [format_sweep_tables(points, fixed, key) for key in ("recall@1", "map@r", "r_precision")]
                        + ([gains] if gains else []))


def sweep_figures(result: Dict[str, Any]) -> Dict[str, Callable[[Path], Path]]:
    """``sweep.png`` (Recall@1 per sweep), ``gain.png`` (the gain over XBM) and ``gain_staleness.png``, each a
    function of its file (:func:`~xbn_queue.training.series.write_series`)."""
    dataset, points, fixed, runs = result["dataset"], result["points"], result["fixed"], result["runs"]
    spread = "one seed" if result["seeds"] == 1 else f"mean ± std over {result['seeds']} seeds"
    base = result["baselines"].get("summary", {})
    trained = {k: [p for p in v if p["method"] != "xbm"] for k, v in points.items()}
    return {"sweep.png": lambda png: plot_sweep(points, fixed, png, f"{dataset}: Recall@1, {spread}", base),
            "gain.png": lambda png: plot_sweep(trained, fixed, png, f"{dataset}: Recall@1 gain over XBM, {spread}",
                                               key="gain_recall@1", ylabel="Recall@1 gain over XBM (points)", zero_line=True),
            "gain_staleness.png": lambda png: plot_gain_vs_staleness(
                runs, png, f"{dataset}: gain over XBM against the XBM memory's staleness, every run")}


def write_sweep(out: Path, result: Dict[str, Any], axes: Sequence[Axis], early_label: str, resume_cmd: str = "") -> None:
    """Print the tables (when every run finished) and write ``sweep.md``, ``sweep.json``, ``sweep.csv`` and the
    figures (:func:`sweep_figures`; removed while runs are missing)."""
    text = sweep_markdown(result, early_label, resume_cmd)
    if not result["incomplete_runs"]:
        print(text)
        print(f"[sweep] {len(result['runs'])} runs in {result['wall_seconds']:.0f} s", file=sys.stderr)
    write_series(out, "sweep", text + "\n", result, result["incomplete_runs"], resume_cmd, sweep_figures(result))
    write_runs_csv(result["runs"], axes, out / "sweep.csv")


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
                       resume_cmd=resume_command(PROG, "metric", argv, out), vary=extras.vary, jobs=extras.jobs)
    return int(result["exit_code"])
