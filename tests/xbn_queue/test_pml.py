"""AdaptiveCrossBatchMemory against the real pytorch-metric-learning package."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses, miners  # noqa: E402
from pytorch_metric_learning.losses import CrossBatchMemory  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402

from xbn_queue import AdaptiveQueue  # noqa: E402
from xbn_queue.pml import AdaptiveCrossBatchMemory  # noqa: E402

from .reference import RefQueue  # noqa: E402

D = 8
MEMORY = 20  # batches of 7 do not divide it: the ring wraps mid-batch
BATCH = 7
STEPS = 8

LOSSES = {
    "supcon": lambda: losses.SupConLoss(temperature=0.1),
    "contrastive": lambda: losses.ContrastiveLoss(),
    "multisim": lambda: losses.MultiSimilarityLoss(),
    "triplet": lambda: losses.TripletMarginLoss(margin=0.2),
    "ntxent": lambda: losses.NTXentLoss(temperature=0.2),
}
MINERS = {
    "none": lambda: None,
    "pairmargin": lambda: miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8),
    "tripletmargin": lambda: miners.TripletMarginMiner(margin=0.5, type_of_triplets="all"),
}
CASES = [
    ("supcon", "none"),
    ("supcon", "pairmargin"),
    ("contrastive", "none"),
    ("contrastive", "pairmargin"),
    ("multisim", "none"),
    ("multisim", "pairmargin"),
    ("triplet", "none"),
    ("triplet", "tripletmargin"),
    ("ntxent", "none"),
    ("ntxent", "pairmargin"),
]


def _batches(steps=STEPS, b=BATCH, seed=0, n_classes=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        emb = torch.nn.functional.normalize(torch.randn(b, D, generator=g), dim=1)
        # a per-step shift so that XBN has something to do
        emb = emb * (1 + 0.3 * torch.rand(1, D, generator=g)) + 0.2 * torch.randn(1, D, generator=g)
        labels = torch.randint(0, n_classes, (b,), generator=g)
        out.append((emb, labels))
    return out


def _step(module, emb, labels, **kw):
    x = emb.clone().requires_grad_(True)
    loss = module(x, labels, **kw)
    if loss.requires_grad:
        loss.backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return loss.detach(), grad


# every loss with and without a miner; the mask and input-tuple paths with every loss, miners alternating
EQUIV_CASES = (
    [("plain", loss, miner) for loss, miner in CASES]
    + [("enqueue_mask", loss, miner) for loss, miner in CASES[0::2]]
    + [("indices_tuple", loss, miner) for loss, miner in CASES[1::2]]
    + [("indices_tuple", "supcon", "none"), ("enqueue_mask", "triplet", "tripletmargin")]
)


@pytest.mark.parametrize("mode, loss_name, miner_name", EQUIV_CASES)
def test_none_equals_pml_cross_batch_memory(mode, loss_name, miner_name):
    torch.manual_seed(0)
    ours = AdaptiveCrossBatchMemory(
        LOSSES[loss_name](), D, memory_size=MEMORY, miner=MINERS[miner_name](), adaptation="none"
    )
    ref = CrossBatchMemory(LOSSES[loss_name](), D, memory_size=MEMORY, miner=MINERS[miner_name]())
    g = torch.Generator().manual_seed(1)
    nonzero = 0
    label_ring = _LabelRing(MEMORY)
    for step, (emb, labels) in enumerate(_batches()):
        kw = {}
        if mode == "enqueue_mask":
            kw["enqueue_mask"] = torch.rand(BATCH, generator=g) < 0.5
        elif mode == "indices_tuple":
            # extra batch-vs-memory indices, consistent with the memory labels after this enqueue;
            # alternate pair and triplet tuples (PML converts them to the mined tuple's kind)
            mem_labels = label_ring.push(labels)
            if step % 2:
                it = lmu.get_all_pairs_indices(labels, mem_labels)
                kw["indices_tuple"] = (it[0][::2], it[1][::2], it[2][::3], it[3][::3])
            else:
                kw["indices_tuple"] = tuple(t[::4] for t in lmu.get_all_triplets_indices(labels, mem_labels))
        loss_o, grad_o = _step(ours, emb, labels, **kw)
        loss_r, grad_r = _step(ref, emb, labels, **kw)
        torch.testing.assert_close(loss_o, loss_r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_o, grad_r, rtol=1e-5, atol=1e-7)
        nonzero += int(loss_r.item() != 0)
        n = len(ours.queue)
        assert torch.equal(ours.queue.embeddings, ref.embedding_memory[:n])
        assert torch.equal(ours.queue.labels, ref.label_memory[:n])
        assert ours.queue_idx == ref.queue_idx and ours.has_been_filled == ref.has_been_filled
    assert nonzero >= 3  # the comparison is not vacuous
    assert ours.has_been_filled


class _LabelRing:
    """Labels a PML memory holds after each enqueue (plain list)."""

    def __init__(self, size):
        self.size, self.labels, self.ptr = size, [], 0

    def push(self, labels):
        for v in labels.tolist():
            if len(self.labels) < self.size:
                self.labels.append(v)
            else:
                self.labels[self.ptr] = v
            self.ptr = (self.ptr + 1) % self.size
        return torch.tensor(self.labels)


def _ref_loss_on_memory(loss_fn, miner, emb, labels, mem, mem_labels, positions, memory_size):
    """PML's CrossBatchMemory loss computed by hand on a given memory (no mask, no input tuple)."""
    if miner is not None:
        it = miner(emb, labels, mem, mem_labels)
    else:
        it = lmu.get_all_pairs_indices(labels, mem_labels)
    it = lmu.remove_self_comparisons(it, positions, memory_size)
    return loss_fn(emb, labels, it, mem, mem_labels)


