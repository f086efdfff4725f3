"""Same-sample negatives: the queue's id mask, and the drop-ins that leave those rows out, against plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from xbn_queue import AdaptiveQueue
from xbn_queue.opcount import count_ops


def _ids_stream(steps: int, b: int, n_samples: int, seed: int = 0):
    """Batches drawn from a small dataset, so that samples come back while older copies are stored."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 4, generator=g), torch.randperm(n_samples, generator=g)[:b]) for _ in range(steps)]


# ---------------------------------------------------------------------------------------------- queue
@pytest.mark.parametrize("adaptation", ["none", "xbn"])
def test_same_id_mask_equals_a_loop_over_stored_rows(adaptation):
    q = AdaptiveQueue(size=11, dim=4, adaptation=adaptation)
    stored_ids: list = [None] * 11
    ptr = 0
    for x, ids in _ids_stream(6, 5, 9):
        q.update(x, ids=ids)
        for i in ids.tolist():
            stored_ids[ptr] = i
            ptr = (ptr + 1) % 11
    queries = torch.tensor([0, 3, 8, 5, 1, 100])
    n = len(q)
    expected = [[stored_ids[j] == int(qi) for j in range(n)] for qi in queries]
    assert q.same_id_mask(queries).tolist() == expected
    assert sum(map(sum, expected)) >= 3  # the test has something to find
    hits = [j for row in expected for j, e in enumerate(row) if e]
    exclude = torch.tensor([hits[0], 7])
    masked = [[e and j not in (hits[0], 7) for j, e in enumerate(row)] for row in expected]
    assert masked != expected
    assert q.same_id_mask(queries, exclude=exclude).tolist() == masked


def test_same_id_mask_reads_nothing_on_the_host_and_refuses_rows_without_ids():
    q = AdaptiveQueue(size=64, dim=4, adaptation="xbn", validate="device")
    for x, ids in _ids_stream(20, 8, 40):
        q.update(x, ids=ids)
    x, ids = _ids_stream(1, 8, 40, seed=1)[0]
    c = count_ops(lambda: q.same_id_mask(ids, exclude=q.update(x, ids=ids)))
    assert c.syncs == 0, dict(c.sync_ops)
    plain = AdaptiveQueue(size=8, dim=4)
    plain.enqueue(torch.randn(3, 4))
    with pytest.raises(ValueError, match="stored rows carry no ids"):
        plain.same_id_mask(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"ids: expected a \(B,\) integer tensor"):
        q.same_id_mask(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="expected an integer tensor"):
        q.same_id_mask(torch.zeros(2))


# ---------------------------------------------------------------------------------------------- PML
def _all_pairs_contrastive_by_hand(emb, labels, ids, mem, mem_labels, mem_ids, written, pos_margin=0.0, neg_margin=1.0):
    """PML's ContrastiveLoss over all (anchor, memory row) pairs, written as loops in float64: self pairs
    (the anchor's own row just written) and pairs with an older row of the same sample left out."""
    pos_losses, neg_losses = [], []
    for i in range(emb.shape[0]):
        for j in range(mem.shape[0]):
            if j == written[i]:
                continue
            if int(ids[i]) == int(mem_ids[j]) and j not in written:
                continue
            a, m = emb[i].double(), mem[j].double()
            d = math.sqrt(float(((a / a.norm() - m / m.norm()) ** 2).sum()))
            if int(labels[i]) == int(mem_labels[j]):
                pos_losses.append(max(d - pos_margin, 0.0))
            else:
                neg_losses.append(max(neg_margin - d, 0.0))

    def avg_nonzero(xs):
        nz = [x for x in xs if x > 0]
        return sum(nz) / len(nz) if nz else 0.0

    return avg_nonzero(pos_losses) + avg_nonzero(neg_losses)


