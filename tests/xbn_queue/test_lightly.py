"""AdaptiveMemoryBank against the real lightly package."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("lightly")
from lightly.loss import NTXentLoss  # noqa: E402
from lightly.models.modules.memory_bank import MemoryBankModule  # noqa: E402

from xbn_queue import distributed as xdist  # noqa: E402
from xbn_queue.lightly import AdaptiveMemoryBank  # noqa: E402

from .reference import RefQueue  # noqa: E402

N, D, B = 32, 16, 8  # N a multiple of B, as lightly's bank needs to keep whole batches


def _views(steps, seed=0, b=B, drift=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        x = torch.randn(b, D, generator=g)
        shift = (0.1 * k * torch.randn(1, D, generator=g)) if drift else 0.0
        out0 = x + 0.1 * torch.randn(b, D, generator=g) + shift
        out1 = x * (1 + 0.05 * k) + 0.1 * torch.randn(b, D, generator=g) + shift
        out.append((out0, out1))
    return out


def _normalize64(rows):
    return [[v / max(math.sqrt(sum(x * x for x in r)), 1e-12) for v in r] for r in rows]


def _ntxent_by_hand(out0, out1, negatives, temperature):
    """lightly's NTXentLoss with a memory bank, written out: negatives (D, n)."""
    out0 = torch.nn.functional.normalize(out0, dim=1)
    out1 = torch.nn.functional.normalize(out1, dim=1)
    sim_pos = (out0 * out1).sum(dim=1, keepdim=True)  # (B, 1)
    sim_neg = out0 @ negatives  # (B, n)
    logits = torch.cat([sim_pos, sim_neg], dim=1) / temperature
    return torch.nn.functional.cross_entropy(logits, torch.zeros(out0.shape[0], dtype=torch.long))


def test_none_equals_lightly_memory_bank_once_full():
    ref = NTXentLoss(temperature=0.3, memory_bank_size=(N, D))
    ours = NTXentLoss(temperature=0.3, memory_bank_size=(N, D))
    ours.memory_bank = AdaptiveMemoryBank(size=(N, D), adaptation="none")
    views = _views(N // B + 6)
    for k, (o0, o1) in enumerate(views):
        a0, a1 = o0.clone().requires_grad_(True), o1.clone().requires_grad_(True)
        b0, b1 = o0.clone().requires_grad_(True), o1.clone().requires_grad_(True)
        loss_ref = ref(a0, a1)
        loss_ours = ours(b0, b1)
        if k < N // B:
            continue  # lightly's bank still holds its random initial rows
        torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-5, atol=1e-6)
        loss_ref.backward()
        loss_ours.backward()
        torch.testing.assert_close(b0.grad, a0.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b1.grad, a1.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.memory_bank.bank, ref.memory_bank.bank, rtol=1e-6, atol=1e-7)
        assert int(ours.memory_bank.bank_ptr) == int(ref.memory_bank.bank_ptr)