@pytest.mark.parametrize("loss_name, miner_name", [("supcon", "pairmargin"), ("multisim", "none"), ("triplet", "tripletmargin")])
def test_xbn_memory_equals_float64_reference_and_loss_equals_pml_by_hand(loss_name, miner_name):
    loss_fn, miner = LOSSES[loss_name](), MINERS[miner_name]()
    ours = AdaptiveCrossBatchMemory(loss_fn, D, memory_size=MEMORY, miner=miner, adaptation="xbn")
    ref_q = RefQueue(MEMORY, "xbn", eps=1e-6)
    for emb, labels in _batches():
        ref_q.adapt(emb.double().tolist())  # Eq. 6 with the statistics of the rows being enqueued ...
        pos = ref_q.enqueue(emb.double().tolist(), labels.tolist())  # ... then enqueue
        ref_mem = torch.tensor(ref_q.valid(), dtype=torch.float64)
        ref_labels = torch.tensor(ref_q.labels[: ref_q.n])
        x = emb.clone().requires_grad_(True)
        loss = ours(x, labels)
        torch.testing.assert_close(ours.queue.embeddings.double(), ref_mem, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.curr_batch_idx, torch.tensor(pos))
        x_ref = emb.clone().requires_grad_(True)
        expected = _ref_loss_on_memory(
            loss_fn, miner, x_ref, labels, ref_mem.float(), ref_labels, torch.tensor(pos), MEMORY
        )
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
        if expected.requires_grad:
            loss.backward()
            expected.backward()
            torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-3, atol=1e-5)


def test_axbn_memory_follows_the_queue_update_path():
    """The wrapper's memory is exactly what AdaptiveQueue.update gives (AXBN itself is tested in test_queue)."""
    kw = dict(kalman_r=0.5, kalman_gain_every=3)
    ours = AdaptiveCrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY, adaptation="axbn", **kw)
    q = AdaptiveQueue(size=MEMORY, dim=D, adaptation="axbn", **kw)
    for emb, labels in _batches():
        ours(emb, labels)
        q.update(emb, labels)
        assert torch.equal(ours.queue.embeddings, q.embeddings)
        assert torch.equal(ours.queue.adaptation.mean_gain, q.adaptation.mean_gain)


