"""Tests for xbn_queue.drift against plain float64 references."""

import math

import pytest
import torch
from torch import nn

from xbn_queue import AdaptiveQueue
from xbn_queue.drift import DriftMonitor, feature_drift, memory_staleness, queue_staleness


def ref_row_l2(a, b):
    """Plain float64 loop: ||a_i - b_i||_2 for each row."""
    out = []
    for i in range(a.shape[0]):
        s = 0.0
        for j in range(a.shape[1]):
            s += (float(a[i, j]) - float(b[i, j])) ** 2
        out.append(math.sqrt(s))
    return out


def ref_cosine(a, b):
    out = []
    for i in range(a.shape[0]):
        dot = sum(float(a[i, j]) * float(b[i, j]) for j in range(a.shape[1]))
        na = math.sqrt(sum(float(a[i, j]) ** 2 for j in range(a.shape[1])))
        nb = math.sqrt(sum(float(b[i, j]) ** 2 for j in range(a.shape[1])))
        out.append(dot / max(na * nb, 1e-8))
    return out


def test_feature_drift_matches_reference():
    g = torch.Generator().manual_seed(0)
    z_old = torch.randn(13, 7, generator=g)
    z_new = z_old + 0.3 * torch.randn(13, 7, generator=g)
    d = ref_row_l2(z_new.double(), z_old.double())
    out = feature_drift(z_new, z_old)
    assert set(out) == {"mean", "max"}
    assert isinstance(out["mean"], float) and isinstance(out["max"], float)
    assert out["mean"] == pytest.approx(sum(d) / len(d), rel=1e-6)
    assert out["max"] == pytest.approx(max(d), rel=1e-6)


def test_feature_drift_bf16_and_identical():
    z = torch.randn(5, 4)
    assert feature_drift(z, z) == {"mean": 0.0, "max": 0.0}
    zb = z.bfloat16()
    out = feature_drift(zb, z)
    ref = ref_row_l2(zb.double(), z.double())
    assert out["max"] == pytest.approx(max(ref), rel=1e-5)


@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.randn(3, 4), torch.randn(4, 4), "same shape"),
        (torch.randn(3), torch.randn(3), "2-D"),
        (torch.randn(0, 4), torch.randn(0, 4), "at least one row"),
        (torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), "floating point"),
    ],
)
def test_feature_drift_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        feature_drift(a, b)


