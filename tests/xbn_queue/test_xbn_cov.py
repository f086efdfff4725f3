"""Full-covariance XBN (``adaptation="xbn-cov"``) against plain float64 references (loops + numpy's eigh).

The references here follow the *stated* estimator (``XBNCov``'s docstring), written differently from
the code: the filter's target is an explicit weighted sum of the covariances it has seen (weights
``w_s = K_s prod_{u > s} (1 - K_u)``), not a recursion on a matrix, and its first measurement is the
memory's own covariance whenever the memory holds more than ``D`` rows.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from xbn_queue import AdaptiveQueue, XBNCov, prefill
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


def ref_noise(c, dof):
    """Mean Wishart variance of the entries of a sample covariance, in loops."""
    d = len(c)
    return sum(c[i][j] ** 2 + c[i][i] * c[j][j] for i in range(d) for j in range(d)) / (d * d) / dof


def ref_shrink(c, v):
    """Off-diagonal entries times (1 - lam), lam = v/(1+v) sum_{i!=j} (c_ij^2 + c_ii c_jj) / sum_{i!=j} c_ij^2."""
    d = len(c)
    num = sum(c[i][j] ** 2 + c[i][i] * c[j][j] for i in range(d) for j in range(d) if i != j) * v / (1 + v)
    den = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    lam = 1.0 if den == 0 else min(1.0, num / den)
    return [[c[i][j] * (1 if i == j else 1 - lam) for j in range(d)] for i in range(d)], lam


class RefCovQueue:
    """Ring buffer + the stated covariance estimator, float64 lists, step by step.

    The filter keeps the list of covariances it measured and their gains; the estimate is their
    explicit weighted sum. The first measurement is the memory's covariance when the memory holds more
    than ``D`` rows (then the batch is a second measurement in the same step), else the batch's.
    """

    def __init__(self, size, d, eps=1e-6, q=0.0246, p0=1.0, shrinkage="auto"):
        self.size, self.d, self.eps, self.q, self.p0, self.shrinkage = size, d, eps, q, p0, shrinkage
        self.rows, self.ptr, self.t = [None] * size, 0, 0
        self.seen, self.gains, self.dofs, self.P = [], [], [], None  # covariances, gains, degrees of freedom

    def valid(self):
        return [r for r in self.rows if r is not None]

    def estimate(self):
        """T = sum_s w_s C_s and v = sum_s w_s^2 / dof_s, w_s = K_s prod_{u > s} (1 - K_u)."""
        d, n = self.d, len(self.seen)
        w = [self.gains[s] * math.prod(1 - self.gains[u] for u in range(s + 1, n)) for s in range(n)]
        t = [[sum(w[s] * self.seen[s][i][j] for s in range(n)) for j in range(d)] for i in range(d)]
        return t, sum(w[s] ** 2 / self.dofs[s] for s in range(n))

    def measure(self, c, dof):
        r = ref_noise(c, dof)
        if not self.seen:
            k, self.P = 1.0, self.p0 * r
        else:
            self.P += self.q * r
            k = self.P / (self.P + r)
            self.P *= 1 - k
        self.seen.append(c)
        self.gains.append(k)
        self.dofs.append(dof)

    def target(self):
        t, v = self.estimate()
        if self.shrinkage == "auto":
            return ref_shrink(t, v)[0]
        a = self.shrinkage
        return [[t[i][j] * (1 if i == j else 1 - a) for j in range(self.d)] for i in range(self.d)]

    def update(self, batch, adapt=True):
        b, n = len(batch), len(self.valid())
        if adapt and n >= 2 and b >= 2:
            bm, s = ref_mean_cov(batch)
            if not self.seen and n > self.d:
                self.measure(ref_mean_cov(self.valid())[1], n - 1)
            self.measure(s, b - 1)
            self.t += 1
            new = ref_match(self.valid(), bm, self.target(), self.eps)
            for i in range(n):
                self.rows[i] = new[i]
        self.adapted = [list(r) for r in self.valid()]  # the stored rows after the adaptation, before the enqueue
        for row in batch:
            self.rows[self.ptr] = list(row)
            self.ptr = (self.ptr + 1) % self.size


def _stream(steps, b, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)  # correlated dimensions
    out = []
    for t in range(steps):
        rot = torch.linalg.matrix_exp(0.05 * t * (mix - mix.t()))  # (D, D) slowly rotating
        out.append((torch.randn(b, d, generator=g) * torch.linspace(0.5, 2, d)) @ mix @ rot + 0.2 * t)
    return out


def _eig_ratio(rows: torch.Tensor) -> float:
    """Smallest over largest eigenvalue of the rows' covariance (float64)."""
    val = torch.linalg.eigvalsh(torch.cov(rows.double().t()))
    return float(val[0] / val[-1])


