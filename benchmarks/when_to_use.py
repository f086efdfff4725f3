"""The figures and tables of docs/when-to-use.md, from finished run folders.

Reads every run folder (``<method>-...-seed<S>/metrics.jsonl`` and ``config.yaml``) below the given
``compare`` / ``sweep`` folders, pairs each XBN (or AXBN) run with the XBM run of the same settings
and seed, and reports how the gain over XBM depends on the swept options and on what the XBM run's
own ``metrics.jsonl`` measured (feature drift, the stored rows' cosine with fresh embeddings, the
memory's moment gap). Usage::

    python benchmarks/when_to_use.py runs/guide-a runs/guide-b runs/mainjob --out docs/images/when_to_use
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as st
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

#: Settings that define "the same cell" (everything a sweep may vary here).
CELL_KEYS = ("dataset", "batch_size", "memory_size", "lr", "epochs", "m_per_class")


def load_runs(folders: List[Path]) -> List[Dict]:
    """Every finished run below ``folders``: its config, per-epoch records, method and seed.

    A run of the same cell, method and seed found again in a later folder is skipped (a sweep's base
    point and a comparison with the same settings hold the same run twice).
    """
    runs, seen = [], set()
    for folder in folders:
        for mfile in sorted(folder.glob("*/metrics.jsonl")):
            cfg = yaml.safe_load((mfile.parent / "config.yaml").read_text())
            recs = [json.loads(line) for line in mfile.read_text().splitlines() if line.strip()]
            recs = [r for r in recs if "recall@1" in r]
            if not recs or recs[-1]["epoch"] < cfg["epochs"] + cfg.get("warmup_epochs", 0):
                continue  # unfinished
            cell = tuple(cfg.get(k) for k in CELL_KEYS)
            if (cell, cfg["method"], cfg["seed"]) in seen:
                continue
            seen.add((cell, cfg["method"], cfg["seed"]))
            runs.append({"cfg": cfg, "recs": recs, "method": cfg["method"], "seed": cfg["seed"],
                         "cell": cell, "folder": str(mfile.parent)})
    return runs


def summary(recs: List[Dict]) -> Dict[str, float]:
    """R@1 at the first epoch after any warm-up ("epoch 1"), best and last; MAP@R best; mean drift;
    staleness at that first epoch and averaged over the run."""
    def mean_of(key):
        vals = [r[key] for r in recs if isinstance(r.get(key), float) and not math.isnan(r[key])]
        return st.fmean(vals) if vals else math.nan

    first = next((r for r in recs if r.get("phase", "train") == "train"), recs[0])  # the first epoch after any warm-up
    return {"r1_ep1": 100 * first["recall@1"], "r1_best": 100 * max(r["recall@1"] for r in recs),
            "r1_last": 100 * recs[-1]["recall@1"], "map_best": 100 * max(r["map@r"] for r in recs),
            "drift": mean_of("drift_mean"), "cos_ep1": first.get("staleness_cosine", math.nan),
            "cos": mean_of("staleness_cosine"), "gap_ep1": first.get("staleness_moment_gap", math.nan),
            "gap": mean_of("staleness_moment_gap")}


def pairs(runs: List[Dict], method: str) -> List[Tuple[Dict, Dict, Dict]]:
    """``(cfg, summary of method run, summary of XBM twin)`` for every run of ``method`` with an XBM twin."""
    xbm = {(r["cell"], r["seed"]): r for r in runs if r["method"] == "xbm"}
    out = []
    for r in runs:
        twin = xbm.get((r["cell"], r["seed"]))
        if r["method"] == method and twin is not None:
            out.append((r["cfg"], summary(r["recs"]), summary(twin["recs"])))
    return out


def by_option(runs: List[Dict], option: str, base: Dict) -> Dict:
    """``{value: {method: [summaries]}}`` along one option, the other cell keys at ``base``'s values."""
    out: Dict = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if all(r["cfg"].get(k) == base.get(k) for k in CELL_KEYS if k not in (option, "m_per_class")):
            out[r["cfg"][option]][r["method"]].append(dict(summary(r["recs"]), seed=r["seed"]))
    return out


def pearson(x: List[float], y: List[float]) -> float:
    pts = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(pts) < 3:
        return math.nan
    mx, my = st.fmean(p[0] for p in pts), st.fmean(p[1] for p in pts)
    sxy = sum((a - mx) * (b - my) for a, b in pts)
    sx = math.sqrt(sum((a - mx) ** 2 for a, _ in pts))
    sy = math.sqrt(sum((b - my) ** 2 for _, b in pts))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else math.nan


def ms(vals: List[float]) -> str:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return "-"
    return f"{st.fmean(vals):.2f}" + (f" ± {st.stdev(vals):.2f}" if len(vals) > 1 else "")


def tables(runs: List[Dict], base: Dict, options: List[str]) -> str:
    lines = []
    for opt in options:
        data = by_option(runs, opt, base)
        if len(data) < 2:
            continue
        lines += [f"\n### {opt.replace('_', '-')} (others at the defaults; mean ± std over seeds, %)\n",
                  f"| {opt.replace('_', '-')} | method | R@1 epoch 1 | R@1 best | MAP@R best | XBM: drift | XBM: stored-row cosine | XBM: moment gap |",
                  "|---|---|---|---|---|---|---|---|"]
        for value in sorted(data, key=float):
            for method in ("none", "xbm", "xbn", "axbn"):
                s = data[value].get(method)
                if not s:
                    continue
                diag = [ms([x[k] for x in s]) for k in ("drift", "cos", "gap")] if method == "xbm" else ["", "", ""]
                lines.append(f"| {value} | {method} | {ms([x['r1_ep1'] for x in s])} | {ms([x['r1_best'] for x in s])} | "
                             f"{ms([x['map_best'] for x in s])} | " + " | ".join(diag) + " |")
    return "\n".join(lines)


