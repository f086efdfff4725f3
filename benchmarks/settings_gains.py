"""The tables of docs/results/settings.md: per setting, every method's Recall@1 and MAP@R and the paired
gains of the memory methods over XBM, XBM* and No-XBM.

A *setting* is a list of ``compare`` / ``sweep`` folders whose runs share every option but the method
and the seed (for example the main job's folder and a folder of XBN* / AXBN* runs at the same
defaults). Runs are read with :func:`when_to_use.load_runs` (finished runs only; a run found again in
a later folder is skipped) and summarised with :func:`when_to_use.summary`:

* R@1 at "epoch 1" (the first epoch after any warm-up), R@1 at the best epoch and MAP@R at that epoch
  (the first evaluation with the highest R@1, as ``compare``'s "best"), mean ± sample std over seeds,
  with the per-seed values;
* for each memory method M (``--methods``) and each baseline B of XBM (``xbm``), XBM* (``xbm-batch``)
  and No-XBM (``none``): the per-seed differences ``R@1(M, seed s) - R@1(B, seed s)`` (same seed = same
  initialisation and the same batches), their mean ± standard error (sample std / sqrt(n));
* the verdict ``CLEAR`` when every per-seed difference is positive and the mean exceeds
  ``--clear-se`` standard errors (default 4.3: the two-sided 5 % t quantile with 2 degrees of freedom,
  i.e. 3 seeds), ``clear loss`` in the mirror case, ``-`` otherwise;
* the same differences as mean ± sample std (ddof 1) for R@1 at epoch 1, R@1 best and MAP@R best, each
  marked where its sign is the same in every seed (the table a reader of one run needs);
* the XBM run's memory moment gap (``staleness_moment_gap`` of metrics.jsonl: at epoch 1 and its mean
  over the run), mean over seeds.

Usage::

    python benchmarks/settings_gains.py --setting "defaults=/work/runs-meas/main,/work/runs-meas/star" \\
        --setting "rot4=/work/runs-meas/rot4" --setting "mem2=/work/runs-meas/mem2,/work/runs-meas/main@none" \\
        --json gains.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as st
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_gains import sign_text  # noqa: E402  (the same text in both scripts' spread tables)
from when_to_use import load_runs, summary  # noqa: E402

NAMES = {"none": "No-XBM", "xbm": "XBM", "xbm-batch": "XBM*", "xbn": "XBN", "xbn-batch": "XBN*", "axbn": "AXBN",
         "axbn-batch": "AXBN*", "xbn-cov": "XBN-cov", "xbn-cov-batch": "XBN-cov*"}
ORDER = list(NAMES)
BASELINES = ("xbm", "xbm-batch", "none")


def paired(a: Dict[int, float], b: Dict[int, float]) -> Dict[str, object]:
    """Per-seed differences ``a[s] - b[s]`` over the seeds both have: mean, SE, n, values, seeds."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    return {"mean": st.fmean(d) if d else math.nan,
            "se": st.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan,
            "n": len(d), "values": d, "seeds": seeds}


def verdict(g: Dict, clear_se: float) -> str:
    d, mean, se = g["values"], g["mean"], g["se"]
    if len(d) < 3 or math.isnan(se):  # 4.3 SE is the 3-seed bar; fewer seeds get no verdict
        return "-"
    if all(x > 0 for x in d) and mean > clear_se * se:
        return "**CLEAR**"
    if all(x < 0 for x in d) and mean < -clear_se * se:
        return "clear loss"
    return "-"


def ms(vals: Sequence[float], per_seed: bool = True) -> str:
    vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    s = f"{st.fmean(vals):.2f}" + (f" ± {st.stdev(vals):.2f}" if len(vals) > 1 else "")
    return s + (" (" + ", ".join(f"{v:.1f}" for v in vals) + ")" if per_seed else "")


def gtext(g: Dict) -> str:
    if not g or not g["n"]:
        return "-"
    se = "" if math.isnan(g["se"]) else f" ± {g['se']:.2f}"
    return f"{g['mean']:+.2f}{se} (" + ", ".join(f"{x:+.1f}" for x in g["values"]) + ")"


def analyse(folders: List[Path], only: Optional[Dict[Path, List[str]]] = None) -> Dict[str, Dict[str, Dict[int, float]]]:
    """``{method: {key: {seed: value}}}`` for the keys of :func:`when_to_use.summary`; ``only[folder]``: the
    methods taken from that folder (all when absent)."""
    out: Dict[str, Dict[str, Dict[int, float]]] = {}
    runs = []
    for f in folders:
        runs += [r for r in load_runs([f]) if not (only or {}).get(f) or r["method"] in only[f]]
    for r in runs:
        s = summary(r["recs"])
        best = r["recs"][0]
        for rec in r["recs"]:  # the first evaluation with the highest R@1, as compare's "best" (and best.pt)
            if rec["recall@1"] > best["recall@1"]:
                best = rec
        s["map_best"] = 100 * best["map@r"]
        for k, v in s.items():
            out.setdefault(r["method"], {}).setdefault(k, {})[r["seed"]] = v
    return out


