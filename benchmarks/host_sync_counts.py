"""Host synchronisations and aten ops per steady-state step, counted with a ``TorchDispatchMode``.

``syncs`` counts ``aten._local_scalar_dense`` (the op behind ``.item()`` / ``int()`` / ``bool()`` of a
tensor: on a GPU each one stalls the host until the device has caught up); ``ops`` counts every aten
op (on a GPU, about one kernel launch each). Counted on the CPU (the counts do not depend on the
device, except the batch statistics: one ``var_mean`` on CUDA instead of a float64 two-pass on CPU)
for one step after the memory is full:

* ``AdaptiveQueue.update`` (float32 and bfloat16 memories);
* ``xbn_queue.pml.AdaptiveCrossBatchMemory`` against PML's ``CrossBatchMemory`` (same loss);
* ``xbn_queue.lightly.AdaptiveMemoryBank`` against lightly's ``MemoryBankModule``.

``--validate`` is passed to the queues (``device``: the CUDA default; ``auto`` on a CPU memory adds one
host read, the finite check).

    python benchmarks/host_sync_counts.py                   # batch 64, dim 128, 1,024 rows
    python benchmarks/host_sync_counts.py --json counts.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from xbn_queue import AdaptiveQueue  # noqa: E402
from xbn_queue.opcount import count_ops  # noqa: E402


def count(fn: Callable[[], object]) -> Dict[str, int]:
    c = count_ops(fn)
    return {"syncs": c.syncs, "ops": c.total}


def _kw(validate: str) -> Dict[str, str]:
    """``validate=`` only where the queue has it (so that older versions can be counted too)."""
    return {"validate": validate} if "validate" in inspect.signature(AdaptiveQueue.__init__).parameters else {}


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--validate", default="device", choices=["auto", "sync", "device", "off"])
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    n_warm = -(-args.size // args.batch) + 2

    def batches(n):
        return [(torch.randn(args.batch, args.dim, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
                for _ in range(n)]

    kw = _kw(args.validate)
    rows: List[Dict[str, object]] = []

    def measure(what: str, module, call, **extra) -> None:
        bs = batches(n_warm + 1)
        for b in bs[:-1]:
            call(module, b)
        if hasattr(module, "resync_stats"):
            module.resync_stats()  # count an ordinary step, not a periodic re-synchronisation
        rows.append({"what": what, **extra, **count(lambda: call(module, bs[-1]))})

    for dtype in (torch.float32, torch.bfloat16):
        for a in ("none", "xbn", "axbn"):
            q = AdaptiveQueue(args.size, args.dim, a, dtype=dtype, **kw)
            measure("AdaptiveQueue.update", q, lambda m, b: m.update(b[0], b[1]), adaptation=a,
                    dtype=str(dtype).replace("torch.", ""))
    try:
        from pytorch_metric_learning import losses

        from xbn_queue.pml import AdaptiveCrossBatchMemory

        call = lambda m, b: m(b[0], b[1])  # noqa: E731
        measure("PML CrossBatchMemory (SupConLoss)", losses.CrossBatchMemory(losses.SupConLoss(), args.dim,
                memory_size=args.size), call, adaptation="-", dtype="float32")
        for a in ("none", "xbn", "axbn"):
            m = AdaptiveCrossBatchMemory(losses.SupConLoss(), args.dim, memory_size=args.size, adaptation=a, **kw)
            measure("AdaptiveCrossBatchMemory (SupConLoss)", m, call, adaptation=a, dtype="float32")
    except ImportError as e:
        print(f"(PML drop-in not counted: {e})", file=sys.stderr)
    try:
        from lightly.models.modules.memory_bank import MemoryBankModule

        from xbn_queue.lightly import AdaptiveMemoryBank

        call = lambda m, b: m(b[0], update=True)  # noqa: E731
        measure("lightly MemoryBankModule", MemoryBankModule(size=(args.size, args.dim)), call,
                adaptation="-", dtype="float32")
        for a in ("none", "xbn", "axbn"):
            m = AdaptiveMemoryBank(size=(args.size, args.dim), adaptation=a, **kw)
            measure("AdaptiveMemoryBank", m, call, adaptation=a, dtype="float32")
    except ImportError as e:
        print(f"(lightly drop-in not counted: {e})", file=sys.stderr)

    print(f"| step (batch {args.batch}, dim {args.dim}, {args.size} rows, validate={args.validate}) "
          "| adaptation | dtype | host syncs | aten ops |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['adaptation']} | {r['dtype']} | {r['syncs']} | {r['ops']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
