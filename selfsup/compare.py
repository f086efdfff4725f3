"""``xbn-selfsup compare``: k-NN accuracy per epoch, mean +- std over seeds, per adaptation.

Writes ``compare.md``, ``compare.json`` and ``compare.png`` (the curves with a +- std band).

The shape of the paper's Figure 2 (MoCo with and without XBN). Each run goes to
``OUTPUT_DIR/<adaptation>-seed<S>/`` and resumes from its own ``last.pt`` when present, so an
interrupted comparison continues where it stopped.
"""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from selfsup.config import ADAPTATIONS, SelfSupConfig
from selfsup.data import ImageData, load_dataset


def _mean_std(values: Sequence[float]) -> tuple:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(runs: Dict[str, Dict[int, Dict[float, float]]]) -> Dict[str, Dict[float, Dict[str, float]]]:
    """``runs[adaptation][seed][epoch] = acc`` -> ``summary[adaptation][epoch] = {mean, std, n}``."""
    summary: Dict[str, Dict[float, Dict[str, float]]] = {}
    for a, by_seed in runs.items():
        epochs = sorted({e for accs in by_seed.values() for e in accs})
        summary[a] = {}
        for e in epochs:
            vals = [accs[e] for accs in by_seed.values() if e in accs]
            mean, std = _mean_std(vals)
            summary[a][e] = {"mean": mean, "std": std, "n": len(vals)}
    return summary


def format_table(summary: Dict[str, Dict[float, Dict[str, float]]], title: str = "") -> str:
    """A markdown table: one row per epoch, one column per adaptation (k-NN accuracy in %)."""
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
            cells.append("" if s is None else f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f} (n={s['n']})")
        label = f"{e:g}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
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
    """``compare.png``: k-NN accuracy per epoch, mean +- std band over seeds, one line per adaptation."""
    from xbn_queue.training.tracking import plot_compare

    curves = {a: [{e: 100 * v for e, v in accs.items()} for accs in by.values()] for a, by in runs.items()}
    try:
        plot_compare([("k-NN accuracy (%)", curves)], png, title=title)
    except ValueError:  # the k-NN monitor never ran (e.g. --knn-every 0 and runs cut short)
        print(f"[compare] no k-NN accuracy recorded: {png.name} not written", file=sys.stderr)


def compare(
    cfg: SelfSupConfig,
    adaptations: Sequence[str],
    seeds: int,
    data: Optional[ImageData] = None,
) -> Dict[str, Any]:
    """Trains every (adaptation, seed) pair and writes ``compare.md`` / ``compare.json``.

    Args:
        cfg: training options shared by all runs (``adaptation`` and ``seed`` are overridden:
            seeds are ``cfg.seed, cfg.seed + 1, ...``).
        adaptations: e.g. ``["none", "xbn"]``.
        seeds: number of seeds per adaptation.
        data: a loaded dataset to share (loaded once from ``cfg`` otherwise).

    Returns:
        The JSON-able result: ``runs``, ``summary``, ``adaptations``, ``seeds``, ``markdown``.

    Raises:
        ValueError: unknown adaptation or ``seeds < 1``.
    """
    from xbn_queue.training.distributed import init_distributed

    from selfsup.train import train

    bad = [a for a in adaptations if a not in ADAPTATIONS]
    if bad or not adaptations:
        raise ValueError(f"--adaptations: unknown {bad or adaptations}; choose from {ADAPTATIONS}")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    ctx = init_distributed(cfg.device)  # one process group for all runs
    try:
        if data is None:
            data = load_dataset(
                cfg.dataset, cfg.data_root, download=cfg.download, image_size=cfg.image_size,
                skip_bad_images=cfg.skip_bad_images, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
            )
        out = Path(cfg.output_dir)
        seed_list = [cfg.seed + i for i in range(seeds)]
        runs: Dict[str, Dict[int, Dict[float, float]]] = {a: {} for a in adaptations}
        for a in adaptations:
            for s in seed_list:
                run_dir = out / f"{a}-seed{s}"
                run_cfg = replace(cfg, adaptation=a, seed=s, output_dir=str(run_dir), resume="auto",
                                  run_name=cfg.run_name and f"{cfg.run_name}-{a}-seed{s}")
                if ctx.is_main:
                    print(f"[compare] adaptation={a} seed={s} -> {run_dir}", file=sys.stderr, flush=True)
                train(run_cfg, data)
                runs[a][s] = read_knn_history(run_dir / "metrics.jsonl") if ctx.is_main else {}
        summary = summarize(runs)
        title = (
            f"MoCo k-NN accuracy ({cfg.dataset}, {len(data.train_images)} train / {len(data.test_images)} test images, "
            f"{cfg.epochs} epochs, batch {cfg.batch_size}, queue {cfg.queue_size}, seeds {seed_list})"
        )
        markdown = format_table(summary, title)
        result = {
            "adaptations": list(adaptations),
            "seeds": seed_list,
            "runs": {a: {str(s): {f"{e:g}": v for e, v in accs.items()} for s, accs in by.items()} for a, by in runs.items()},
            "summary": {a: {f"{e:g}": v for e, v in by.items()} for a, by in summary.items()},
            "markdown": markdown,
        }
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "compare.md").write_text(markdown)
            (out / "compare.json").write_text(json.dumps(result, indent=2))
            _plot(runs, out / "compare.png", f"MoCo on {cfg.dataset}: mean ± std over {len(seed_list)} seed(s)")
            print(markdown)
        return result
    finally:
        ctx.cleanup()
