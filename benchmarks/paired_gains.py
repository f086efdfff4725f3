"""XBN's (and AXBN's) Recall@1 gain over XBM, over XBM* and over No-XBM, paired by seed, per cell.

Reads every finished run below the given ``compare`` / ``sweep`` folders (``<run>/metrics.jsonl`` and
``config.yaml``, through :func:`when_to_use.load_runs`; a run of the same cell, method and seed found
again in a later folder is skipped). A *cell* is one setting of batch size, memory size and learning
rate (the other options as the runs were given them). In each cell, for each method: Recall@1 at the
first epoch after any warm-up ("epoch 1") and at the best epoch, mean ± sample std over seeds. For
XBN (and AXBN, where run) against each baseline B in ``xbm`` (XBM: memory loss), ``xbm-batch`` (XBM*:
memory loss + batch loss) and ``none`` (No-XBM: batch loss only): the per-seed differences
``R@1(XBN, seed s) - R@1(B, seed s)`` (same seed = same initialisation and the same batches), their
mean ± standard error (sample std / sqrt(n)) and the values themselves; and beside each cell the
moment gap of the XBM run's memory (``staleness_moment_gap``: epoch 1, and the mean over the run) and
the same for XBM*. A second table per method gives the spread as a reader of a single run needs it:
the per-seed differences' mean ± sample std (ddof 1) for R@1 at epoch 1, R@1 at the best epoch and
MAP@R at that epoch (the first evaluation with the highest R@1, as ``compare``'s "best"), each marked
where its sign is the same in every seed, with the baseline's moment gap beside it.

The verdict against the best of the three baselines (the baseline with the highest mean R@1 in that
cell) is ``ahead`` when the paired gain over it is positive in every seed and its mean exceeds twice
its standard error, ``behind`` in the mirror case, and ``tie`` otherwise. With 3 seeds this is a
coarse test; the per-seed values are printed so a reader can apply another.

Usage::

    python benchmarks/paired_gains.py /work/runs-meas/grid /work/runs-meas/main --json gains.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as st
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from when_to_use import load_runs, summary

#: Baselines a memory method is compared with, strongest last in the paper's Table 2.
BASELINES = (("xbm", "XBM"), ("xbm-batch", "XBM*"), ("none", "No-XBM"))
NAMES = {"none": "No-XBM", "xbm": "XBM", "xbm-batch": "XBM*", "xbn": "XBN", "axbn": "AXBN", "xbn-cov": "XBN-cov"}
#: The options a cell is told apart by, and the main job's values of them (the base point).
CELL = ("batch_size", "memory_size", "lr")
BASE = {"batch_size": 16, "memory_size": 0.5, "lr": 0.001}


#: The scores paired by seed: R@1 at epoch 1, R@1 at the best epoch, MAP@R at that epoch.
KEYS = ("r1_ep1", "r1_best", "map_best")


def scores(recs: Sequence[Dict]) -> Dict[str, float]:
    """:func:`when_to_use.summary`, with ``map_best`` as MAP@R at the best-R@1 epoch (the first evaluation
    with the highest R@1, as ``compare``'s "best" and ``best.pt``), not the highest MAP@R of any epoch."""
    s = summary(list(recs))
    best = recs[0]
    for rec in recs:
        if rec["recall@1"] > best["recall@1"]:
            best = rec
    s["map_best"] = 100 * best["map@r"]
    return s


def paired(a: Dict[int, float], b: Dict[int, float]) -> Dict[str, object]:
    """Per-seed differences ``a[s] - b[s]`` over the seeds both have: ``{"mean", "se", "n", "values"}``."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    se = st.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return {"mean": st.fmean(d) if d else math.nan, "se": se, "n": len(d), "values": d, "seeds": seeds}


def verdict(g: Dict[str, object]) -> str:
    """``ahead`` / ``behind`` / ``tie``: every seed on one side and |mean| > 2 SE, else a tie."""
    d, mean, se = g["values"], g["mean"], g["se"]
    if len(d) < 2 or math.isnan(se):
        return "n/a"
    if all(x > 0 for x in d) and mean > 2 * se:
        return "ahead"
    if all(x < 0 for x in d) and mean < -2 * se:
        return "behind"
    return "tie"


def cell_label(cell: Tuple) -> str:
    """``batch 8`` for a cell that differs from the base point in one option, ``base`` for the base point."""
    diff = [(k, v) for k, v in zip(CELL, cell) if v != BASE[k]]
    if not diff:
        return "base (batch 16, memory 50 %, lr 1e-3)"
    names = {"batch_size": "batch", "memory_size": "memory", "lr": "lr"}
    return ", ".join(f"{names[k]} {f'{100 * v:g} %' if k == 'memory_size' and isinstance(v, float) else f'{v:g}'}"
                     for k, v in diff)


def analyse(runs: Sequence[Dict], methods: Sequence[str] = ("xbn", "axbn")) -> List[Dict]:
    """One record per cell: per-method scores per seed, paired gains of ``methods`` over each baseline."""
    cells: Dict[Tuple, Dict[str, Dict[int, Dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        cells[tuple(r["cfg"].get(k) for k in CELL)][r["method"]][r["seed"]] = scores(r["recs"])
    out = []
    for cell in sorted(cells, key=lambda c: (cell_label(c) != cell_label(tuple(BASE.values())),) + tuple(float(x) for x in c)):
        by = cells[cell]
        rec: Dict = {"cell": dict(zip(CELL, cell)), "label": cell_label(cell), "methods": {}, "gains": {}}
        for m, seeds in by.items():
            rec["methods"][m] = {k: {s: v[k] for s, v in sorted(seeds.items())} for k in KEYS + ("gap_ep1", "gap")}
        for m in methods:
            if m not in by:
                continue
            for b, _ in BASELINES:
                if b not in by:
                    continue
                rec["gains"][(m, b)] = {k: paired(rec["methods"][m][k], rec["methods"][b][k]) for k in KEYS}
            present = [b for b, _ in BASELINES if b in by]
            if present:
                for k in ("r1_ep1", "r1_best"):
                    best = max(present, key=lambda b: st.fmean(rec["methods"][b][k].values()))
                    g = rec["gains"][(m, best)][k]
                    rec["gains"][(m, "best", k)] = {"baseline": best, "verdict": verdict(g), **g}
        out.append(rec)
    return out


def ms(vals: Sequence[float]) -> str:
    vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    return f"{st.fmean(vals):.2f}" + (f" ± {st.stdev(vals):.2f}" if len(vals) > 1 else "")


def gap_text(per_seed: Dict[int, float]) -> str:
    """Mean over seeds of a moment gap (3 significant digits), ``-`` when none was measured."""
    vals = [v for v in per_seed.values() if isinstance(v, float) and not math.isnan(v)]
    return f"{st.fmean(vals):.3g}" if vals else "-"


def gain_text(g: Dict, seeds: bool = True) -> str:
    if not g or not g["n"]:
        return "-"
    se = "" if math.isnan(g["se"]) else f" ± {g['se']:.2f}"
    per = " (" + ", ".join(f"{x:+.2f}" for x in g["values"]) + ")" if seeds else ""
    return f"{g['mean']:+.2f}{se}{per}"


def score_table(cells: Sequence[Dict]) -> str:
    """Markdown: R@1 at epoch 1 and at the best epoch per method and cell."""
    shown = [m for m in ("none", "xbm", "xbm-batch", "xbn", "axbn") if any(m in c["methods"] for c in cells)]
    lines = ["**R@1 (%), epoch 1 / best epoch, mean ± std over seeds (n = seeds)**", "",
             "| cell | " + " | ".join(NAMES[m] for m in shown) + " |", "|---|" + "---|" * len(shown)]
    for c in cells:
        row = []
        for m in shown:
            s = c["methods"].get(m)
            row.append("-" if not s else f"{ms(list(s['r1_ep1'].values()))} / {ms(list(s['r1_best'].values()))} (n={len(s['r1_best'])})")
        lines.append(f"| {c['label']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def gain_tables(cells: Sequence[Dict], method: str = "xbn") -> str:
    """Markdown: the method's paired gains per cell, the verdict against the best baseline, the moment gaps."""
    lines: List[str] = []
    for k, when in (("r1_ep1", "epoch 1"), ("r1_best", "the best epoch")):
        lines += ["", f"**{NAMES[method]}'s R@1 gain at {when}, paired by seed: mean ± SE (per-seed values), points**", "",
                  "| cell | over XBM | over XBM* | over No-XBM | best baseline: verdict | XBM moment gap, epoch 1 / mean | XBM* moment gap, epoch 1 / mean |",
                  "|---|---|---|---|---|---|---|"]
        for c in cells:
            if method not in c["methods"]:
                continue
            g = [gain_text(c["gains"].get((method, b), {}).get(k, {})) for b, _ in BASELINES]
            best = c["gains"].get((method, "best", k))
            v = "-" if best is None else f"{NAMES[best['baseline']]}: **{best['verdict']}**"
            gaps = []
            for b in ("xbm", "xbm-batch"):
                s = c["methods"].get(b)
                gaps.append("-" if not s else f"{gap_text(s['gap_ep1'])} / {gap_text(s['gap'])}")
            lines.append(f"| {c['label']} | " + " | ".join(g) + f" | {v} | " + " | ".join(gaps) + " |")
    return "\n".join(lines)


def sign_text(g: Dict) -> str:
    """``mean ± std (ddof 1)`` of the per-seed differences and whether the sign holds in every seed."""
    if not g or not g["n"]:
        return "-"
    d = g["values"]
    std = f" ± {st.stdev(d):.2f}" if len(d) > 1 else ""
    same = "every seed +" if all(x > 0 for x in d) else "every seed −" if all(x < 0 for x in d) else "mixed"
    return f"{g['mean']:+.2f}{std} ({same})"


def spread_table(cells: Sequence[Dict], method: str = "xbn") -> str:
    """Markdown: per cell and baseline, the method's paired differences as mean ± std (ddof 1) over the seeds
    for R@1 at epoch 1, R@1 best and MAP@R best, the sign in every seed, and the baseline's moment gap."""
    lines = ["", f"**{NAMES[method]} minus each baseline, paired by seed: mean ± std (ddof 1) of the per-seed "
             "differences, points; the sign in every seed**", "",
             "| cell | minus | seeds | R@1 epoch 1 | R@1 best | MAP@R best | baseline's moment gap, epoch 1 / mean |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        if method not in c["methods"]:
            continue
        for b, name in BASELINES:
            g = c["gains"].get((method, b))
            if not g:
                continue
            s = c["methods"][b]
            gap = "-" if b == "none" else f"{gap_text(s['gap_ep1'])} / {gap_text(s['gap'])}"
            lines.append(f"| {c['label']} | {name} | {g['r1_best']['n']} | " + " | ".join(sign_text(g[k]) for k in KEYS)
                         + f" | {gap} |")
    return "\n".join(lines)


def to_json(cells: Sequence[Dict]) -> List[Dict]:
    out = []
    for c in cells:
        out.append({"cell": c["cell"], "label": c["label"], "methods": c["methods"],
                    "gains": {"/".join(map(str, k)): v for k, v in c["gains"].items()}})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="compare / sweep folders (a run found twice counts once)")
    ap.add_argument("--methods", default="xbn,axbn", help="methods whose gains are reported (default: xbn,axbn)")
    ap.add_argument("--json", type=Path, default=None, help="also write every number (per seed) to this JSON file")
    args = ap.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        print(f"paired_gains: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = load_runs(args.folders)
    if not runs:
        print("paired_gains: no finished runs below " + ", ".join(map(str, args.folders)), file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    cells = analyse(runs, methods)
    print(f"{len(runs)} finished runs in {len(cells)} cells\n")
    print(score_table(cells))
    for m in methods:
        if any(m in c["methods"] for c in cells):
            print(gain_tables(cells, m) + "\n")
            print(spread_table(cells, m) + "\n")
    if args.json:
        args.json.write_text(json.dumps(to_json(cells), indent=1, default=str))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
