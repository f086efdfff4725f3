"""Benchmark: chunked Recall@K + MAP@R at SOP scale (60,502 x 512).

Synthetic SOP-shaped problem: 60,502 L2-normalised 512-d features in 11,316 classes of 2-12 images
(leave-one-out, query set = gallery set), clustered so that the metrics are neither 0 nor 1.
Measures wall time, process CPU time (user + system; on a busy shared machine the wall time grows
with the load average, printed too) and the peak extra memory of ``metric.evaluate.retrieval_metrics``:
on CPU the process's peak resident set (``ru_maxrss``) above the level just before the call, on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before the call.

    python benchmarks/recall_eval.py                      # SOP scale on CPU
    python benchmarks/recall_eval.py --device cuda --json out.json
    python benchmarks/recall_eval.py --n 5000 --classes 1000   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metric.evaluate import retrieval_metrics  # noqa: E402


def make_problem(n: int, classes: int, dim: int, seed: int):
    """Features (n, dim) and labels (n,): ``classes`` classes of 2..12 items, n items in total."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.full((classes,), 2, dtype=torch.long)
    extra = n - 2 * classes
    if extra < 0:
        raise SystemExit(f"--n {n} is too small for {classes} classes of at least 2 items")
    while extra > 0:  # spread the rest randomly, at most 12 per class
        idx = torch.randint(0, classes, (min(extra, classes),), generator=gen)
        for i in idx.tolist():
            if extra > 0 and sizes[i] < 12:
                sizes[i] += 1
                extra -= 1
    labels = torch.repeat_interleave(torch.arange(classes), sizes)  # (n,)
    centers = torch.randn(classes, dim, generator=gen)
    x = centers[labels] + 2.5 * torch.randn(n, dim, generator=gen)  # (n, dim)
    return torch.nn.functional.normalize(x, dim=1), labels


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return rss_bytes()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=60502)
    p.add_argument("--classes", type=int, default=11316)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ks", default="1,10,100,1000")
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = make_problem(args.n, args.classes, args.dim, args.seed)
    ks = [int(k) for k in args.ks.split(",")]
    if args.device == "cuda":
        x, y = x.cuda(), y.cuda()
        torch.cuda.synchronize()
        retrieval_metrics(x[:4096], y[:4096], ks=ks, chunk_size=args.chunk_size)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss()
    load_before = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = retrieval_metrics(x, y, ks=ks, chunk_size=args.chunk_size, query_is_gallery=True)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if args.device == "cuda":
        extra = torch.cuda.max_memory_allocated() - before
    else:
        extra = rss_bytes() - before  # peak RSS over the process life minus the level before the call
    row = {
        "n": args.n, "classes": args.classes, "dim": args.dim, "device": args.device,
        "threads": torch.get_num_threads(), "chunk_size": args.chunk_size, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 1),
        "load_avg_1min": round(max(load_before, os.getloadavg()[0]), 2),
        "peak_extra_mb": round(extra / 2**20, 1), **{k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()},
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    cols = ["n", "dim", "device", "threads", "chunk_size", "seconds", "cpu_seconds", "load_avg_1min", "peak_extra_mb"] + [k for k in out if k.startswith(("recall", "map"))]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return row


if __name__ == "__main__":
    main()
