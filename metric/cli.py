"""Command line: ``xbn-metric [train] [options]`` trains one run, ``xbn-metric compare [options]`` compares
methods, ``xbn-metric sweep [options]`` sweeps batch and memory sizes (the paper's Figure 1).

Examples::

    xbn-metric --dataset digits --method xbn                          # the built-in demo
    xbn-metric compare --dataset digits --methods none,xbm,xbn,axbn --seeds 3
    xbn-metric sweep --dataset digits --split class --methods xbm,xbn,axbn --batch-sizes 16,32,64 --classes-per-batch 4
    xbn-metric --dataset sop --data-root /data/Stanford_Online_Products --method axbn --memory-size 0.5
    torchrun --nproc_per_node 4 -m metric --dataset inshop --data-root /data/inshop --scale-lr
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

__all__ = ["main"]

PROG = "xbn-metric"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``xbn-metric`` console script (and ``python -m metric``).

    Returns:
        0 on success (also after a clean stop on SIGTERM/SIGINT); errors exit with status 2 and a
        one-line message.
    """
    from xbn_queue.training.config import parse_config

    from .config import MetricConfig
    from .data import BadImageError, DataFormatError
    from .model import PretrainedWeightsError
    from .train import NonFiniteError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compare"]:
            from .compare import add_compare_args, run_compare

            cfg, extras = parse_config(MetricConfig, argv[1:], prog=f"{PROG} compare", extra_args=add_compare_args)
            run_compare(cfg, extras.methods, extras.seeds)
            return 0
        if argv[:1] == ["sweep"]:
            from .sweep import add_sweep_args, run_sweep

            cfg, extras = parse_config(MetricConfig, argv[1:], prog=f"{PROG} sweep", extra_args=add_sweep_args)
            run_sweep(cfg, extras.methods, extras.batch_sizes, extras.memory_sizes, extras.seeds, extras.classes_per_batch)
            return 0
        if argv[:1] == ["train"]:
            argv = argv[1:]
        from .train import train

        cfg = parse_config(MetricConfig, argv, prog=PROG)
        result = train(cfg)
        if result.get("best") and int(os.environ.get("RANK", "0") or 0) == 0:
            best = result["best"]
            shown = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k.startswith(("recall@", "map@r")))
            print(f"[{PROG}] best (epoch {best.get('epoch')}): {shown}; files in {result['output_dir']}")
        return 0
    except (DataFormatError, BadImageError, PretrainedWeightsError, NonFiniteError, ValueError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
