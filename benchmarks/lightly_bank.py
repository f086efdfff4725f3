"""Benchmark: the adaptive memory bank against lightly's MemoryBankModule.

One call ``bank_module(output, update=True)`` (return the negatives, enqueue the batch) on a full bank of
``memory_size`` rows of dimension 128, batch 256:

* ``lightly_ms``: lightly's ``MemoryBankModule`` (clone of the bank, enqueue).
* ``ms``: ``xbn_queue.lightly.AdaptiveMemoryBank`` (adapt the stored rows to the batch, return them
  L2-normalized as a new tensor, enqueue), adaptation ``xbn`` by default (``--adaptations none,xbn,axbn``).
* ``ratio``: median over rounds of ``ms / lightly_ms``, both measured back to back in every round.

    python benchmarks/lightly_bank.py --device cpu --json out.json
    python benchmarks/lightly_bank.py --device cuda --repeats 100
    python benchmarks/lightly_bank.py --sizes 16384,65536 --adaptations none,xbn,axbn
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    interleaved,
    machine_info,
    median,
    paired_ratio,
    parse_sizes,
    print_table,
    resolve_device,
    add_timing_args,
    resolve_timing_args,
    write_json,
)

from lightly.models.modules.memory_bank import MemoryBankModule  # noqa: E402

from xbn_queue.lightly import AdaptiveMemoryBank  # noqa: E402

COLUMNS = ["memory_size", "dim", "adaptation", "ms", "lightly_ms", "ratio"]


def step_fn(module: torch.nn.Module, batches) -> Callable[[], None]:
    state = {"i": 0}

    def step() -> None:
        x = batches[state["i"] % len(batches)]
        state["i"] += 1
        module(x, update=True)

    return step


def bench_size(args, device: torch.device, size: int) -> List[Dict[str, object]]:
    g = torch.Generator().manual_seed(size)
    batches = [
        torch.nn.functional.normalize(torch.randn(args.batch, args.dim, generator=g) + 0.3, dim=1).to(device)
        for _ in range(8)
    ]
    modules: Dict[str, torch.nn.Module] = {"lightly": MemoryBankModule(size=(size, args.dim)).to(device)}
    for a in args.adaptations:
        m = AdaptiveMemoryBank(size=(size, args.dim), adaptation=a, normalize=args.normalize,
                               compile={"auto": None, "on": True, "off": False}[args.compile]).to(device)
        with torch.no_grad():
            m.queue.enqueue(modules["lightly"].bank.clone())  # full, the same rows as lightly's bank
        modules[a] = m
    fns = {name: step_fn(m, batches) for name, m in modules.items()}
    times = interleaved(fns, device, args.repeats, args.warmup, args.clock)
    rows = []
    for a in args.adaptations:
        rows.append(
            {
                "memory_size": size,
                "dim": args.dim,
                "adaptation": a,
                "normalize": args.normalize,
                "compile": args.compile,
                "ms": median(times[a]),
                "lightly_ms": median(times["lightly"]),
                "ratio": paired_ratio(times[a], times["lightly"]),
                "ratio_of_medians": median(times[a]) / median(times["lightly"]),
                "times_ms": [round(t, 4) for t in times[a]],
                "lightly_times_ms": [round(t, 4) for t in times["lightly"]],
            }
        )
    return rows


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--sizes", default="65536", help="comma-separated bank sizes")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--adaptations", default="xbn", help="comma-separated, from none,xbn,axbn")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="AdaptiveMemoryBank(normalize=...) (default: on, as for NTXentLoss)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile of the queue's O(D) bookkeeping (auto: on for cuda, off for cpu)")
    add_timing_args(p, 30, 200, 3, 20)
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    args.adaptations = [a for a in args.adaptations.split(",") if a]
    resolve_timing_args(args, device, (30, 200), (3, 20))
    torch.manual_seed(0)

    info = machine_info(device)
    print(f"# lightly_bank: {info}  repeats={args.repeats} warmup={args.warmup} clock={args.clock}")
    rows: List[Dict[str, object]] = []
    for size in parse_sizes(args.sizes):
        rows += bench_size(args, device, size)
    print()
    print("## forward(update=True): ours (ms) vs lightly MemoryBankModule (lightly_ms), ratio = median of paired ratios")
    print_table(rows, COLUMNS)
    payload = {"benchmark": "lightly_bank", "machine": info, "args": vars(args), "rows": rows}
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