def test_pml_dropin_removes_same_sample_pairs():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses

    from xbn_queue.pml import AdaptiveCrossBatchMemory

    ours = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), 4, memory_size=20, adaptation="none", mask_same_ids=True)
    plain = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), 4, memory_size=20, adaptation="none")
    g = torch.Generator().manual_seed(3)
    found = 0
    for x, ids in _ids_stream(7, 6, 12, seed=2):
        labels = ids % 3
        mem_ids_before = ours.queue.ids
        loss = ours(x, labels, ids=ids)
        plain_loss = plain(x, labels, ids=ids)
        mem, mem_labels, mem_ids = ours.queue.embeddings, ours.queue.labels, ours.queue.ids
        written = ours.curr_batch_idx.tolist()
        expected = _all_pairs_contrastive_by_hand(x, labels, ids, mem, mem_labels, mem_ids, written)
        torch.testing.assert_close(loss.item(), expected, rtol=1e-5, atol=1e-6)
        if mem_ids_before is not None:
            found += int(sum((mem_ids_before == i).sum() for i in ids))
    assert found > 5  # older copies were there to remove
    assert not torch.isclose(loss, plain_loss)  # and removing them changed the loss
    with pytest.raises(ValueError, match="ids are required with mask_same_ids=True"):
        ours(torch.randn(6, 4, generator=g), torch.zeros(6, dtype=torch.long))