def test_enqueue_mask_adapts_to_enqueued_rows_only():
    ours = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=MEMORY, adaptation="xbn")
    ref_q = RefQueue(MEMORY, "xbn", eps=1e-6)
    g = torch.Generator().manual_seed(5)
    for emb, labels in _batches():
        mask = torch.rand(BATCH, generator=g) < 0.6
        ref_q.adapt(emb[mask].double().tolist())
        ref_q.enqueue(emb[mask].double().tolist(), labels[mask].tolist())
        ours(emb, labels, enqueue_mask=mask)
        torch.testing.assert_close(
            ours.queue.embeddings.double(), torch.tensor(ref_q.valid(), dtype=torch.float64), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("miner_name", ["none", "pairmargin"])
def test_add_batch_loss_is_memory_loss_plus_batch_loss(miner_name):
    loss_fn = losses.SupConLoss(temperature=0.1)
    miner = MINERS[miner_name]()
    plus = AdaptiveCrossBatchMemory(loss_fn, D, memory_size=MEMORY, miner=miner, adaptation="xbn", add_batch_loss=True)
    plain = AdaptiveCrossBatchMemory(loss_fn, D, memory_size=MEMORY, miner=miner, adaptation="xbn")
    for emb, labels in _batches():
        x1 = emb.clone().requires_grad_(True)
        x2 = emb.clone().requires_grad_(True)
        total = plus(x1, labels)
        mem_loss = plain(x2, labels)
        batch_it = miner(x2, labels) if miner is not None else None
        batch_loss = loss_fn(x2, labels, batch_it)
        torch.testing.assert_close(total, mem_loss + batch_loss, rtol=1e-6, atol=1e-7)
        total.backward()
        (mem_loss + batch_loss).backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)
        assert torch.equal(plus.queue.embeddings, plain.queue.embeddings)


def test_add_batch_loss_with_input_indices_tuple_and_mask():
    loss_fn = losses.ContrastiveLoss()
    plus = AdaptiveCrossBatchMemory(loss_fn, D, memory_size=MEMORY, adaptation="none", add_batch_loss=True)
    plain = AdaptiveCrossBatchMemory(loss_fn, D, memory_size=MEMORY, adaptation="none")
    emb, labels = _batches(steps=1)[0]
    it = lmu.get_all_pairs_indices(labels)
    torch.testing.assert_close(plus(emb, labels, indices_tuple=it), plain(emb, labels, indices_tuple=it) + loss_fn(emb, labels, it))
    mask = torch.tensor([True, False, True, False, False, True, False])
    a = plus(emb, labels, enqueue_mask=mask)
    b = plain(emb, labels, enqueue_mask=mask) + loss_fn(emb[~mask], labels[~mask])
    torch.testing.assert_close(a, b)


