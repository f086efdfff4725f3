"""``--adapt-keys raw``: the MoCo loss on raw keys (selfsup.loss) against float64 references and PML."""

import math

import pytest
import torch

from selfsup.loss import RawKeyMoCoLoss, raw_key_ntxent
from tests.xbn_queue.reference import ref_mean_std, ref_xbn


def ref_ntxent(queries, memory, positives, t):
    """Plain float64 NT-Xent with cosine similarity: every stored row but the positive is a negative."""
    total = 0.0
    for i, q in enumerate(queries):
        qn = math.sqrt(sum(x * x for x in q))
        sims = []
        for m in memory:
            mn = math.sqrt(sum(x * x for x in m))
            sims.append(sum(a * b for a, b in zip(q, m)) / (qn * mn) / t)
        top = max(sims)
        lse = top + math.log(sum(math.exp(s - top) for s in sims))
        total += lse - sims[positives[i]]
    return total / len(queries)


def _rows(x):
    return x.double().tolist()


def test_raw_key_ntxent_matches_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 7, generator=g) * 3.0 + 0.5
    mem = torch.randn(13, 7, generator=g) * 0.2 - 1.0  # far from unit norm: the loss must normalise
    pos = torch.tensor([0, 4, 12, 7, 4])
    ours = raw_key_ntxent(q.double(), mem.double(), pos, 0.1)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.item(), ref_ntxent(_rows(q), _rows(mem), pos.tolist(), 0.1), rtol=1e-12, atol=1e-12)


def test_raw_mode_stores_unnormalised_keys_and_counts_the_batch_as_negatives():
    g = torch.Generator().manual_seed(1)
    crit = RawKeyMoCoLoss(queue_size=10, dim=4, temperature=0.2, adaptation="none")
    q = torch.randn(3, 4, generator=g)
    k = torch.randn(3, 4, generator=g) * 5.0  # norms about 10
    loss = crit(q, k)
    stored = crit.queue.valid_memory()
    torch.testing.assert_close(stored, k)  # stored as the key encoder gave them
    assert not torch.allclose(stored.norm(dim=1), torch.ones(3))
    # first step, empty queue before: the other 2 keys of the batch are the negatives (loss > 0)
    torch.testing.assert_close(loss.item(), ref_ntxent(_rows(q), _rows(k), [0, 1, 2], 0.2), rtol=1e-6, atol=1e-6)
    assert loss.item() > 0.0


def test_raw_mode_xbn_adapts_the_raw_rows_then_enqueues_then_compares_with_everything():
    """Two steps by hand in float64: Eq. 6 on the stored raw keys, wrap-around, loss over the whole memory."""
    g = torch.Generator().manual_seed(2)
    size, dim, b, t = 7, 3, 4, 0.1  # 7 is not a multiple of 4: the second batch wraps
    crit = RawKeyMoCoLoss(queue_size=size, dim=dim, temperature=t, adaptation="xbn", eps=1e-6)
    k1 = torch.randn(b, dim, generator=g) * 2.0 + 1.0
    crit(torch.randn(b, dim, generator=g), k1)
    q2 = torch.randn(b, dim, generator=g, requires_grad=True)
    k2 = torch.randn(b, dim, generator=g) * 0.5 - 3.0
    loss = crit(q2, k2)

    t_mean, t_std = ref_mean_std(_rows(k2))
    memory = ref_xbn(_rows(k1), t_mean, t_std, 1e-6)  # rows 0..3, adapted to k2's statistics
    memory += [[0.0] * dim] * (size - b)
    positions = [(b + i) % size for i in range(b)]  # 4, 5, 6, 0
    for i, p in enumerate(positions):
        memory[p] = _rows(k2)[i]
    torch.testing.assert_close(crit.queue.valid_memory().double(), torch.tensor(memory, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.item(), ref_ntxent(_rows(q2.detach()), memory, positions, t), rtol=1e-5, atol=1e-5)
    loss.backward()  # the gradient reaches the queries, never the queue
    assert q2.grad is not None and torch.isfinite(q2.grad).all()
    assert not crit.queue.memory.requires_grad


def _eq6_on_upstream_memory(pml, keys, eps=1e-6):
    """Eq. 6 applied by hand, in float64, to the rows upstream's ``CrossBatchMemory`` holds (before it
    enqueues ``keys``): the paper's wrapper, written independently of the queue."""
    n = pml.memory_size if pml.has_been_filled else pml.queue_idx
    if n < 2:
        return
    t_mean, t_std = ref_mean_std(_rows(keys))
    adapted = ref_xbn(_rows(pml.embedding_memory[:n]), t_mean, t_std, eps)
    pml.embedding_memory[:n] = torch.tensor(adapted, dtype=torch.float64).to(pml.embedding_memory.dtype)


@pytest.mark.parametrize("adaptation", ["none", "xbn"])
def test_raw_mode_equals_pml_moco_example_step_by_step(adaptation):
    """The paper's setup: PML's CrossBatchMemory(NTXentLoss) fed [query; key] with fresh labels and an
    enqueue_mask; for XBN the test adapts upstream's memory itself (no code of this project on that side)."""
    from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss

    size, dim, b = 20, 6, 8
    pml = CrossBatchMemory(NTXentLoss(temperature=0.1), dim, memory_size=size)  # upstream itself
    ours = RawKeyMoCoLoss(size, dim, 0.1, adaptation)
    g = torch.Generator().manual_seed(3)
    mask = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)])
    for step in range(6):  # fills, then wraps (20 is not a multiple of 8)
        q = (torch.randn(b, dim, generator=g) * 3 + 1).requires_grad_()
        k = torch.randn(b, dim, generator=g) * 2 - 0.5
        labels = torch.arange(step * b, (step + 1) * b)  # query i and key i share a label never seen before
        q_ref = q.detach().clone().requires_grad_()
        if adaptation == "xbn":
            _eq6_on_upstream_memory(pml, k)
        expected = pml(torch.cat([q_ref, k]), torch.cat([labels, labels]), enqueue_mask=mask)
        got = ours(q, k)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        expected.backward()
        got.backward()
        torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-4, atol=1e-6)


