"""Warm-up (the memory kept out of the loss for a while) and prefill, against upstream PML / lightly and plain loops."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xbn_queue import AdaptiveQueue, prefill


def _stream(steps: int, b: int = 6, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=g) * 1.5 + 0.3, torch.randint(0, 3, (b,), generator=g)) for _ in range(steps)]


# ---------------------------------------------------------------------------------------------- queue
def test_in_warmup_counts_steps_and_rows():
    q = AdaptiveQueue(size=20, dim=4, warmup_steps=2)
    seen = []
    for x, y in _stream(4):
        q.update(x, y)
        seen.append(q.in_warmup)
    assert seen == [True, True, False, False] and q.num_steps == 4
    q = AdaptiveQueue(size=20, dim=4, warmup_rows=15)
    seen = []
    for x, y in _stream(4):
        q.update(x, y)
        seen.append(q.in_warmup)
    assert seen == [True, True, False, False]  # 6, 12, 18 rows
    q = AdaptiveQueue(size=20, dim=4, warmup_steps=3, warmup_rows=6)  # both must be reached
    seen = []
    for x, y in _stream(5):
        q.adapt(x)  # adapt + enqueue is a step as update is
        q.enqueue(x, y)
        seen.append(q.in_warmup)
    assert seen == [True, True, True, False, False]
    q.enqueue(*_stream(1)[0])  # an enqueue alone (a prefill) is not a step
    assert q.num_steps == 5


def test_warmup_state_round_trip_resume_and_reset():
    a = AdaptiveQueue(size=20, dim=4, adaptation="axbn", warmup_steps=5)
    stream = _stream(9, seed=1)
    for x, y in stream[:3]:
        a.update(x, y)
    state = copy.deepcopy(a.state_dict())
    assert int(state["steps"]) == 3
    b = AdaptiveQueue(size=20, dim=4, adaptation="axbn", warmup_steps=5)
    b.load_state_dict(state)
    assert b.num_steps == 3 and b.in_warmup
    flags_a, flags_b = [], []
    for x, y in stream[3:]:
        a.update(x, y)
        b.update(x, y)
        flags_a.append(a.in_warmup)
        flags_b.append(b.in_warmup)
    assert flags_a == flags_b == [True, True, False, False, False, False]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    b.reset()
    assert b.num_steps == 0 and int(b.state_dict()["steps"]) == 0


def test_checkpoint_without_step_count_loads():
    old = AdaptiveQueue(size=20, dim=4).state_dict()
    old.pop("steps")
    q = AdaptiveQueue(size=20, dim=4, warmup_steps=3)
    q.load_state_dict(old)  # strict: an empty memory starts its warm-up
    assert q.num_steps == 0
    full = AdaptiveQueue(size=20, dim=4)
    full.update(*_stream(1)[0])
    old = full.state_dict()
    old.pop("steps")
    q.load_state_dict(old)  # a memory holding rows counts as past its warm-up
    assert not q.in_warmup


def test_warmup_arguments_are_checked():
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        AdaptiveQueue(size=4, dim=2, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"warmup_rows must be in \[0, size=4\], got 5"):
        AdaptiveQueue(size=4, dim=2, warmup_rows=5)


# ---------------------------------------------------------------------------------------------- PML
@pytest.mark.parametrize("adaptation", ["none", "xbn"])
@pytest.mark.parametrize("miner", [False, True])
def test_pml_warmup_is_pmls_loss_without_memory_then_the_memory_loss(adaptation, miner):
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses, miners

    from xbn_queue.pml import AdaptiveCrossBatchMemory

    make_miner = (lambda: miners.PairMarginMiner(0.2, 0.8)) if miner else (lambda: None)
    warm = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), 4, memory_size=20, miner=make_miner(),
                                    adaptation=adaptation, warmup_steps=3)
    cold = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), 4, memory_size=20, miner=make_miner(),
                                    adaptation=adaptation)
    for step, (x, y) in enumerate(_stream(7, seed=2)):
        xw = x.clone().requires_grad_()
        xp = x.clone().requires_grad_()
        got = warm(xw, y)
        with_memory = cold(x, y)
        if step < 3:
            # upstream, side by side: PML's CrossBatchMemory holding only this batch, and the plain loss
            fresh = losses.CrossBatchMemory(losses.ContrastiveLoss(), 4, memory_size=20, miner=make_miner())
            torch.testing.assert_close(got, fresh(x, y))
            plain_loss = losses.ContrastiveLoss()
            plain = plain_loss(xp, y, make_miner()(xp, y) if miner else None)
            torch.testing.assert_close(got, plain)
            got.backward()
            plain.backward()
            torch.testing.assert_close(xw.grad, xp.grad)  # the plain batch loss, gradient through both sides
        else:
            torch.testing.assert_close(got, with_memory)  # the memory filled and adapted meanwhile
        assert torch.equal(warm.queue.embeddings, cold.queue.embeddings)


def test_pml_warmup_with_enqueue_mask_is_pmls_memory_of_this_batch():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses

    from xbn_queue.pml import AdaptiveCrossBatchMemory

    b = 4
    warm = AdaptiveCrossBatchMemory(losses.NTXentLoss(0.1), 4, memory_size=16, adaptation="xbn", warmup_rows=16)
    mask = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)])
    for step, (x, _) in enumerate(_stream(5, b=b, seed=3)):
        k = x + 0.2
        labels = torch.arange(step * b, (step + 1) * b)
        args = (torch.cat([x, k]), torch.cat([labels, labels]))
        got = warm(*args, enqueue_mask=mask)
        fresh = losses.CrossBatchMemory(losses.NTXentLoss(0.1), 4, memory_size=16)
        expected = fresh(*args, enqueue_mask=mask)
        if step < 3:  # 4, 8, 12 keys stored: in warm-up
            torch.testing.assert_close(got, expected)
        else:
            assert not torch.isclose(got, expected)  # the older keys are negatives now


def test_pml_warmup_resumes_exactly():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses

    from xbn_queue.pml import AdaptiveCrossBatchMemory

    make = lambda: AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), 4, memory_size=20, adaptation="axbn",  # noqa: E731
                                           warmup_steps=4)
    a, stream = make(), _stream(8, seed=4)
    for x, y in stream[:2]:
        a(x, y)
    b = make()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for x, y in stream[2:]:
        assert torch.equal(a(x, y), b(x, y))


# ---------------------------------------------------------------------------------------------- lightly
def test_lightly_warmup_is_lightlys_loss_without_a_bank():
    pytest.importorskip("lightly")
    from lightly.loss import NTXentLoss

    from xbn_queue.lightly import AdaptiveMemoryBank

    crit = NTXentLoss(temperature=0.2, memory_bank_size=(16, 4))
    crit.memory_bank = AdaptiveMemoryBank(size=(16, 4), adaptation="xbn", warmup_steps=2)
    cold = NTXentLoss(temperature=0.2, memory_bank_size=(16, 4))
    cold.memory_bank = AdaptiveMemoryBank(size=(16, 4), adaptation="xbn")
    no_bank = NTXentLoss(temperature=0.2)
    for step, (x, _) in enumerate(_stream(5, b=4, seed=5)):
        q = x.clone().requires_grad_()
        k = x + 0.3
        got = crit(q, k)
        expected = no_bank(q, k) if step < 2 else cold(q, k)
        if step < 2:
            cold(q, k)  # the bank fills the same way meanwhile
        torch.testing.assert_close(got, expected)
    assert torch.equal(crit.memory_bank.queue.embeddings, cold.memory_bank.queue.embeddings)


# ---------------------------------------------------------------------------------------------- selfsup
def test_raw_key_loss_warmup_compares_with_this_steps_keys_only():
    from selfsup.loss import RawKeyMoCoLoss
    from tests.selfsup.test_loss import ref_ntxent

    warm = RawKeyMoCoLoss(12, 3, 0.2, "xbn", warmup_steps=2)
    cold = RawKeyMoCoLoss(12, 3, 0.2, "xbn")
    g = torch.Generator().manual_seed(6)
    for step in range(4):
        q, k = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g) * 2
        got, with_memory = warm(q, k), cold(q, k)
        if step < 2:
            expected = ref_ntxent(q.double().tolist(), k.double().tolist(), [0, 1, 2, 3], 0.2)
            torch.testing.assert_close(got.item(), expected, rtol=1e-6, atol=1e-6)
            # the queries get the gradient of that loss (the warm-up loss is a training loss)
            q_grad = q.clone().requires_grad_()
            warm_grad = RawKeyMoCoLoss(12, 3, 0.2, "xbn", warmup_steps=2)
            warm_grad(q_grad, k).backward()
            q64 = q.double().requires_grad_()
            logits = F.normalize(q64, dim=1) @ F.normalize(k.double(), dim=1).t() / 0.2  # (4, 4)
            F.cross_entropy(logits, torch.arange(4)).backward()
            torch.testing.assert_close(q_grad.grad.double(), q64.grad, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(got, with_memory)


# ---------------------------------------------------------------------------------------------- prefill
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.lin(x))


def _loader(n_batches=4, b=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 5, generator=g), torch.randint(0, 4, (b,), generator=g), torch.arange(i * b, (i + 1) * b))
            for i in range(n_batches)]


def test_prefill_writes_eval_mode_embeddings_with_labels_and_ids_and_restores_modes():
    net, loader = _Net(), _loader()
    net.train()
    net.drop.eval()  # a mixed state, restored as it was
    q = AdaptiveQueue(size=10, dim=4, adaptation="xbn", warmup_steps=3)
    written = prefill(q, net, loader, progress=False)
    assert written == 10 and len(q) == 10 and q.num_steps == 0  # not a training step
    assert net.training and not net.drop.training
    xs = torch.cat([x for x, _, _ in loader])[:10]
    expected = xs @ net.lin.weight.detach().t() + net.lin.bias.detach()  # eval: no dropout
    torch.testing.assert_close(q.embeddings, expected)
    assert q.labels.tolist() == torch.cat([y for _, y, _ in loader])[:10].tolist()
    assert q.ids.tolist() == list(range(10))  # the last batch was cut: the first rows were kept
    assert net.lin.weight.grad is None and not q.memory.requires_grad


def test_prefill_in_train_mode_rows_and_a_bank():
    pytest.importorskip("lightly")
    from xbn_queue.lightly import AdaptiveMemoryBank

    net, loader = _Net(), _loader()
    net.eval()
    q = AdaptiveQueue(size=10, dim=4, adaptation="none")
    torch.manual_seed(1)
    assert prefill(q, net, [(x, y) for x, y, _ in loader], train=True, rows=5, progress=True) == 5
    assert not net.training
    dropped = (q.embeddings == 0).sum()
    assert int(dropped) > 0 and len(q) == 5  # dropout was on
    bank = AdaptiveMemoryBank(size=(8, 4), adaptation="xbn")
    n = prefill(bank, net, [x for x, _, _ in loader], embed=lambda m, x: nn.functional.normalize(m(x), dim=1))
    assert n == 8 and len(bank.queue) == 8
    torch.testing.assert_close(bank.queue.embeddings.norm(dim=1), torch.ones(8))
    assert int(bank.bank_ptr) == 0  # lightly's pointer went round


def test_prefill_errors():
    net = _Net()
    q = AdaptiveQueue(size=10, dim=4)
    with pytest.raises(ValueError, match=r"rows must be in \[1, 10\]"):
        prefill(q, net, _loader(), rows=11)
    with pytest.raises(ValueError, match="cannot read a batch of type dict"):
        prefill(q, net, [{"x": torch.randn(2, 5)}])
    with pytest.raises(ValueError, match="is not a memory"):
        prefill(object(), net, _loader())
    assert prefill(q, net, _loader(n_batches=1)) == 3  # the loader ended first
    assert math.isfinite(float(q.embeddings.sum()))


def _unit(r):
    n = math.sqrt(sum(v * v for v in r))
    return [v / n for v in r]


def _dot(a, b):
    return sum(u * v for u, v in zip(a, b))


def _match_by_hand(rows, batch, eps=1e-6):
    """XBN (Eq. 6) in float64 loops: each column of ``rows`` to the mean and Bessel-corrected std of ``batch``'s."""
    def col_moments(m, j):
        c = [r[j] for r in m]
        mean = sum(c) / len(c)
        return mean, math.sqrt(sum((v - mean) ** 2 for v in c) / (len(c) - 1))

    out = [list(r) for r in rows]
    for j in range(len(rows[0])):
        (mr, sr), (mb, sb) = col_moments(rows, j), col_moments(batch, j)
        for r in out:
            r[j] = (r[j] - mr) / (sr + eps) * sb + mb
    return out