def test_errors_and_memory_unchanged():
    with pytest.raises(ValueError, match="does not support FastAPLoss"):
        AdaptiveCrossBatchMemory(losses.FastAPLoss(), D)
    m = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=MEMORY)
    emb, labels = _batches(steps=1)[0]
    m(emb, labels)
    before = m.queue.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    mask = torch.zeros(BATCH, dtype=torch.bool)
    with pytest.raises(ValueError, match="mutually exclusive"):
        m(emb, labels, indices_tuple=lmu.get_all_pairs_indices(labels), enqueue_mask=mask)
    with pytest.raises(ValueError, match=r"embedding_size=8"):
        m(torch.randn(BATCH, D + 1), labels)
    with pytest.raises(ValueError, match=r"embedding_size=8"):
        m(torch.randn(D), labels)
    with pytest.raises(ValueError, match=r"labels must be \(B=7,\)"):
        m(emb, labels[:-1])
    with pytest.raises(ValueError, match="enqueue_mask must be"):
        m(emb, labels, enqueue_mask=mask[:-1])
    with pytest.raises(ValueError, match="memory_size=20"):
        m(torch.randn(MEMORY + 1, D), torch.zeros(MEMORY + 1, dtype=torch.long))
    bad = emb.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        m(bad, labels)
    for k, v in m.queue.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pml_compatibility_reset_state_dict_and_dtypes():
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    m = AdaptiveCrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY, miner=miners.PairMarginMiner())
    assert isinstance(m, CrossBatchMemory)
    DistributedLossWrapper(m)  # PML accepts it as a CrossBatchMemory
    assert m.memory_size == MEMORY and m.embedding_size == D and isinstance(m.queue, AdaptiveQueue)
    batches = _batches(steps=10)
    for emb, labels in batches[:5]:
        m(emb, labels)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    m2 = AdaptiveCrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY, miner=miners.PairMarginMiner())
    m2.load_state_dict(sd)
    for emb, labels in batches[5:]:
        assert torch.equal(m(emb, labels), m2(emb, labels))
    # low-precision input: the loss sees the memory in the input dtype, the memory stays float32
    lp = AdaptiveCrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY)
    for emb, labels in batches[:4]:
        out = lp(emb.bfloat16(), labels)
        assert out.dtype == torch.bfloat16 and lp.queue.memory.dtype == torch.float32
        assert torch.isfinite(out)
    assert torch.equal(lp.queue.embeddings[lp.curr_batch_idx], batches[3][0].bfloat16().float())
    out64 = m(batches[1][0].double(), batches[1][1])
    assert out64.dtype == torch.float64
    m.reset_queue()
    assert len(m.queue) == 0 and m.queue_idx == 0 and not m.has_been_filled


def test_ids_are_stored_for_staleness():
    from xbn_queue.drift import queue_staleness

    m = AdaptiveCrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY, adaptation="xbn")
    g = torch.Generator().manual_seed(3)
    for step, (emb, labels) in enumerate(_batches(steps=4)):
        ids = torch.arange(step * BATCH, (step + 1) * BATCH)
        mask = torch.rand(BATCH, generator=g) < 0.7 if step % 2 else None
        m(emb, labels, enqueue_mask=mask, ids=ids)
        stored_ids = ids[mask] if mask is not None else ids
        assert torch.equal(m.queue.ids[m.curr_batch_idx], stored_ids)
    fresh_ids = m.queue.ids.flip(0)
    fresh = m.queue.embeddings.flip(0)
    out = queue_staleness(m.queue, fresh_ids, fresh)
    assert out["count"] == len(m.queue) and out["max_l2"] == 0.0
    with pytest.raises(ValueError, match=r"ids must be \(B=7,\)"):
        m(emb, labels, ids=torch.arange(3))


