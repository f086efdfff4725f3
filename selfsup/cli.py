"""Command line: ``xbn-selfsup [train] [options]`` and ``xbn-selfsup compare --adaptations none,xbn --seeds 3 [options]``.

Exit status: 0 when everything finished; 2 for bad input (one line naming the option or file, nothing
written); 128 + N when signal N stopped the run after its checkpoint (130 for Ctrl-C, 143 for
SIGTERM), after printing the command that resumes it; 1 when the run itself failed.
"""

import sys
from typing import List, Optional, Sequence

from selfsup.config import SelfSupConfig

PROG = "xbn-selfsup"

USAGE = f"""{PROG}: MoCo on CIFAR-10/100 (or an image folder, or digits) with an adaptive queue inside lightly's NTXentLoss.

  {PROG} [train] [options]                       train one run (see {PROG} train --help)
  {PROG} compare --adaptations none,xbn --seeds 3 [options]
                                                      train every adaptation x seed, write compare.md / compare.json
                                                      (see {PROG} compare --help)

exit status: 0 finished; 2 bad input (nothing written); 130 / 143 stopped by SIGINT / SIGTERM after a
checkpoint (the command that resumes is printed); 1 the run failed.
Without --output-dir every run gets a new folder runs/selfsup/<dataset>-<adaptation>-<timestamp>; a
folder that holds a run is refused unless --resume (continue it) or --overwrite (replace it).
"""


def _train_command(args: List[str], full_argv: List[str]) -> int:
    from xbn_queue.training.cli import resume_command
    from xbn_queue.training.config import parse_config

    cfg = parse_config(SelfSupConfig, args, prog=f"{PROG} train", epilog=USAGE.split("\n\n", 1)[1])
    cfg.validate()  # bad options end here, before the heavy imports and any data or model work
    from selfsup.train import default_output_dir, train

    cfg = default_output_dir(cfg)
    summary = train(cfg)
    if summary.get("stopped") == "signal":
        print(f"[{PROG}] to resume: {resume_command(PROG, 'selfsup', full_argv, summary['output_dir'])}", file=sys.stderr)
        return 128 + (summary.get("signal") or 15)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``xbn-selfsup`` console script and ``python -m selfsup``.

    Returns:
        The exit status (see the module docstring).
    """
    from xbn_queue.training.cli import run_main

    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"], ["help"]):
        print(USAGE)
        return 0

    def body() -> int:
        if args[:1] == ["compare"]:
            from selfsup.compare import compare_main

            return compare_main(args)
        return _train_command(args[1:] if args[:1] == ["train"] else args, args)

    return run_main(PROG, body, bad_input=("selfsup.data:BadImageError",), failures=("selfsup.train:NonFiniteError",))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
