"""One rank of the 2-process CPU gloo check in test_training_distributed.

The test forks one process per rank (so torch need not be imported again) and calls :func:`run_rank`,
which sets the variables torchrun would set and runs :func:`main`. It also runs under torchrun itself:
``torchrun --nproc_per_node=2 tests/xbn_queue/training/_training_dist_worker.py OUT_DIR``.
Each rank writes OUT_DIR/rank{R}.pt with what it observed.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import torch

from xbn_queue.training import distributed as D


def run_rank(out_dir: str, rank: int, world_size: int, port: int) -> None:
    """Fork target: set torchrun's environment variables, run :func:`main`, record any error."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        main(Path(out_dir))
    except BaseException:
        (Path(out_dir) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def main(out: Path) -> None:
    """Exercise the collectives on uneven, empty, bool and gradient-carrying inputs."""
    ctx = D.init_distributed("cpu", timeout=datetime.timedelta(seconds=60))
    r = ctx.rank
    # Uneven sizes: rank r holds r + 2 rows whose values encode (rank, row, column).
    feats = torch.stack([torch.arange(3, dtype=torch.float32) + 100 * r + 10 * i for i in range(r + 2)])  # (r+2, 3)
    labels = torch.arange(r + 2) + 1000 * r  # (r+2,)
    empty = torch.zeros(0 if r == 0 else 2, 4)  # rank 0 contributes nothing
    flags = torch.tensor([True, r == 1])
    leaf = feats.clone().requires_grad_(True)
    gathered_grad = ctx.gather_features(leaf, keep_local_grad=True)
    gathered_grad.sum().backward()
    result = {
        "rank": r,
        "world_size": ctx.world_size,
        "local_rank": ctx.local_rank,
        "is_main": ctx.is_main,
        "backend": ctx.backend,
        "device": str(ctx.device),
        "feats": ctx.gather_features(feats),
        "labels": D.gather_features(labels),
        "empty": ctx.gather_features(empty),
        "flags": ctx.gather_features(flags),
        "grad": leaf.grad.clone(),
        "mean_float": ctx.all_reduce_mean(float(r + 1)),
        "mean_tensor": ctx.all_reduce_mean(torch.tensor([r * 2.0, 4.0])),
        "mean_int_tensor": ctx.all_reduce_mean(torch.tensor([r])),
        "module_rank": (D.get_rank(), D.get_world_size(), D.is_main_process()),
        "objects": ctx.all_gather_object({"rank": r, "name": f"r{r}"}),
        "broadcast": ctx.broadcast_object(f"from rank {r}", src=1),
    }
    ctx.barrier()
    torch.save(result, out / f"rank{r}.pt")
    ctx.cleanup()
    result_after = D.get_world_size()
    torch.save(result_after, out / f"after{r}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
