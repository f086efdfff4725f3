"""Driver of the 2-process selfsup tests: several runs, one after the other, in one launch of two processes.

Run as ``python -m torch.distributed.run --nproc_per_node 2 tests/selfsup/_ddp_driver.py SPEC.json``; ``SPEC.json``
is a list of ``[case, argv]`` (``argv``: the run's options, its own ``--output-dir`` included). Every run trains
through the public :class:`~selfsup.train.Trainer` in one gloo process group made here (each trainer uses it
and leaves it up for the next), which saves a launch of two interpreters per run. ``case`` is:

* ``plain``: a normal run; each rank saves its queue, the run summary and the world size to
  ``OUTPUT_DIR/queue_rank{rank}.pt``;
* ``embedding`` / ``loss``: only rank 1 sees a NaN at step 3 (its keys, or its loss with finite keys); each
  rank saves how it stopped and its live queue to ``OUTPUT_DIR/stopped_rank{rank}.pt``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from selfsup.config import SelfSupConfig
from selfsup.train import NonFiniteError, Trainer, criterion_queue
from xbn_queue.training.config import parse_config

BAD_STEP = 2  # 0-based: the third step


def poison(trainer: Trainer, what: str) -> None:
    """On rank 1 only: NaN keys (``embedding``) or a NaN loss (``loss``) at step ``BAD_STEP``."""
    if what == "embedding":
        views = trainer.views

        def nan_views(epoch, step, idx, batch):
            x0, x1, g = views(epoch, step, idx, batch)
            return x0, (x1 * float("nan") if trainer.state.global_step == BAD_STEP else x1), g

        trainer.views = nan_views
    else:
        criterion = trainer.criterion
        forward = criterion.forward

        def nan_loss(*args, **kwargs):
            loss = forward(*args, **kwargs)
            return loss * float("nan") if trainer.state.global_step == BAD_STEP else loss

        criterion.forward = nan_loss


def plain(cfg: SelfSupConfig) -> None:
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit().to_dict()
        queue = criterion_queue(trainer.criterion).state_dict()
        torch.save({"queue": queue, "summary": summary, "world_size": trainer.ctx.world_size},
                   Path(cfg.output_dir) / f"queue_rank{trainer.ctx.rank}.pt")
    finally:
        trainer.close()


def nan_on_rank_1(cfg: SelfSupConfig, what: str) -> None:
    trainer = Trainer(cfg)
    if trainer.ctx.rank == 1:
        poison(trainer, what)
    try:
        trainer.fit()
        stopped = "finished"
    except NonFiniteError as err:
        stopped = str(err)
    try:
        torch.save({"stopped": stopped, "queue": criterion_queue(trainer.criterion).state_dict()},
                   Path(cfg.output_dir) / f"stopped_rank{trainer.ctx.rank}.pt")
    finally:
        trainer.close()


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    try:
        for case, argv in spec:
            cfg = parse_config(SelfSupConfig, argv)
            plain(cfg) if case == "plain" else nan_on_rank_1(cfg, case)
    finally:
        dist.destroy_process_group()
