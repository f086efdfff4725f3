"""The Lightning example (examples/moco_lightning.py): exact resume from a checkpoint, and 2-process DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("lightly")
pytest.importorskip("sklearn")

from ._lightning_ddp_driver import ROOT, load_example  # noqa: E402

ex = load_example()
# 76 of the first 96 digits, batches of 16 (drop_last): 4 steps an epoch; 40 rows is not a multiple of
# 16, so lightly's write rule (the rows that fit, then row 0) runs and the pointer at the resume is 16.
OPTS = ["--limit", "96", "--batch-size", "16", "--memory-size", "40", "--seed", "3"]


def _fit(tmp_path: Path, epochs: int, resume=None, adaptation="xbn"):
    args = ex.parse_args(OPTS + ["--max-epochs", str(epochs), "--adaptation", adaptation, "--out", str(tmp_path)])
    ex.L.seed_everything(args.seed, verbose=False)
    images, _ = ex.load_digits(args.limit)
    model = ex.MoCo(memory_size=args.memory_size, adaptation=args.adaptation, seed=args.seed)
    trainer = ex.make_trainer(args)
    trainer.fit(model, ex.make_loader(images[:76], args.batch_size, args.seed), ckpt_path=resume)
    return trainer, model


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("adaptation", ["xbn", "none"])
def test_resume_from_a_lightning_checkpoint_gives_the_uninterrupted_queue(tmp_path, adaptation):
    _, straight = _fit(tmp_path / "a", epochs=2, adaptation=adaptation)
    first, _ = _fit(tmp_path / "b", epochs=1, adaptation=adaptation)
    ckpt = tmp_path / "b" / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert int(saved["criterion.memory_bank.queue.ptr"]) == 16  # the bank is in the checkpoint
    resumed_trainer, resumed = _fit(tmp_path / "c", epochs=2, resume=str(ckpt), adaptation=adaptation)
    assert resumed_trainer.global_step == 8
    bank_a, bank_b = straight.criterion.memory_bank, resumed.criterion.memory_bank
    ptr = 0
    for _ in range(8):  # lightly's write rule, by hand: 16, 32, 0, 16, 32, 0, 16, 32
        ptr = (ptr + min(16, 40 - ptr)) % 40
    assert len(bank_a.queue) == 40 and int(bank_a.bank_ptr) == ptr == 32
    for key, value in bank_a.queue.state_dict().items():
        assert torch.equal(bank_b.queue.state_dict()[key], value), key
    for (name, p_a), p_b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p_a, p_b), name


def test_two_process_ddp_gathers_keys_into_identical_banks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tests" / "xbn_queue" / "_lightning_ddp_driver.py"), str(tmp_path)]
    cmd += OPTS + ["--max-epochs", "1", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"bank_rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    steps = ranks[0]["steps"]  # 96 digits over 2 ranks, batches of 16: 3 steps
    assert steps == 3
    # each step writes the keys of both ranks (32 rows, fewer at the end of the ring): 32 -> 40 (8 kept) -> 32
    queue0, queue1 = ranks[0]["queue"], ranks[1]["queue"]
    assert int(queue0["num_filled"]) == 40 and int(queue0["ptr"]) == 32
    for key, value in queue0.items():
        assert torch.equal(queue1[key], value), key
