"""Shared helpers for the benchmarks: interleaved timing, machine description, tables, JSON.

Timings are medians of repeated measurements after warm-up. The implementations being compared
are measured in the same run, interleaved (A, B, C, then B, C, A, ...), so that slow drifts of a
shared machine hit all of them alike and the *ratio* stays meaningful even when absolute times
are noisy. On CUDA every measurement is bracketed by CUDA events after a synchronize.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def resolve_device(name: str) -> torch.device:
    """``"cpu"`` / ``"cuda"`` (``"auto"``: cuda when available). Exits with a message if CUDA is asked for but absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def time_once(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> float:
    """Time of one call of ``fn`` in milliseconds.

    ``clock="wall"``: wall time (CUDA events on a GPU). ``clock="cpu"``: CPU time of this process
    (user + system, all threads; ``time.process_time``), which time spent waiting for a core that
    other processes hold does not inflate: with ``--threads 1`` it is the wall time the step would
    take on an idle core, a robust measure on a shared machine. CPU only.
    """
    if clock == "cpu":
        t0 = time.process_time()
        fn()
        return (time.process_time() - t0) * 1e3
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(
    fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int, clock: str = "wall"
) -> Dict[str, List[float]]:
    """Time every function ``repeats`` times after ``warmup`` calls each, rotating the order each round.

    Returns:
        name -> list of ``repeats`` times in ms.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(time_once(fns[name], device, clock))
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios (each round measured both back to back): robust to drifts of load."""
    return float(statistics.median(a / b for a, b in zip(num, den)))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> Dict[str, object]:
    """What the numbers were measured on."""
    info: Dict[str, object] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import os

        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    return info


def print_table(rows: List[Dict[str, object]], columns: Sequence[str]) -> None:
    """Plain fixed-width table on stdout."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v != 0 and abs(v) < 1e-2:
                return f"{v:.2e}"
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(path: str, payload: Dict[str, object]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {p}")


def parse_sizes(text: str) -> List[int]:
    return [int(s.replace("_", "")) for s in text.split(",") if s.strip()]


def setup_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def add_timing_args(p, default_repeats_cpu: int, default_repeats_cuda: int, default_warmup_cpu: int, default_warmup_cuda: int) -> None:
    """``--repeats``, ``--warmup``, ``--threads``, ``--clock`` (shared by the benchmarks)."""
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed rounds (default {default_repeats_cpu} on cpu, {default_repeats_cuda} on cuda)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed rounds first (default {default_warmup_cpu} on cpu, {default_warmup_cuda} on cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall time, or this process's CPU time (robust on a shared machine; use with --threads 1)")


def resolve_timing_args(args, device: torch.device, repeats: tuple, warmup: tuple) -> None:
    setup_threads(args.threads)
    cuda = device.type == "cuda"
    args.repeats = args.repeats or (repeats[1] if cuda else repeats[0])
    args.warmup = args.warmup if args.warmup is not None else (warmup[1] if cuda else warmup[0])
    if args.clock == "cpu" and cuda:
        raise SystemExit("--clock cpu measures CPU time; use --clock wall on cuda")
