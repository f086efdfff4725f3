"""``xbn-selfsup compare``: k-NN accuracy per epoch, mean +- std over seeds, per adaptation.

Below the per-epoch table, each adaptation's last epoch and best epoch (the best is chosen on the
test split itself, so it flatters; the last is not chosen).

Writes ``compare.md``, ``compare.json`` and ``compare.png`` (the curves with a +- std band).

The shape of the paper's Figure 2 (MoCo with and without XBN). Each run goes to
``OUTPUT_DIR/<adaptation>-seed<S>/``. The runs are driven by
:func:`xbn_queue.training.series.run_series`: SIGINT / SIGTERM stop the whole comparison after the
current run's checkpoint (exit 130 / 143, the resume command printed); a table never counts an
unfinished run (``compare.md`` then starts with an ``INCOMPLETE:`` line and every run in
``compare.json`` has a ``complete`` flag); ``compare --resume`` continues every run from its
``last.pt`` (finished runs are not trained again) and writes the full table. With W&B on, the runs
form one W&B group, the comparison folder's name (or ``--wandb-group``), each with its adaptation as job
type (:func:`~xbn_queue.training.series.series_wandb`).
"""

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from xbn_queue.training.series import (PlannedRun, RunOutcome, SeriesReport, check_series_dir, format_mean_std,
                                       lock_series_dir, mean_std, run_series, seed_plan, series_run_config, table_title,
                                       write_series)

from selfsup.config import ADAPTATIONS, SelfSupConfig
from selfsup.data import ImageData, load_dataset

PROG = "xbn-selfsup"


DESCRIPTION = """Train every adaptation of --adaptations with --seeds seeds each (seeds --seed, --seed + 1, ...)
and tabulate the k-NN accuracy per epoch as mean ± std over seeds, in % (the paper's Figure 2), then
each adaptation's last epoch next to its best epoch (the best is chosen on the test split itself).

Every training option below is passed through to each run unchanged, except --adaptation, --seed and
--output-dir, which compare sets per run: run <adaptation>-seed<seed> goes to
OUTPUT_DIR/<adaptation>-seed<seed>/. OUTPUT_DIR gets compare.md, compare.json and compare.png (default
OUTPUT_DIR: a new folder runs/selfsup/compare-<dataset>-<timestamp>).

Ctrl-C / SIGTERM stop the whole comparison after the current run's checkpoint (exit 130 / 143) and
print the command that finishes it (compare --resume --output-dir OUTPUT_DIR). A table never counts
an unfinished run."""


def add_compare_args(parser) -> None:
    """The options of ``compare`` that are not training options."""
    g = parser.add_argument_group("compare")
    g.add_argument("--adaptations", default="none,xbn",
                   help=f"comma-separated adaptations to compare, among {', '.join(ADAPTATIONS)} (default: none,xbn)")
    g.add_argument("--seeds", type=int, default=3,
                   help="runs per adaptation, with seeds --seed, --seed + 1, ... (default: 3) [valid: >= 1]")


def summarize(runs: Dict[str, Dict[int, Dict[float, float]]]) -> Dict[str, Dict[float, Dict[str, float]]]:
    """``runs[adaptation][seed][epoch] = acc`` -> ``summary[adaptation][epoch] = {mean, std, n}``."""
    summary: Dict[str, Dict[float, Dict[str, float]]] = {}
    for a, by_seed in runs.items():
        epochs = sorted({e for accs in by_seed.values() for e in accs})
        summary[a] = {}
        for e in epochs:
            summary[a][e] = mean_std([accs[e] for accs in by_seed.values() if e in accs])
    return summary


def summarize_final(runs: Dict[str, Dict[int, Dict[float, float]]]) -> Dict[str, Dict[str, Any]]:
    """Each adaptation's last and best epoch over seeds.

    Args:
        runs: ``runs[adaptation][seed][epoch] = acc``.

    Returns:
        ``final[adaptation] = {"last": {mean, std, n}, "best": {mean, std, n}, "best_epochs": [...]}``: the
        accuracy of each seed's last evaluated epoch, and of its best one (chosen on the test split
        itself, so an optimistic number), with the epoch each seed's best was at (in seed order).
    """
    final: Dict[str, Dict[str, Any]] = {}
    for a, by_seed in runs.items():
        histories = [by_seed[s] for s in sorted(by_seed) if by_seed[s]]
        best_epochs = [max(h, key=lambda e: (h[e], -e)) for h in histories]  # the earliest epoch of a tie
        final[a] = {
            "last": mean_std([h[max(h)] for h in histories]),
            "best": mean_std([h[e] for h, e in zip(histories, best_epochs)]),
            "best_epochs": best_epochs,
        }
    return final