def ref_ntxent_excluding(queries, memory, positives, excluded, t):
    """``ref_ntxent`` with the rows ``excluded[i]`` left out of query i's denominator."""
    total = 0.0
    for i, q in enumerate(queries):
        qn = math.sqrt(sum(x * x for x in q))
        sims = {}
        for j, m in enumerate(memory):
            if j in excluded[i]:
                continue
            mn = math.sqrt(sum(x * x for x in m))
            sims[j] = sum(a * b for a, b in zip(q, m)) / (qn * mn) / t
        top = max(sims.values())
        lse = top + math.log(sum(math.exp(v - top) for v in sims.values()))
        total += lse - sims[positives[i]]
    return total / len(queries)


@pytest.mark.parametrize("mask", [False, True])
def test_raw_mode_leaves_older_keys_of_the_same_image_out_of_the_negatives(mask):
    g = torch.Generator().manual_seed(5)
    size, dim, b, n_images = 12, 3, 4, 6
    crit = RawKeyMoCoLoss(size, dim, 0.2, "none", mask_same_ids=mask)
    stored = [None] * size  # sample id per row, by hand
    ptr, total_same = 0, 0
    for step in range(6):
        ids = torch.randperm(n_images, generator=g)[:b]
        q, k = torch.randn(b, dim, generator=g), torch.randn(b, dim, generator=g)
        loss = crit(q, k, ids=ids)
        positions = [(ptr + i) % size for i in range(b)]
        for p, i in zip(positions, ids.tolist()):
            stored[p] = i
        ptr = (ptr + b) % size
        rows = crit.queue.embeddings.double().tolist()
        same = [{j for j, s in enumerate(stored[: len(rows)]) if s == i and j not in positions} for i in ids.tolist()]
        total_same += sum(map(len, same))
        assert int(crit.same_id_negatives) == sum(map(len, same))
        excluded = same if mask else [set()] * b
        expected = ref_ntxent_excluding(_rows(q), rows, positions, excluded, 0.2)
        torch.testing.assert_close(loss.item(), expected, rtol=1e-6, atol=1e-6)
    assert total_same > 4  # the stream brings images back while older keys are stored


def test_raw_mode_mask_needs_ids_and_is_off_by_default():
    crit = RawKeyMoCoLoss(8, 3, 0.2, "xbn", mask_same_ids=True)
    with pytest.raises(ValueError, match="ids are required with mask_same_ids=True"):
        crit(torch.randn(2, 3), torch.randn(2, 3))
    assert len(crit.queue) == 0  # nothing changed
    assert RawKeyMoCoLoss(8, 3).mask_same_ids is False


def test_raw_mode_state_dict_round_trip_and_bad_input():
    g = torch.Generator().manual_seed(4)
    a = RawKeyMoCoLoss(16, 4, 0.1, "axbn", kalman_r="auto")
    for _ in range(3):
        a(torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g))
    b = RawKeyMoCoLoss(16, 4, 0.1, "axbn", kalman_r="auto")
    b.load_state_dict(a.state_dict())
    q, k = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    torch.testing.assert_close(a(q, k), b(q, k))
    before = a.queue.memory.clone()
    with pytest.raises(ValueError, match="query and key must both be"):
        a(torch.randn(5, 4), torch.randn(4, 4))
    with pytest.raises(ValueError):
        a(torch.randn(5, 4), torch.full((5, 4), float("nan")))
    assert torch.equal(a.queue.memory, before)  # nothing changed
    with pytest.raises(ValueError, match="temperature"):
        RawKeyMoCoLoss(16, 4, 0.0)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        crit = RawKeyMoCoLoss(queue_size=13, dim=4, temperature=0.1, adaptation="xbn", gather_distributed=True)
        losses = []
        for step in range(4):
            q, k = _ddp_batch(rank, step)
            losses.append(crit(q, k).item())
        torch.save({"queue": crit.queue.state_dict(), "losses": losses}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ddp_batch(rank, step):
    g = torch.Generator().manual_seed(10 * step + rank)
    b = 3 + rank  # uneven batch sizes across ranks
    return torch.randn(b, 4, generator=g), torch.randn(b, 4, generator=g) * (2 + step) + rank


def test_raw_mode_under_ddp_shares_the_queue_and_each_rank_takes_its_own_positives(tmp_path):
    """Two gloo processes: identical queues; each rank's loss is its queries against the gathered keys."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in r0["queue"]:
        assert torch.equal(r0["queue"][key], r1["queue"][key]), key
    # one process seeing the keys of both ranks (rank order) in one batch builds the same queue
    single = RawKeyMoCoLoss(queue_size=13, dim=4, temperature=0.1, adaptation="xbn")
    for step in range(4):
        (q0, k0), (q1, k1) = _ddp_batch(0, step), _ddp_batch(1, step)
        pos = torch.arange(single.queue.ptr.item(), single.queue.ptr.item() + 7) % 13
        single.queue.update(torch.cat([k0, k1]))
        memory = single.queue.valid_memory()
        for rank, q, rows in ((0, q0, pos[:3]), (1, q1, pos[3:])):
            expected = ref_ntxent(_rows(q), _rows(memory), rows.tolist(), 0.1)
            assert (r0, r1)[rank]["losses"][step] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(single.queue.memory, r0["queue"]["memory"])
