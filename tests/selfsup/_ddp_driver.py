"""Driver of the 2-process DDP test: trains through the public Trainer, then dumps this rank's queue.

Run as ``python -m torch.distributed.run --nproc_per_node 2 tests/selfsup/_ddp_driver.py [options]``.
"""

import sys
from pathlib import Path

import torch

from selfsup.config import SelfSupConfig
from selfsup.train import Trainer, criterion_queue
from xbn_queue.training.config import parse_config

if __name__ == "__main__":
    cfg = parse_config(SelfSupConfig, sys.argv[1:])
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit().to_dict()
        queue = criterion_queue(trainer.criterion).state_dict()
        torch.save({"queue": queue, "summary": summary, "world_size": trainer.ctx.world_size},
                   Path(cfg.output_dir) / f"queue_rank{trainer.ctx.rank}.pt")
    finally:
        trainer.close()