# ---------------------------------------------------------------------------------------------- the map
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
    o_mean, o_cov = ref_mean_cov(out.tolist())
    assert_close(torch.tensor(o_mean, dtype=torch.float64), t_mean, rtol=1e-10, atol=1e-10)
    assert_close(torch.tensor(o_cov, dtype=torch.float64), t_cov, rtol=1e-9, atol=1e-9)
    # diagonal source and target: Eq. 6, dimension by dimension
    zd = torch.randn(30, 4, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    _, cd = F.mean_cov(zd)
    md = zd.mean(0)
    t_std = [1.0, 0.2, 4.0, 0.7]
    a, b = F.covariance_matching_affine(md, torch.diag(torch.diagonal(cd)), md * 0 + 1, torch.diag(torch.tensor(t_std, dtype=torch.float64) ** 2), eps=1e-6)
    got = zd @ a + b
    want = torch.tensor(ref_xbn(zd.tolist(), [1.0] * 4, t_std, 1e-6), dtype=torch.float64)
    assert_close(got, want, rtol=1e-10, atol=1e-10)
    for j in range(4):  # each column: mean 1, std t_std * s_std / (s_std + eps), in plain float64
        col, src = [r[j] for r in got.tolist()], [r[j] for r in zd.tolist()]
        mean = sum(col) / len(col)
        std = math.sqrt(sum((x - mean) ** 2 for x in col) / (len(col) - 1))
        s_mean = sum(src) / len(src)
        s_std = math.sqrt(sum((x - s_mean) ** 2 for x in src) / (len(src) - 1))
        assert abs(mean - 1.0) < 1e-12 and abs(std - t_std[j] * s_std / (s_std + 1e-6)) < 1e-12


def test_rank_deficient_memory_goes_to_the_target_mean_outside_its_span():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 6, generator=g, dtype=torch.float64)  # 3 rows in 6 dimensions: centred rank 2
    t_mean = torch.arange(6, dtype=torch.float64) + 3.0
    m, c = F.mean_cov(z)
    a, b = F.covariance_matching_affine(m, c, t_mean, torch.eye(6, dtype=torch.float64), eps=0.0)
    dev = np.array((z @ a + b).tolist()) - np.array(t_mean.tolist())  # (3, 6) rows minus the target mean
    rows = np.array(z.tolist())
    basis = np.linalg.svd(rows - rows.mean(0))[2][:2]  # (2, 6) orthonormal span of the centred rows
    outside = dev - dev @ basis.T @ basis  # (3, 6) the part outside the span
    assert np.abs(outside).max() < 1e-10  # at the target mean there
    assert np.abs(dev.mean(0)).max() < 1e-10  # the rows' mean is the target mean
    # inside the span the target covariance (I) restricted to it: the projector onto the span
    assert np.abs(dev.T @ dev / 2 - basis.T @ basis).max() < 1e-10


