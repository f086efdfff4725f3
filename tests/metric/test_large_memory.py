"""A memory larger than an epoch (``--memory-size`` above 1.0 or above the training set)."""

import pytest
import torch
from pytorch_metric_learning import losses

from metric.data import load_digits
from metric.train import train
from xbn_queue.pml import AdaptiveCrossBatchMemory
from xbn_queue.training.checkpoint import load_checkpoint
from xbn_queue.training.tracking import read_metrics

from .helpers import tiny_cfg
from .test_train import memory_of

N_TRAIN = len(load_digits("instance", 0.1, 0).train)  # the tiny configuration's training set (179 images)
STEPS = N_TRAIN // 16  # steps per epoch at batch 16


@pytest.mark.parametrize("memory_size,rows", [(2.0, 2 * N_TRAIN), (N_TRAIN + 20, N_TRAIN + 20)])
def test_memory_of_two_epochs_holds_older_copies_of_the_same_images(tmp_path, memory_size, rows):
    cfg = tiny_cfg(tmp_path, method="xbm", memory_size=memory_size, warmup_epochs=0, epochs=3)
    train(cfg)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["memory_rows"] for r in recs] == [min(rows, e * STEPS * 16) for e in (1, 2, 3)]
    assert load_checkpoint(tmp_path / "last.pt")["meta"]["memory_rows"] == rows
    q, _ = memory_of(tmp_path, cfg)
    ids = q.ids
    counts = torch.bincount(ids)
    assert len(q) == min(rows, 3 * STEPS * 16) and int(counts.max()) >= 2  # some image is stored twice or more
    labels = q.valid_labels()
    for i in torch.nonzero(counts >= 2).flatten()[:5]:  # every copy of an image carries its label
        assert torch.unique(labels[ids == i]).numel() == 1


def test_an_older_copy_of_the_anchor_is_a_positive():
    """PML's CrossBatchMemory semantics: the row written by this step is not compared with its anchor, an
    older copy of the same image (same label) is a positive pair like any other row of its class."""
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    labels = torch.arange(4)  # four classes: within a batch no positive pair
    # pos_margin 0 and neg_margin 0: a positive pair costs its distance, a negative pair nothing
    mem = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.0), embedding_size=3,
                                   memory_size=12, adaptation="none")
    assert float(mem(first, labels, ids=labels)) == 0.0  # only the rows' own copies: removed
    got = mem(second, labels, ids=labels)
    # reference: each anchor against its own older copy (the only positive), averaged over the non-zero pairs
    first_n = torch.nn.functional.normalize(first, dim=1)
    second_n = torch.nn.functional.normalize(second, dim=1)
    want = torch.linalg.vector_norm(second_n - first_n, dim=1).mean()
    torch.testing.assert_close(got, want)


def test_prefill_refuses_a_memory_larger_than_the_training_set(tmp_path):
    from xbn_queue.training.cli import UsageError

    with pytest.raises(UsageError, match=rf"--prefill: .*--memory-size 2.0 is {2 * N_TRAIN} rows, more than the "
                                         rf"{N_TRAIN} training images"):
        train(tiny_cfg(tmp_path, memory_size=2.0, prefill=True))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
