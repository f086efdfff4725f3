"""AdaptiveQueue against the float64 reference in ``reference.py``, state round trips and every bad-input case."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from xbn_queue import AXBN, XBN, AdaptiveQueue, NoAdaptation

from .reference import RefQueue

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batches(n_steps: int, b: int, d: int, seed: int = 0, drift: float = 0.3):
    """Batches whose distribution drifts (mean and scale change every step), like embeddings in training."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n_steps):
        scale = 1.0 + drift * t * torch.rand(d, generator=g)
        shift = drift * t * torch.randn(d, generator=g)
        x = torch.randn(b, d, generator=g) * scale + shift
        y = torch.randint(0, 5, (b,), generator=g)
        out.append((x, y))
    return out


def _run_reference(ref: RefQueue, batches):
    for x, y in batches:
        rows = x.double().tolist()
        ref.adapt(rows)
        ref.enqueue(rows, y.tolist())
    return torch.tensor(ref.valid(), dtype=torch.float64), torch.tensor([ref.labels[i] for i in range(ref.n)])


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- ring buffer
@pytest.mark.parametrize("size,b", [(10, 3), (7, 4), (5, 5), (13, 1)])
def test_ring_buffer_wraps_for_sizes_that_do_not_divide(size, b):
    q = AdaptiveQueue(size=size, dim=4, adaptation="none")
    ref = RefQueue(size, "none")
    for step, (x, y) in enumerate(_batches(9, b, 4, seed=size)):
        pos = q.enqueue(x, y)
        ref_pos = ref.enqueue(x.double().tolist(), y.tolist())
        assert pos.tolist() == ref_pos
        assert len(q) == ref.n == min((step + 1) * b, size)
        assert int(q.ptr) == ref.ptr
    assert_close(q.embeddings.double(), torch.tensor(ref.valid(), dtype=torch.float64))
    assert q.labels.tolist() == [ref.labels[i] for i in range(ref.n)]
    assert q.is_full == (9 * b >= size)


def test_fill_order_and_partial_queue():
    q = AdaptiveQueue(size=6, dim=2, adaptation="xbn")
    x = torch.arange(8.0).reshape(4, 2)
    q.enqueue(x)
    assert len(q) == 4 and not q.is_full
    assert q.labels is None and q.ids is None
    assert_close(q.embeddings, x)
    assert q.embeddings.dtype == torch.float32


def test_ids_are_stored_beside_labels():
    q = AdaptiveQueue(size=5, dim=3, adaptation="none")
    q.enqueue(torch.randn(3, 3), labels=torch.tensor([1, 2, 3]), ids=torch.tensor([10, 11, 12]))
    q.enqueue(torch.randn(3, 3), labels=torch.tensor([4, 5, 6]), ids=torch.tensor([13, 14, 15]))
    # the second batch goes to rows 3, 4 and (wrapping) 0
    assert q.ids.tolist() == [15, 11, 12, 13, 14]
    assert q.labels.tolist() == [6, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="ids missing"):
        q.enqueue(torch.randn(1, 3), labels=torch.tensor([7]))


# ---------------------------------------------------------------------------------------------- XBN / AXBN
@pytest.mark.parametrize("size,b", [(11, 4), (16, 8)])
def test_xbn_matches_float64_reference(size, b):
    batches = _batches(12, b, 5, seed=1)
    q = AdaptiveQueue(size=size, dim=5, adaptation="xbn", eps=1e-6)
    for x, y in batches:
        q.adapt(x)
        q.enqueue(x, y)
    ref_rows, ref_labels = _run_reference(RefQueue(size, "xbn", eps=1e-6), batches)
    assert_close(q.embeddings.double(), ref_rows, rtol=1e-5, atol=1e-5)
    assert torch.equal(q.labels, ref_labels)


