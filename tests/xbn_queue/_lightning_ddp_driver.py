"""Driver of the 2-process Lightning DDP test: fits the example's MoCo, then dumps this rank's bank.

Run as ``python tests/xbn_queue/_lightning_ddp_driver.py OUT_DIR [example options]``; Lightning's ``ddp``
launcher starts the second process by running the same command again.
"""

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def load_example():
    spec = importlib.util.spec_from_file_location("moco_lightning", ROOT / "examples" / "moco_lightning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    ex = load_example()
    out = Path(sys.argv[1])
    args = ex.parse_args(sys.argv[2:] + ["--out", str(out)])

    class DumpBank(ex.L.Callback):
        def on_train_end(self, trainer, module):
            bank = module.criterion.memory_bank
            state = {k: v.clone() for k, v in bank.queue.state_dict().items()}
            torch.save({"queue": state, "world_size": trainer.world_size, "steps": trainer.global_step},
                       out / f"bank_rank{trainer.global_rank}.pt")

    ex.L.seed_everything(args.seed, verbose=False)
    images, _ = ex.load_digits(args.limit)
    model = ex.MoCo(memory_size=args.memory_size, adaptation=args.adaptation, seed=args.seed)
    trainer = ex.make_trainer(args, callbacks=[DumpBank()])
    trainer.fit(model, ex.make_loader(images, args.batch_size, args.seed))
