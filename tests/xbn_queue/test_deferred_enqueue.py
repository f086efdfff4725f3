"""Deferred enqueue: stage / preview / commit equal update bit for bit; a raising block leaves the batch out."""

import pytest
import torch

from xbn_queue import AdaptiveQueue
from xbn_queue.queue import PendingWrite

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses, miners  # noqa: E402

from selfsup.loss import RawKeyMoCoLoss  # noqa: E402
from xbn_queue.lightly import AdaptiveMemoryBank, AdaptiveNTXentLoss  # noqa: E402
from xbn_queue.pml import AdaptiveCrossBatchMemory  # noqa: E402


def batches(n, b, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=g) * (1 + i) + i, torch.randint(0, 5, (b,), generator=g),
             torch.arange(i * b, (i + 1) * b)) for i in range(n)]


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("adaptation", ["none", "xbn", "axbn", "xbn-cov"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_stage_preview_commit_is_update_bit_for_bit(adaptation, dtype):
    if adaptation == "xbn-cov" and dtype == torch.bfloat16:
        pytest.skip("xbn-cov needs float32 or float64 storage")
    kw = dict(size=20, dim=6, adaptation=adaptation, dtype=dtype, stats_resync_every=3)
    a, b = AdaptiveQueue(**kw), AdaptiveQueue(**kw)
    for x, y, i in batches(9, 7, 6):  # 7 does not divide 20: the ring wraps mid-batch
        pos_a = a.update(x, y, ids=i)
        pending = b.stage(x, y, ids=i)
        rows, labels, ids = b.preview(pending)
        assert pending.num_filled == len(a) and pending.in_warmup == a.in_warmup
        pos_b = b.commit(pending)
        assert torch.equal(pos_a, pos_b)
        assert torch.equal(rows, b.valid_memory()) and torch.equal(rows, a.valid_memory())
        assert torch.equal(labels, a.labels) and torch.equal(ids, a.ids)
        assert_same_state(state(a), state(b))


def test_preview_writes_nothing_and_a_dropped_batch_never_reaches_the_memory():
    q = AdaptiveQueue(size=16, dim=4, adaptation="none")
    (x0, y0, i0), (x1, y1, i1) = batches(2, 6, 4)
    q.update(x0, y0, ids=i0)
    before = state(q)
    pending = q.stage(x1, y1, ids=i1)
    rows, labels, ids = q.preview(pending)
    assert rows.shape == (12, 4) and torch.equal(rows[6:], x1) and torch.equal(ids[6:], i1)
    same = q.same_id_mask(torch.tensor([3, 7]), pending=pending)  # over the 12 rows as they will be
    assert same.shape == (2, 12) and same[0, 3] and same[1, 7] and same.sum() == 2
    del pending  # dropped: nothing of x1 is in the queue
    assert_same_state({k: v for k, v in state(q).items() if k != "steps"}, {k: v for k, v in before.items() if k != "steps"})
    assert len(q) == 6


def test_a_stale_pending_write_is_refused():
    q = AdaptiveQueue(size=16, dim=4)
    (x0, _, _), (x1, _, _) = batches(2, 4, 4)
    pending = q.stage(x0)
    q.update(x1)
    with pytest.raises(ValueError, match="changed since this batch was staged"):
        q.commit(pending)
    with pytest.raises(ValueError, match="changed since this batch was staged"):
        q.preview(pending)
    assert isinstance(q.stage(x0), PendingWrite)


def pml_loss(adaptation):
    return AdaptiveCrossBatchMemory(losses.SupConLoss(), embedding_size=8, memory_size=24,
                                    miner=miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8),
                                    adaptation=adaptation, mask_same_ids=True, warmup_steps=1)


@pytest.mark.parametrize("make", [
    lambda: pml_loss("none"),
    lambda: pml_loss("xbn"),
    lambda: pml_loss("axbn"),
    lambda: RawKeyMoCoLoss(24, 8, adaptation="xbn", mask_same_ids=True, warmup_steps=1),
    lambda: AdaptiveNTXentLoss(memory_bank_size=(24, 8), adaptation="xbn", mask_same_ids=True),
], ids=["pml-none", "pml-xbn", "pml-axbn", "raw-moco", "lightly"])
def test_a_deferred_step_gives_the_same_loss_and_memory_bit_for_bit(make):
    torch.manual_seed(0)
    plain, deferred = make(), make()
    deferred.load_state_dict(plain.state_dict())
    for x, y, i in batches(7, 5, 8):
        second = x.flip(0) * 0.5 + 0.1  # the keys (MoCo) or unused
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        pml_style = isinstance(plain, AdaptiveCrossBatchMemory)
        loss_a = plain(*((xa, y) if pml_style else (xa, second)), ids=i)
        with deferred.deferred_enqueue() if not isinstance(deferred, AdaptiveNTXentLoss) else \
                deferred.memory_bank.deferred_enqueue():
            loss_b = deferred(*((xb, y) if pml_style else (xb, second)), ids=i)
        loss_a.backward()
        loss_b.backward()
        assert torch.equal(loss_a, loss_b)
        assert torch.equal(xa.grad, xb.grad)  # the stored rows carry no gradient in either
        assert_same_state(state(plain), state(deferred))


def test_a_raising_block_drops_the_batch_and_blocks_do_not_nest():
    loss_fn = pml_loss("none")
    (x0, y0, i0), (x1, y1, i1) = batches(2, 6, 8)
    loss_fn(x0, y0, ids=i0)
    rows = loss_fn.queue.embeddings
    with pytest.raises(FloatingPointError):
        with loss_fn.deferred_enqueue():
            loss_fn(x1, y1, ids=i1)
            raise FloatingPointError("non-finite loss")
    assert torch.equal(loss_fn.queue.embeddings, rows) and len(loss_fn.queue) == 6
    with loss_fn.deferred_enqueue():
        loss_fn(x1, y1, ids=i1)
        with pytest.raises(RuntimeError, match="one forward per deferred_enqueue"):
            loss_fn(x1, y1, ids=i1)
        with pytest.raises(RuntimeError, match="do not nest"):
            with loss_fn.deferred_enqueue():
                pass
        assert len(loss_fn.queue) == 6  # held until the block ends
    assert len(loss_fn.queue) == 12 and torch.equal(loss_fn.queue.embeddings[6:], x1)


def test_the_lightly_bank_holds_the_batch_until_the_block_ends():
    bank = AdaptiveMemoryBank(size=(10, 4), adaptation="xbn")
    (x0, _, _), (x1, _, _) = batches(2, 4, 4)
    bank(x0, update=True)
    with pytest.raises(FloatingPointError):
        with bank.deferred_enqueue():
            _, negatives = bank(x1, update=True)
            assert negatives.shape == (4, 4)  # the bank before the write, as lightly returns it
            raise FloatingPointError
    assert len(bank.queue) == 4 and int(bank.bank_ptr) == 4
