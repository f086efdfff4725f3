"""Both drop-ins as a user swapping the class meets them: old checkpoints and devices."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("lightly")
from lightly.loss import NTXentLoss  # noqa: E402
from pytorch_metric_learning import losses, miners  # noqa: E402
from pytorch_metric_learning.losses import CrossBatchMemory  # noqa: E402

import xbn_queue.lightly as xlightly  # noqa: E402
import xbn_queue.pml as xpml  # noqa: E402
from xbn_queue import AdaptiveQueue  # noqa: E402
from xbn_queue._compat import follow_device  # noqa: E402
from xbn_queue.lightly import AdaptiveMemoryBank  # noqa: E402
from xbn_queue.pml import AdaptiveCrossBatchMemory  # noqa: E402

D, M, B = 8, 20, 6  # 6 does not divide 20: the ring wraps mid-batch


def _batches(steps, seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.nn.functional.normalize(torch.randn(b, D, generator=g), dim=1), torch.randint(0, 3, (b,), generator=g))
        for _ in range(steps)
    ]


def _pml(cls=CrossBatchMemory, **kw):
    return cls(losses.ContrastiveLoss(), D, memory_size=M, miner=miners.PairMarginMiner(0.2, 0.8), **kw)


def _no_warning():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")
    return ctx


# ---------------------------------------------------------------- PML checkpoints


@pytest.mark.parametrize("steps_before", [0, 1, 3])  # empty, partly filled (the pointer is inferred)
def test_pml_state_dict_of_a_partly_filled_memory_continues_exactly(steps_before):
    batches = _batches(8)
    pml = _pml()
    for emb, labels in batches[:steps_before]:
        pml(emb, labels)
    sd = pml.state_dict()
    assert set(sd) == {"embedding_memory", "label_memory"}  # PML does not save queue_idx
    ours = _pml(AdaptiveCrossBatchMemory, adaptation="none")
    ctx = _no_warning()
    try:
        ours.load_state_dict(sd, strict=True)
    finally:
        ctx.__exit__(None, None, None)
    assert ours.queue_idx == pml.queue_idx and len(ours.queue) == steps_before * B
    for emb, labels in batches[steps_before:]:  # the uninterrupted PML run goes on beside it
        torch.testing.assert_close(ours(emb, labels), pml(emb, labels), rtol=1e-6, atol=1e-7)
        assert torch.equal(ours.embedding_memory, pml.embedding_memory)
    assert pml.has_been_filled and ours.has_been_filled


@pytest.mark.parametrize("as_tensor", [False, True])
def test_pml_state_dict_with_queue_idx_of_a_full_memory_continues_exactly(as_tensor):
    batches = _batches(10)
    pml = _pml()
    for emb, labels in batches[:5]:  # 30 rows into 20: full, pointer at 10
        pml(emb, labels)
    sd = pml.state_dict()
    sd["queue_idx"] = torch.tensor(pml.queue_idx) if as_tensor else pml.queue_idx
    ours = _pml(AdaptiveCrossBatchMemory, adaptation="none")
    ours.load_state_dict(sd, strict=True)
    assert ours.queue_idx == pml.queue_idx == 10 and ours.has_been_filled
    for emb, labels in batches[5:]:
        torch.testing.assert_close(ours(emb, labels), pml(emb, labels), rtol=1e-6, atol=1e-7)
        assert torch.equal(ours.embedding_memory, pml.embedding_memory)


def test_pml_state_dict_of_a_full_memory_without_queue_idx_keeps_rows_and_warns():
    batches = _batches(10)
    pml = _pml()
    for emb, labels in batches[:5]:
        pml(emb, labels)
    sd = pml.state_dict()
    ours = _pml(AdaptiveCrossBatchMemory, adaptation="none")
    with pytest.warns(UserWarning, match="does not save queue_idx"):
        ours.load_state_dict(sd, strict=True)
    # what it does: all rows kept, writing from row 0, i.e. PML's memory with its pointer at 0
    pml.queue_idx = 0
    for emb, labels in batches[5:]:
        torch.testing.assert_close(ours(emb, labels), pml(emb, labels), rtol=1e-6, atol=1e-7)


def test_pml_state_dict_nested_in_a_lightning_style_checkpoint():
    """A LightningModule's checkpoint nests the criterion's keys under its attribute name."""

    class Module(torch.nn.Module):
        def __init__(self, criterion):
            super().__init__()
            self.model = torch.nn.Linear(4, D)
            self.criterion = criterion

    batches = _batches(8)
    torch.manual_seed(0)
    old = Module(_pml())
    for emb, labels in batches[:2]:
        old.criterion(emb, labels)
    checkpoint = {"epoch": 3, "state_dict": old.state_dict()}
    assert "criterion.embedding_memory" in checkpoint["state_dict"]
    new = Module(_pml(AdaptiveCrossBatchMemory, adaptation="none"))
    new.load_state_dict(checkpoint["state_dict"], strict=True)
    assert torch.equal(new.model.weight, old.model.weight)
    for emb, labels in batches[2:]:
        torch.testing.assert_close(new.criterion(emb, labels), old.criterion(emb, labels), rtol=1e-6, atol=1e-7)


def test_pml_state_dict_into_an_adapting_memory_and_bad_shapes():
    batches = _batches(6)
    pml = _pml()
    for emb, labels in batches[:2]:
        pml(emb, labels)
    ours = _pml(AdaptiveCrossBatchMemory, adaptation="xbn")
    ours(*batches[5])  # some state that the load replaces
    ours.load_state_dict(pml.state_dict(), strict=True)
    fresh = AdaptiveQueue(size=M, dim=D, adaptation="xbn")  # the same rows, enqueued into a new queue
    fresh.enqueue(pml.embedding_memory[: 2 * B], pml.label_memory[: 2 * B])
    for emb, labels in batches[2:]:
        ours(emb, labels)
        fresh.update(emb, labels)
        torch.testing.assert_close(ours.queue.embeddings, fresh.embeddings)
    small = CrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=M - 1)
    with pytest.raises(RuntimeError, match=r"expected a PML memory of shape \(20, 8\), got \(19, 8\)"):
        ours.load_state_dict(small.state_dict())
    sd = pml.state_dict()
    del sd["label_memory"]
    with pytest.raises(RuntimeError, match="label_memory of shape"):
        ours.load_state_dict(sd)


# ---------------------------------------------------------------- lightly checkpoints


def test_lightly_ntxent_state_dict_loads_strictly_and_starts_fresh():
    batches = _batches(6, b=4)
    torch.manual_seed(1)
    ref = NTXentLoss(temperature=0.3, memory_bank_size=(M, D))
    for emb, _ in batches[:3]:
        ref(emb.clone().requires_grad_(True), emb.flip(0))
    sd = ref.state_dict()
    assert not any("memory_bank" in k for k in sd)  # lightly's bank is not saved
    ours = NTXentLoss(temperature=0.3, memory_bank_size=(M, D))
    ours.memory_bank = AdaptiveMemoryBank(size=(M, D), adaptation="none")
    for emb, _ in batches[:3]:
        ours(emb.clone().requires_grad_(True), emb.flip(0))  # a used bank: the load resets it
    torch.manual_seed(9)
    resumed = NTXentLoss(temperature=0.3, memory_bank_size=(M, D))  # lightly resumed: a new random bank
    resumed.load_state_dict(sd, strict=True)
    torch.manual_seed(9)
    with pytest.warns(UserWarning, match="starts fresh"):
        ours.load_state_dict(sd, strict=True)
    assert torch.equal(ours.memory_bank.bank, resumed.memory_bank.bank) and int(ours.memory_bank.bank_ptr) == 0
    for emb, _ in batches[3:]:
        torch.testing.assert_close(
            ours(emb.clone().requires_grad_(True), emb.flip(0)), resumed(emb.clone().requires_grad_(True), emb.flip(0))
        )
    # nested, and an adapting bank starts empty
    outer = torch.nn.ModuleDict({"criterion": NTXentLoss(memory_bank_size=(M, D))})
    outer["criterion"].memory_bank = AdaptiveMemoryBank(size=(M, D), adaptation="xbn")
    outer["criterion"].memory_bank(batches[0][0], update=True)
    with pytest.warns(UserWarning, match="criterion.memory_bank.queue"):
        outer.load_state_dict({}, strict=True)
    assert len(outer["criterion"].memory_bank.queue) == 0


def test_lightly_bank_state_dict_of_ours_loads_without_warning_and_partial_is_refused():
    a = AdaptiveMemoryBank(size=(M, D), adaptation="axbn")
    for emb, _ in _batches(5):
        a(emb, update=True)
    b = AdaptiveMemoryBank(size=(M, D), adaptation="axbn")
    ctx = _no_warning()
    try:
        b.load_state_dict(a.state_dict(), strict=True)
    finally:
        ctx.__exit__(None, None, None)
    assert b._ptr is None  # the host pointer is read again from the loaded buffer
    for emb, _ in _batches(5, seed=1):
        assert torch.equal(a(emb, update=True)[1], b(emb, update=True)[1])
    assert int(a.bank_ptr) == int(b.bank_ptr)
    partial = {k: v for k, v in a.state_dict().items() if k != "queue.ptr"}
    with pytest.raises(RuntimeError, match="queue.ptr"):
        b.load_state_dict(partial, strict=True)


# ---------------------------------------------------------------- devices


def test_follow_device_moves_every_buffer_and_keeps_float64_statistics():
    q = AdaptiveQueue(size=M, dim=D, adaptation="axbn")
    for emb, labels in _batches(3):
        q.update(emb, labels)
    assert not follow_device(q, q.memory, torch.device("cpu"))  # same device: nothing happens
    assert follow_device(q, q.memory, torch.device("meta"))
    assert {b.device.type for b in q.buffers()} == {"meta"}
    assert q.stat_sumsq.dtype == torch.float64 and q.memory.dtype == torch.float32


def test_pml_memory_and_curr_batch_idx_follow_the_embeddings(monkeypatch):
    m = _pml(AdaptiveCrossBatchMemory)
    calls = []
    real = xpml.follow_device
    monkeypatch.setattr(xpml, "follow_device", lambda mod, ref, dev: calls.append((mod, dev)) or real(mod, ref, dev))
    emb, labels = _batches(1)[0]
    m(emb, labels)
    m.add_to_memory(emb, labels, B)
    assert calls == [(m.queue, emb.device)] * 2  # every entry point asks for the embeddings' device
    m._follow_device(torch.device("meta"))  # what a CUDA input does, on a device this machine has
    assert m.queue.memory.device.type == "meta" and m.curr_batch_idx.device.type == "meta"
    assert m.queue.stat_center.dtype == torch.float64


def test_lightly_bank_follows_the_output(monkeypatch):
    bank = AdaptiveMemoryBank(size=(M, D), adaptation="xbn")
    calls = []
    real = xlightly.follow_device
    monkeypatch.setattr(xlightly, "follow_device", lambda mod, ref, dev: calls.append((mod, dev)) or real(mod, ref, dev))
    emb, _ = _batches(1)[0]
    bank(emb, update=True)
    bank._dequeue_and_enqueue(emb)
    assert calls == [(bank.queue, emb.device)] * 2
    real(bank.queue, bank.queue.memory, torch.device("meta"))
    assert {b.device.type for b in bank.queue.buffers()} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("adaptation", ["none", "xbn"])
def test_cuda_embeddings_with_losses_left_on_the_cpu(adaptation):
    """Only the model is on the GPU; PML's and lightly's classes work so, and so do ours (and agree)."""
    dev = torch.device("cuda")
    ours, pml = _pml(AdaptiveCrossBatchMemory, adaptation=adaptation), _pml()
    cpu_twin = _pml(AdaptiveCrossBatchMemory, adaptation=adaptation)
    for emb, labels in _batches(6):
        loss = ours(emb.to(dev), labels.to(dev))
        assert loss.device == dev and ours.queue.memory.device == ours.curr_batch_idx.device == emb.to(dev).device
        torch.testing.assert_close(loss.cpu(), cpu_twin(emb, labels), rtol=1e-4, atol=1e-5)
        if adaptation == "none":
            torch.testing.assert_close(loss, pml(emb.to(dev), labels.to(dev)), rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    ref = NTXentLoss(memory_bank_size=(M, D))
    crit = NTXentLoss(memory_bank_size=(M, D))
    torch.manual_seed(0)
    crit.memory_bank = AdaptiveMemoryBank(size=(M, D), adaptation=adaptation)
    for emb, _ in _batches(6, b=4):
        x = emb.to(dev).requires_grad_(True)
        loss = crit(x, emb.flip(0).to(dev))
        assert crit.memory_bank.queue.memory.device.type == "cuda"
        if adaptation == "none":
            torch.testing.assert_close(loss, ref(emb.to(dev).requires_grad_(True), emb.flip(0).to(dev)))
