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

N, D, B = 32, 16, 8


def _write_as_lightly(ref, rows):
    """lightly's write rule on a RefQueue: only the rows that fit before the end of the ring."""
    k = min(len(rows), ref.size - ref.ptr)
    ref.enqueue(rows[:k])


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


@pytest.mark.parametrize("normalize, feature_dim_first", [(True, True), (False, True), (True, False)])
def test_xbn_bank_equals_float64_reference(normalize, feature_dim_first):
    bank = AdaptiveMemoryBank(size=(N - 3, D), adaptation="xbn", normalize=normalize, feature_dim_first=feature_dim_first)
    ref = RefQueue(N - 3, "xbn", eps=1e-6)  # 29 rows: the 4th batch of 8 does not fit
    for k, (_, o1) in enumerate(_views(8)):
        ref.adapt(o1.double().tolist())  # adapt to this batch ...
        rows = ref.valid()  # ... the bank returned is the memory before this batch is enqueued
        expected = torch.tensor(_normalize64(rows) if normalize else rows, dtype=torch.float64).reshape(-1, D)
        _write_as_lightly(ref, o1.double().tolist())
        out, got = bank(o1, update=True)
        assert out is o1
        assert got.dtype == torch.float32 and not got.requires_grad
        if feature_dim_first:
            got = got.t()
        assert got.shape == (min(k * B, N - 3), D)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        assert int(bank.bank_ptr) == ref.ptr
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
        criterion.memory_bank = AdaptiveMemoryBank(size=(N, D), adaptation=adaptation, init="empty")
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
    with pytest.raises(ValueError, match="init must be one of random, empty"):
        AdaptiveMemoryBank(size=(N, D), init="zeros")
    with pytest.raises(ValueError, match="adaptation must be one of"):
        AdaptiveMemoryBank(size=0, adaptation="xbm")  # refused even for a disabled bank
    bank = AdaptiveMemoryBank(size=(N, D))
    bank(torch.randn(B, D), update=True)
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    with pytest.raises(ValueError, match=r"D=16"):
        bank(torch.randn(B, D + 1), update=True)
    bad = torch.randn(B, D)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        bank(bad, update=True)
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
        _write_as_lightly(ref, full.double().tolist())  # 13 rows a step: the 3rd step keeps 6
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


# ---------------------------------------------------------------- lightly's own behaviour, side by side


def _pair(size, seed, **kw):
    """lightly's bank and ours (adaptation "none", defaults otherwise) built from the same global seed."""
    torch.manual_seed(seed)
    ref = MemoryBankModule(size=size, **kw)
    torch.manual_seed(seed)
    ours = AdaptiveMemoryBank(size=size, adaptation="none", **kw)
    return ref, ours