def correlations(runs: List[Dict]) -> Tuple[str, List]:
    pr = pairs(runs, "xbn") + pairs(runs, "axbn")
    lines = [f"\n### What the gain over XBM tracks ({len(pr)} XBN/AXBN runs paired with their XBM twin)\n",
             "| measured in the XBM run | Pearson r with the R@1 gain at epoch 1 | with the gain at the best epoch |",
             "|---|---|---|"]
    g1 = [a["r1_ep1"] - b["r1_ep1"] for _, a, b in pr]
    gb = [a["r1_best"] - b["r1_best"] for _, a, b in pr]
    for key, label in (("drift", "feature drift (mean over the run)"), ("cos_ep1", "stored-row cosine, epoch 1"),
                       ("cos", "stored-row cosine (mean)"), ("gap_ep1", "moment gap, epoch 1"),
                       ("gap", "moment gap (mean)"), ("r1_ep1", "its own R@1 at epoch 1")):
        xs = [b[key] for _, _, b in pr]
        lines.append(f"| {label} | {pearson(xs, g1):+.2f} | {pearson(xs, gb):+.2f} |")
    return "\n".join(lines), pr


def plot(runs: List[Dict], base: Dict, options: List[str], pr: List, out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    opts = [o for o in options if len(by_option(runs, o, base)) >= 2]
    fig, axes = plt.subplots(2, len(opts), figsize=(4.2 * len(opts), 6.4), squeeze=False)
    colors = {"none": "tab:blue", "xbm": "tab:orange", "xbn": "tab:green", "axbn": "tab:red"}
    for j, opt in enumerate(opts):
        data = by_option(runs, opt, base)
        xs = sorted(data, key=float)
        for method in ("none", "xbm", "xbn", "axbn"):
            pts = [(float(v), [s["r1_best"] for s in data[v][method]]) for v in xs if data[v].get(method)]
            if pts:
                axes[0][j].errorbar([p[0] for p in pts], [st.fmean(p[1]) for p in pts],
                                    yerr=[st.stdev(p[1]) if len(p[1]) > 1 else 0 for p in pts], marker="o",
                                    capsize=3, color=colors[method], label={"none": "No-XBM"}.get(method, method.upper()))
        for method in ("xbn", "axbn"):
            for key, style, label in (("r1_ep1", "--", "epoch 1"), ("r1_best", "-", "best epoch")):
                pts = []
                for v in xs:
                    a, b = data[v].get(method, []), data[v].get("xbm", [])
                    twin = {y["seed"]: y for y in b}
                    gains = [x[key] - twin[x["seed"]][key] for x in a if x["seed"] in twin]  # paired by seed
                    if gains:
                        pts.append((float(v), st.fmean(gains), st.stdev(gains) if len(gains) > 1 else 0))
                if len(pts) > 1 or (pts and method == "xbn"):
                    axes[1][j].errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                                        capsize=3, linestyle=style, color=colors[method],
                                        label=f"{method.upper()} - XBM, {label}")
        for ax in axes[:, j]:
            if opt in ("batch_size", "lr"):
                ax.set_xscale("log")
            ax.set_xticks([float(v) for v in xs])
            ax.set_xticklabels([f"{float(v):g}" for v in xs])
            ax.minorticks_off()
            ax.set_xlabel(opt.replace("_", "-"))
            ax.grid(alpha=0.3)
        axes[1][j].axhline(0, color="gray", lw=0.8)
        axes[0][j].set_ylabel("R@1, best epoch (%)")
        axes[1][j].set_ylabel("R@1 gain over XBM (points)")
        axes[0][j].legend(fontsize=8)
        axes[1][j].legend(fontsize=8)
    fig.suptitle("Omniglot (embedded split), Conv-4 from scratch: mean ± std over seeds")
    fig.tight_layout()
    p = out.with_name(out.name + "_options.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    g1 = [a["r1_ep1"] - b["r1_ep1"] for _, a, b in pr]
    for ax, key, label in zip(axes, ("gap_ep1", "cos_ep1", "drift"),
                              ("XBM memory's moment gap, epoch 1", "XBM stored-row cosine, epoch 1", "feature drift, XBM run")):
        xs = [b[key] for _, _, b in pr]
        for ds, color in (("omniglot", "tab:green"), ("digits", "tab:gray"), ("folder", "tab:purple")):
            for method, marker in (("xbn", "o"), ("axbn", "^")):
                sel = [(x, g) for (c, _, _), x, g in zip(pr, xs, g1) if c["dataset"] == ds and c["method"] == method]
                if sel:
                    ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=22, c=color, marker=marker,
                               label=f"{ds}, {method.upper()}")
        ax.legend(fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("R@1 gain over XBM at epoch 1 (points)")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(f"r = {pearson(xs, g1):+.2f}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out.with_name(out.name + "_staleness.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("when_to_use"), help="prefix of the PNG files")
    ap.add_argument("--options", default="batch_size,memory_size,lr")
    args = ap.parse_args(argv)
    runs = load_runs(args.folders)
    if not runs:
        print("no finished runs below " + ", ".join(map(str, args.folders)), file=sys.stderr)
        return 2
    base = next(r["cfg"] for r in runs if r["method"] == "xbm")
    base = dict(base, batch_size=16, memory_size=0.5, lr=0.001)
    options = args.options.split(",")
    print(f"{len(runs)} finished runs")
    print(tables(runs, base, options))
    text, pr = correlations(runs)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for p in plot(runs, base, options, pr, args.out):
        print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
