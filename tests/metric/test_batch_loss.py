"""The batch loss beside every memory method: xbm-batch (XBM*), xbn-batch (XBN*), axbn-batch (AXBN*), xbn-cov-batch."""

import dataclasses

import pytest
import torch
from pytorch_metric_learning import losses, miners

from metric.experiments.compare import PAPER_NAMES, _parse_methods, format_table, plan_runs, table_columns
from metric.config import METHODS, method_memory, resolve_config
from metric.train import build_losses
from xbn_queue.training.cli import UsageError

from .helpers import tiny_cfg

EXPECTED = {"none": (None, False), "xbm": ("none", False), "xbm-batch": ("none", True), "xbn": ("xbn", False),
            "xbn-batch": ("xbn", True), "axbn": ("axbn", False), "axbn-batch": ("axbn", True),
            "xbn-cov": ("xbn-cov", False), "xbn-cov-batch": ("xbn-cov", True)}


def test_every_memory_method_has_a_batch_loss_variant():
    assert set(METHODS) == set(EXPECTED)
    for method, (adaptation, batch) in EXPECTED.items():
        assert method_memory(method) == (adaptation, batch)
        _, mem = build_losses(resolve_config(tiny_cfg("out", method=method)), 64, False)
        if adaptation is None:
            assert mem is None
        else:
            assert (mem.queue.adaptation.name, mem.add_batch_loss) == (adaptation, batch)
    with pytest.raises(UsageError, match="--method xbm-bogus: expected one of none, xbm"):
        method_memory("xbm-bogus")


@pytest.mark.parametrize("method", ["xbn", "axbn"])
def test_batch_variant_adds_the_plain_batch_loss(method):
    """method-batch = method's memory loss + SupCon on the batch with the pair-margin miner (PML's classes)."""
    cfg = resolve_config(tiny_cfg("out", method=method, embedding_dim=8))
    _, plain = build_losses(cfg, 32, False)
    _, with_batch = build_losses(dataclasses.replace(cfg, method=method + "-batch"), 32, False)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # the memory fills and adapts over a few steps
        emb = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
        labels = torch.arange(16) // 4
        got, memory_part = with_batch(emb, labels), plain(emb, labels)
        batch_part = losses.SupConLoss()(emb, labels, miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)(emb, labels))
        torch.testing.assert_close(got, memory_part + batch_part)
        assert float(batch_part) > 0
    torch.testing.assert_close(with_batch.queue.memory, plain.queue.memory)  # the same memory


def test_compare_lists_the_starred_methods_beside_xbm_star():
    methods = _parse_methods("none,xbm,xbm-batch,xbn,xbn-batch,axbn,axbn-batch")
    assert [r.name for r in plan_runs(methods, 0, 1)] == [f"{m}-seed0" for m in methods]
    stat = {"mean": 0.5, "std": 0.0, "n": 1}
    table = format_table({m: {"recall@1": stat} for m in methods}, table_columns("R@1 ep 1")[1:2])
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [
        "No-XBM", "XBM", "XBM*", "XBN", "XBN*", "AXBN", "AXBN*"]
    assert PAPER_NAMES["xbn-cov-batch"] == "xbn-cov*"
