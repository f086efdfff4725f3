"""The pure functions of xbn_queue.functional against plain float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from xbn_queue import functional as F

from .reference import RefKalman, ref_mean_std, ref_xbn


def test_moments_match_reference_and_torch_std():
    x = torch.randn(37, 6, dtype=torch.float64) * torch.arange(1, 7) + 3
    mean, std = F.moments(x)
    r_mean, r_std = ref_mean_std(x.tolist())
    assert_close(mean, torch.tensor(r_mean, dtype=torch.float64))
    assert_close(std, torch.tensor(r_std, dtype=torch.float64))
    assert_close(std, x.std(0))  # Bessel's correction, as torch.std


def test_moments_promote_low_precision():
    x = torch.randn(20, 3).to(torch.bfloat16)
    mean, std = F.moments(x)
    assert mean.dtype == std.dtype == torch.float32
    assert_close(std, x.float().std(0))


def test_match_moments_is_eq6():
    z = torch.randn(15, 4, dtype=torch.float64) * 2 + 1
    b = torch.randn(9, 4, dtype=torch.float64) * 0.3 - 1
    m_mean, m_std = F.moments(z)
    b_mean, b_std = F.moments(b)
    out = F.match_moments(z, m_mean, m_std, b_mean, b_std, eps=1e-3)
    ref = ref_xbn(z.tolist(), b_mean.tolist(), b_std.tolist(), eps=1e-3)
    assert_close(out, torch.tensor(ref, dtype=torch.float64))


def test_apply_affine_in_place_equals_out_of_place():
    z = torch.randn(50, 7)
    scale, shift = torch.rand(7) + 0.5, torch.randn(7)
    expected = z * scale + shift
    ptr = z.data_ptr()
    out = F.apply_affine_(z, scale, shift)
    assert out.data_ptr() == ptr
    assert_close(z, expected)


def test_constant_source_dimension_maps_to_target_mean():
    z = torch.randn(10, 2)
    z[:, 0] = 0.7
    mean, std = F.moments(z)
    scale, shift = F.moment_matching_affine(mean, std, torch.tensor([5.0, 1.0]), torch.tensor([2.0, 3.0]))
    assert scale[0] == 0 and torch.isfinite(scale).all()
    assert_close(z * scale + shift, F.match_moments(z, mean, std, torch.tensor([5.0, 1.0]), torch.tensor([2.0, 3.0])))
    assert_close((z * scale + shift)[:, 0], torch.full((10,), 5.0))


def test_kalman_step_against_reference_sequence():
    torch.manual_seed(0)
    d, b, steps = 3, 8, 12
    ref = RefKalman(p0=1.0, q=0.2, r=3.0, gain_every=4, stat="mean")
    u = p = k = None
    for t in range(steps):
        v = torch.randn(d, dtype=torch.float64)
        ref_u = ref.step(v.tolist(), [1.0] * d, b)
        if t == 0:
            u, p, k = v.clone(), torch.ones(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        else:
            u, p, k = F.kalman_step(u, p, k, v, 0.2, 3.0 / b, update_gain=(t - 1) % 4 == 0)
        assert_close(u, torch.tensor(ref_u, dtype=torch.float64))
        assert_close(k, torch.tensor(ref.K, dtype=torch.float64))


def test_kalman_gain_converges_to_steady_state():
    q, r = 0.5, 2.0
    u, p, k = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for _ in range(200):
        u, p, k = F.kalman_step(u, p, k, torch.zeros(1, dtype=torch.float64), q, r)
    p_pred = (q + math.sqrt(q * q + 4 * q * r)) / 2  # positive root of P^2 - qP - qr = 0
    assert_close(k, torch.tensor([p_pred / (p_pred + r)], dtype=torch.float64))


def test_kalman_zero_noise_has_unit_gain():
    u, p, k = F.kalman_step(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.ones(2), 0.0, 0.0)
    assert torch.equal(k, torch.ones(2)) and torch.equal(u, torch.ones(2))


def test_measurement_noise():
    s = torch.tensor([2.0, 0.5])
    assert_close(F.measurement_noise(s, 16, "mean"), s.square() / 16)
    assert_close(F.measurement_noise(s, 16, "std"), s.square() / 30)
    with pytest.raises(ValueError, match="'mean' or 'std'"):
        F.measurement_noise(s, 16, "var")


def test_std_measurement_noise_matches_simulation():
    # Var of the sample std of B normal samples ~ sigma^2 / (2 (B - 1)).
    g = torch.Generator().manual_seed(0)
    b, sigma = 32, 1.5
    stds = (torch.randn(20000, b, generator=g, dtype=torch.float64) * sigma).std(dim=1)
    predicted = F.measurement_noise(torch.tensor([sigma], dtype=torch.float64), b, "std")
    assert abs(stds.var().item() / predicted.item() - 1) < 0.05