@pytest.mark.parametrize("n, b", [(10, 3), (9, 3), (4, 8), (5, 5), (7, 16), (1, 2)])
@pytest.mark.parametrize("feature_dim_first", [True, False])
def test_none_bank_is_lightlys_bank_step_by_step(n, b, feature_dim_first):
    """Random unit start, rows returned as stored, the rows that fit kept (batches larger than the bank too)."""
    ref, ours = _pair((n, 3), seed=n * 100 + b, feature_dim_first=feature_dim_first)
    assert ours.init == "random" and ours.normalize is False
    assert torch.equal(ours.bank, ref.bank)  # the same random unit rows before any step
    g = torch.Generator().manual_seed(b)
    for step in range(3 * n // b + 4):
        x = 3 * torch.randn(b, 3, generator=g) + 1  # not unit rows: returned as stored, not normalized
        update = step % 5 != 4  # an evaluation step now and then: nothing written
        out_r, bank_r = ref(x, update=update)
        out_o, bank_o = ours(x, update=update)
        assert out_o is x
        assert bank_o.shape == bank_r.shape and bank_o.dtype == bank_r.dtype
        assert torch.equal(bank_o, bank_r), step
        assert torch.equal(ours.bank, ref.bank) and torch.equal(ours.bank_ptr, ref.bank_ptr), step


@pytest.mark.parametrize("n_samples, bank_rows", [(8, 4), (16, 15), (3, 2), (4, 16), (6, 9)])
def test_none_bank_inside_ntxent_equals_lightly_from_the_first_step(n_samples, bank_rows):
    """Losses and gradients equal lightly's NTXentLoss with its own bank, including batches larger than the bank."""
    torch.manual_seed(7)
    ref = NTXentLoss(temperature=0.5, memory_bank_size=(bank_rows, D))
    ours = NTXentLoss(temperature=0.5, memory_bank_size=(bank_rows, D))
    torch.manual_seed(7)  # the same draw as lightly's bank above
    ours.memory_bank = AdaptiveMemoryBank(size=(bank_rows, D), adaptation="none")
    for o0, o1 in _views(5, seed=n_samples, b=n_samples):
        a0, b0 = o0.clone().requires_grad_(True), o0.clone().requires_grad_(True)
        loss_r, loss_o = ref(a0, o1), ours(b0, o1)
        torch.testing.assert_close(loss_o, loss_r, rtol=1e-6, atol=1e-6)
        loss_r.backward()
        loss_o.backward()
        torch.testing.assert_close(b0.grad, a0.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.memory_bank.bank, ref.memory_bank.bank)


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
def test_none_bank_in_co2_regularizer_equals_lightly():
    from lightly.loss.regularizer import CO2Regularizer

    torch.manual_seed(3)
    ref = CO2Regularizer(memory_bank_size=(12, D))
    ours = CO2Regularizer(memory_bank_size=(12, D))
    torch.manual_seed(3)
    ours.memory_bank = AdaptiveMemoryBank(size=(12, D), adaptation="none")
    for o0, o1 in _views(4, b=5):
        torch.testing.assert_close(ours(o0, o1), ref(o0, o1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size", [0, (0,), (0, D)])
def test_size_zero_disables_the_bank_as_lightly(size):
    ours = AdaptiveMemoryBank(size=size)
    ref = MemoryBankModule(size=size)
    x = torch.randn(B, D)
    for update in (False, True):
        out, bank = ours(x, update=update)
        assert out is x and bank is None
        assert ref(x, update=update)[1] is None
    assert ours.queue is None and ours.size == ref.size and ours.state_dict() == {}
    # inside NTXentLoss: the other samples of the batch are the negatives, as with lightly's size 0
    criterion = NTXentLoss(temperature=0.3, memory_bank_size=0)
    plain = NTXentLoss(temperature=0.3, memory_bank_size=0)
    criterion.memory_bank = ours
    o0, o1 = _views(1)[0]
    torch.testing.assert_close(criterion(o0, o1), plain(o0, o1))


@pytest.mark.parametrize("size", [-1, (10, -1), (-3, 4), 10, (1, 2, 3), (5,)])
def test_invalid_sizes_raise_lightlys_message(size):
    with pytest.raises(ValueError) as ref_error:
        MemoryBankModule(size=size)
    with pytest.raises(ValueError) as our_error:
        AdaptiveMemoryBank(size=size)
    assert str(our_error.value) == str(ref_error.value)


@pytest.mark.parametrize("size", [(16, 0), 2.5, (True, 4), (4.0, 2), "12"])
def test_sizes_lightly_cannot_use_either_raise_value_error(size):
    """A zero feature dimension (lightly accepts it, nothing can be stored) and non-int sizes (a TypeError in lightly)."""
    with pytest.raises(ValueError, match="Illegal memory bank size"):
        AdaptiveMemoryBank(size=size)


def test_defaults_depend_on_the_adaptation_and_can_be_overridden():
    for adaptation, init, normalize in (("none", "random", False), ("xbn", "empty", True), ("axbn", "empty", True)):
        bank = AdaptiveMemoryBank(size=(N, D), adaptation=adaptation)
        assert (bank.init, bank.normalize) == (init, normalize)
        assert len(bank.queue) == (N if init == "random" else 0)
    x = torch.randn(B, D) * 2
    empty_none = AdaptiveMemoryBank(size=(N, D), adaptation="none", init="empty")
    assert empty_none(x, update=True)[1].shape == (D, 0)
    assert torch.equal(empty_none(x)[1].t(), x)  # rows as stored
    torch.manual_seed(5)
    random_xbn = AdaptiveMemoryBank(size=(N, D), adaptation="xbn", init="random", normalize=False)
    torch.manual_seed(5)
    lightly_start = MemoryBankModule(size=(N, D)).bank
    _, bank = random_xbn(x, update=True)
    ref = RefQueue(N, "xbn", eps=1e-6)
    ref.enqueue(lightly_start.double().tolist())
    ref.adapt(x.double().tolist())
    torch.testing.assert_close(bank.t().double(), torch.tensor(ref.valid(), dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_adapted_rows_are_renormalized_only_when_adapting():
    """The rule: rows are returned L2-normalized exactly when the adaptation changes them (xbn / axbn)."""
    views = _views(5)
    xbn = AdaptiveMemoryBank(size=(N, D), adaptation="xbn")
    raw = AdaptiveMemoryBank(size=(N, D), adaptation="xbn", normalize=False)
    for _, o1 in views:
        _, nb = xbn(o1, update=True)
        _, rb = raw(o1, update=True)
        if nb.shape[1]:
            torch.testing.assert_close(nb, torch.nn.functional.normalize(rb, dim=0))
            assert not torch.allclose(rb.norm(dim=0), torch.ones(rb.shape[1]), atol=1e-3)  # XBN left the sphere


def test_lightly_method_names_follow_lightlys_semantics():
    ref, ours = _pair((6, 3), seed=11)
    x = torch.randn(4, 3)
    ref._dequeue_and_enqueue(x)
    ours._dequeue_and_enqueue(x)
    ref._dequeue_and_enqueue(x)  # 4 + 4 >= 6: the first 2 rows are written, the pointer goes to 0
    ours._dequeue_and_enqueue(x)
    assert torch.equal(ours.bank, ref.bank) and torch.equal(ours.bank_ptr, ref.bank_ptr)
    torch.manual_seed(12)
    ref._init_memory_bank(ref.size)
    torch.manual_seed(12)
    ours._init_memory_bank(ours.size)
    assert torch.equal(ours.bank, ref.bank) and int(ours.bank_ptr) == 0