def test_gather_distributed_without_process_group_is_plain():
    a = AdaptiveCrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY, gather_distributed=True)
    b = AdaptiveCrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY)
    for emb, labels in _batches(steps=4):
        assert torch.equal(a(emb, labels), b(emb, labels))
        assert torch.equal(a.curr_batch_idx, b.curr_batch_idx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = AdaptiveCrossBatchMemory(
            losses.SupConLoss(), D, memory_size=MEMORY, miner=miners.PairMarginMiner(), gather_distributed=True
        )
        results = []
        for step in range(4):
            # rank r's batch: rows of a shared global batch (uneven sizes 4 and 3)
            lo, hi = (0, 4) if rank == 0 else (4, 7)
            g_emb, g_lab = _global_batch(step)
            loss = m(g_emb[lo:hi], g_lab[lo:hi])
            results.append((loss.detach(), m.curr_batch_idx.clone(), m.queue.embeddings.clone()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    emb = torch.nn.functional.normalize(torch.randn(7, D, generator=g), dim=1) * (1 + step * 0.2)
    return emb, torch.randint(0, 3, (7,), generator=g)


def test_gather_distributed_two_process_gloo():
    """Each rank enqueues the gathered batch and removes self-comparisons at its own rows' positions."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
        res = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    # single-process reference: one queue fed the whole global batch; rank r's anchors are its rows
    loss_fn, miner = losses.SupConLoss(), miners.PairMarginMiner()
    q = AdaptiveQueue(size=MEMORY, dim=D, adaptation="xbn")
    for step in range(4):
        g_emb, g_lab = _global_batch(step)
        pos = q.update(g_emb, g_lab)
        mem, mem_lab = q.embeddings, q.labels
        for rank, (lo, hi) in enumerate([(0, 4), (4, 7)]):
            loss, idx, stored = res[rank][step]
            assert torch.equal(idx, pos[lo:hi])
            torch.testing.assert_close(stored, mem)
            expected = _ref_loss_on_memory(loss_fn, miner, g_emb[lo:hi], g_lab[lo:hi], mem, mem_lab, pos[lo:hi], MEMORY)
            torch.testing.assert_close(loss, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("adaptation", ["none", "xbn", "axbn"])
def test_cuda_matches_cpu_and_pml(adaptation):
    dev = torch.device("cuda")
    mk = lambda: AdaptiveCrossBatchMemory(  # noqa: E731
        losses.SupConLoss(), D, memory_size=MEMORY, miner=miners.PairMarginMiner(), adaptation=adaptation
    )
    cpu, gpu = mk(), mk().to(dev)
    ref = CrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY, miner=miners.PairMarginMiner()).to(dev)
    for emb, labels in _batches():
        loss_c = cpu(emb, labels)
        loss_g = gpu(emb.to(dev), labels.to(dev))
        torch.testing.assert_close(loss_g.cpu(), loss_c, rtol=1e-4, atol=1e-5)
        assert gpu.queue.memory.device.type == "cuda" and gpu.curr_batch_idx.device.type == "cuda"
        if adaptation == "none":
            torch.testing.assert_close(loss_g, ref(emb.to(dev), labels.to(dev)))
    torch.testing.assert_close(gpu.queue.embeddings.cpu(), cpu.queue.embeddings, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- PML's attributes and the one exception


@pytest.mark.parametrize(
    "emb_dtype, label_dtype", [(torch.float32, torch.long), (torch.float64, torch.int32), (torch.bfloat16, torch.long)]
)
def test_embedding_and_label_memory_are_pmls(emb_dtype, label_dtype):
    """Code written for PML reads loss_fn.embedding_memory / label_memory: same shape, dtype and values."""
    ours = AdaptiveCrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY, adaptation="none")
    ref = CrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY)
    for name in ("embedding_memory", "label_memory"):  # before the first call: zeros, float32 / int64
        assert getattr(ours, name).dtype == getattr(ref, name).dtype
        assert torch.equal(getattr(ours, name), getattr(ref, name))
    for emb, labels in _batches(steps=5):
        emb, labels = emb.to(emb_dtype), labels.to(label_dtype)
        ours(emb, labels)
        ref(emb, labels)
        for name in ("embedding_memory", "label_memory"):
            mine, theirs = getattr(ours, name), getattr(ref, name)
            assert mine.shape == theirs.shape and mine.dtype == theirs.dtype and mine.device == theirs.device
            assert torch.equal(mine, theirs), name
        # PML's queue bookkeeping read the way PML's users read it
        assert torch.equal(ours.embedding_memory[ours.curr_batch_idx], emb)
        assert ours.queue_idx == ref.queue_idx
    # a copy: writing into what it returns changes nothing
    before = ours.queue.embeddings.clone()
    ours.embedding_memory.zero_()
    ours.label_memory.zero_()
    assert torch.equal(ours.queue.embeddings, before) and bool(ours.queue.labels.ne(0).any())


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adaptation", ["none", "xbn"])
def test_assigning_embedding_and_label_memory_replaces_the_rows_as_in_pml(adaptation, storage):
    """``loss.embedding_memory = loss.embedding_memory.to(device).type(dtype)`` (PML's users and PML's own
    tests): the assigned rows become the memory, later reads come in the assigned dtype, and the next
    steps equal upstream's after the same assignment."""
    kw = dict(adaptation=adaptation, dtype=storage)
    ours = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=MEMORY, **kw)
    ref = CrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=MEMORY)
    batches = _batches(steps=8)
    for emb, labels in batches[:3]:
        ours(emb, labels)
        ref(emb, labels)
    g = torch.Generator().manual_seed(5)
    new_rows = torch.randn(MEMORY, D, generator=g, dtype=torch.float64)
    new_labels = torch.randint(0, 3, (MEMORY,), generator=g, dtype=torch.int32)
    ours.embedding_memory = new_rows
    ours.label_memory = new_labels
    assert ours.embedding_memory.dtype == torch.float64 and ours.label_memory.dtype == torch.int32
    n = len(ours.queue)
    tol = dict(rtol=0, atol=0) if storage == torch.float32 else dict(rtol=0, atol=4 * 2.0**-8)  # bf16: frame rounding
    torch.testing.assert_close(ours.queue.embeddings, new_rows[:n].float(), **tol)
    assert torch.equal(ours.queue.labels, new_labels[:n].long())
    if adaptation == "none" and storage == torch.float32:
        ref.embedding_memory = new_rows.float()
        ref.label_memory = new_labels.long()
        for emb, labels in batches[3:]:
            torch.testing.assert_close(ours(emb, labels), ref(emb, labels))
    elif adaptation == "xbn":  # the running statistics follow the new rows: the next adaptation uses their moments
        emb, labels = batches[3]
        ours(emb, labels)
        rows = ours.queue.embeddings[: n].double()  # rows 0..n-1 were adapted, then the batch written
        written = set(ours.curr_batch_idx.tolist())
        kept = [i for i in range(n) if i not in written]
        target_mean = emb.double().mean(0)
        adapted = (new_rows[:n] - new_rows[:n].mean(0)) / (new_rows[:n].std(0) + 1e-6) * emb.double().std(0)
        adapted = adapted + target_mean
        tol = 1e-4 if storage == torch.float32 else 4 * 2.0**-8
        assert float((rows[kept] - adapted[kept]).abs().max()) < tol * float(adapted.abs().max())


def test_assigning_a_wrong_memory_is_refused():
    ours = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=MEMORY, adaptation="xbn")
    with pytest.raises(ValueError, match=rf"embedding_memory must be a floating tensor of shape \({MEMORY}, {D}\)"):
        ours.embedding_memory = torch.zeros(MEMORY - 1, D)
    with pytest.raises(ValueError, match="embedding_memory must be a floating tensor"):
        ours.embedding_memory = torch.zeros(MEMORY, D, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"label_memory must be an integer tensor of shape \({MEMORY},\)"):
        ours.label_memory = torch.zeros(MEMORY + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="label_memory must be an integer tensor"):
        ours.label_memory = torch.zeros(MEMORY)
    with pytest.raises(ValueError, match="rows: expected a floating tensor"):
        ours.queue.replace_rows(torch.zeros(3, D))


