"""The queue step made for the GPU, proven on the CPU: no host synchronisation, few kernels, graph-safe.

A ``TorchDispatchMode`` (:class:`xbn_queue.opcount.OpCounter`) sees every aten op a step dispatches.
"No host sync" below means that none of these ran (``OpCounter.syncs == 0``):

* ``aten._local_scalar_dense``, the op behind ``.item()`` / ``int()`` / ``bool()`` / ``float()`` of a
  tensor and ``if tensor:``;
* the ops whose output size depends on device values: ``nonzero`` (``torch.where(mask)``),
  ``masked_select``, indexing or assigning with a boolean mask (``x[mask]``, ``x[mask] = v``),
  every ``torch.unique`` variant, ``repeat_interleave`` without ``output_size``, ``bincount``;
* ops returning a Python value computed on the device: ``equal``, ``allclose``, ``is_nonzero``;
* the linear-algebra ops that synchronise on CUDA (``eigh``, ``eig``, ``svd``, ``pinv``, the error
  check of ``cholesky`` / ``inv`` / ``solve`` / ``lu_factor``, ``_ex`` variants with
  ``check_errors=True``): ``"xbn-cov"`` makes exactly two per step, in ``eigh``, and nothing else;
* device-to-host copies (``_to_copy`` / ``copy_`` from a GPU tensor to the CPU), and ``.tolist()``,
  ``.numpy()``, ``.cpu()`` called on any tensor (counted on a CPU tensor too, where they dispatch
  nothing, since they name the host).

It does not cover what a dispatch mode cannot see: an explicit ``torch.cuda.synchronize()`` or event
wait, a pageable host-to-device copy, or the CUDA caching allocator waiting for memory. Each kind
counted is shown to be counted in ``test_counter_counts_every_kind_of_host_sync``. The results of
the sync-free step are checked against the float64 reference in ``test_fastpath.py`` /
``test_queue.py``; here eager, compiled and (on CUDA) graph-replayed steps are compared with each
other, and op counts (about one kernel each on a GPU) are bounded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from xbn_queue import AdaptiveQueue
from xbn_queue import _compile
from xbn_queue import functional as F
from xbn_queue import queue as Q
from xbn_queue.opcount import SYNC_OP, OpCounter, count_ops
from xbn_queue.opcount import SYNC_OPS

from .test_fastpath import PlainQueue, _stream

SYNC = SYNC_OP
DTYPES = [torch.float32, torch.bfloat16]
count = count_ops


def _batches(n: int, b: int = 64, d: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=g) * 2 + 0.5, torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


def _steady_queue(adaptation: str, dtype: torch.dtype, size: int = 1024, dim: int = 128, b: int = 64, **kw):
    """A full queue (by default 1,024 rows, dim 128, after 20 batches of 64)."""
    q = AdaptiveQueue(size=size, dim=dim, adaptation=adaptation, dtype=dtype, validate="device", **kw)
    for x, y in _batches(20, b=b, d=dim, seed=1):
        q.update(x, y)
    assert q.is_full
    return q


# ---------------------------------------------------------------------------------------------- no syncs
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("adaptation", ["none", "xbn", "axbn"])
def test_fifty_steady_state_steps_never_read_the_device(adaptation, dtype):
    # stats_resync_every=16: the periodic exact re-synchronisation (and a fixed frame's re-base)
    # happen inside the 50 steps, and they too are decided and done without a host read.
    q = _steady_queue(adaptation, dtype, size=256, dim=32, b=16, stats_resync_every=16)
    batches = _batches(50, b=16, d=32, seed=2)

    def steps():
        for i, (x, y) in enumerate(batches):
            if i % 5 == 4:  # the two halves separately too
                q.adapt(x)
                q.enqueue(x, y)
            else:
                q.update(x, y)

    c = count(steps)
    assert c.syncs == 0, dict(c.ops)
    if adaptation != "none":
        assert c.ops["aten.addmv_.default"] >= 100  # the running sums were really updated at every step
    # The host mirrors still equal their buffers (read outside the counted region).
    assert len(q) == int(q.num_filled) == 256
    assert q._age == int(q.stat_age) and q._synced == bool(q.stat_synced)
    if adaptation == "axbn":
        assert q.adaptation._t == int(q.adaptation.step) == 20 - 1 + 50


@pytest.mark.parametrize("kalman_r", ["auto", "sampling"])
def test_axbn_noise_models_never_read_the_device(kalman_r):
    q = _steady_queue("axbn", torch.float32, size=256, dim=32, b=16, kalman_r=kalman_r, kalman_gain_every=3)
    batches = _batches(20, b=16, d=32, seed=3)
    c = count(lambda: [q.update(x, y) for x, y in batches])
    assert c.syncs == 0, dict(c.ops)
    assert q.adaptation._t == int(q.adaptation.step) == 20 - 1 + 20


def test_xbn_cov_steady_state_step_synchronises_exactly_twice_in_eigh_and_nowhere_else():
    """The stated exception: ``"xbn-cov"`` takes two float64 eigendecompositions per step, and
    ``torch.linalg.eigh`` makes the host wait for a CUDA device. Everything else in its step (both
    covariances, the filter, the shrinkage, the map) stays on the device."""
    q = _steady_queue("xbn-cov", torch.float32, size=128, dim=16, b=16)
    batches = _batches(5, b=16, d=16, seed=2)
    c = count(lambda: [q.update(x, y) for x, y in batches])
    assert c.sync_ops == {"aten._linalg_eigh.default": 2 * len(batches)}, dict(c.sync_ops)
    assert q.adaptation._t == int(q.adaptation.step) == 20 - 1 + 5


def test_filling_steps_do_not_read_the_device_either():
    q = AdaptiveQueue(size=100, dim=8, adaptation="axbn", validate="device")
    c = count(lambda: [q.update(x, y) for x, y in _batches(12, b=16, d=8)])
    assert c.syncs == 0 and len(q) == 100


# ---------------------------------------------------------------------------------------------- the counter
def _sync_cases():
    x = torch.randn(6, 3)
    m = x[:, 0] > 0
    i = torch.tensor([2, 0, 2])
    spd = x.t() @ x + torch.eye(3)  # (3, 3) symmetric positive definite
    return {
        ".item()": (lambda: x[0, 0].item(), SYNC_OP),
        "bool(tensor)": (lambda: bool(m.any()), SYNC_OP),
        "nonzero": (lambda: m.nonzero(), "aten.nonzero.default"),
        "torch.where(mask)": (lambda: torch.where(m), "aten.nonzero.default"),
        "masked_select": (lambda: x.masked_select(m[:, None]), "aten.masked_select.default"),
        "x[mask]": (lambda: x[m], "aten.index.Tensor"),
        "x[mask] = v": (lambda: x.__setitem__(m, 0.0), "aten.index_put_.default"),
        "unique": (lambda: torch.unique(i), "aten._unique2.default"),
        "unique_consecutive": (lambda: torch.unique_consecutive(i), "aten.unique_consecutive.default"),
        "repeat_interleave": (lambda: torch.repeat_interleave(i), "aten.repeat_interleave.Tensor"),
        "bincount": (lambda: torch.bincount(i), "aten.bincount.default"),
        "equal": (lambda: torch.equal(i, i), "aten.equal.default"),
        "tolist": (lambda: i.tolist(), "Tensor.tolist"),
        "numpy": (lambda: i.numpy(), "Tensor.numpy"),
        ".cpu()": (lambda: i.cpu(), "Tensor.cpu"),
        "linalg.eigh": (lambda: torch.linalg.eigh(spd), "aten._linalg_eigh.default"),
        "linalg.eigvalsh": (lambda: torch.linalg.eigvalsh(spd), "aten._linalg_eigh.default"),
        "linalg.eig": (lambda: torch.linalg.eig(spd), "aten.linalg_eig.default"),
        "linalg.svd": (lambda: torch.linalg.svd(spd), "aten._linalg_svd.default"),
        "linalg.matrix_rank": (lambda: torch.linalg.matrix_rank(spd), "aten._linalg_svd.default"),
        "linalg.pinv": (lambda: torch.linalg.pinv(spd), "aten.linalg_pinv.atol_rtol_tensor"),
        "linalg.cholesky": (lambda: torch.linalg.cholesky(spd), "aten._linalg_check_errors.default"),
        "linalg.inv": (lambda: torch.linalg.inv(spd), "aten._linalg_check_errors.default"),
        "torch.inverse": (lambda: torch.inverse(spd), "aten._linalg_check_errors.default"),
        "linalg.solve": (lambda: torch.linalg.solve(spd, spd), "aten._linalg_check_errors.default"),
        "linalg.lu_factor": (lambda: torch.linalg.lu_factor(spd), "aten._linalg_check_errors.default"),
        "cholesky_ex(check_errors=True)": (lambda: torch.linalg.cholesky_ex(spd, check_errors=True),
                                           "aten.linalg_cholesky_ex.default"),
        "inv_ex(check_errors=True)": (lambda: torch.linalg.inv_ex(spd, check_errors=True), "aten.linalg_inv_ex.default"),
    }


@pytest.mark.parametrize("case", list(_sync_cases()))
def test_counter_counts_every_kind_of_host_sync(case):
    fn, name = _sync_cases()[case]
    c = count(fn)
    assert c.syncs == 1 and c.sync_ops == {name: 1}, dict(c.sync_ops)


def test_counter_does_not_count_what_needs_no_host_read():
    x, i = torch.randn(6, 3), torch.tensor([2, 0, 2])
    c = count(lambda: (x[i], x[1:3], x.index_select(0, i), torch.repeat_interleave(i, i, output_size=4),
                       x.to(x.device), x.sum(), torch.where(x > 0, x, 0.0)))
    assert c.syncs == 0 and c.total >= 7, dict(c.sync_ops)
    spd = x.t() @ x + torch.eye(3)  # the linalg ops that skip the host-side error check, and matmuls
    c = count(lambda: (torch.linalg.cholesky_ex(spd), torch.linalg.inv_ex(spd), torch.linalg.solve_ex(spd, spd),
                       torch.linalg.lu_factor_ex(spd), spd @ spd, torch.linalg.matrix_exp(spd)))
    assert c.syncs == 0 and c.total >= 6, dict(c.sync_ops)
    assert SYNC_OP in SYNC_OPS
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist  # the methods are restored on exit


# ---------------------------------------------------------------------------------------------- op counts
#: Issue 10's bounds for one steady-state ``update`` (float32 queue, batch 64, dim 128, 1,024 rows);
#: a bfloat16 memory may use 10 more.
OP_BOUNDS = {"none": 15, "xbn": 40, "axbn": 50}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("adaptation", ["none", "xbn", "axbn"])
def test_steady_state_update_op_count(adaptation, dtype):
    q = _steady_queue(adaptation, dtype)
    q.resync_stats()  # the counted step is an ordinary one, not a periodic re-synchronisation
    x, y = _batches(1, seed=3)[0]
    c = count(lambda: q.update(x, y))
    bound = OP_BOUNDS[adaptation] + (10 if dtype == torch.bfloat16 else 0)
    assert c.syncs == 0
    assert c.total <= bound, (c.total, dict(c.ops))
    assert c.ops["aten.index_copy_.default"] == 2  # rows and labels, at device-computed positions


def test_before_the_change_a_step_synchronised_many_times():
    """What the counter measures is real: the default CPU validation reads one value per call."""
    q = AdaptiveQueue(size=64, dim=8, adaptation="xbn")  # validate="auto" -> "sync" on CPU
    for x, y in _batches(5, b=16, d=8):
        q.update(x, y)
    x, y = _batches(1, b=16, d=8, seed=4)[0]
    assert count(lambda: q.update(x, y)).syncs == 1
    assert count(lambda: int(q.ptr)).syncs == 1


# ---------------------------------------------------------------------------------------------- validate
def _nan_batch(b: int = 4, d: int = 8) -> torch.Tensor:
    x = torch.randn(b, d)
    x[1, 3] = float("nan")
    return x


@pytest.mark.parametrize("method", ["update", "adapt", "enqueue"])
def test_device_validation_refuses_non_finite_input_before_any_change(method):
    q = AdaptiveQueue(size=16, dim=8, adaptation="axbn", validate="device")
    for x, _ in _batches(3, b=4, d=8):
        q.update(x)
    before = copy.deepcopy(q.state_dict())
    for bad in (_nan_batch(), torch.full((4, 8), float("inf")), torch.full((4, 8), -float("inf"))):
        with pytest.raises(RuntimeError, match="expected finite values"):
            getattr(q, method)(bad)
        after = q.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    big = torch.full((4, 8), 3.0e38)  # finite values whose float32 sum would overflow: accepted
    getattr(q, method)(big)


def test_validate_modes():
    assert AdaptiveQueue(4, 2)._validate_mode() == "sync"
    assert AdaptiveQueue(4, 2, validate="device")._validate_mode() == "device"
    with pytest.raises(ValueError, match="validate must be one of 'auto', 'sync', 'device', 'off', got 'fast'"):
        AdaptiveQueue(4, 2, validate="fast")
    q = AdaptiveQueue(size=8, dim=8, adaptation="none", validate="off")
    q.enqueue(_nan_batch())  # no finiteness check at all: the caller's choice
    assert torch.isnan(q.embeddings).any()
    with pytest.raises(ValueError, match="expected shape"):  # shapes are still checked
        q.enqueue(torch.randn(4, 3))
    with pytest.raises(ValueError, match="finite"):
        AdaptiveQueue(size=8, dim=8, validate="sync").enqueue(_nan_batch())


# ---------------------------------------------------------------------------------------------- host mirrors
@pytest.mark.parametrize("adaptation", ["xbn", "axbn"])
def test_host_mirrors_follow_load_reset_and_round_trips(adaptation):
    kw = dict(size=40, dim=6, adaptation=adaptation, kalman_r=1.0, dtype=torch.bfloat16)
    stream = _stream(30, 7, 6, seed=21)
    a = AdaptiveQueue(**kw)
    for x in stream[:12]:
        a.update(x, torch.arange(7))
    b = AdaptiveQueue(**kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert (b._n, b._has_labels, b._age, b._synced) == (a._n, a._has_labels, a._age, a._synced)
    if adaptation == "axbn":
        assert b.adaptation._t == a.adaptation._t == 12 - 1
    for x in stream[12:]:
        a.update(x, torch.arange(7))
        b.update(x, torch.arange(7))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    b.reset()
    assert (b._n, b._has_labels, b._age, b._synced) == (0, False, 0, False)
    b.enqueue(torch.randn(3, 6))  # no labels needed after a reset
    assert len(b) == 3 and int(b.num_filled) == 3


def test_loading_into_a_used_queue_replaces_its_mirrors():
    a = AdaptiveQueue(size=10, dim=3, adaptation="xbn")
    a.enqueue(torch.randn(4, 3))
    b = AdaptiveQueue(size=10, dim=3, adaptation="xbn")
    for x in _stream(6, 3, 3):
        b.update(x, torch.arange(3))
    b.load_state_dict(a.state_dict())
    assert len(b) == 4 and b.labels is None
    b.enqueue(torch.randn(2, 3))  # unlabelled, as the loaded rows
    assert len(b) == 6


# ---------------------------------------------------------------------------------------------- compile
def test_compile_switch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("XBN_QUEUE_COMPILE", raising=False)
    assert not _compile.compile_enabled(cpu, None) and _compile.compile_enabled(cuda, None)
    assert _compile.compile_enabled(cpu, True) and not _compile.compile_enabled(cuda, False)
    monkeypatch.setenv("XBN_QUEUE_COMPILE", "1")
    assert _compile.compile_enabled(cpu, None) and not _compile.compile_enabled(cpu, False)
    monkeypatch.setenv("XBN_QUEUE_COMPILE", "0")
    assert not _compile.compile_enabled(cuda, None) and not _compile.compile_enabled(cuda, True)


def test_failed_compilation_warns_once_and_falls_back_to_eager(monkeypatch):
    def broken_compile(fn, **kw):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken_compile)
    fused = _compile.Fused(F.kalman_step_)
    u, p, k = torch.zeros(3), torch.ones(3), torch.zeros(3)
    with pytest.warns(RuntimeWarning, match="torch.compile of kalman_step_ failed.*using the eager kernels"):
        fused(True, u, p, k, torch.ones(3), 1.0, 1.0)
    assert fused.failed
    fused(True, u, p, k, torch.ones(3), 1.0, 1.0)  # no second warning, still computed
    ref_u, ref_p, ref_k = torch.zeros(3), torch.ones(3), torch.zeros(3)
    for _ in range(2):
        F.kalman_step_(ref_u, ref_p, ref_k, torch.ones(3), 1.0, 1.0)
    assert torch.equal(u, ref_u) and torch.equal(p, ref_p) and torch.equal(k, ref_k)


def _compare_compiled_with_eager(monkeypatch, backend: str, dtypes=DTYPES) -> None:
    """Eager and compiled queues on one stream: the same memory, and both equal the float64 reference."""
    fresh = {name: _compile.Fused(fn) for name, fn in (("_XBN_STEP", F.xbn_step_), ("_FRAME_STEP", F.frame_step_))}
    for name, fused in fresh.items():
        fused._compiled = torch.compile(fused.fn, backend=backend, dynamic=False)
        monkeypatch.setattr(Q, name, fused)
    stream = _stream(40, 8, 16, seed=22)
    for dtype in dtypes:
        for adaptation in ("xbn", "axbn"):
            kw = dict(size=32, dim=16, adaptation=adaptation, kalman_r=1.0, dtype=dtype)
            eager, comp = AdaptiveQueue(compile=False, **kw), AdaptiveQueue(compile=True, **kw)
            ref = PlainQueue(32, 16, adaptation, r=1.0)
            for x in stream:
                eager.update(x)
                comp.update(x)
                ref.update(x)
            assert not any(f.failed for f in fresh.values())
            assert_close(comp.embeddings, eager.embeddings, rtol=1e-6, atol=1e-6)
            scale = ref.rows.std(dim=0, correction=0).clamp_min(1e-3)  # (D,)
            tol = 1e-4 if dtype == torch.float32 else 8 * 2.0**-8
            assert float(((comp.embeddings.double() - ref.rows) / scale).abs().max()) < tol


def test_traced_bookkeeping_equals_eager(monkeypatch):
    """Dynamo traces the in-place functional steps (no graph breaks needed) and the traced graph computes
    what eager does; ``aot_eager`` skips the C++ code generation, so this runs in seconds on CPU."""
    _compare_compiled_with_eager(monkeypatch, "aot_eager")


@pytest.mark.slow
def test_inductor_compiled_bookkeeping_equals_eager(monkeypatch):
    """The real thing (inductor kernels; about a minute of compilation on a 2-core CPU)."""
    _compare_compiled_with_eager(monkeypatch, "inductor", dtypes=[torch.float32])


# ---------------------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("adaptation", ["xbn", "axbn"])
def test_cuda_graph_replay_equals_eager(adaptation, dtype):
    """A steady-state update captured once in a CUDA graph and replayed gives the memory of eager steps."""
    dev = torch.device("cuda")
    kw = dict(size=1024, dim=128, adaptation=adaptation, dtype=dtype, stats_resync_every=10**6)
    graphed = AdaptiveQueue(**kw).to(dev)
    eager = AdaptiveQueue(**kw).to(dev)
    for x, y in _batches(20, seed=5):
        graphed.update(x.to(dev), y.to(dev))
        eager.update(x.to(dev), y.to(dev))
    static_x, static_y = torch.zeros(64, 128, device=dev), torch.zeros(64, dtype=torch.long, device=dev)
    warm = _batches(3, seed=6)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream (compilation, caches), as CUDA graphs require
        for x, y in warm:
            static_x.copy_(x)
            static_y.copy_(y)
            graphed.update(static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in warm:
        eager.update(x.to(dev), y.to(dev))
    g = torch.cuda.CUDAGraph()
    first = _batches(1, seed=7)[0]
    static_x.copy_(first[0])
    static_y.copy_(first[1])
    with torch.cuda.graph(g):
        graphed.update(static_x, static_y)  # captured, and executed once
    eager.update(first[0].to(dev), first[1].to(dev))
    for x, y in _batches(30, seed=8):
        static_x.copy_(x)
        static_y.copy_(y)
        g.replay()
        eager.update(x.to(dev), y.to(dev))
    torch.cuda.synchronize()
    assert torch.equal(graphed.ptr, eager.ptr)
    assert torch.equal(graphed.label_memory, eager.label_memory)
    # bfloat16: the eager queue re-bases its frame once per turnover, the replayed step never does
    # (its host counters do not run), so the two agree within a few bf16 roundings.
    tol = 1e-5 if dtype == torch.float32 else 8 * 2.0**-8 * 4
    assert_close(graphed.embeddings, eager.embeddings, rtol=tol, atol=tol)
    graphed.resync_stats()  # after replays: the host counters catch up with the device
    assert len(graphed) == 1024


# ---------------------------------------------------------------------------------------------- drop-ins
#: Issue 10: a drop-in's forward may use at most the upstream class's ops plus these.
DROPIN_EXTRA_OPS = {"none": 40, "xbn": 40, "axbn": 50}


def _pml_losses():
    from pytorch_metric_learning import losses, miners

    return {
        "supcon": (losses.SupConLoss, None),
        "contrastive+miner": (losses.ContrastiveLoss, miners.PairMarginMiner),
    }


def _steady_counts(module, batches, call) -> OpCounter:
    for b in batches[:-1]:
        call(module, b)
    return count(lambda: call(module, batches[-1]))


@pytest.mark.parametrize("loss_name", ["supcon", "contrastive+miner"])
@pytest.mark.parametrize("adaptation", ["none", "xbn", "axbn"])
def test_pml_dropin_forward_syncs_and_ops_against_pml(adaptation, loss_name):
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses

    from xbn_queue.pml import AdaptiveCrossBatchMemory

    loss_cls, miner_cls = _pml_losses()[loss_name]
    miner = (lambda: miner_cls()) if miner_cls else (lambda: None)
    batches = _batches(10, b=32, d=64, seed=9)  # 10 x 32 rows into 256: full, wrapped

    def call(m, b):
        m(b[0], b[1]).backward() if b[0].requires_grad else m(b[0], b[1])

    torch.manual_seed(0)
    upstream = losses.CrossBatchMemory(loss_cls(), 64, memory_size=256, miner=miner())
    ours = AdaptiveCrossBatchMemory(loss_cls(), 64, memory_size=256, miner=miner(), adaptation=adaptation,
                                    validate="device")  # the CUDA default
    up = _steady_counts(upstream, batches, call)
    us = _steady_counts(ours, batches, call)
    assert us.syncs <= up.syncs, (us.syncs, up.syncs)
    assert us.total <= up.total + DROPIN_EXTRA_OPS[adaptation], (us.total, up.total, dict(us.ops))


def test_plain_xbm_through_the_pml_dropin_costs_no_more_than_pml():
    """``AdaptiveCrossBatchMemory(adaptation="none")`` against PML's ``CrossBatchMemory``: batch 64, dim 128,
    1,024 rows, ``ContrastiveLoss``, a steady-state step, with the validation a CUDA memory gets by
    default (``"off"`` for a memory that is never adapted: see ``AdaptiveQueue``'s ``validate``)."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses

    from xbn_queue.pml import AdaptiveCrossBatchMemory

    ours = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), 128, memory_size=1024, adaptation="none")
    cuda_default = ours.queue._validate_mode(torch.device("cuda"))
    assert cuda_default == "off"
    ours.queue.validate = cuda_default
    upstream = losses.CrossBatchMemory(losses.ContrastiveLoss(), 128, memory_size=1024)
    batches = _batches(20, b=64, d=128, seed=12)  # 1,280 rows: full and wrapped
    up = _steady_counts(upstream, batches, lambda m, b: m(*b))
    us = _steady_counts(ours, batches, lambda m, b: m(*b))
    assert us.syncs <= up.syncs, (dict(us.sync_ops), dict(up.sync_ops))
    assert us.total <= up.total, (us.total, up.total, dict(us.ops))


