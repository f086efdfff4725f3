"""Cost of one ``AdaptiveQueue.update`` with full-covariance XBN (``"xbn-cov"``) against XBN, side by side.

For each embedding dimension and memory size, a full queue of each kind takes the same batches;
the two updates are timed interleaved in one run and the ratio is the median of the per-round ratios.
XBN's step is O(B d) bookkeeping plus one element-wise pass over the memory; xbn-cov's is a float64
covariance of the memory (O(n d^2)), two d x d float64 eigendecompositions and an (n, d) @ (d, d)
product over the memory. A third queue, ``XBNCov(d, shrinkage=0.0)`` (the unshrunk target of 0.3.0),
measures what the default shrinkage towards the diagonal adds (``shrink_ratio``: default / unshrunk).

    python benchmarks/cov_cost.py --threads 1 --clock cpu                       # d 64,128,512; 4k-100k rows
    python benchmarks/cov_cost.py --dims 64 --sizes 4096 --json cov.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    add_timing_args, interleaved, machine_info, median, paired_ratio, parse_sizes, print_table,
    resolve_device, resolve_timing_args, write_json,
)

from xbn_queue import AdaptiveQueue, XBNCov  # noqa: E402


COLUMNS = ["dim", "rows", "xbn_ms", "cov_ms", "ratio", "unshrunk_ms", "shrink_ratio"]


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="64,128,512")
    p.add_argument("--sizes", default="4096,32768,100000")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="")
    add_timing_args(p, 5, 20, 1, 3)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    resolve_timing_args(args, device, (args.repeats or 5, 20), (1, 3))
    g = torch.Generator().manual_seed(0)
    rows: List[Dict[str, object]] = []
    for d in parse_sizes(args.dims):
        mix = torch.randn(d, d, generator=g) / d**0.5
        for size in parse_sizes(args.sizes):
            queues = {name: AdaptiveQueue(size=size, dim=d, adaptation=name, validate="off").to(device)
                      for name in ("xbn", "xbn-cov")}
            queues["unshrunk"] = AdaptiveQueue(size=size, dim=d, adaptation=XBNCov(d, shrinkage=0.0),
                                               validate="off").to(device)
            fill = torch.randn(size, d, generator=g) @ mix
            for q in queues.values():
                q.enqueue(fill.to(device))
            batches = [(torch.randn(args.batch, d, generator=g) @ mix).to(device) for _ in range(4)]
            state = {"i": 0}

            def step(q: AdaptiveQueue) -> None:
                q.update(batches[state["i"] % len(batches)])
                state["i"] += 1

            times = interleaved({name: (lambda q=q: step(q)) for name, q in queues.items()}, device,
                                args.repeats, args.warmup, args.clock)
            row = {"dim": d, "rows": size, "xbn_ms": median(times["xbn"]), "cov_ms": median(times["xbn-cov"]),
                   "ratio": paired_ratio(times["xbn-cov"], times["xbn"]),
                   "unshrunk_ms": median(times["unshrunk"]),
                   "shrink_ratio": paired_ratio(times["xbn-cov"], times["unshrunk"])}
            rows.append(row)
            print_table([row], COLUMNS)
            del queues, fill
    print()
    print_table(rows, COLUMNS)
    info = machine_info(device)
    print(info)
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