def test_pmls_own_self_comparison_test_runs_on_the_drop_in():
    """pytorch-metric-learning's ``test_remove_self_comparisons``, set up as PML's test does (the memory
    moved and cast by assignment), checked against PML's own ``lmu.remove_self_comparisons`` semantics."""
    memory_size, batch_size = 321, 32
    for dtype in (torch.float32, torch.float64):
        loss = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), D, memory_size=memory_size, adaptation="none")
        loss.embedding_memory = loss.embedding_memory.to("cpu").type(dtype)
        loss.label_memory = loss.label_memory.to("cpu")
        embeddings = torch.randn(batch_size, D).type(dtype)
        labels = torch.randint(0, 10, (batch_size,))
        for _ in range(30):
            loss.add_to_memory(embeddings, labels, batch_size)
            a = torch.randint(0, batch_size, (100,))
            p = (a + loss.curr_batch_idx[0]) % memory_size  # each anchor's own row: all removed
            kept = lmu.remove_self_comparisons((a, p, a), loss.curr_batch_idx, memory_size)
            assert kept[0].numel() == 0
        assert loss.embedding_memory.dtype == dtype


def test_embedding_memory_of_an_adapted_and_a_low_precision_queue():
    """Rows never written read as zeros also where the stored rows are kept in a fixed frame (bfloat16)."""
    ours = AdaptiveCrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY, adaptation="xbn", dtype=torch.bfloat16)
    for emb, labels in _batches(steps=2):
        ours(emb, labels)
    mem = ours.embedding_memory
    n = len(ours.queue)
    assert mem.shape == (MEMORY, D) and n == 2 * BATCH
    assert torch.equal(mem[:n], ours.queue.embeddings) and not bool(mem[n:].any())