def format_final_table(final: Dict[str, Dict[str, Any]]) -> str:
    """A markdown table: one row per adaptation, the last epoch's and the best epoch's k-NN accuracy (%)."""
    lines = ["| adaptation | last epoch k-NN acc (%) | best epoch k-NN acc (%) | best at epoch |", "|---|---:|---:|---|"]
    for a, f in final.items():
        n = f"(n={f['last']['n']})"
        epochs = ", ".join(f"{e:g}" for e in f["best_epochs"])
        lines.append(f"| {a} | {format_mean_std(f['last'], pm='+-')} {n} | {format_mean_std(f['best'], pm='+-')} | {epochs} |")
    return "\n".join(lines) + "\n"


def format_table(summary: Dict[str, Dict[float, Dict[str, float]]], title: str = "",
                 final: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    """A markdown table: one row per epoch, one column per adaptation (k-NN accuracy in %).

    With ``final`` (from :func:`summarize_final`) a second table follows: the last and the best epoch
    per adaptation, the best one marked as chosen on the test split.
    """
    adaptations = list(summary)
    epochs = sorted({e for s in summary.values() for e in s})
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| epoch | " + " | ".join(f"{a} k-NN acc (%)" for a in adaptations) + " |")
    lines.append("|---:|" + "---:|" * len(adaptations))
    for e in epochs:
        cells = []
        for a in adaptations:
            s = summary[a].get(e)
            cells.append("" if s is None else f"{format_mean_std(s, pm='+-')} (n={s['n']})")
        label = f"{e:g}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if final:
        lines += ["", "Last and best epoch per adaptation, mean and std over seeds (the best epoch is each seed's "
                  "highest k-NN accuracy on the test split itself, an optimistic choice; the last epoch is not chosen):",
                  "", format_final_table(final).rstrip("\n")]
    return "\n".join(lines) + "\n"


def read_knn_history(metrics_path: Path) -> Dict[float, float]:
    """``{epoch: knn_acc}`` from a run's ``metrics.jsonl`` (the last record wins per epoch)."""
    from xbn_queue.training.tracking import read_metrics

    out: Dict[float, float] = {}
    for r in read_metrics(metrics_path):
        if "knn_acc" in r and "epoch" in r:
            out[round(float(r["epoch"]), 4)] = float(r["knn_acc"])
    return out


def _plot(runs: Dict[str, Dict[int, Dict[float, float]]], png: Path, title: str) -> None:
    """``compare.png``: k-NN accuracy per epoch, mean +- std band over seeds, one line per adaptation.

    Raises:
        ValueError: the k-NN monitor never ran (e.g. ``--knn-every 0`` and runs cut short).
    """
    from xbn_queue.training.tracking import plot_compare

    curves = {a: [{e: 100 * v for e, v in accs.items()} for accs in by.values()] for a, by in runs.items()}
    plot_compare([("k-NN accuracy (%)", curves)], png, title=title)


def series_knn_features(cfg: SelfSupConfig, out: Path, plan: Sequence[PlannedRun], resume: bool) -> str:
    """``--knn-features`` of every run of a comparison, so that one table never mixes two monitors.

    As given; else, when resuming, that of the first run the folder holds a checkpoint of (``backbone``
    for a checkpoint written before the option existed); else the default, ``head``.
    """
    from xbn_queue.training.checkpoint import load_checkpoint

    from selfsup.config import COMPAT_DEFAULTS, DEFAULT_KNN_FEATURES
    from selfsup.train import CHECKPOINT_NAME

    if cfg.knn_features is not None:
        return cfg.knn_features
    for run in plan if resume else ():
        ckpt = out / run.name / CHECKPOINT_NAME
        if ckpt.is_file():
            saved = load_checkpoint(ckpt, map_location="cpu", kind=PROG, required_keys=("config",))["config"]
            return saved.get("knn_features", COMPAT_DEFAULTS["knn_features"])
    return DEFAULT_KNN_FEATURES


def default_compare_dir(cfg: SelfSupConfig) -> SelfSupConfig:
    """``output_dir`` of a comparison: as given, else a new ``runs/selfsup/compare-<dataset>-<timestamp>``.

    Raises:
        UsageError: ``--resume`` without ``--output-dir``.
    """
    from xbn_queue.training.cli import series_output_dir

    return replace(cfg, output_dir=series_output_dir(cfg.output_dir, bool(cfg.resume), "runs/selfsup", "compare",
                                                     cfg.dataset))


def compare(
    cfg: SelfSupConfig,
    adaptations: Sequence[str],
    seeds: int,
    data: Optional[ImageData] = None,
    resume_cmd: str = "",
) -> Dict[str, Any]:
    """Trains every (adaptation, seed) pair and writes ``compare.md`` / ``compare.json`` / ``compare.png``.

    Args:
        cfg: training options shared by all runs (``adaptation`` and ``seed`` are overridden:
            seeds are ``cfg.seed, cfg.seed + 1, ...``). ``cfg.resume`` (any non-empty value) continues
            every run from its ``last.pt``; ``cfg.overwrite`` replaces runs the folder holds; without
            either, a folder that holds a comparison is refused before anything is written.
        adaptations: e.g. ``["none", "xbn"]``.
        seeds: number of seeds per adaptation.
        data: a loaded dataset to share (loaded once from ``cfg`` otherwise).
        resume_cmd: the command that finishes an interrupted comparison (printed and written).

    Returns:
        The JSON-able result: ``runs``, ``summary``, ``final`` (last and best epoch per adaptation,
        :func:`summarize_final`), ``knn_features``, ``adaptations``, ``seeds``, ``complete``,
        ``incomplete_runs``, ``run_complete`` (per run), ``markdown``, and ``exit_code`` (0, or 128 + the
        signal that stopped the comparison).

    Raises:
        UsageError: unknown adaptation, ``seeds < 1``, bad options, an unusable output folder or data.
    """
    from xbn_queue.training.cli import FolderLock, parse_choices
    from xbn_queue.training.distributed import init_distributed

    from selfsup.train import check_data

    adaptations = parse_choices("--adaptations", adaptations, ADAPTATIONS)
    plan = seed_plan("adaptation", adaptations, cfg.seed, seeds)
    cfg.validate()
    resume = bool(cfg.resume)
    cfg = default_compare_dir(cfg)
    out = Path(cfg.output_dir)
    check_series_dir(out, plan, resume=resume, overwrite=cfg.overwrite)
    cfg = replace(cfg, knn_features=series_knn_features(cfg, out, plan, resume))
    ctx = init_distributed(cfg.device)  # one process group for all runs
    lock = FolderLock(out)  # held by rank 0 from its first write to its last
    try:
        data = load_compare_data(cfg) if data is None else data
        check_data(cfg, data, ctx.world_size)
        lock = lock_on_rank0(ctx, out, plan, resume, cfg.overwrite)
        if ctx.is_main:
            print(f"[compare] comparison folder: {out}", file=sys.stderr, flush=True)
        report = run_series(plan, out, series_trainer(cfg, data, resume), verbose=ctx.is_main)
        runs = knn_histories(report, adaptations, ctx.is_main)
        result = compare_result(cfg, data, [cfg.seed + i for i in range(seeds)], report, runs, resume_cmd)
        if ctx.is_main:
            write_compare(out, result, runs, f"MoCo on {cfg.dataset}: mean ± std over {seeds} seed(s)", resume_cmd)
        result["exit_code"] = report.exit_code
        return result
    finally:
        lock.release()
        ctx.cleanup()


def write_compare(out: Path, result: Dict[str, Any], runs: Dict[str, Dict[int, Dict[float, float]]], title: str,
                  resume_cmd: str = "") -> None:
    """Write ``compare.md``, ``compare.json`` and ``compare.png`` (titled ``title``;
    :func:`~xbn_queue.training.series.write_series`), then print the table when every run finished."""
    write_series(out, "compare", result["markdown"], result, result["incomplete_runs"], resume_cmd,
                 {"compare.png": lambda png: _plot(runs, png, title)})
    if result["complete"]:
        print(result["markdown"])


def load_compare_data(cfg: SelfSupConfig) -> ImageData:
    """The dataset every run of a comparison shares, loaded once."""
    return load_dataset(cfg.dataset, cfg.data_root, download=cfg.download, image_size=cfg.image_size,
                        skip_bad_images=cfg.skip_bad_images, train_subset=cfg.train_subset, test_subset=cfg.test_subset)


def lock_on_rank0(ctx: Any, out: Path, plan: Sequence[PlannedRun], resume: bool, overwrite: bool) -> Any:
    """Rank 0 locks the comparison folder (each run locks its own below it); every rank stops if it cannot.

    Returns:
        The :class:`~xbn_queue.training.cli.FolderLock`: held on rank 0, unheld on the other ranks.

    Raises:
        UsageError: on every rank, when rank 0 could not lock the folder (:func:`lock_series_dir`).
    """
    from xbn_queue.training.cli import UsageError
    from xbn_queue.training.loop import any_rank

    lock, lock_error = None, None
    try:
        lock = lock_series_dir(out, plan, resume=resume, overwrite=overwrite, what="an xbn-selfsup compare",
                               enabled=ctx.is_main)
    except UsageError as err:
        lock_error = err
    if any_rank(ctx, lock_error is not None)[0]:
        raise lock_error or UsageError(f"--output-dir {out}: refused on rank 0 (see its message)")
    return lock


def series_trainer(cfg: SelfSupConfig, data: ImageData, resume: bool) -> Callable[[PlannedRun, Path], RunOutcome]:
    """The ``train_one`` callback of :func:`~xbn_queue.training.series.run_series`: ``cfg`` with the run's
    adaptation and seed, in its folder, on the shared ``data``."""
    from selfsup.train import train

    def train_one(run: PlannedRun, run_dir: Path) -> RunOutcome:
        wandb_name = cfg.wandb_name and f"{cfg.wandb_name}-{run.name}"
        return RunOutcome.of_summary(train(series_run_config(cfg, run, run_dir, resume, wandb_name), data))

    return train_one


def knn_histories(report: SeriesReport, adaptations: Sequence[str], read: bool = True) -> Dict[str, Dict[int, Dict[float, float]]]:
    """``runs[adaptation][seed][epoch] = k-NN accuracy`` of the finished runs (``read=False``: empty histories,
    on the ranks that write nothing)."""
    runs: Dict[str, Dict[int, Dict[float, float]]] = {a: {} for a in adaptations}
    for rec in report.completed():
        a, s = rec.run.settings["adaptation"], rec.run.settings["seed"]
        runs[a][s] = read_knn_history(rec.output_dir / "metrics.jsonl") if read else {}
    return runs


def compare_result(cfg: SelfSupConfig, data: ImageData, seed_list: List[int], report: SeriesReport,
                   runs: Dict[str, Dict[int, Dict[float, float]]], resume_cmd: str = "") -> Dict[str, Any]:
    """The content of ``compare.json``, its ``markdown`` the content of ``compare.md`` (:func:`format_table`)."""
    incomplete = report.incomplete()
    summary = summarize(runs)
    final = summarize_final(runs)
    title = table_title(
        f"MoCo k-NN accuracy on {cfg.knn_features} features ({cfg.dataset}, {len(data.train_images)} train / "
        f"{len(data.test_images)} test images, {cfg.epochs} epochs, batch {cfg.batch_size}, queue {cfg.queue_size}, "
        f"seeds {seed_list})", incomplete, resume_cmd)
    return {
        "adaptations": list(runs),
        "knn_features": cfg.knn_features,
        "seeds": seed_list,
        "complete": not incomplete,
        "incomplete_runs": incomplete,
        "run_complete": {r.run.name: r.complete for r in report.records},
        "runs": {a: {str(s): {f"{e:g}": v for e, v in accs.items()} for s, accs in by.items()} for a, by in runs.items()},
        "summary": {a: {f"{e:g}": v for e, v in by.items()} for a, by in summary.items()},
        "final": final,
        "markdown": format_table(summary, title, final),
    }


def compare_main(argv: Sequence[str]) -> int:
    """``xbn-selfsup compare ...`` (``argv`` starts with ``compare``); returns the exit status."""
    from xbn_queue.training.cli import resume_command
    from xbn_queue.training.config import parse_config

    cfg, extras = parse_config(SelfSupConfig, list(argv[1:]), prog=f"{PROG} compare", extra_args=add_compare_args,
                               description=DESCRIPTION)
    cfg.validate()
    cfg = default_compare_dir(cfg)
    adaptations = [a.strip() for a in extras.adaptations.split(",") if a.strip()]
    result = compare(cfg, adaptations, extras.seeds, resume_cmd=resume_command(PROG, "selfsup", list(argv), cfg.output_dir))
    return int(result["exit_code"])