def test_adaptive_ntxent_with_ids_warms_up_as_lightlys_loss_without_a_bank():
    pytest.importorskip("lightly")
    from lightly.loss import NTXentLoss

    from xbn_queue.lightly import AdaptiveNTXentLoss

    crit = AdaptiveNTXentLoss(temperature=0.2, memory_bank_size=(16, 4), mask_same_ids=True, warmup_steps=2)
    no_bank = NTXentLoss(temperature=0.2)
    rows, row_ids = [], []  # the bank by hand, float64: keys as stored, XBN-matched at every step
    for step, (x, _) in enumerate(_stream(3, b=4, seed=5)):
        q, q_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        k, ids = x + 0.3, torch.arange(4) + 4 * (step % 2)
        keys = [_unit(r) for r in k.double().tolist()]  # the loss normalizes the keys before the bank sees them
        if len(rows) >= 2:  # Eq. 6 to the batch of keys, before the write (the default adaptation)
            rows = _match_by_hand(rows, keys)
        got = crit(q, k, ids=ids)
        if step < 2:  # the batch's other samples are the negatives; the keys and ids are stored meanwhile
            expected = no_bank(q_ref, k)
            torch.testing.assert_close(got, expected)
            got.backward()
            expected.backward()
            torch.testing.assert_close(q.grad, q_ref.grad)
            assert len(crit.memory_bank.queue) == 4 * (step + 1)
        else:  # the bank is back: its 8 rows (L2-normalized) are the negatives, the 4 of ids 0-3 masked out
            excluded = [[row_ids[j] == int(i) for j in range(len(rows))] for i in ids]
            assert crit.memory_bank.negative_mask.tolist() == excluded and sum(map(sum, excluded)) == 4
            qs = [_unit(r) for r in x.double().tolist()]
            total = 0.0
            for i in range(4):
                logits = [_dot(qs[i], keys[i]) / 0.2]
                logits += [_dot(qs[i], _unit(r)) / 0.2 for j, r in enumerate(rows) if not excluded[i][j]]
                top = max(logits)
                total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[0]
            # float32 features, products and log-sum-exp against float64: a few float32 roundings
            torch.testing.assert_close(got.item(), total / 4, rtol=1e-5, atol=1e-6)
        rows, row_ids = rows + keys, row_ids + ids.tolist()
    assert torch.equal(crit.memory_bank.queue.ids, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]))


def test_prefill_of_a_lightly_bank_whose_pointer_is_not_at_row_0_keeps_every_row():
    pytest.importorskip("lightly")
    from xbn_queue.lightly import AdaptiveMemoryBank

    bank = AdaptiveMemoryBank(size=(8, 4), adaptation="none", init="empty")
    bank(torch.nn.functional.normalize(torch.randn(5, 4), dim=1), update=True, ids=torch.arange(5))  # lightly's rule: pointer at 5
    assert int(bank.bank_ptr) == 5
    rows = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    ids = torch.arange(10, 18)
    assert prefill(bank, nn.Identity(), [(rows, None, ids)], progress=False) == 8
    # rows 5, 6, 7 then 0..4: all 8 written (lightly's rule would have kept 3), the pointer back at 5
    order = (torch.arange(8) - 5) % 8  # memory row r holds prefill row order[r]
    torch.testing.assert_close(bank.queue.embeddings, rows[order])
    assert torch.equal(bank.queue.ids, ids[order]) and int(bank.bank_ptr) == 5