def test_update_equals_adapt_then_enqueue():
    batches = _batches(10, 4, 6, seed=2)
    a = AdaptiveQueue(size=9, dim=6, adaptation="axbn", kalman_r=2.0, kalman_gain_every=3)
    b = copy.deepcopy(a)
    for x, y in batches:
        a.adapt(x)
        a.enqueue(x, y)
        b.update(x, y)
    assert _state_equal(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("gain_every", [1, 3])
def test_axbn_matches_float64_reference_with_gain_far_from_one(gain_every):
    # r / B = 4 / 6 is large next to q = 0.05: the steady-state gain is about 0.24, far from 1.
    kw = dict(p0=1.0, q=0.05, r=4.0, gain_every=gain_every)
    batches = _batches(14, 6, 4, seed=3)
    q = AdaptiveQueue(
        size=10, dim=4, adaptation="axbn", kalman_p0=kw["p0"], kalman_q=kw["q"], kalman_r=kw["r"],
        kalman_gain_every=gain_every,
    )
    ref = RefQueue(10, "axbn", **kw)
    for x, y in batches:
        q.update(x, y)
        rows = x.double().tolist()
        ref.adapt(rows)
        ref.enqueue(rows, y.tolist())
    gains = q.adaptation.mean_gain
    assert 0.05 < float(gains.max()) < 0.6, "the test must exercise a gain far from 1"
    assert_close(q.embeddings.double(), torch.tensor(ref.valid(), dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert_close(q.adaptation.mean_estimate.double(), torch.tensor(ref.kf_mean.u, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert_close(q.adaptation.std_estimate.double(), torch.tensor(ref.kf_std.u, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert int(q.adaptation.step) == ref.kf_mean.t


def test_axbn_auto_noise_matches_reference():
    batches = _batches(10, 8, 3, seed=4)
    q = AdaptiveQueue(size=12, dim=3, adaptation="axbn", kalman_r="auto", kalman_q=0.5, kalman_p0=2.0, kalman_gain_every=2)
    ref = RefQueue(12, "axbn", p0=2.0, q=0.5, r="auto", gain_every=2)
    for x, y in batches:
        q.update(x, y)
        rows = x.double().tolist()
        ref.adapt(rows)
        ref.enqueue(rows, y.tolist())
    assert_close(q.embeddings.double(), torch.tensor(ref.valid(), dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_axbn_with_vanishing_measurement_noise_is_xbn():
    # r -> 0 makes the gain 1 (r = 0 itself is refused since 0.5: with q = 0 the recursion would divide 0 by 0)
    batches = _batches(8, 5, 4, seed=5)
    a = AdaptiveQueue(size=9, dim=4, adaptation="axbn", kalman_r=1e-9)
    b = AdaptiveQueue(size=9, dim=4, adaptation="xbn")
    for x, y in batches:
        a.update(x, y)
        b.update(x, y)
    assert_close(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-5)


def test_adapted_memory_has_batch_moments():
    q = AdaptiveQueue(size=50, dim=8, adaptation="xbn", eps=0.0)
    q.enqueue(torch.randn(50, 8) * 3 + 1)
    batch = torch.randn(16, 8) * 0.5 - 2
    q.adapt(batch)
    assert_close(q.embeddings.mean(0), batch.mean(0), rtol=1e-4, atol=1e-5)
    assert_close(q.embeddings.std(0), batch.std(0), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- no-ops
@pytest.mark.parametrize(
    "adaptation,stored,b",
    [("none", 6, 4), ("xbn", 6, 1), ("xbn", 1, 4), ("axbn", 1, 4), ("axbn", 6, 1)],
)
def test_adapt_is_a_noop(adaptation, stored, b):
    q = AdaptiveQueue(size=8, dim=3, adaptation=adaptation)
    q.enqueue(torch.randn(stored, 3))
    before = copy.deepcopy(q.state_dict())
    q.adapt(torch.randn(b, 3) * 10 + 5)
    after = q.state_dict()
    assert int(after.pop("steps")) == int(before.pop("steps")) + 1  # a step was counted, nothing else changed
    assert _state_equal(before, after)


def test_adaptation_classes_and_instances():
    assert isinstance(AdaptiveQueue(4, 2, "none").adaptation, NoAdaptation)
    assert isinstance(AdaptiveQueue(4, 2, "XBN").adaptation, XBN)
    custom = AXBN(2, r=0.5)
    assert AdaptiveQueue(4, 2, custom).adaptation is custom
    with pytest.raises(ValueError, match="adaptation must be one of"):
        AdaptiveQueue(4, 2, "bn")
    with pytest.raises(ValueError, match="dim=3"):
        AdaptiveQueue(4, 2, AXBN(3))
    with pytest.raises(ValueError, match="kalman_gain_every"):
        AdaptiveQueue(4, 2, "axbn", kalman_gain_every=0)
    with pytest.raises(ValueError, match="kalman_r"):
        AdaptiveQueue(4, 2, "axbn", kalman_r="sometimes")
    with pytest.raises(ValueError, match="size and dim"):
        AdaptiveQueue(0, 2)


# ---------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("adaptation", ["none", "xbn", "axbn"])
def test_state_dict_round_trip_mid_run_continues_bit_identically(adaptation):
    batches = _batches(12, 5, 6, seed=6)
    kw = dict(size=13, dim=6, adaptation=adaptation, kalman_r=1.0, kalman_gain_every=2)
    a = AdaptiveQueue(**kw)
    for x, y in batches[:7]:
        a.update(x, y, ids=torch.arange(len(y)))
    b = AdaptiveQueue(**kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert len(b) == len(a) and int(b.ptr) == int(a.ptr)
    for x, y in batches[7:]:
        a.update(x, y, ids=torch.arange(len(y)))
        b.update(x, y, ids=torch.arange(len(y)))
    assert _state_equal(a.state_dict(), b.state_dict())
    keys = set(a.state_dict())
    assert {"memory", "label_memory", "id_memory", "ptr", "num_filled"} <= keys
    if adaptation == "axbn":
        assert {"adaptation.mean_estimate", "adaptation.std_gain", "adaptation.step"} <= keys


def test_state_dict_through_torch_save(tmp_path):
    a = AdaptiveQueue(size=7, dim=3, adaptation="axbn")
    for x, y in _batches(4, 3, 3):
        a.update(x, y)
    torch.save(a.state_dict(), tmp_path / "q.pt")
    b = AdaptiveQueue(size=7, dim=3, adaptation="axbn")
    b.load_state_dict(torch.load(tmp_path / "q.pt"))
    assert _state_equal(a.state_dict(), b.state_dict())


def test_reset_empties_everything():
    q = AdaptiveQueue(size=5, dim=2, adaptation="axbn")
    for x, y in _batches(3, 3, 2):
        q.update(x, y)
    q.reset()
    assert len(q) == 0 and int(q.ptr) == 0 and q.labels is None
    assert int(q.adaptation.step) == 0
    q.enqueue(torch.ones(2, 2))  # labels may be left out again after a reset
    assert q.labels is None


def test_reads_are_copies_and_carry_no_gradient():
    q = AdaptiveQueue(size=6, dim=3, adaptation="xbn")
    x = torch.randn(4, 3, requires_grad=True)
    q.update(x * 2, torch.arange(4))
    emb = q.embeddings
    assert not emb.requires_grad and not q.memory.requires_grad
    emb.add_(100.0)
    q.labels.add_(100)
    assert_close(q.embeddings, (x * 2).detach())
    assert q.labels.tolist() == [0, 1, 2, 3]


def test_low_precision_input_is_stored_as_float32():
    q = AdaptiveQueue(size=8, dim=4, adaptation="xbn")
    x = torch.randn(5, 4).to(torch.bfloat16)
    q.enqueue(x)
    assert q.memory.dtype == torch.float32
    assert torch.equal(q.embeddings, x.float())
    q.update(torch.randn(3, 4).half())
    assert torch.isfinite(q.embeddings).all()


def test_autocast_bfloat16_batch():
    q = AdaptiveQueue(size=8, dim=4, adaptation="axbn")
    lin = torch.nn.Linear(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            z = lin(torch.randn(4, 4))
            assert z.dtype == torch.bfloat16
            q.update(z)
    assert q.embeddings.dtype == torch.float32 and torch.isfinite(q.embeddings).all()


def test_constant_dimensions_never_give_nan_or_inf():
    q = AdaptiveQueue(size=10, dim=3, adaptation="xbn")
    x = torch.randn(10, 3)
    x[:, 1] = 0.1  # constant in the memory
    q.enqueue(x)
    batch = torch.randn(4, 3)
    batch[:, 2] = -3.0  # constant in the batch
    q.adapt(batch)
    emb = q.embeddings
    assert torch.isfinite(emb).all()
    assert_close(emb[:, 1], batch[:, 1].mean().expand(10))  # Eq. 6 sends a constant column to the batch mean
    assert_close(emb[:, 2], torch.full((10,), -3.0))
    q2 = AdaptiveQueue(size=10, dim=3, adaptation="axbn", kalman_r="auto")
    for _ in range(3):
        q2.update(torch.ones(4, 3))  # all-constant batches: zero measurement noise in "auto" mode
    assert torch.isfinite(q2.embeddings).all()


# ---------------------------------------------------------------------------------------------- bad input
def _filled_queue():
    q = AdaptiveQueue(size=6, dim=3, adaptation="axbn")
    for x, y in _batches(3, 3, 3):
        q.update(x, y)
    return q


BAD_CALLS = [
    ("enqueue 1-d", lambda q: q.enqueue(torch.randn(3)), r"expected shape \(B, 3\), got \(3,\)"),
    ("enqueue wrong dim", lambda q: q.enqueue(torch.randn(2, 4), torch.arange(2)), r"expected shape \(B, 3\), got \(2, 4\)"),
    ("adapt wrong dim", lambda q: q.adapt(torch.randn(2, 5)), r"expected shape \(B, 3\), got \(2, 5\)"),
    ("update wrong dim", lambda q: q.update(torch.randn(2, 2), torch.arange(2)), r"expected shape \(B, 3\)"),
    ("labels length", lambda q: q.enqueue(torch.randn(2, 3), torch.arange(3)), r"labels: expected shape \(2,\).*got \(3,\)"),
    ("ids length", lambda q: q.enqueue(torch.randn(2, 3), torch.arange(2), ids=torch.arange(5)), r"ids: expected shape \(2,\)"),
    ("float labels", lambda q: q.enqueue(torch.randn(2, 3), torch.rand(2)), "integer"),
    ("nan enqueue", lambda q: q.enqueue(torch.tensor([[0.0, float("nan"), 1.0]]), torch.arange(1)), "finite"),
    ("inf adapt", lambda q: q.adapt(torch.tensor([[0.0, 1.0, 1.0], [float("inf"), 0.0, 0.0]])), "finite"),
    ("nan update", lambda q: q.update(torch.full((2, 3), float("nan")), torch.arange(2)), "finite"),
    ("too large", lambda q: q.enqueue(torch.randn(7, 3), torch.arange(7)), "larger than the queue size 6"),
    ("too large update", lambda q: q.update(torch.randn(7, 3), torch.arange(7)), "larger than the queue size 6"),
    ("missing labels", lambda q: q.enqueue(torch.randn(2, 3)), "labels missing"),
    ("integer embeddings", lambda q: q.enqueue(torch.ones(2, 3, dtype=torch.long), torch.arange(2)), "floating-point"),
    ("not a tensor", lambda q: q.adapt([[1.0, 2.0, 3.0]]), "torch.Tensor"),
]


@pytest.mark.parametrize("name,call,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_and_leaves_memory_unchanged(name, call, match):
    q = _filled_queue()
    before = copy.deepcopy(q.state_dict())
    with pytest.raises(ValueError, match=match):
        call(q)
    assert _state_equal(before, q.state_dict())


def test_labels_given_after_unlabelled_rows_is_refused():
    q = AdaptiveQueue(size=6, dim=2)
    q.enqueue(torch.randn(2, 2))
    before = copy.deepcopy(q.state_dict())
    with pytest.raises(ValueError, match="labels given"):
        q.enqueue(torch.randn(2, 2), torch.arange(2))
    assert _state_equal(before, q.state_dict())


def test_gather_distributed_without_process_group_is_a_noop():
    a = AdaptiveQueue(size=9, dim=3, adaptation="xbn", gather_distributed=True)
    b = AdaptiveQueue(size=9, dim=3, adaptation="xbn")
    for x, y in _batches(5, 4, 3):
        a.update(x, y)
        b.update(x, y)
    assert _state_equal(a.state_dict(), b.state_dict())


# ---------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device", DEVICES)
def test_device_move_and_input_on_queue_device(device):
    batches = _batches(6, 4, 5, seed=7)
    q = AdaptiveQueue(size=10, dim=5, adaptation="axbn", kalman_r=1.0).to(device)
    for name, buf in q.named_buffers():
        assert buf.device.type == device, name
    for x, y in batches:
        q.update(x.to(device), y.to(device))
    ref = AdaptiveQueue(size=10, dim=5, adaptation="axbn", kalman_r=1.0)
    for x, y in batches:
        ref.update(x, y)
    assert_close(q.embeddings.cpu(), ref.embeddings, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_dict_round_trip_and_bf16_autocast():
    q = AdaptiveQueue(size=64, dim=16, adaptation="axbn").cuda()
    lin = torch.nn.Linear(16, 16).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(5):
            q.update(lin(torch.randn(8, 16, device="cuda")), torch.arange(8, device="cuda"))
    assert q.memory.dtype == torch.float32
    r = AdaptiveQueue(size=64, dim=16, adaptation="axbn").cuda()
    r.load_state_dict(q.state_dict())
    x = torch.randn(8, 16, device="cuda")
    q.update(x, torch.arange(8, device="cuda"))
    r.update(x, torch.arange(8, device="cuda"))
    assert torch.equal(q.memory, r.memory)


# ---------------------------------------------------------------------------------------------- float64 storage
@pytest.mark.parametrize("adaptation", ["none", "xbn", "axbn"])
def test_float64_storage_is_float64_throughout(adaptation):
    """A float64 queue keeps float64 input digits, float64 filter state, and matches the float64
    reference to float64 rounding (a float32 step anywhere would leave errors of 1e-7)."""
    kw = dict(p0=1.0, q=0.05, r=4.0, gain_every=1)
    batches = [(x.double() + 1e-9 * torch.arange(x.shape[1]), y) for x, y in _batches(14, 6, 4, seed=8)]
    q = AdaptiveQueue(size=10, dim=4, adaptation=adaptation, dtype=torch.float64, kalman_p0=kw["p0"],
                      kalman_q=kw["q"], kalman_r=kw["r"])
    assert q.read_dtype == torch.float64
    assert all(b.dtype in (torch.float64, torch.long, torch.bool) for b in q.buffers())
    ref = RefQueue(10, adaptation, **kw)
    for x, y in batches:
        q.update(x, y)
        rows = x.tolist()
        ref.adapt(rows)
        ref.enqueue(rows, y.tolist())
    assert q.embeddings.dtype == q.valid_memory().dtype == torch.float64
    assert_close(q.embeddings, torch.tensor(ref.valid(), dtype=torch.float64), rtol=1e-11, atol=1e-11)
    if adaptation == "axbn":
        assert_close(q.adaptation.mean_estimate, torch.tensor(ref.kf_mean.u, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    if adaptation == "none":  # stored as given, to the last digit
        assert torch.equal(q.embeddings, torch.tensor(ref.valid(), dtype=torch.float64))
    # state dict round trip keeps float64
    b = AdaptiveQueue(size=10, dim=4, adaptation=adaptation, dtype=torch.float64, kalman_r=4.0)
    b.load_state_dict(q.state_dict())
    assert _state_equal(b.state_dict(), q.state_dict())
    # .float() turns all of it to float32 (the float64 statistics stay float64, as for any queue)
    q.float()
    assert q.memory.dtype == torch.float32 and q.embeddings.dtype == torch.float32
    if adaptation == "axbn":
        assert q.adaptation.mean_estimate.dtype == torch.float32
