"""Command line: ``xbn-metric [train] [options]`` trains one run, ``xbn-metric compare [options]`` compares
methods, ``xbn-metric sweep [options]`` sweeps training options (by default batch and memory sizes, the
paper's Figure 1); ``embed``, ``search`` and ``export`` use a trained run (:mod:`metric.retrieval`).

Examples::

    xbn-metric --dataset digits --method xbn                          # the built-in demo
    xbn-metric compare --dataset digits --methods none,xbm,xbn,axbn --seeds 3
    xbn-metric sweep --dataset digits --split class --backbone conv4 --classes-per-batch 4 --seeds 3
    xbn-metric sweep --dataset digits --vary lr=3e-4,1e-3,3e-3 --methods xbm,xbn,axbn --jobs 2
    xbn-metric --dataset sop --data-root /data/Stanford_Online_Products --method axbn --memory-size 0.5
    torchrun --nproc_per_node 4 -m metric --dataset inshop --data-root /data/inshop --scale-lr
    xbn-metric embed runs/metric/sop-axbn-X --out gallery/          # the run's test images -> a store
    xbn-metric search gallery/ --query photo.jpg --k 10 --predict    # nearest images, k-NN class vote
    xbn-metric export runs/metric/sop-axbn-X --format hf --out sop-axbn/    # a Hub model folder
    xbn-metric export runs/metric/sop-axbn-X --format onnx --out model.onnx

Exit status: 0 when everything finished; 2 for bad input (one line naming the option or file, nothing
written); 128 + N when signal N stopped the run after its checkpoint (130 for Ctrl-C, 143 for
SIGTERM), after printing the command that resumes it; 1 when the run itself failed.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

__all__ = ["main"]

PROG = "xbn-metric"

EPILOG = f"""commands:
  {PROG} [train] [options]     train one run (this help)
  {PROG} compare [options]     train several methods x seeds and tabulate mean ± std
                                   (see {PROG} compare --help)
  {PROG} sweep [options]       Recall@1 and the gain over XBM against any training option
                                   (--vary lr=...; by default batch and memory size, the paper's
                                   Figure 1; see {PROG} sweep --help)
  {PROG} embed RUN --out DIR   embed images with a trained run into a store
  {PROG} search STORE --query IMG_OR_DIR
                                   nearest gallery images (faiss), k-NN class vote, HTML / contact sheet
  {PROG} export RUN --format hf|torch-export|onnx|torchscript --out PATH
                                   the embedding model as a Hugging Face Hub folder (--push-to-hub
                                   REPO uploads it) or a file that runs without this package

exit status: 0 finished; 2 bad input (nothing written); 130 / 143 stopped by SIGINT / SIGTERM after a
checkpoint (the command that resumes is printed); 1 the run failed.
Without --output-dir every run gets a new folder runs/metric/<dataset>-<method>-<timestamp>; a folder
that holds a run is refused unless --resume (continue it) or --overwrite (replace it)."""


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _train_command(argv: List[str], full_argv: List[str]) -> int:
    from xbn_queue.training.cli import resume_command
    from xbn_queue.training.config import parse_config

    from .config import MetricConfig, resolve_config

    cfg = parse_config(MetricConfig, argv, prog=PROG, epilog=EPILOG)
    cfg = resolve_config(cfg)  # bad options end here, before the heavy imports and any data work
    from .train import default_output_dir, train

    cfg = default_output_dir(cfg)

    result = train(cfg)
    if not _is_main_rank():
        return 0 if result.get("stopped") != "signal" else 128 + (result.get("signal") or 15)
    if result.get("stopped") == "signal":
        print(f"[{PROG}] to resume: {resume_command(PROG, 'metric', full_argv, result['output_dir'])}", file=sys.stderr)
        return 128 + (result.get("signal") or 15)
    best = result.get("best") or {}
    from .evaluate import SCORE_PREFIXES

    if best:
        shown = ", ".join(f"{k} {100 * v:.2f}%" for k, v in best.items() if k.startswith(SCORE_PREFIXES))
        print(f"[{PROG}] best (epoch {best.get('epoch')}): {shown}; files in {result['output_dir']}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``xbn-metric`` console script (and ``python -m metric``).

    Returns:
        The exit status (see the module docstring).
    """
    from xbn_queue.training.cli import run_main

    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        if argv[:1] == ["compare"]:
            from .experiments.compare import compare_main

            return compare_main(argv)
        if argv[:1] == ["sweep"]:
            from .experiments.sweep import sweep_main

            return sweep_main(argv)
        if argv[:1] in (["embed"], ["search"]):
            from . import retrieval

            return retrieval.embed_main(argv) if argv[0] == "embed" else retrieval.search_main(argv)
        if argv[:1] == ["export"]:
            from .retrieval import export_main

            return export_main(argv)
        return _train_command(argv[1:] if argv[:1] == ["train"] else argv, argv)

    return run_main(PROG, body, bad_input=("metric.data:DataFormatError", "metric.data:BadImageError",
                                            "metric.model:PretrainedWeightsError"),
                    failures=("metric.train:NonFiniteError",))


if __name__ == "__main__":
    sys.exit(main())