@pytest.mark.parametrize("normalize, feature_dim_first", [(True, True), (False, True), (True, False)])
def test_xbn_bank_equals_float64_reference(normalize, feature_dim_first):
    bank = AdaptiveMemoryBank(size=(N - 3, D), adaptation="xbn", normalize=normalize, feature_dim_first=feature_dim_first)
    ref = RefQueue(N - 3, "xbn", eps=1e-6)  # 29 rows: batches of 8 wrap mid-batch
    for k, (_, o1) in enumerate(_views(8)):
        ref.adapt(o1.double().tolist())  # adapt to this batch ...
        rows = ref.valid()  # ... the bank returned is the memory before this batch is enqueued
        expected = torch.tensor(_normalize64(rows) if normalize else rows, dtype=torch.float64).reshape(-1, D)
        ref.enqueue(o1.double().tolist())
        out, got = bank(o1, update=True)
        assert out is o1
        assert got.dtype == torch.float32 and not got.requires_grad
        if feature_dim_first:
            got = got.t()
        assert got.shape == (min(k * B, N - 3), D)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        bank.queue.embeddings.double(), torch.tensor(ref.valid(), dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


def test_bank_inside_ntxent_is_ours_and_used():
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(N, D))
    ours = AdaptiveMemoryBank(size=(N, D), adaptation="xbn")
    criterion.memory_bank = ours
    assert criterion.memory_bank is ours and isinstance(ours, MemoryBankModule)
    shadow = RefQueue(N, "xbn", eps=1e-6)
    for k, (o0, o1) in enumerate(_views(7)):
        x0 = o0.clone().requires_grad_(True)
        x1 = o1.clone().requires_grad_(True)
        loss = criterion(x0, x1)
        # by hand: lightly enqueues the normalized out1; the bank is adapted to it first
        n1 = torch.nn.functional.normalize(o1, dim=1).double().tolist()
        shadow.adapt(n1)
        rows = shadow.valid()
        negatives = torch.tensor(_normalize64(rows), dtype=torch.float32).reshape(-1, D).t()  # (D, n)
        shadow.enqueue(n1)
        expected = _ntxent_by_hand(o0, o1, negatives, 0.2)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        if k == 0:
            # first batch: empty bank (D, 0), only the positive logit: loss exactly 0, gradient 0
            assert loss.item() == 0.0
            loss.backward()
            assert torch.count_nonzero(x0.grad) == 0
        assert len(ours.queue) == min((k + 1) * B, N)
    # evaluation (out0 without grad): no update, the bank is returned as is
    before = ours.queue.embeddings.clone()
    with torch.no_grad():
        o0, o1 = _views(1, seed=9)[0]
        loss = criterion(o0, o1)
    assert torch.equal(ours.queue.embeddings, before)
    expected = _ntxent_by_hand(o0, o1, torch.nn.functional.normalize(before, dim=1).t(), 0.2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_xbn_changes_the_loss_compared_to_none():
    losses = {}
    for adaptation in ("none", "xbn"):
        criterion = NTXentLoss(temperature=0.2, memory_bank_size=(N, D))
        criterion.memory_bank = AdaptiveMemoryBank(size=(N, D), adaptation=adaptation)
        losses[adaptation] = [criterion(o0.requires_grad_(True), o1).item() for o0, o1 in _views(6)]
    assert losses["none"][0] == losses["xbn"][0] == 0.0  # empty bank on the first step
    assert all(abs(a - b) > 1e-3 for a, b in zip(losses["none"][1:], losses["xbn"][1:]))


def test_state_dict_round_trip_and_reset():
    a = AdaptiveMemoryBank(size=(N, D), adaptation="axbn", kalman_r=0.5, kalman_gain_every=2)
    views = _views(8)
    for _, o1 in views[:4]:
        a(o1, update=True)
    b = AdaptiveMemoryBank(size=(N, D), adaptation="axbn", kalman_r=0.5, kalman_gain_every=2)
    b.load_state_dict(a.state_dict())
    for _, o1 in views[4:]:
        assert torch.equal(a(o1, update=True)[1], b(o1, update=True)[1])
    a.reset()
    _, bank = a(views[0][1], update=True)
    assert bank.shape == (D, 0) and len(a.queue) == B


def test_bad_input_leaves_the_bank_unchanged():
    with pytest.raises(ValueError, match=r"pair \(N, D\)"):
        AdaptiveMemoryBank(size=128)
    with pytest.raises(ValueError, match=r"pair \(N, D\)"):
        AdaptiveMemoryBank(size=(0, 16))
    bank = AdaptiveMemoryBank(size=(N, D))
    bank(torch.randn(B, D), update=True)
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    with pytest.raises(ValueError, match=r"D=16"):
        bank(torch.randn(B, D + 1), update=True)
    bad = torch.randn(B, D)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        bank(bad, update=True)
    with pytest.raises(ValueError, match="larger than the memory bank size 32"):
        bank(torch.randn(N + 1, D), update=True)
    for k, v in bank.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gather_distributed_gathers_once_for_statistics_and_enqueue(monkeypatch):
    """As rank 0 of 2 (collective mocked): statistics and enqueue use the gathered batch."""
    other = torch.randn(5, D) * 3 + 1
    calls = []

    def fake_gather(t):
        calls.append(t.shape[0])
        return torch.cat([t, other])

    monkeypatch.setattr(xdist, "is_distributed", lambda: True)
    monkeypatch.setattr(xdist, "all_gather_cat", fake_gather)
    bank = AdaptiveMemoryBank(size=(N, D), adaptation="xbn", gather_distributed=True)
    ref = RefQueue(N, "xbn", eps=1e-6)
    for _, o1 in _views(5):
        full = torch.cat([o1, other])
        ref.adapt(full.double().tolist())
        expected = torch.tensor(_normalize64(ref.valid()), dtype=torch.float64).reshape(-1, D)
        ref.enqueue(full.double().tolist())
        _, got = bank(o1, update=True)
        torch.testing.assert_close(got.t().double(), expected, rtol=1e-5, atol=1e-5)
    assert calls == [B] * 5  # one gather per step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bank_matches_cpu_inside_ntxent():
    dev = torch.device("cuda")
    crit = {}
    for where in ("cpu", "cuda"):
        c = NTXentLoss(temperature=0.2, memory_bank_size=(N, D))
        c.memory_bank = AdaptiveMemoryBank(size=(N, D), adaptation="xbn")
        crit[where] = c.to(where)
    for o0, o1 in _views(6):
        lc = crit["cpu"](o0.requires_grad_(True), o1)
        lg = crit["cuda"](o0.detach().to(dev).requires_grad_(True), o1.to(dev))
        torch.testing.assert_close(lg.cpu(), lc.detach(), rtol=1e-4, atol=1e-5)
    assert crit["cuda"].memory_bank.queue.memory.device.type == "cuda"
