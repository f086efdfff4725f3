"""Driver of the 2-process non-finite test: only rank 1 sees a NaN at step 3; each rank records how it stopped.

Run as ``python -m torch.distributed.run --nproc_per_node 2 tests/selfsup/_nonfinite_driver.py WHAT [options]``
with ``WHAT`` ``embedding`` (rank 1's keys are NaN) or ``loss`` (rank 1's loss is NaN, its keys finite).
"""

import sys
from pathlib import Path

import torch

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


if __name__ == "__main__":
    what = sys.argv[1]
    cfg = parse_config(SelfSupConfig, sys.argv[2:])
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
