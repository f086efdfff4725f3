"""Full-covariance XBN (``adaptation="xbn-cov"``) against a plain float64 reference (loops + numpy's eigh)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from xbn_queue import AdaptiveQueue, XBNCov
from xbn_queue import functional as F

from .reference import ref_xbn


def ref_mean_cov(rows):
    n, d = len(rows), len(rows[0])
    mean = [sum(r[j] for r in rows) / n for j in range(d)]
    cov = [[sum((r[i] - mean[i]) * (r[j] - mean[j]) for r in rows) / (n - 1) for j in range(d)] for i in range(d)]
    return mean, cov


def ref_sqrt(mat, inverse=False, eps=0.0, floor=1e-10):
    """Symmetric (inverse) square root through numpy's float64 eigendecomposition."""
    val, vec = np.linalg.eigh(np.array(mat, dtype=np.float64))
    val = np.clip(val, 0, None)
    if inverse:
        f = np.array([1 / (math.sqrt(v) + eps) if v > floor * max(val.max(), 1e-300) else 0.0 for v in val])
    else:
        f = np.sqrt(val)
    return (vec * f) @ vec.T


def ref_match(rows, t_mean, t_cov, eps):
    m, c = ref_mean_cov(rows)
    a = ref_sqrt(c, inverse=True, eps=eps) @ ref_sqrt(t_cov)
    return [list((np.array(r) - np.array(m)) @ a + np.array(t_mean)) for r in rows]


class RefCovQueue:
    """Ring buffer + the scalar-gain covariance Kalman filter of XBNCov, float64 lists, step by step."""

    def __init__(self, size, eps=1e-6, q=0.0246, p0=1.0, shrinkage=0.0):
        self.size, self.eps, self.q, self.p0, self.shrinkage = size, eps, q, p0, shrinkage
        self.rows, self.ptr, self.t = [None] * size, 0, 0
        self.T = self.P = None

    def valid(self):
        return [r for r in self.rows if r is not None]

    def update(self, batch):
        b = len(batch)
        if len(self.valid()) >= 2 and b >= 2:
            bm, s = ref_mean_cov(batch)
            d = len(s)
            r = sum(s[i][j] ** 2 + s[i][i] * s[j][j] for i in range(d) for j in range(d)) / (d * d) / (b - 1)
            if self.t == 0:
                self.T, self.P = [row[:] for row in s], self.p0 * r
            else:
                self.P += self.q * r
                k = self.P / (self.P + r)
                self.T = [[self.T[i][j] + k * (s[i][j] - self.T[i][j]) for j in range(d)] for i in range(d)]
                self.P = (1 - k) * self.P
            self.t += 1
            target = [[self.T[i][j] * (1 - self.shrinkage) + (self.T[i][j] * self.shrinkage if i == j else 0)
                       for j in range(d)] for i in range(d)]
            n = len(self.valid())
            new = ref_match(self.valid(), bm, target, self.eps)
            for i in range(n):
                self.rows[i] = new[i]
        for row in batch:
            self.rows[self.ptr] = list(row)
            self.ptr = (self.ptr + 1) % self.size


def _stream(steps, b, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)  # correlated dimensions: a rotation the diagonal cannot follow
    out = []
    for t in range(steps):
        rot = torch.linalg.matrix_exp(0.05 * t * (mix - mix.t()))  # (D, D) slowly rotating
        out.append((torch.randn(b, d, generator=g) * torch.linspace(0.5, 2, d)) @ mix @ rot + 0.2 * t)
    return out