def test_memory_staleness_matches_reference():
    g = torch.Generator().manual_seed(1)
    stored = torch.randn(9, 5, generator=g)
    fresh = stored * 1.5 + 0.2 * torch.randn(9, 5, generator=g)
    out = memory_staleness(stored, fresh)
    d = ref_row_l2(stored.double(), fresh.double())
    c = ref_cosine(stored.double(), fresh.double())
    assert out["mean_l2"] == pytest.approx(sum(d) / len(d), rel=1e-6)
    assert out["max_l2"] == pytest.approx(max(d), rel=1e-6)
    assert out["mean_cosine"] == pytest.approx(sum(c) / len(c), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        memory_staleness(stored, fresh[:3])


def test_queue_staleness_matches_by_id_with_wraparound():
    g = torch.Generator().manual_seed(2)
    q = AdaptiveQueue(size=10, dim=4, adaptation="none")
    all_emb = torch.randn(30, 4, generator=g)
    # 3 batches of 4 into a memory of 10: wraps; ids 0..11, rows 0..1 overwritten by ids 10, 11
    for k in range(3):
        q.enqueue(all_emb[4 * k : 4 * k + 4], ids=torch.arange(4 * k, 4 * k + 4))
    stored_ids = q.ids.tolist()
    stored = q.embeddings.double()
    # fresh embeddings for a shuffled set of ids, some stored (2, 5, 10, 11, 7), some not (0, 1, 25)
    fresh_ids = torch.tensor([11, 25, 2, 0, 7, 5, 10, 1])
    fresh = torch.randn(len(fresh_ids), 4, generator=g)
    pairs_s, pairs_f = [], []
    for r, sid in enumerate(stored_ids):
        for m, fid in enumerate(fresh_ids.tolist()):
            if sid == fid:
                pairs_s.append(stored[r])
                pairs_f.append(fresh[m].double())
    s = torch.stack(pairs_s)
    f = torch.stack(pairs_f)
    d = ref_row_l2(s, f)
    c = ref_cosine(s, f)
    out = queue_staleness(q, fresh_ids, fresh)
    assert out["count"] == 5
    assert out["mean_l2"] == pytest.approx(sum(d) / len(d), rel=1e-6)
    assert out["max_l2"] == pytest.approx(max(d), rel=1e-6)
    assert out["mean_cosine"] == pytest.approx(sum(c) / len(c), rel=1e-6)


def test_queue_staleness_no_match_and_errors():
    q = AdaptiveQueue(size=8, dim=3, adaptation="none")
    q.enqueue(torch.randn(4, 3), ids=torch.arange(4))
    out = queue_staleness(q, torch.tensor([100, 101]), torch.randn(2, 3))
    assert out["count"] == 0 and math.isnan(out["mean_l2"])
    with pytest.raises(ValueError, match="duplicates"):
        queue_staleness(q, torch.tensor([1, 1]), torch.randn(2, 3))
    with pytest.raises(ValueError, match="same length"):
        queue_staleness(q, torch.tensor([1, 2]), torch.randn(3, 3))
    with pytest.raises(ValueError, match="dim 3"):
        queue_staleness(q, torch.tensor([1, 2]), torch.randn(2, 5))
    no_ids = AdaptiveQueue(size=8, dim=3, adaptation="none")
    no_ids.enqueue(torch.randn(4, 3))
    with pytest.raises(ValueError, match="stores no ids"):
        queue_staleness(no_ids, torch.tensor([1]), torch.randn(1, 3))


def test_queue_staleness_xbn_removes_affine_drift():
    """Memory stored under an old model, adapted with the same samples under a new (per-dimension
    affine) model: XBN's memory equals the fresh embeddings, plain XBM's stays stale."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 8, generator=g)
    ids = torch.arange(32)
    z_old = x * 0.5 + 1.0
    z_new = x * torch.linspace(0.5, 2.0, 8) - 0.7
    stale = {}
    for a in ("none", "xbn"):
        q = AdaptiveQueue(size=32, dim=8, adaptation=a)
        q.enqueue(z_old, ids=ids)
        q.adapt(z_new)
        stale[a] = queue_staleness(q, ids.flip(0), z_new.flip(0))
    ref = ref_row_l2(z_old.double(), z_new.double())
    assert stale["none"]["count"] == stale["xbn"]["count"] == 32
    assert stale["none"]["mean_l2"] == pytest.approx(sum(ref) / len(ref), rel=1e-5)
    assert stale["xbn"]["max_l2"] < 1e-4
    assert stale["xbn"]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)


class _Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.lin(x))


def test_drift_monitor_records_reference_drift_every_n():
    torch.manual_seed(0)
    probe = torch.randn(10, 6)
    model = _Affine()
    model.train()
    monitor = DriftMonitor(probe, every=2)
    outs = []
    recs = []
    for step in range(7):
        rec = monitor.step(model, step)
        recs.append(rec)
        if step % 2 == 0:
            model.eval()
            with torch.no_grad():
                outs.append(model(probe).double())
            model.train()
        with torch.no_grad():
            model.lin.weight.add_(0.05 * torch.randn_like(model.lin.weight))
    assert model.training  # mode restored
    assert recs[0] is None and recs[1] is None and recs[3] is None
    assert [r["step"] for r in monitor.history] == [2, 4, 6]
    for k, r in enumerate(monitor.history):
        d = ref_row_l2(outs[k + 1], outs[k])
        assert r["mean"] == pytest.approx(sum(d) / len(d), rel=1e-5)
        assert r["max"] == pytest.approx(max(d), rel=1e-5)
    assert recs[2] == monitor.history[0]
    # BatchNorm running stats were not touched (eval mode during measurement)
    assert torch.equal(model.bn.running_mean, torch.zeros(3))


def test_drift_monitor_state_dict_round_trip():
    torch.manual_seed(1)
    probe = torch.randn(5, 6)
    lin = nn.Linear(6, 4)
    m1 = DriftMonitor(probe, every=1)
    for step in range(3):
        m1.step(lin, step)
        with torch.no_grad():
            lin.weight.mul_(1.1)
    sd = m1.state_dict()
    m2 = DriftMonitor(torch.zeros(5, 6), every=3)
    m2.load_state_dict(sd)
    assert torch.equal(m2.probe, probe)
    assert torch.equal(m2.prev, m1.prev)
    assert m2.history == m1.history and m2.every == 1
    r1 = m1.step(lin, 3)
    r2 = m2.step(lin, 3)
    assert r1 == r2 and r1 is not None
    assert len(m2.history) == 3


def test_drift_monitor_callable_and_errors():
    probe = torch.randn(4, 3)
    mon = DriftMonitor(probe)
    assert mon.step(lambda x: x * 2, 0) is None
    rec = mon.step(lambda x: x * 2 + 1, 1)
    assert rec["mean"] == pytest.approx(math.sqrt(3), rel=1e-6)
    assert rec["max"] == pytest.approx(math.sqrt(3), rel=1e-6)
    with pytest.raises(ValueError, match="N=4"):
        mon.step(lambda x: x[:2], 2)
    with pytest.raises(ValueError, match="shape changed"):
        mon.step(lambda x: torch.cat([x, x], 1), 3)
    with pytest.raises(ValueError, match="every"):
        DriftMonitor(probe, every=0)
    with pytest.raises(ValueError, match="probe_inputs"):
        DriftMonitor(torch.empty(0, 3))
    mon.reset()
    assert mon.history == [] and not mon.has_previous


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_drift_and_monitor():
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    out = feature_drift(a.cuda(), b.cuda())
    ref = feature_drift(a, b)
    assert out["mean"] == pytest.approx(ref["mean"], rel=1e-5)
    lin = nn.Linear(5, 3).cuda()
    mon = DriftMonitor(torch.randn(4, 5)).cuda()
    mon.step(lin, 0)
    with torch.no_grad():
        lin.weight.mul_(2)
    rec = mon.step(lin, 1)
    assert rec is not None and mon.prev.device.type == "cuda"


def test_moment_gap_against_a_plain_float64_loop():
    from xbn_queue.drift import moment_gap

    g = torch.Generator().manual_seed(0)
    fresh = torch.randn(40, 6, generator=g, dtype=torch.float64)
    fresh[:, 5] = 2.0  # a constant fresh dimension is left out
    stored = fresh * torch.linspace(0.5, 1.5, 6, dtype=torch.float64) + torch.linspace(-1, 1, 6, dtype=torch.float64)
    terms = []
    for d in range(5):
        s = [float(stored[i, d]) for i in range(40)]
        f = [float(fresh[i, d]) for i in range(40)]
        ms, mf = sum(s) / 40, sum(f) / 40
        ss = math.sqrt(sum((x - ms) ** 2 for x in s) / 39)
        sf = math.sqrt(sum((x - mf) ** 2 for x in f) / 39)
        terms.append((abs(ms - mf) + abs(ss - sf)) / sf)
    assert moment_gap(stored, fresh) == pytest.approx(sum(terms) / len(terms), rel=1e-12)  # both float64
    assert moment_gap(stored, fresh) > 0.1
    assert math.isnan(moment_gap(torch.ones(3, 2), torch.ones(3, 2)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        moment_gap(torch.ones(1, 2), torch.ones(1, 2))


def _plain_gap(stored, fresh):
    """moment_gap written out in float64 Python: per dimension, mean and Bessel-corrected std by loops."""
    n, d = len(stored), len(stored[0])
    terms = []
    for j in range(d):
        s = [float(stored[i][j]) for i in range(n)]
        f = [float(fresh[i][j]) for i in range(n)]
        ms, mf = sum(s) / n, sum(f) / n
        ss = math.sqrt(sum((x - ms) ** 2 for x in s) / (n - 1))
        sf = math.sqrt(sum((x - mf) ** 2 for x in f) / (n - 1))
        if sf > 0:
            terms.append((abs(ms - mf) + abs(ss - sf)) / sf)
    return sum(terms) / len(terms)


def test_moment_gap_of_an_affine_drift_and_after_matching_to_a_batch():
    """Closed form under a per-dimension affine drift; XBN's map to one batch's moments leaves a gap."""
    from xbn_queue import functional as F
    from xbn_queue.drift import moment_gap

    g = torch.Generator().manual_seed(1)
    fresh = torch.randn(200, 8, generator=g, dtype=torch.float64) * 0.7 + 0.2  # (N, D)
    a = torch.linspace(0.5, 1.6, 8, dtype=torch.float64)  # (D,) per-dimension scale, all > 0
    c = torch.linspace(-0.3, 0.4, 8, dtype=torch.float64)  # (D,) shift
    stored = fresh * a + c  # the stored rows: an old model's affine image of the same samples
    # mean(s) = a mean(f) + c and std(s) = a std(f), so the gap is exactly
    # mean_d (|(a - 1) mean(f) + c| + |a - 1| std(f)) / std(f)
    mf, sf = fresh.mean(0), fresh.std(0)
    exact = float(((((a - 1) * mf + c).abs() + (a - 1).abs() * sf) / sf).mean())
    assert moment_gap(stored, fresh) == pytest.approx(exact, rel=1e-12)  # float64 both
    assert moment_gap(stored, fresh) == pytest.approx(_plain_gap(stored.tolist(), fresh.tolist()), rel=1e-12)
    assert exact > 0.3
    # XBN (Eq. 6) matches the stored rows to the moments of one batch of 16 fresh rows, not of all 200:
    # the gap left is the batch's sampling error, not zero, and moment_gap measures it as the loop does
    batch = fresh[:16]  # (B, D)
    matched = F.match_moments(stored, stored.mean(0), stored.std(0), batch.mean(0), batch.std(0), eps=0.0)
    left = moment_gap(matched, fresh)
    assert left == pytest.approx(_plain_gap(matched.tolist(), fresh.tolist()), rel=1e-12)
    assert 0.01 < left < exact  # smaller than without adaptation, not removed
    # matched to all fresh rows' moments the gap is zero: the only case where it must vanish
    full = F.match_moments(stored, stored.mean(0), stored.std(0), fresh.mean(0), fresh.std(0), eps=0.0)
    assert moment_gap(full, fresh) == pytest.approx(0.0, abs=1e-12)
