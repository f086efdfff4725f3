"""Command line: ``xbn-selfsup [train] [options]`` and ``xbn-selfsup compare --adaptations none,xbn --seeds 3 [options]``."""

import sys
from typing import List, Optional, Sequence

from selfsup.config import SelfSupConfig

USAGE = """xbn-selfsup: MoCo on CIFAR-10/100 (or an image folder, or digits) with an adaptive queue inside lightly's NTXentLoss.

  xbn-selfsup [train] [options]                       train one run (see xbn-selfsup train --help)
  xbn-selfsup compare --adaptations none,xbn --seeds 3 [options]
                                                      train every adaptation x seed, write compare.md / compare.json
"""


def _add_compare_args(parser) -> None:
    parser.add_argument("--adaptations", default="none,xbn", help="comma-separated adaptations to compare (default none,xbn)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per adaptation: --seed, --seed + 1, ... (default 3)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``xbn-selfsup`` console script and ``python -m selfsup``.

    Returns:
        0 on success (also after a clean stop on SIGTERM/SIGINT), 1 on a reported error.
    """
    from xbn_queue.training.config import parse_config

    from selfsup.data import BadImageError
    from selfsup.train import NonFiniteError

    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"], ["help"]):
        print(USAGE)
        return 0
    command = "train"
    if args[:1] in (["train"], ["compare"]):
        command, args = args[0], args[1:]
    try:
        if command == "compare":
            from selfsup.compare import compare

            cfg, extras = parse_config(SelfSupConfig, args, prog="xbn-selfsup compare", extra_args=_add_compare_args)
            adaptations = [a.strip() for a in extras.adaptations.split(",") if a.strip()]
            compare(cfg, adaptations, extras.seeds)
        else:
            from selfsup.train import train

            cfg = parse_config(SelfSupConfig, args, prog="xbn-selfsup train")
            summary = train(cfg)
            if summary.get("stopped"):
                print(f"stopped by signal at step {summary['global_step']}; resume with --resume", file=sys.stderr)
    except (FileNotFoundError, BadImageError, NonFiniteError, ValueError) as exc:
        print(f"xbn-selfsup: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
