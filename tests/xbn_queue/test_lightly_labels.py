"""Labels in the lightly drop-in: supervised contrastive loss over batch + memory (lightly #1554)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("lightly")
from pytorch_metric_learning.losses import SupConLoss  # noqa: E402

from xbn_queue.lightly import AdaptiveMemoryBank  # noqa: E402

from .reference import RefQueue  # noqa: E402

N, D, B, C, T = 29, 16, 8, 3, 0.1  # 29 rows: the 4th batch of 8 does not fit (lightly drops its tail)


def _steps(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        y = torch.randint(0, C, (B,), generator=g)
        centre = torch.randn(C, D, generator=g)[y] + 0.2 * k  # drifting features
        out0 = centre + 0.5 * torch.randn(B, D, generator=g)
        out1 = centre * (1 + 0.05 * k) + 0.5 * torch.randn(B, D, generator=g)
        out.append((out0, out1, y))
    return out


def _unit(row):
    norm = math.sqrt(sum(v * v for v in row))
    return [v / max(norm, 1e-12) for v in row]


def _supcon64(queries, candidates, query_labels, candidate_labels, t):
    """SupCon (L_out, Khosla et al. 2020 Eq. 2) written out in float64: every candidate with the
    anchor's label is a positive, all candidates are in the denominator; mean over the anchors."""
    losses = []
    for q, yq in zip(queries, query_labels):
        q = _unit(q)
        logits = [sum(a * b for a, b in zip(q, _unit(c))) / t for c in candidates]
        top = max(logits)
        log_den = top + math.log(sum(math.exp(v - top) for v in logits))
        pos = [v - log_den for v, yc in zip(logits, candidate_labels) if yc == yq]
        losses.append(-sum(pos) / len(pos))
    return sum(losses) / len(losses)


def _write_as_lightly(ref, rows, labels):
    k = min(len(rows), ref.size - ref.ptr)
    ref.enqueue(rows[:k], labels[:k])


@pytest.mark.parametrize("adaptation", ["xbn", "axbn", "none"])
def test_supcon_over_batch_and_memory_equals_float64_reference(adaptation):
    bank = AdaptiveMemoryBank(size=(N, D), adaptation=adaptation, feature_dim_first=False)
    ref = RefQueue(N, adaptation, eps=1e-6)
    if bank.init == "random":  # lightly's start (for "none"): N random unit rows, no class
        ref.rows, ref.labels, ref.n = bank.bank.double().tolist(), [-1] * N, N
    loss_fn = SupConLoss(temperature=T)
    for step, (out0, out1, y) in enumerate(_steps(9)):
        key = torch.nn.functional.normalize(out1, dim=1)  # (B, D) unit keys, as NTXentLoss stores them
        ref.adapt(key.double().tolist())  # adapted to this batch; the bank returned is before the write
        mem, mem_labels = [_unit(r) for r in ref.valid()], ref.labels[: ref.n]
        expected = _supcon64(out0.double().tolist(), key.double().tolist() + mem, y.tolist(), y.tolist() + mem_labels, T)
        _write_as_lightly(ref, key.double().tolist(), y.tolist())

        key_out, rows, row_labels = bank(key, labels=y, update=True)
        assert key_out is key and rows.shape == (len(mem), D) and row_labels.tolist() == mem_labels
        loss = loss_fn(out0, y, ref_emb=torch.cat([key_out, rows]), ref_labels=torch.cat([y, row_labels]))
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-5), step
    assert bank.queue.labels.tolist() == ref.labels[: ref.n]  # after 9 steps: wrapped twice, tails dropped
    assert int(bank.bank_ptr) == ref.ptr


