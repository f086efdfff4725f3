"""Benchmark: the adaptive memory against pytorch-metric-learning's CrossBatchMemory, and bfloat16 storage.

One training step of the loss = forward + backward of ``SupConLoss`` with ``PairMarginMiner`` against a
full memory of ``memory_size`` rows of dimension 512, batch 64:

* ``pml_ms``: PML's ``CrossBatchMemory`` (plain XBM: enqueue, mine, loss).
* ``ms``: ``xbn_queue.pml.AdaptiveCrossBatchMemory`` with the same loss and miner, adaptation
  ``xbn`` / ``axbn`` (adapt the memory to the batch, enqueue, mine, loss). With ``--impl queue`` (or when
  the drop-in is not importable) the same step is assembled from ``AdaptiveQueue.update`` and PML's own
  index bookkeeping on ``queue.valid_memory()``.
* ``ratio``: median over rounds of ``ms / pml_ms``, both measured back to back in every round (the order
  rotates), which keeps the ratio meaningful on a loaded machine. ``ratio_of_medians`` is also written.

``adapt_ms`` is ``queue.adapt`` alone on the same full memory (4x more rounds): a low-noise estimate of
the overhead, ``ratio ~ 1 + adapt_share``.

``--naive`` adds ``xbn-naive``: the straightforward adaptation (``torch.var_mean`` over the memory every
step, then the affine), for comparison. ``--bf16-steps N`` then runs N steps of a drifting embedding
stream through float32 and bfloat16 queues and reports the effect of bf16 storage on the loss.

    python benchmarks/queue_overhead.py --device cpu --sizes 4096,30000,100000,200000 --json out.json
    python benchmarks/queue_overhead.py --device cuda --repeats 50 --json out_cuda.json
    python benchmarks/queue_overhead.py --sizes 4096 --repeats 3 --bf16-steps 0      # quick look
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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

from pytorch_metric_learning import losses, miners  # noqa: E402

from xbn_queue import AdaptiveQueue  # noqa: E402
from xbn_queue import functional as XF  # noqa: E402

COLUMNS = ["memory_size", "adaptation", "ms", "pml_ms", "ratio"]
#: ``--compile`` -> ``AdaptiveQueue(compile=...)`` (auto: compiled bookkeeping on CUDA, eager on CPU).
COMPILE = {"auto": None, "on": True, "off": False}
EXTRA = ["adapt_ms", "adapt_share"]


class NaiveQueue(AdaptiveQueue):
    """The straightforward adaptation: a ``var_mean`` pass over the memory, then the affine, every step."""

    def _adapt(self, batch: torch.Tensor) -> None:
        n = len(self)
        if not self.adaptation.active or batch.shape[0] < 2 or n < 2:
            return
        b_var, b_mean = torch.var_mean(batch, dim=0, correction=1)
        target = self.adaptation.target(b_mean, b_var.sqrt(), batch.shape[0])
        mem = self.memory[:n]
        m_var, m_mean = torch.var_mean(mem, dim=0, correction=1)
        scale, shift = XF.moment_matching_affine(m_mean, m_var.sqrt(), target[0], target[1], self.eps)
        XF.apply_affine_(mem, scale, shift)


def make_data(dim: int, batch: int, classes: int, n_batches: int, device: torch.device, seed: int = 0):
    """Class prototypes, a pool of labelled batches (4 samples per class), and a maker of memory rows."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)

    def rows(labels: torch.Tensor) -> torch.Tensor:
        x = protos[labels] + 0.06 * torch.randn(len(labels), dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1)

    batches = []
    for _ in range(n_batches):
        labels = torch.randint(0, classes, (batch // 4,), generator=g).repeat_interleave(4)[:batch]
        batches.append((rows(labels).to(device), labels.to(device)))
    return rows, batches, g


def pml_xbm(dim: int, size: int):
    return losses.CrossBatchMemory(losses.SupConLoss(), dim, memory_size=size, miner=miners.PairMarginMiner())


class QueueStep(torch.nn.Module):
    """Fallback when ``xbn_queue.pml`` is absent: ``AdaptiveQueue.update`` + PML's bookkeeping on ``valid_memory()``."""

    def __init__(self, dim: int, size: int, adaptation: str, queue_cls=AdaptiveQueue, **kw) -> None:
        super().__init__()
        self.queue = queue_cls(size=size, dim=dim, adaptation=adaptation, **kw)
        self.helper = pml_xbm(dim, 1)  # only its loss, miner and create_indices_tuple are used

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.helper.curr_batch_idx = self.queue.update(emb, labels)  # (B,)
        e_mem, l_mem = self.queue.valid_memory(), self.queue.valid_labels()
        idx = self.helper.create_indices_tuple(emb, labels, e_mem, l_mem, None, True)
        return self.helper.loss(emb, labels, idx, e_mem, l_mem)


def build_ours(impl: str, dim: int, size: int, adaptation: str, naive: bool = False, **kw) -> torch.nn.Module:
    queue_cls = NaiveQueue if naive else AdaptiveQueue
    if impl == "dropin":
        from xbn_queue.pml import AdaptiveCrossBatchMemory

        m = AdaptiveCrossBatchMemory(
            losses.SupConLoss(), dim, memory_size=size, miner=miners.PairMarginMiner(), adaptation=adaptation, **kw
        )
        if naive:
            m.queue = NaiveQueue(size=size, dim=dim, adaptation=adaptation, **kw)
        return m
    return QueueStep(dim, size, adaptation, queue_cls=queue_cls, **kw)


def fill(module: torch.nn.Module, rows: torch.Tensor, labels: torch.Tensor) -> None:
    """Fill a memory completely (steady state), the same rows for every implementation."""
    with torch.no_grad():
        if isinstance(module, losses.CrossBatchMemory) and not hasattr(module, "queue"):
            module.embedding_memory.copy_(rows)
            module.label_memory.copy_(labels)
            module.has_been_filled = True
            module.queue_idx = 0
        else:
            module.queue.enqueue(rows, labels)


def step_fn(module: torch.nn.Module, batches) -> Callable[[], None]:
    state = {"i": 0}

    def step() -> None:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        emb = x.clone().requires_grad_(True)
        module(emb, y).backward()

    return step


def resolve_impl(impl: str) -> str:
    if impl != "auto":
        return impl
    try:
        import xbn_queue.pml  # noqa: F401

        return "dropin"
    except ImportError:
        return "queue"


def bench_size(args, device: torch.device, size: int, impl: str) -> List[Dict[str, object]]:
    rows_fn, batches, g = make_data(args.dim, args.batch, args.classes, 8, device)
    labels = torch.randint(0, args.classes, (size,), generator=g)
    mem_rows = rows_fn(labels).to(device)
    labels = labels.to(device)
    modules: Dict[str, torch.nn.Module] = {"pml": pml_xbm(args.dim, size).to(device)}
    qkw = {"compile": COMPILE[args.compile]}
    for a in args.adaptations:
        modules[a] = build_ours(impl, args.dim, size, a, **qkw).to(device)
    if args.naive:
        modules["xbn-naive"] = build_ours(impl, args.dim, size, "xbn", naive=True, **qkw).to(device)
    for m in modules.values():
        fill(m, mem_rows, labels)
    del mem_rows
    fns = {name: step_fn(m, batches) for name, m in modules.items()}
    times = interleaved(fns, device, args.repeats, args.warmup, args.clock)
    # The adaptation alone (queue.adapt on the same full memory), many more rounds: a low-noise
    # estimate of the overhead, ratio ~ 1 + adapt_ms / pml_ms.
    adapt_fns = {}
    for name, m in modules.items():
        if name != "pml":
            adapt_fns[name] = (lambda q=m.queue: q.adapt(batches[0][0]))
    adapt_times = interleaved(adapt_fns, device, 4 * args.repeats, args.warmup, args.clock) if adapt_fns else {}
    out = []
    for name in modules:
        if name == "pml":
            continue
        out.append(
            {
                "memory_size": size,
                "adaptation": name,
                "ms": median(times[name]),
                "pml_ms": median(times["pml"]),
                "ratio": paired_ratio(times[name], times["pml"]),
                "ratio_of_medians": median(times[name]) / median(times["pml"]),
                "adapt_ms": median(adapt_times[name]),
                "adapt_share": median(adapt_times[name]) / median(times["pml"]),
                "times_ms": [round(t, 3) for t in times[name]],
                "pml_times_ms": [round(t, 3) for t in times["pml"]],
                "impl": impl,
                "compile": args.compile,
            }
        )
    return out


def bf16_effect(args, device: torch.device, impl: str) -> List[Dict[str, object]]:
    """Same drifting stream through float32 and bfloat16 memories: relative loss difference per step.

    The loss here is ``SupConLoss`` against the whole memory without a miner, so every stored row
    contributes (a miner would hide most of them). For scale, ``xbn_vs_xbm_rel_diff_mean`` is how much
    the adaptation itself changes the loss (float32 xbn / axbn against float32 plain XBM).
    """
    g = torch.Generator().manual_seed(1)
    dim, classes = args.dim, args.classes
    protos = torch.randn(classes, 64, generator=g)
    w = torch.randn(64, dim, generator=g) / 8
    stream = []
    for _ in range(args.bf16_steps):
        w = w + 0.02 * torch.randn(64, dim, generator=g) / 8  # the "model" drifts
        y = torch.randint(0, classes, (args.batch // 4,), generator=g).repeat_interleave(4)[: args.batch]
        x = protos[y] + 0.5 * torch.randn(len(y), 64, generator=g)
        stream.append((torch.nn.functional.normalize(x @ w, dim=1).to(device), y.to(device)))

    def make(adaptation: str, dtype: torch.dtype) -> torch.nn.Module:
        if impl == "dropin":
            from xbn_queue.pml import AdaptiveCrossBatchMemory

            m = AdaptiveCrossBatchMemory(losses.SupConLoss(), dim, memory_size=args.bf16_memory,
                                         adaptation=adaptation, dtype=dtype)
        else:
            m = QueueStep(dim, args.bf16_memory, adaptation, dtype=dtype)
            m.helper.miner = None
        return m.to(device)

    def run(m: torch.nn.Module) -> torch.Tensor:
        out = []
        for x, y in stream:
            emb = x.clone().requires_grad_(True)
            loss = m(emb, y)
            loss.backward()
            out.append(float(loss.detach()))
        return torch.tensor(out, dtype=torch.float64)

    warm = args.bf16_memory // args.batch  # compare once the memory is full
    xbm = run(make("none", torch.float32))[warm:]
    out = []
    for a in ("xbn", "axbn"):
        mods = {dt: make(a, dt) for dt in (torch.float32, torch.bfloat16)}
        f32, b16 = run(mods[torch.float32])[warm:], run(mods[torch.bfloat16])[warm:]
        rel = (b16 - f32).abs() / f32.abs().clamp_min(1e-12)
        ok = rel.numel() > 0
        mem_bytes = {str(dt).replace("torch.", ""): m.queue.memory.numel() * m.queue.memory.element_size()
                     for dt, m in mods.items()}
        out.append(
            {
                "adaptation": a,
                "memory_size": args.bf16_memory,
                "steps": len(stream),
                "steps_compared": int(rel.numel()),
                "loss_f32_mean": float(f32.mean()) if ok else float("nan"),
                "rel_diff_mean": float(rel.mean()) if ok else float("nan"),
                "rel_diff_max": float(rel.max()) if ok else float("nan"),
                "rel_diff_last": float(rel[-1]) if ok else float("nan"),
                "xbn_vs_xbm_rel_diff_mean": float(((f32 - xbm).abs() / xbm.abs()).mean()) if ok else float("nan"),
                "memory_bytes": mem_bytes,
            }
        )
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--sizes", default="4096,30000,100000,200000", help="comma-separated memory sizes")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--adaptations", default="xbn,axbn", help="comma-separated, from none,xbn,axbn")
    p.add_argument("--naive", action="store_true", help="also time the straightforward var_mean + affine adaptation")
    add_timing_args(p, 5, 50, 1, 10)
    p.add_argument("--impl", default="auto", choices=["auto", "dropin", "queue"],
                   help="dropin: xbn_queue.pml.AdaptiveCrossBatchMemory; queue: AdaptiveQueue.update + PML's bookkeeping")
    p.add_argument("--compile", default="auto", choices=sorted(COMPILE),
                   help="torch.compile of the queue's O(D) bookkeeping (auto: on for cuda, off for cpu)")
    p.add_argument("--bf16-steps", type=int, default=200, help="steps of the bf16 loss comparison (0: skip)")
    p.add_argument("--bf16-memory", type=int, default=4096)
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    args.adaptations = [a for a in args.adaptations.split(",") if a]
    resolve_timing_args(args, device, (5, 50), (1, 10))
    impl = resolve_impl(args.impl)
    torch.manual_seed(0)

    info = machine_info(device)
    print(f"# queue_overhead: {info}  impl={impl} repeats={args.repeats} warmup={args.warmup} clock={args.clock}")
    rows: List[Dict[str, object]] = []
    for size in parse_sizes(args.sizes):
        new = bench_size(args, device, size, impl)
        rows += new
        print_table(new, COLUMNS + EXTRA)
        sys.stdout.flush()
    bf16 = bf16_effect(args, device, impl) if args.bf16_steps > 0 else []
    print()
    print("## step time: ours (ms) vs PML CrossBatchMemory (pml_ms), ratio = median of paired ratios;")
    print("## adapt_ms: queue.adapt alone on the same memory (adapt_share = adapt_ms / pml_ms)")
    print_table(rows, COLUMNS + EXTRA)
    if bf16:
        print()
        print("## bfloat16 memory vs float32: relative loss difference per step over the run (memory full);")
        print("## xbn_vs_xbm: how much the adaptation itself changes the loss, for scale")
        print_table(bf16, ["adaptation", "memory_size", "steps_compared", "loss_f32_mean", "rel_diff_mean",
                           "rel_diff_max", "xbn_vs_xbm_rel_diff_mean"])
    payload = {"benchmark": "queue_overhead", "machine": info, "args": vars(args), "rows": rows, "bf16": bf16}
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