def render(name: str, by: Dict, methods: Sequence[str], clear_se: float) -> str:
    shown = [m for m in ORDER if m in by]
    lines = [f"### {name}", "", "| method | seeds | R@1 epoch 1 | R@1 best | MAP@R best | moment gap epoch 1 / mean |",
             "|---|---|---|---|---|---|"]
    for m in shown:
        s = by[m]
        gap = "-"
        if m != "none" and not all(math.isnan(v) for v in s["gap"].values()):
            gap = f"{st.fmean(s['gap_ep1'].values()):.3g} / {st.fmean(s['gap'].values()):.3g}"
        lines.append(f"| {NAMES.get(m, m)} | {len(s['r1_best'])} | {ms(list(s['r1_ep1'].values()))} | "
                     f"{ms(list(s['r1_best'].values()))} | {ms(list(s['map_best'].values()))} | {gap} |")
    for m in methods:
        if m not in by:
            continue
        lines += ["", f"{NAMES.get(m, m)}'s R@1 gain, paired by seed: mean ± SE (per-seed values, seeds 0, 1, 2), "
                  f"points; CLEAR = every seed positive and mean > {clear_se:g} SE", "",
                  "| epoch | over XBM | over XBM* | over No-XBM |", "|---|---|---|---|"]
        for k, when in (("r1_ep1", "epoch 1"), ("r1_best", "best")):
            cells = []
            for b in BASELINES:
                if b not in by or b == m:
                    cells.append("-")
                    continue
                g = paired(by[m][k], by[b][k])
                v = verdict(g, clear_se)
                cells.append(gtext(g) + ("" if v == "-" else f" {v}"))
            lines.append(f"| {when} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_spread(by: Dict, methods: Sequence[str], pairs: Sequence[str] = ()) -> str:
    """Markdown: each method minus each baseline (then each ``A:B`` of ``pairs``), paired by seed, as mean ± std
    (ddof 1) of the per-seed differences for R@1 epoch 1, R@1 best and MAP@R best, the sign in every seed, and
    the subtrahend's moment gap."""
    rows = []
    todo = [(m, b) for m in methods for b in BASELINES] + [tuple(p.partition(":")[::2]) for p in pairs]
    for m, b in todo:
        if m in by and b in by and m != b:
            gs = [paired(by[m][k], by[b][k]) for k in ("r1_ep1", "r1_best", "map_best")]
            gap = "-"
            if b != "none" and b in by and not all(math.isnan(v) for v in by[b]["gap"].values()):
                gap = f"{st.fmean(by[b]['gap_ep1'].values()):.3g} / {st.fmean(by[b]['gap'].values()):.3g}"
            rows.append(f"| {NAMES.get(m, m)} - {NAMES.get(b, b)} | {gs[1]['n']} | " + " | ".join(sign_text(g) for g in gs)
                        + f" | {gap} |")
    if not rows:
        return ""
    return "\n".join(["", "", "Paired by seed: mean ± std (ddof 1) of the per-seed differences, points; the sign in every seed",
                      "", "| difference A - B | seeds | R@1 epoch 1 | R@1 best | MAP@R best | moment gap of B, epoch 1 / mean |",
                      "|---|---|---|---|---|---|"] + rows)


def render_pairs(by: Dict, pairs: Sequence[str], clear_se: float) -> str:
    """Markdown: ``A - B`` paired by seed for each ``A:B`` of ``pairs`` both of whose methods were run."""
    rows = []
    for spec in pairs:
        a, _, b = spec.partition(":")
        if a not in by or b not in by:
            continue
        cells = []
        for k in ("r1_ep1", "r1_best"):
            g = paired(by[a][k], by[b][k])
            v = verdict(g, clear_se)
            cells.append(gtext(g) + ("" if v == "-" else f" {v}"))
        rows.append(f"| {NAMES.get(a, a)} - {NAMES.get(b, b)} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    return "\n".join(["", "", "Other paired R@1 differences, mean ± SE (per-seed values), points", "",
                      "| difference | epoch 1 | best |", "|---|---|---|"] + rows)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", action="append", required=True, metavar="NAME=FOLDER[@M1+M2][,FOLDER...]",
                    help="a setting and its run folders (repeatable); FOLDER@none+xbm takes only those methods' runs "
                         "from FOLDER")
    ap.add_argument("--methods", default="xbn,xbn-batch,axbn-batch,axbn",
                    help="methods whose paired gains are tabulated (default: xbn,xbn-batch,axbn-batch,axbn)")
    ap.add_argument("--pairs", default="xbn-batch:xbn,axbn-batch:axbn,axbn:xbn,xbm-batch:none",
                    help="further paired differences A:B,... (default: the batch loss added to XBN and to AXBN, "
                         "AXBN against XBN, XBM* against No-XBM)")
    ap.add_argument("--clear-se", type=float, default=4.3, help="standard errors of a clear gain (default 4.3)")
    ap.add_argument("--json", type=Path, default=None, help="also write every per-seed number to this file")
    args = ap.parse_args(argv)
    everything = {}
    for spec in args.setting:
        name, eq, folders = spec.partition("=")
        if not eq:
            print(f"settings_gains: --setting {spec}: expected NAME=FOLDER[,FOLDER...]", file=sys.stderr)
            return 2
        paths, only = [], {}
        for f in folders.split(","):
            if f:
                path, _, methods = f.partition("@")
                paths.append(Path(path))
                if methods:
                    only[Path(path)] = methods.split("+")
        missing = [str(p) for p in paths if not p.is_dir()]
        if missing:
            print(f"settings_gains: --setting {name}: no such folder: {', '.join(missing)}", file=sys.stderr)
            return 2
        by = analyse(paths, only)
        everything[name] = by
        print(render(name, by, args.methods.split(","), args.clear_se)
              + render_pairs(by, [p for p in args.pairs.split(",") if p], args.clear_se)
              + render_spread(by, args.methods.split(","), [p for p in args.pairs.split(",") if p]) + "\n")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