def test_labels_survive_a_checkpoint_and_a_deferred_enqueue():
    bank = AdaptiveMemoryBank(size=(N, D), adaptation="xbn")
    steps = _steps(3)
    for _, out1, y in steps[:2]:
        bank(out1, labels=y, update=True)
    again = AdaptiveMemoryBank(size=(N, D), adaptation="xbn")
    again.load_state_dict(bank.state_dict())
    _, out1, y = steps[2]
    with again.deferred_enqueue():
        _, rows, labels = again(out1, labels=y, update=True)
        assert labels.tolist() == torch.cat([steps[0][2], steps[1][2]]).tolist()
        assert len(again.queue) == 2 * B  # held until the block ends
    assert again.queue.labels.tolist() == torch.cat([s[2] for s in steps]).tolist()
    with pytest.raises(ValueError, match="labels missing"):  # the loaded bank keeps the rule
        again(out1, update=True)


@pytest.mark.parametrize("adaptation", ["xbn", "none"])  # an empty start and lightly's random start
def test_labels_on_some_steps_and_not_others_is_one_clear_error(adaptation):
    (_, k0, y0), (_, k1, y1) = _steps(2)
    bank = AdaptiveMemoryBank(size=(N, D), adaptation=adaptation)
    bank(k0, labels=y0, update=True)
    before = (bank.queue.embeddings.clone(), int(bank.bank_ptr), len(bank.queue))
    with pytest.raises(ValueError, match=r"^labels missing: the memory bank's rows carry labels"):
        bank(k1, update=True)
    with pytest.raises(ValueError, match=r"^labels missing"):
        bank._dequeue_and_enqueue(k1)
    with pytest.raises(ValueError, match=r"^labels: expected shape \(8,\) to match the 8 embeddings, got \(7,\)"):
        bank(k1, labels=y1[:7], update=True)
    assert torch.equal(bank.queue.embeddings, before[0]) and (int(bank.bank_ptr), len(bank.queue)) == before[1:]
    assert bank(k1, update=False)[1] is not None  # reading without labels writes nothing: allowed

    bank = AdaptiveMemoryBank(size=(N, D), adaptation=adaptation)
    assert len(bank(k0, labels=y0)) == 3  # a read with labels before any write: the bank is still unlabelled
    bank(k0, update=True)
    with pytest.raises(ValueError, match=r"^labels given, but the memory bank holds rows stored without labels"):
        bank(k1, labels=y1, update=True)
    with pytest.raises(ValueError, match=r"^labels given, but"):
        bank.enqueue(k1, labels=y1)
    bank.reset()  # starts over: empty, or lightly's random rows (label -1: no class)
    assert bank(k1, labels=y1, update=True)[2].tolist() == ([] if adaptation == "xbn" else [-1] * N)
    assert bank.queue.labels[:B].tolist() == y1.tolist()


def test_labels_of_a_prefill_are_dropped_when_the_steps_have_none():
    """lightly ignores labels; a prefill from a loader of (x, y) must not break an unsupervised loss."""
    (_, k0, y0), (_, k1, y1), (_, k2, y2) = _steps(3)
    bank = AdaptiveMemoryBank(size=(N, D), adaptation="xbn")
    bank.enqueue(k0, labels=y0)  # as xbn_queue.prefill does with (x, labels)
    out = bank(k1, update=True)  # the first step has none: the prefill's labels are dropped
    assert len(out) == 2 and bank.queue.labels is None
    with pytest.raises(ValueError, match=r"^labels given, but"):
        bank(k2, labels=y2, update=True)

    bank = AdaptiveMemoryBank(size=(N, D), adaptation="xbn")
    bank.enqueue(k0, labels=y0)
    assert bank(k1, labels=y1, update=True)[2].tolist() == y0.tolist()  # the steps pass labels: kept


def test_disabled_bank_and_warmup_return_no_labels():
    _, k0, y0 = _steps(1)[0]
    assert AdaptiveMemoryBank(size=0)(k0, labels=y0, update=True) == (k0, None, None)
    bank = AdaptiveMemoryBank(size=(N, D), adaptation="xbn", warmup_steps=1)
    assert bank(k0, labels=y0, update=True)[1:] == (None, None)
    assert bank.queue.labels.tolist() == y0.tolist()  # stored during the warm-up