def test_a_rotation_is_not_corrected_but_a_stretch_along_the_principal_axes_is():
    """The documented limit: second moments cannot identify a rotation. With an isotropic memory a
    rotated truth has the same moments, so the map is the identity and the error is what it was."""
    g = torch.Generator().manual_seed(5)
    n, d = 400, 6
    raw = np.array(torch.randn(n, d, generator=g, dtype=torch.float64).tolist())
    raw -= raw.mean(0)
    val, vec = np.linalg.eigh(raw.T @ raw / (n - 1))
    z = raw @ (vec / np.sqrt(val)) @ vec.T  # (n, d) covariance exactly I
    skew = np.array(torch.randn(d, d, generator=g, dtype=torch.float64).tolist())
    rot = torch.linalg.matrix_exp(torch.tensor(skew - skew.T)).numpy()  # (d, d) orthogonal
    for truth in (z @ rot, z @ rot + 1.5):
        src = torch.tensor(z)
        a, b = F.covariance_matching_affine(*F.mean_cov(src), *F.mean_cov(torch.tensor(truth)), eps=0.0)
        adapted = np.array((src @ a + b).tolist()) - (truth.mean(0) - z.mean(0))
        before = np.linalg.norm(z - (truth - truth.mean(0)))
        assert before > 0.5 * np.linalg.norm(z)  # the rotation is large
        assert np.linalg.norm(adapted - z) < 1e-8 * np.linalg.norm(z)  # A = I: the rows stay
        assert abs(np.linalg.norm(adapted - (truth - truth.mean(0))) - before) < 1e-8 * before
    # an anisotropic memory stretched along its own principal axes: followed exactly
    q_basis = np.linalg.qr(skew)[0]  # (d, d) orthonormal
    z2 = z @ np.diag([0.5, 1, 1.5, 2, 3, 4]) @ q_basis.T  # covariance Q diag(s^2) Q^T
    stretch = q_basis @ np.diag([2.0, 0.5, 1.0, 3.0, 0.7, 1.2]) @ q_basis.T  # symmetric, commutes with it
    truth2 = z2 @ stretch - 0.4
    a, b = F.covariance_matching_affine(*F.mean_cov(torch.tensor(z2)), *F.mean_cov(torch.tensor(truth2)), eps=0.0)
    assert np.abs(np.array((torch.tensor(z2) @ a + b).tolist()) - truth2).max() < 1e-8