def test_empty_enqueue_mask_is_the_one_difference_from_pml():
    """A mask selecting no rows before the memory is full: PML marks its memory filled and from then on
    compares against all memory_size rows, the never-written ones being zero vectors with label 0;
    ours compares against the rows written. The losses agree again once memory_size rows were written."""
    loss_fn = lambda: losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)  # noqa: E731
    ours = AdaptiveCrossBatchMemory(loss_fn(), D, memory_size=MEMORY, adaptation="none")
    ref = CrossBatchMemory(loss_fn(), D, memory_size=MEMORY)
    batches = _batches(steps=10, n_classes=2)
    g = torch.Generator().manual_seed(4)
    seen = {"differ": 0, "agree": 0}
    # step 0: an ordinary call (7 rows written), step 1: a mask with no row selected
    for step, (emb, labels) in enumerate(batches):
        mask = torch.zeros(BATCH, dtype=torch.bool) if step == 1 else torch.rand(BATCH, generator=g) < 0.6
        if step == 1:
            labels = labels.clone()
            labels[0] = 0  # an anchor of label 0: PML pairs it with the zero rows as positives
        before = len(ours.queue)
        loss_o, loss_r = ours(emb, labels, enqueue_mask=mask), ref(emb, labels, enqueue_mask=mask)
        written = before + int(mask.sum())
        anchors, anchor_labels = emb[~mask], labels[~mask]
        mem, mem_labels = ours.queue.embeddings, ours.queue.labels
        theirs = loss_fn()(anchors, anchor_labels, lmu.get_all_pairs_indices(anchor_labels, mem_labels), mem, mem_labels)
        torch.testing.assert_close(loss_o, theirs)  # ours: only the written rows
        if step == 0:
            torch.testing.assert_close(loss_o, loss_r)
            assert not ref.has_been_filled
        elif written < MEMORY:  # PML: every row, the zero rows included
            assert ref.has_been_filled and not ours.has_been_filled
            full, full_labels = ref.embedding_memory, ref.label_memory
            assert not bool(full[written:].any())
            pml_by_hand = loss_fn()(
                anchors, anchor_labels, lmu.get_all_pairs_indices(anchor_labels, full_labels), full, full_labels
            )
            torch.testing.assert_close(loss_r, pml_by_hand)
            assert not torch.allclose(loss_o, loss_r)
            seen["differ"] += 1
        else:  # memory_size rows written: the same memory, the same losses again
            torch.testing.assert_close(loss_o, loss_r)
            assert torch.equal(ours.embedding_memory, ref.embedding_memory)
            seen["agree"] += 1
    assert seen["differ"] >= 2 and seen["agree"] >= 2


def test_empty_enqueue_mask_on_a_filled_memory_equals_pml():
    ours = AdaptiveCrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY, adaptation="none")
    ref = CrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY)
    for step, (emb, labels) in enumerate(_batches(steps=6)):
        mask = torch.zeros(BATCH, dtype=torch.bool) if step >= 3 else None
        torch.testing.assert_close(ours(emb, labels, enqueue_mask=mask), ref(emb, labels, enqueue_mask=mask))