def test_covariance_matching_gives_the_target_moments_and_is_eq6_for_diagonal_covariances():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 5, generator=g, dtype=torch.float64)
    t_cov, t_mean = w @ w.t() + 0.1 * torch.eye(5, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    m, c = F.mean_cov(z)
    r_mean, r_cov = ref_mean_cov(z.tolist())
    assert_close(m, torch.tensor(r_mean, dtype=torch.float64))
    assert_close(c, torch.tensor(r_cov, dtype=torch.float64))
    a, b = F.covariance_matching_affine(m, c, t_mean, t_cov, eps=0.0)
    out = F.apply_linear_(z.clone(), a, b)
    expected = torch.tensor(ref_match(z.tolist(), t_mean.tolist(), t_cov.tolist(), 0.0), dtype=torch.float64)
    assert_close(out, expected, rtol=1e-10, atol=1e-10)
    o_mean, o_cov = F.mean_cov(out)
    assert_close(o_mean, t_mean, rtol=1e-10, atol=1e-10)
    assert_close(o_cov, t_cov, rtol=1e-9, atol=1e-9)
    # diagonal source and target: Eq. 6, dimension by dimension
    zd = torch.randn(30, 4, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    _, cd = F.mean_cov(zd)
    md = zd.mean(0)
    t_std = torch.tensor([1.0, 0.2, 4.0, 0.7], dtype=torch.float64)
    a, b = F.covariance_matching_affine(md, torch.diag(torch.diagonal(cd)), md * 0 + 1, torch.diag(t_std**2), eps=1e-6)
    s_std = zd.std(0)
    got = zd @ a + b
    want = torch.tensor(ref_xbn(zd.tolist(), [1.0] * 4, t_std.tolist(), 1e-6), dtype=torch.float64)
    assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert s_std.min() > 0


def test_rank_deficient_memory_gives_finite_rows_at_the_target_mean_outside_its_span():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 6, generator=g, dtype=torch.float64)  # 3 rows in 6 dimensions: rank 2
    m, c = F.mean_cov(z)
    a, b = F.covariance_matching_affine(m, c, torch.zeros(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64))
    out = z @ a + b
    assert torch.isfinite(out).all() and float(out.abs().max()) < 10


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("shrinkage", [0.0, 0.3])
def test_xbn_cov_queue_matches_the_float64_reference(dtype, tol, shrinkage):
    size, b, d = 23, 6, 4  # 23 is not a multiple of 6: the memory wraps
    q = AdaptiveQueue(size=size, dim=d, adaptation=XBNCov(d, shrinkage=shrinkage), dtype=dtype)
    ref = RefCovQueue(size, shrinkage=shrinkage)
    for x in _stream(12, b, d, seed=2):
        q.update(x.to(dtype))
        ref.update(x.to(dtype).double().tolist())
    expected = torch.tensor(ref.valid(), dtype=torch.float64)
    scale = float(expected.abs().max())
    assert_close(q.embeddings.double(), expected, rtol=tol, atol=tol * scale)
    assert_close(q.adaptation.cov_estimate, torch.tensor(ref.T, dtype=torch.float64), rtol=tol, atol=tol * scale)
    assert q.adaptation.step.item() == ref.t == 11


def test_xbn_cov_by_name_state_dict_round_trip_reset_and_errors():
    a = AdaptiveQueue(size=20, dim=4, adaptation="xbn-cov")
    assert isinstance(a.adaptation, XBNCov) and a.adaptation.cov_estimate.dtype == torch.float64
    stream = _stream(10, 5, 4, seed=3)
    for x in stream[:5]:
        a.update(x)
    b = AdaptiveQueue(size=20, dim=4, adaptation="xbn-cov")
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.adaptation._t == 4
    for x in stream[5:]:
        a.update(x)
        b.update(x)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    a.float()
    assert a.adaptation.cov_estimate.dtype == torch.float64  # the filter stays float64
    a.reset()
    assert a.adaptation._t == 0 and not bool(a.adaptation.cov_estimate.any())
    with pytest.raises(ValueError, match="'xbn-cov' needs float32 or float64 storage"):
        AdaptiveQueue(size=8, dim=4, adaptation="xbn-cov", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="shrinkage must be in"):
        XBNCov(4, shrinkage=1.5)
    with pytest.raises(ValueError, match="q and p0 must be non-negative"):
        XBNCov(4, q=-1)
    with pytest.raises(NotImplementedError):
        XBNCov(4).target(torch.zeros(4), torch.ones(4), 2)


def test_steady_gain_of_the_default_filter():
    """q = 0.0246 (relative) gives the steady gain 0.145 the docstring states: constant batches drive P there."""
    f = XBNCov(3)
    s = torch.eye(3, dtype=torch.float64)
    for _ in range(200):
        f.target_covariance(torch.zeros(3, dtype=torch.float64), s, 16)
    assert abs(float(f.cov_gain) - 0.145) < 1e-3


def test_pml_dropin_and_lightly_bank_accept_xbn_cov():
    pytest.importorskip("pytorch_metric_learning")
    pytest.importorskip("lightly")
    from pytorch_metric_learning import losses

    from xbn_queue.lightly import AdaptiveMemoryBank
    from xbn_queue.pml import AdaptiveCrossBatchMemory

    loss_fn = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), 4, memory_size=16, adaptation="xbn-cov")
    bank = AdaptiveMemoryBank(size=(16, 4), adaptation="xbn-cov")
    for x in _stream(6, 5, 4, seed=4):
        assert torch.isfinite(loss_fn(x, torch.arange(5) % 2))
        _, neg = bank(x, update=True)
    assert bank.normalize and neg.shape == (4, 16)