# ---------------------------------------------------------------------------------------------- the estimator
def test_shrink_to_diagonal_matches_the_plain_formula():
    g = torch.Generator().manual_seed(6)
    for v in (0.0, 0.01, 0.2, 5.0):
        w = torch.randn(5, 3, generator=g, dtype=torch.float64)
        c = w @ w.t() + 0.2 * torch.eye(5, dtype=torch.float64)
        out, lam = F.shrink_to_diagonal(c, torch.tensor(v, dtype=torch.float64))
        want, want_lam = ref_shrink(c.tolist(), v)
        assert_close(out, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        assert abs(float(lam) - want_lam) < 1e-12
    diag = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))  # nothing off the diagonal
    out, lam = F.shrink_to_diagonal(diag, torch.tensor(0.1, dtype=torch.float64))
    assert float(lam) == 1.0 and torch.equal(out, diag)
    assert abs(float(F.wishart_noise(c, 7)) - ref_noise(c.tolist(), 7)) < 1e-12
    # one batch of 4 rows in 10 dimensions (rank 3): the shrunk estimate is positive definite, its
    # smallest eigenvalue at least v / (1 + v) times the smallest diagonal entry (numpy's eigvalsh)
    x = torch.randn(4, 10, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    c = F.mean_cov(x)[1]
    out, lam = F.shrink_to_diagonal(c, torch.tensor(1 / 3, dtype=torch.float64))
    smallest = np.linalg.eigvalsh(np.array(out.tolist()))[0]
    assert smallest >= 0.25 * min(c[i, i].item() for i in range(10)) * (1 - 1e-12) and float(lam) >= 0.25


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("shrinkage", ["auto", 0.0, 0.3])
@pytest.mark.parametrize("prefilled", [False, True], ids=["empty", "prefilled"])
def test_xbn_cov_queue_matches_the_float64_reference(dtype, tol, shrinkage, prefilled):
    size, b, d = 23, 4, 6  # rank-deficient batches (rank 3 in 6 dimensions); 23 is not a multiple of 4
    q = AdaptiveQueue(size=size, dim=d, adaptation=XBNCov(d, shrinkage=shrinkage), dtype=dtype)
    ref = RefCovQueue(size, d, shrinkage=shrinkage)
    if prefilled:  # a full memory written without adaptation (as prefill / a loaded PML state does)
        rows = torch.randn(size, d, generator=torch.Generator().manual_seed(9)) * 2.0
        q.enqueue(rows.to(dtype))
        ref.update(rows.to(dtype).double().tolist(), adapt=False)
    for x in _stream(12, b, d, seed=2):
        q.update(x.to(dtype))
        ref.update(x.to(dtype).double().tolist())
    assert ref.dofs[0] == (size - 1 if prefilled else b - 1)  # the reference started where it should
    expected = torch.tensor(ref.valid(), dtype=torch.float64)
    scale = float(expected.abs().max())
    assert_close(q.embeddings.double(), expected, rtol=tol, atol=tol * scale)
    t, v = ref.estimate()
    assert_close(q.adaptation.cov_estimate, torch.tensor(t, dtype=torch.float64), rtol=tol, atol=tol * scale**2)
    assert abs(float(q.adaptation.cov_dof_inv) - v) < tol * v
    assert q.adaptation._t == int(q.adaptation.step) == ref.t == (12 if prefilled else 11)


@pytest.mark.parametrize("dim, size", [(64, 1024), (256, 2048)])
def test_a_prefilled_memory_keeps_full_rank_under_rank_deficient_batches(dim, size):
    """Issue 22's case. The batches (16 rows) have rank 15; the memory must not be mapped onto it.

    Threshold 0.1 on the smallest / largest eigenvalue of the untouched prefilled rows: the truth is
    I (ratio 1); n i.i.d. rows in D dimensions alone give about ((1 - r) / (1 + r))^2, r = sqrt(D / n)
    (Marchenko-Pastur): 0.33 for D 64, n 864 and 0.21 for D 256, n 1888; a collapsed memory gives
    rank 15 and a ratio below 1e-6."""
    g = torch.Generator().manual_seed(0)
    q = AdaptiveQueue(size=size, dim=dim, adaptation="xbn-cov")
    prefill(q, torch.nn.Identity(), [torch.randn(256, dim, generator=g) for _ in range(size // 256)], progress=False)
    assert q.is_full and int(q.ptr) == 0
    for _ in range(10):
        q.update(torch.randn(16, dim, generator=g))
    kept = q.embeddings[160:].double()  # (size - 160, D) the prefilled rows not yet overwritten
    assert int(torch.linalg.matrix_rank(kept - kept.mean(0))) == dim
    assert _eig_ratio(kept) > 0.1


@pytest.mark.parametrize("dim", [64, 256])
def test_rank_deficient_batches_from_an_empty_memory_give_a_well_conditioned_memory(dim):
    """No prefill: the memory fills from batches of 16 (rank 15) in 64 or 256 dimensions.

    Threshold 0.2 on the smallest / largest eigenvalue of the adapted rows (their covariance is the
    target): the truth is I; the shrunk target is about its diagonal, entries 1 +- 3 sqrt(2 v) with
    v about 1 / 192, so a ratio above 0.5. The unshrunk filter (``shrinkage=0``) spreads as a sample
    covariance of about 192 rows, ((1 - r) / (1 + r))^2 with r = sqrt(D / 192): 0.07 for D 64 (0.10
    measured), 0 for D 256 (rank-deficient: 0.005 measured)."""
    ratios = {}
    for shrinkage in ("auto", 0.0):
        g = torch.Generator().manual_seed(3)
        q = AdaptiveQueue(size=1024, dim=dim, adaptation=XBNCov(dim, shrinkage=shrinkage))
        for _ in range(80):
            q.update(torch.randn(16, dim, generator=g))
        ratios[shrinkage] = _eig_ratio(q.embeddings[:-16])  # the adapted rows (the last batch is fresh)
    assert ratios["auto"] > 0.2 > ratios[0.0], ratios


def test_target_error_at_small_batches_is_within_the_stated_error():
    """Issue 22's noise case: D 256, B 16, i.i.d. N(0, I) batches, 300 steps (truth: I).

    The stated error (``F.shrink_to_diagonal``) for Sigma = I is ``2 D v``, against ``(D^2 + D) v``
    unshrunk; ``v`` is the filter's sum of squared weights per degree of freedom, in the steady state
    ``K / ((2 - K)(B - 1))``. The realised error is a sum of D independent squared errors (relative
    spread about sqrt(2 / D) = 0.09), so a factor 1.5 is more than 5 spreads."""
    d, b = 256, 16
    f = XBNCov(d)
    g = torch.Generator().manual_seed(4)
    for _ in range(300):
        x = torch.randn(b, d, generator=g, dtype=torch.float64)
        _, target = f.target_covariance(*F.mean_cov(x), b)
    k, v = float(f.cov_gain), float(f.cov_dof_inv)
    assert abs(v - k / ((2 - k) * (b - 1))) < 0.05 * v  # near the steady state (K moves with each batch's R_t)
    eye = torch.eye(d, dtype=torch.float64)
    err, raw = float((target - eye).square().sum()), float((f.cov_estimate - eye).square().sum())
    assert err < 1.5 * 2 * d * v, (err, 2 * d * v)
    assert raw > 0.5 * (d * d + d) * v  # the unshrunk filter has the error stated for it
    val = torch.linalg.eigvalsh(target)
    assert 0.5 < float(val[0]) and float(val[-1]) < 1.6, (float(val[0]), float(val[-1]))


def test_target_error_with_a_correlated_covariance_is_near_the_oracle_error():
    """A known correlated covariance (AR(1), Sigma_ij = 0.6^|i-j|, D 64, B 16): the error after 300 steps
    against the expected error at the optimal intensity, from the formula, written plainly here."""
    d, b = 64, 16
    sigma = [[0.6 ** abs(i - j) for j in range(d)] for i in range(d)]
    chol = torch.linalg.cholesky(torch.tensor(sigma, dtype=torch.float64))
    f = XBNCov(d)
    g = torch.Generator().manual_seed(8)
    for _ in range(300):
        x = torch.randn(b, d, generator=g, dtype=torch.float64) @ chol.t()
        _, target = f.target_covariance(*F.mean_cov(x), b)
    v = float(f.cov_dof_inv)
    var_off = sum(v * (sigma[i][j] ** 2 + sigma[i][i] * sigma[j][j]) for i in range(d) for j in range(d) if i != j)
    sig_off = sum(sigma[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    lam = var_off / (var_off + sig_off)
    oracle = v * sum(2 * sigma[i][i] ** 2 for i in range(d)) + (1 - lam) * var_off
    unshrunk = v * (sum(sigma[i][j] ** 2 for i in range(d) for j in range(d)) + sum(sigma[i][i] for i in range(d)) ** 2)
    err = float((target - torch.tensor(sigma, dtype=torch.float64)).square().sum())
    assert err < 1.25 * oracle and oracle < 0.8 * unshrunk, (err, oracle, unshrunk)
    assert abs(float(f.cov_intensity) - lam) < 0.25 * lam  # the estimated intensity is near the optimum


# ---------------------------------------------------------------------------------------------- state
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
    with pytest.raises(ValueError, match=r"shrinkage must be 'auto' or in \[0, 1\], got 1.5"):
        XBNCov(4, shrinkage=1.5)
    with pytest.raises(ValueError, match=r"shrinkage must be 'auto' or in \[0, 1\], got 'fast'"):
        XBNCov(4, shrinkage="fast")
    with pytest.raises(ValueError, match="q and p0 must be non-negative"):
        XBNCov(4, q=-1)
    with pytest.raises(NotImplementedError):
        XBNCov(4).target(torch.zeros(4), torch.ones(4), 2)


def test_a_version_0_3_0_checkpoint_loads_and_continues():
    """A 0.3.0 checkpoint has no ``cov_dof_inv`` / ``cov_intensity``: it loads (strictly), ``v`` is
    ``P / mean(T_ij^2 + T_ii T_jj)`` (computed here in loops), and the next steps run."""
    a = AdaptiveQueue(size=20, dim=4, adaptation="xbn-cov")
    stream = _stream(8, 5, 4, seed=7)
    for x in stream[:5]:
        a.update(x)
    old = copy.deepcopy(a.state_dict())
    del old["adaptation.cov_dof_inv"], old["adaptation.cov_intensity"]
    b = AdaptiveQueue(size=20, dim=4, adaptation="xbn-cov")
    b.load_state_dict(old)
    t, p = a.adaptation.cov_estimate.tolist(), float(a.adaptation.cov_variance)
    want = p / (sum(t[i][j] ** 2 + t[i][i] * t[j][j] for i in range(4) for j in range(4)) / 16)
    assert abs(float(b.adaptation.cov_dof_inv) - want) < 1e-12 * want
    assert b.adaptation._t == 4 and float(b.adaptation.cov_intensity) == 0.0
    for x in stream[5:]:
        b.update(x)
    assert b.adaptation._t == 7 and bool(torch.isfinite(b.embeddings).all())


def test_steady_gain_of_the_default_filter():
    """q = 0.0246 (relative) gives the steady gain 0.145 the docstring states: constant batches drive P there."""
    f = XBNCov(3)
    s = torch.eye(3, dtype=torch.float64)
    for _ in range(200):
        f.target_covariance(torch.zeros(3, dtype=torch.float64), s, 16)
    assert abs(float(f.cov_gain) - 0.145) < 1e-3


# ---------------------------------------------------------------------------------------------- drop-ins
def test_pml_dropin_and_lightly_bank_adapt_their_memory_as_the_reference_does():
    pytest.importorskip("pytorch_metric_learning")
    pytest.importorskip("lightly")
    from pytorch_metric_learning import losses

    from xbn_queue.lightly import AdaptiveMemoryBank
    from xbn_queue.pml import AdaptiveCrossBatchMemory

    loss_fn = AdaptiveCrossBatchMemory(losses.ContrastiveLoss(), 4, memory_size=16, adaptation="xbn-cov")
    ref = RefCovQueue(16, 4)
    for x in _stream(6, 5, 4, seed=4):
        assert torch.isfinite(loss_fn(x, torch.arange(5) % 2))
        ref.update(x.double().tolist())
    want = torch.tensor(ref.valid(), dtype=torch.float64)
    assert_close(loss_fn.queue.embeddings.double(), want, rtol=2e-4, atol=2e-4 * float(want.abs().max()))

    bank = AdaptiveMemoryBank(size=(16, 4), adaptation="xbn-cov")  # starts empty; batches of 4 fill the ring exactly
    ref = RefCovQueue(16, 4)
    for x in _stream(7, 4, 4, seed=5):
        _, neg = bank(x, update=True)
        ref.update(x.double().tolist())
        if len(ref.adapted) < 2:
            continue
        want = torch.nn.functional.normalize(torch.tensor(ref.adapted, dtype=torch.float64), dim=1).t()  # (D, n)
        assert neg.shape == want.shape and bank.normalize
        assert_close(neg.double(), want, rtol=2e-4, atol=2e-4)


def test_cov_cost_benchmark_runs_on_a_tiny_problem(tmp_path, monkeypatch):
    """``benchmarks/cov_cost.py`` (the cost numbers in BENCHMARKS.md): one round on a tiny problem
    writes every column, the unshrunk 0.3.0 target included."""
    import importlib
    import json
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    for name in ("common", "cov_cost"):
        sys.modules.pop(name, None)
    cov_cost = importlib.import_module("cov_cost")
    out = tmp_path / "cc.json"
    cov_cost.main(["--dims", "8", "--sizes", "64", "--batch", "8", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert set(cov_cost.COLUMNS) <= set(row) and row["unshrunk_ms"] > 0 and row["shrink_ratio"] > 0