def test_pml_dropin_keeps_the_current_keys_as_positives_with_an_enqueue_mask():
    """PML's MoCo example: [query; key] with fresh labels per step, keys enqueued. Masking removes the
    older keys of the same images (negatives), never this step's key (the positive)."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    from xbn_queue.pml import AdaptiveCrossBatchMemory, remove_same_id_pairs

    b, size = 4, 12
    ours = AdaptiveCrossBatchMemory(losses.NTXentLoss(0.1), 4, memory_size=size, adaptation="none", mask_same_ids=True)
    mask = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)])
    for step, (x, ids) in enumerate(_ids_stream(6, b, 6, seed=4)):
        k = x + 0.1 * torch.randn(b, 4)
        labels = torch.arange(step * b, (step + 1) * b)
        loss = ours(torch.cat([x, k]), torch.cat([labels, labels]), enqueue_mask=mask, ids=torch.cat([ids, ids]))
        mem, mem_labels = ours.queue.embeddings, ours.queue.labels
        same = torch.tensor([[int(i) == int(j) and p not in ours.curr_batch_idx.tolist()
                              for p, j in enumerate(ours.queue.ids)] for i in ids])
        pairs = remove_same_id_pairs(lmu.get_all_pairs_indices(labels, mem_labels), same)
        assert pairs[0].numel() == b  # one positive per query: its own key
        expected = losses.NTXentLoss(0.1)(x, labels, pairs, mem, mem_labels)
        torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------------------------------------- lightly
def _ntxent_with_bank_by_hand(q, k, bank, excluded, t, differentiable=False):
    """Plain float64 NT-Xent: column 0 the positive, then every bank row not excluded for that query.

    With ``differentiable`` the loop is kept in float64 tensors (a 0-dim tensor returned), so that
    autograd gives the reference gradient with respect to ``q``; else a Python float.
    """
    total = q.new_zeros((), dtype=torch.float64)
    for i in range(q.shape[0]):
        qi = q[i].double() / q[i].double().norm()
        ki = k[i].double() / k[i].double().norm()
        logits = [qi @ ki / t]
        logits += [qi @ bank[j].double() / t for j in range(bank.shape[0]) if not excluded[i][j]]
        top = max(float(v.detach()) for v in logits)
        total = total + top + torch.log(sum(torch.exp(v - top) for v in logits)) - logits[0]
    total = total / q.shape[0]
    return total if differentiable else float(total)


def _bank_by_hand(stored, k, adaptation, eps=1e-6):
    """The negatives the bank returns, in float64: the stored rows, XBN-matched (Eq. 6) to the moments of
    the normalized keys and L2-normalized for ``"xbn"`` (fewer than 2 rows: as stored), as stored for ``"none"``."""
    rows = stored.double()  # (n, D)
    if adaptation == "none" or rows.shape[0] < 2:
        return rows if adaptation == "none" else torch.nn.functional.normalize(rows, dim=1)
    keys = torch.nn.functional.normalize(k.double(), dim=1)  # (B, D)
    out = torch.empty_like(rows)
    for j in range(rows.shape[1]):
        col, bcol = rows[:, j].tolist(), keys[:, j].tolist()
        mr, mb = sum(col) / len(col), sum(bcol) / len(bcol)
        sr = math.sqrt(sum((v - mr) ** 2 for v in col) / (len(col) - 1))
        sb = math.sqrt(sum((v - mb) ** 2 for v in bcol) / (len(bcol) - 1))
        out[:, j] = torch.tensor([(v - mr) / (sr + eps) * sb + mb for v in col], dtype=torch.float64)
    return torch.nn.functional.normalize(out, dim=1)


@pytest.mark.parametrize("adaptation", ["none", "xbn"])
def test_lightly_loss_leaves_older_keys_of_the_same_sample_out(adaptation):
    pytest.importorskip("lightly")
    from xbn_queue.lightly import AdaptiveNTXentLoss

    torch.manual_seed(0)
    crit = AdaptiveNTXentLoss(temperature=0.2, memory_bank_size=(16, 4), adaptation=adaptation, mask_same_ids=True)
    stored_ids = [-1] * 16
    n_masked = 0
    for x, ids in _ids_stream(8, 5, 10, seed=5):
        q = x.clone().requires_grad_()
        k = x + 0.3 * torch.randn(5, 4)
        n_before = len(crit.memory_bank.queue)
        ptr = int(crit.memory_bank.queue.ptr)
        bank = _bank_by_hand(crit.memory_bank.queue.embeddings, k, adaptation)  # (n_before, D) float64
        loss = crit(q, k, ids=ids)
        excluded = [[stored_ids[j] == int(i) for j in range(n_before)] for i in ids]
        n_masked += sum(map(sum, excluded))
        assert crit.memory_bank.negative_mask.tolist() == excluded
        for j, i in zip(range(ptr, min(ptr + 5, 16)), ids.tolist()):  # lightly's write rule
            stored_ids[j] = i
        loss.backward()
        # the loss and its gradient against float64: the loop, and autograd through the same loop in float64
        q64 = x.double().requires_grad_()
        expected = _ntxent_with_bank_by_hand(q64, k, bank, excluded, 0.2, differentiable=True)
        expected.backward()
        torch.testing.assert_close(loss.item(), expected.item(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.grad, q64.grad.float(), rtol=1e-4, atol=1e-6)  # float32 softmax weights
    assert n_masked > 5


def test_lightly_loss_by_hand_and_without_ids_equals_lightly():
    pytest.importorskip("lightly")
    from lightly.loss import NTXentLoss

    from xbn_queue.lightly import AdaptiveNTXentLoss

    torch.manual_seed(1)
    ours = AdaptiveNTXentLoss(temperature=0.2, memory_bank_size=(16, 4), adaptation="none", mask_same_ids=True)
    torch.manual_seed(1)
    theirs = NTXentLoss(temperature=0.2, memory_bank_size=(16, 4))
    for x, ids in _ids_stream(5, 5, 10, seed=6):
        k = x + 0.3 * torch.randn(5, 4)
        q = x.clone().requires_grad_()
        torch.testing.assert_close(ours(q, k), theirs(q, k))  # no ids: lightly's loss, same bank
    # without ids both banks stored the same keys in the same rows (copies of lightly's normalized keys)
    assert torch.equal(ours.memory_bank.queue.embeddings, theirs.memory_bank.bank)
    # with ids: against the float64 loop over the bank as it stood (plain XBM: rows as stored)
    for x, ids in _ids_stream(4, 5, 10, seed=7):
        k = x + 0.3 * torch.randn(5, 4)
        q = x.clone().requires_grad_()
        stored_ids = ours.memory_bank.queue.ids.tolist()
        bank = ours.memory_bank.queue.embeddings
        excluded = [[stored_ids[j] == int(i) for j in range(len(stored_ids))] for i in ids]
        expected = _ntxent_with_bank_by_hand(q.detach(), k, bank, excluded, 0.2)
        torch.testing.assert_close(ours(q, k, ids=ids).item(), expected, rtol=1e-5, atol=1e-6)
    assert sum(map(sum, excluded)) > 0  # the last batch had rows to leave out
    with pytest.raises(ValueError, match=r"ids must be \(B=5,\)"):
        ours(q, k, ids=torch.arange(4))
