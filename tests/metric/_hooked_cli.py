"""``python -m metric`` with test callbacks registered on every run it starts.

Usage: ``python tests/metric/_hooked_cli.py [--hang-after-step N] [--dump-memory DIR] -- ARGS...``

* ``--hang-after-step N``: after ``last.pt`` of step N is written, print a line and wait until the run
  receives a signal (a test then sends SIGKILL, SIGTERM or SIGINT at a known step).
* ``--dump-memory DIR``: when the run ends, every rank saves its memory, the stored ids and its model
  to ``DIR/queue_rank{rank}.pt``.
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

import metric.train
from metric.cli import main
from xbn_queue.training.loop import Callback

HANG_LINE = "test hook: checkpoint of step"


class HangAfterCheckpoint(Callback):
    """Waits for a signal after the periodic checkpoint of one step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, loop, path):
        if path.name == "last.pt" and loop.state.global_step == self.step:
            print(f"[test] {HANG_LINE} {self.step} written; waiting for a signal", file=sys.stderr, flush=True)
            while not loop.stop.requested:
                time.sleep(0.05)


class DumpMemory(Callback):
    """Saves this rank's memory and model at the end of the run."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_run_end(self, loop, summary):
        queue = loop.mem_loss.queue
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"memory": queue.embeddings.cpu(), "labels": queue.labels.cpu(), "ids": queue.ids.cpu(),
                    "model": {k: v.cpu() for k, v in loop.model.state_dict().items()}},
                   self.folder / f"queue_rank{loop.ctx.rank}.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--hang-after-step", type=int, default=0)
    parser.add_argument("--dump-memory", default="")
    split = sys.argv.index("--")
    opts = parser.parse_args(sys.argv[1:split])
    callbacks = ([HangAfterCheckpoint(opts.hang_after_step)] if opts.hang_after_step else []) + (
        [DumpMemory(opts.dump_memory)] if opts.dump_memory else [])
    metric.train.train = functools.partial(metric.train.train, callbacks=callbacks)
    sys.exit(main(sys.argv[split + 1:]))
