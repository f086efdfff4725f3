"""``build_criterion`` with ``--adapt-keys normalized``: lightly's loss gets one bank, the adaptive one (up to 0.5
lightly's ``NTXentLoss`` also drew a random bank of its own that was replaced at once), and building it draws
nothing from torch's global random stream."""

import pytest
import torch

from selfsup.config import SelfSupConfig
from selfsup.train import build_criterion, criterion_queue


@pytest.mark.parametrize("mask_same_ids", [False, True])
@pytest.mark.parametrize("adaptation", ["none", "xbn", "axbn"])
def test_one_bank_and_no_random_draw(monkeypatch, adaptation, mask_same_ids):
    from lightly.models.modules.memory_bank import MemoryBankModule

    import xbn_queue.lightly as xl

    lightly_banks, adaptive_banks = [], []
    real_fill, real_init = MemoryBankModule._init_memory_bank, xl.AdaptiveMemoryBank.__init__

    def lightly_fill(self, size):  # lightly's own (N, D) bank of random rows
        lightly_banks.append(tuple(size))
        return real_fill(self, size)

    def adaptive_init(self, *args, **kwargs):
        adaptive_banks.append(kwargs.get("size", args[0] if args else None))
        return real_init(self, *args, **kwargs)

    monkeypatch.setattr(MemoryBankModule, "_init_memory_bank", lightly_fill)
    monkeypatch.setattr(xl.AdaptiveMemoryBank, "__init__", adaptive_init)
    cfg = SelfSupConfig(adapt_keys="normalized", adaptation=adaptation, mask_same_ids=mask_same_ids, queue_size=96,
                        embedding_dim=24, kalman_q=1.0)
    torch.manual_seed(5)
    criterion = build_criterion(cfg)
    after = torch.get_rng_state()
    assert lightly_banks == [] and [s for s in adaptive_banks if s != 0] == [(96, 24)]
    assert criterion_queue(criterion).size == 96 and len(criterion_queue(criterion)) == 0  # starts empty
    torch.manual_seed(5)
    assert torch.equal(after, torch.get_rng_state())  # an empty bank: nothing random drawn
