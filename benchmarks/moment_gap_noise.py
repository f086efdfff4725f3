"""What ``xbn_queue.drift.moment_gap`` measures, and how much of it XBN removes.

A memory of N stored rows is made stale by a pure per-dimension affine drift: the stored row of a
sample is ``(f - shift) / scale`` of its fresh embedding ``f`` (rows i.i.d. N(0, I_d)). XBN (Eq. 6)
then matches the stored rows to the moments of one *batch* of B fresh embeddings of other samples,
which is all it sees at a training step. The script prints :func:`~xbn_queue.drift.moment_gap` of
the stored rows against the fresh rows of the same samples

* without adaptation (the drift itself),
* after XBN with a batch of B rows, for several B,
* after matching to the fresh rows' own moments (what "the part XBN removes" would leave: 0),

next to the closed-form sampling noise of a B-row estimate for Gaussian rows:
``sqrt(2/pi) * (sqrt(1/B + 1/N) + sqrt(1/(2 (B - 1)) + 1/(2 (N - 1))))``: the mean absolute
difference between the mean of B rows and that of the N fresh rows, plus the same for the standard
deviations (large-sample approximation), in units of the spread. The gap left after XBN is that noise, not drift: XBN removes only the part of the
gap a batch of B rows can estimate. Usage::

    python benchmarks/moment_gap_noise.py                     # d 256, 880 rows, B 8..256, 20 trials
    python benchmarks/moment_gap_noise.py --json gap.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics as st
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from xbn_queue.drift import moment_gap  # noqa: E402
from xbn_queue.functional import match_moments, moments  # noqa: E402


def one_trial(gen: torch.Generator, rows: int, dim: int, batch_sizes, shift_std: float, log_scale_std: float):
    """Gaps for one random drift: ``{"none": g, "own": g, B: g, ...}``."""
    fresh = torch.randn(rows, dim, generator=gen, dtype=torch.float64)  # (N, D) current model
    shift = shift_std * torch.randn(dim, generator=gen, dtype=torch.float64)  # (D,)
    scale = torch.exp(log_scale_std * torch.randn(dim, generator=gen, dtype=torch.float64))  # (D,)
    stored = (fresh - shift) / scale  # (N, D) the same samples embedded by the old model
    s_mean, s_std = moments(stored)
    out = {"none": moment_gap(stored, fresh)}
    f_mean, f_std = moments(fresh)
    out["own"] = moment_gap(match_moments(stored, s_mean, s_std, f_mean, f_std), fresh)
    for b in batch_sizes:
        batch = torch.randn(b, dim, generator=gen, dtype=torch.float64)  # (B, D) other samples, current model
        b_mean, b_std = moments(batch)
        out[b] = moment_gap(match_moments(stored, s_mean, s_std, b_mean, b_std), fresh)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=880, help="stored rows (the Omniglot default memory: 880)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch-sizes", default="8,16,32,64,256")
    p.add_argument("--shift-std", type=float, default=0.5, help="per-dimension shift ~ N(0, s^2), in fresh spreads")
    p.add_argument("--log-scale-std", type=float, default=0.4, help="per-dimension log scale ~ N(0, s^2)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    gen = torch.Generator().manual_seed(a.seed)
    trials = [one_trial(gen, a.rows, a.dim, batch_sizes, a.shift_std, a.log_scale_std) for _ in range(a.trials)]

    def row(key):
        vals = [t[key] for t in trials]
        return st.mean(vals), (st.stdev(vals) if len(vals) > 1 else 0.0)

    print(f"moment_gap of {a.rows} stored rows, d {a.dim}, per-dimension affine drift "
          f"(shift ~ N(0, {a.shift_std}^2), log scale ~ N(0, {a.log_scale_std}^2)); {a.trials} trials, mean ± std")
    print("| stored rows | moment gap | sampling noise of a B-row estimate (closed form) |")
    print("|---|---:|---:|")
    result = {"rows": a.rows, "dim": a.dim, "trials": a.trials, "shift_std": a.shift_std,
              "log_scale_std": a.log_scale_std, "seed": a.seed, "gap": {}}
    m, s = row("none")
    print(f"| no adaptation | {m:.3f} ± {s:.3f} | |")
    result["gap"]["none"] = [m, s]
    for b in batch_sizes:
        m, s = row(b)
        n = a.rows
        noise = math.sqrt(2 / math.pi) * (math.sqrt(1 / b + 1 / n) + math.sqrt(1 / (2 * (b - 1)) + 1 / (2 * (n - 1))))
        print(f"| XBN, batch of B = {b} | {m:.3f} ± {s:.3f} | {noise:.3f} |")
        result["gap"][f"xbn_B{b}"] = [m, s, noise]
    m, s = row("own")
    print(f"| matched to the fresh rows' own moments | {m:.1e} ± {s:.1e} | |")
    result["gap"]["own"] = [m, s]
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