@pytest.mark.parametrize("adaptation", ["none", "xbn", "axbn"])
def test_lightly_dropin_forward_syncs_and_ops_against_lightly(adaptation):
    pytest.importorskip("lightly")
    from lightly.models.modules.memory_bank import MemoryBankModule

    from xbn_queue.lightly import AdaptiveMemoryBank

    batches = [x for x, _ in _batches(10, b=32, d=64, seed=10)]

    def call(m, x):
        m(x, update=True)

    torch.manual_seed(0)
    up = _steady_counts(MemoryBankModule(size=(256, 64)), batches, call)
    torch.manual_seed(0)
    us = _steady_counts(AdaptiveMemoryBank(size=(256, 64), adaptation=adaptation, validate="device"), batches, call)
    assert up.syncs == 1  # lightly reads its pointer on the host at every call
    assert us.syncs <= up.syncs and us.syncs == 0
    assert us.total <= up.total + DROPIN_EXTRA_OPS[adaptation], (us.total, up.total, dict(us.ops))


def test_dropins_default_cpu_validation_costs_one_host_read():
    """With ``validate="auto"`` on a CPU memory the finite check reads one value on the host (a memory
    read, no device to wait for); on CUDA the default is the device-side check counted above."""
    pytest.importorskip("lightly")
    from xbn_queue.lightly import AdaptiveMemoryBank

    bank = AdaptiveMemoryBank(size=(256, 32), adaptation="xbn")
    xs = [x for x, _ in _batches(10, b=16, d=32, seed=11)]
    assert _steady_counts(bank, xs, lambda m, x: m(x, update=True)).syncs == 1
