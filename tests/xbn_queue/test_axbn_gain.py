"""AXBN's Kalman gain: the steady state of its recursion, and the ``kalman_r="sampling"`` noise model.

The references are plain float64 loops: the Riccati recursion iterated with Python floats, and
synthetic batches whose population moments are known, so the error the filter leaves can be
compared with what the derivation in :class:`xbn_queue.AXBN` says.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.testing import assert_close

from xbn_queue import AXBN, AdaptiveQueue
from xbn_queue import functional as F

from .reference import RefQueue


def _riccati(q: float, r: float, p0: float = 1.0, steps: int = 20000) -> float:
    """The gain after iterating Eq. 19-22 with constant noises, written out with Python floats."""
    p, k = p0, 0.0
    for _ in range(steps):
        p = p + q
        k = p / (p + r)
        p = (1 - k) * p
    return k


# ---------------------------------------------------------------------------------------------- the fixed point
@pytest.mark.parametrize(
    "q,r",
    [(1.0, 0.01 / 8), (1.0, 0.01 / 16), (1.0, 0.01 / 64), (0.01, 1 / 8), (0.01, 1 / 64), (0.5, 2.0), (1e-4, 3.0)],
)
def test_steady_state_gain_is_the_fixed_point_of_the_recursion(q, r):
    k = F.steady_state_gain(q, r)
    assert math.isclose(k, _riccati(q, r), rel_tol=1e-9)
    # The same from the tensor form, and from the ratio q / r alone.
    assert_close(F.steady_state_gain(torch.tensor([q]), torch.tensor([r])), torch.tensor([k], dtype=torch.float64))
    lam = q / r
    root = math.sqrt(lam * lam + 4 * lam)
    assert math.isclose(k, (lam + root) / (lam + root + 2), rel_tol=1e-12)


def test_steady_state_gain_limits():
    assert F.steady_state_gain(0.0, 1.0) == 0.0  # a static state: nothing new to learn at the limit
    assert F.steady_state_gain(1.0, 0.0) == 1.0 and F.steady_state_gain(0.0, 0.0) == 1.0  # exact measurement
    k = F.steady_state_gain(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(k, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))


def test_paper_settings_gain_stated_in_the_docs():
    """q = 1, r = 0.01 per row, p0 = 1: the gain never leaves [0.99875, 1) for B >= 8 (docs/queue.md)."""
    stated = {8: 0.998753, 16: 0.999376, 64: 0.999844}
    for b, k in stated.items():
        assert round(F.steady_state_gain(1.0, 0.01 / b), 6) == k
        assert round(AXBN(4).steady_gain(b), 6) == k
    # The transient from p0 = 1: the first gain is 2 / (2 + r / B), then the steady value at once.
    p, gains = 1.0, []
    for _ in range(3):
        p += 1.0
        gains.append(p / (p + 0.01 / 8))
        p *= 1 - gains[-1]
    assert round(gains[0], 6) == 0.999375 and min(gains) >= 0.99875


def test_sampling_gain_grows_with_the_batch():
    ks = [F.sampling_gain(0.01, b) for b in (8, 16, 32, 64)]
    assert ks == sorted(ks) and ks[0] < 0.25 < 0.5 < ks[-1]
    assert [round(k, 3) for k in (ks[0], ks[1], ks[3])] == [0.246, 0.328, 0.542]  # stated in AXBN's docstring
    assert math.isclose(F.sampling_gain(0.01, 8), _riccati(0.01, 1 / 8), rel_tol=1e-9)
    assert math.isclose(F.sampling_gain(0.01, 8, "std"), _riccati(0.01, 1 / 14), rel_tol=1e-9)
    assert round(F.sampling_gain(0.01, 8, "std"), 3) == 0.311
    with pytest.raises(ValueError, match="'mean' or 'std'"):
        F.sampling_noise(8, "var")


# ---------------------------------------------------------------------------------------------- the filter itself
def _batches(n: int, b: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=g) * 3 + 1, torch.randint(0, 5, (b,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("gain_every", [1, 3])
def test_sampling_queue_matches_float64_reference(gain_every):
    batches = _batches(14, 6, 4, seed=11)
    q = AdaptiveQueue(size=10, dim=4, adaptation="axbn", kalman_r="sampling", kalman_p0=2.0, kalman_gain_every=gain_every)
    assert q.adaptation.q == 0.01  # the sampling model's default process noise
    ref = RefQueue(10, "axbn", p0=2.0, q=0.01, r="sampling", gain_every=gain_every)
    for x, y in batches:
        q.update(x, y)
        rows = x.double().tolist()
        ref.adapt(rows)
        ref.enqueue(rows, y.tolist())
    assert_close(q.embeddings.double(), torch.tensor(ref.valid(), dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert_close(q.adaptation.mean_estimate.double(), torch.tensor(ref.kf_mean.u, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert_close(q.adaptation.std_estimate.double(), torch.tensor(ref.kf_std.u, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert_close(q.adaptation.mean_gain.double(), torch.tensor(ref.kf_mean.K, dtype=torch.float64))
    assert float(q.adaptation.mean_gain.max()) < 0.5


def _synthetic(b: int, d: int, steps: int, drift: float, seed: int):
    """Batches of ``b`` rows from N(m_t, sigma^2) per dimension, with sigma spread over four orders of
    magnitude and m_t a random walk of per-step variance ``drift * sigma^2`` (0: stationary)."""
    g = torch.Generator().manual_seed(seed)
    sigma = 10.0 ** (torch.rand(d, generator=g, dtype=torch.float64) * 4 - 2)  # (D,)
    m = torch.randn(d, generator=g, dtype=torch.float64) * sigma * 5  # (D,)
    for _ in range(steps):
        m = m + math.sqrt(drift) * sigma * torch.randn(d, generator=g, dtype=torch.float64)
        yield m, sigma, m + sigma * torch.randn(b, d, generator=g, dtype=torch.float64)  # (D,), (D,), (B, D)


def _run_filter(b: int, drift: float, steps: int = 400, d: int = 256, burn: int = 100, seed: int = 0, **kw):
    """Filter synthetic batches; return the filter and the mean squared errors (in units of sigma^2 / B)
    of the filtered and the raw batch mean, and of the filtered and raw std (in units of sigma^2)."""
    f = AXBN(d, r="sampling", **kw).double()
    err = dict(mean=0.0, raw_mean=0.0, std=0.0, raw_std=0.0)
    n = 0
    for t, (m, sigma, x) in enumerate(_synthetic(b, d, steps, drift, seed)):
        v_mean, v_std = F.batch_moments(x)
        u_mean, u_std = f.target(v_mean, v_std, b)
        if t >= burn:
            err["mean"] += ((u_mean - m) / sigma).square().mean().item() * b
            err["raw_mean"] += ((v_mean - m) / sigma).square().mean().item() * b
            err["std"] += ((u_std - sigma) / sigma).square().mean().item()
            err["raw_std"] += ((v_std - sigma) / sigma).square().mean().item()
            n += 1
    return f, {k: v / n for k, v in err.items()}


@pytest.mark.parametrize("b", [8, 64])
def test_sampling_gain_reached_on_batches_of_known_variance(b):
    """Whatever the scale of each dimension, the filter settles at the derived gain, the same in every dimension."""
    f, _ = _run_filter(b, drift=0.0, steps=120, d=64, burn=0)
    assert_close(f.mean_gain, torch.full((64,), F.sampling_gain(0.01, b), dtype=torch.float64))
    assert_close(f.std_gain, torch.full((64,), F.sampling_gain(0.01, b, "std"), dtype=torch.float64))
    if b == 8:
        assert float(f.mean_gain.max()) < 0.25 and float(f.std_gain.max()) < 0.32  # the bounds the docs state
    else:
        assert float(f.mean_gain.min()) > 0.5


def test_filtered_moments_beat_the_batch_moments_on_stationary_data():
    """On a stationary dataset the filter averages batches: error K / (2 - K) of the batch mean's (derived)."""
    f, err = _run_filter(8, drift=0.0)
    k = F.sampling_gain(0.01, 8)
    assert math.isclose(err["raw_mean"], 1.0, rel_tol=0.05)  # the batch mean's error is sigma^2 / B
    assert math.isclose(err["mean"], k / (2 - k), rel_tol=0.1)  # an exponential average of weight K
    assert err["mean"] < 0.2 * err["raw_mean"]
    assert err["std"] < 0.35 * err["raw_std"]  # the std estimate too (bias of s included)


def test_filtered_mean_error_on_drifting_data_is_the_posterior_variance():
    """Moments that drift by q sigma^2 per step, the model's assumption: the error is P = K sigma^2 / B."""
    f, err = _run_filter(8, drift=0.01)
    k = F.sampling_gain(0.01, 8)
    assert math.isclose(err["mean"], k, rel_tol=0.1)
    assert err["mean"] < 0.4 * err["raw_mean"]


# ---------------------------------------------------------------------------------------------- state
def test_sampling_state_dict_round_trip_continues_bit_identically():
    batches = _batches(12, 8, 6, seed=12)
    kw = dict(size=20, dim=6, adaptation="axbn", kalman_r="sampling", kalman_gain_every=2)
    a = AdaptiveQueue(**kw)
    for x, y in batches[:7]:
        a.update(x, y)
    b = AdaptiveQueue(**kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.adaptation._t == a.adaptation._t == 6
    for x, y in batches[7:]:
        a.update(x, y)
        b.update(x, y)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


#: The AXBN buffers a checkpoint written before ``kalman_r="sampling"`` existed holds (xbn-queue 0.x).
OLD_AXBN_KEYS = {
    "adaptation.mean_estimate", "adaptation.mean_variance", "adaptation.mean_gain",
    "adaptation.std_estimate", "adaptation.std_variance", "adaptation.std_gain", "adaptation.step",
}


def test_old_format_checkpoint_loads_into_every_noise_model():
    old = AdaptiveQueue(size=20, dim=6, adaptation="axbn")  # the paper's noise, as every old run had
    for x, y in _batches(5, 8, 6, seed=13):
        old.update(x, y)
    state = copy.deepcopy(old.state_dict())
    assert {k for k in state if k.startswith("adaptation.")} == OLD_AXBN_KEYS
    for r in (0.01, "auto", "sampling"):
        new = AdaptiveQueue(size=20, dim=6, adaptation="axbn", kalman_r=r)
        new.load_state_dict(state)  # strict: no key missing, none unexpected
        assert new.adaptation._t == 4 and torch.equal(new.memory, old.memory)
        new.update(*_batches(1, 8, 6, seed=14)[0])
        assert torch.isfinite(new.memory).all()


def test_unknown_noise_model_is_refused():
    with pytest.raises(ValueError, match="'auto' or 'sampling', got 'sometimes'"):
        AdaptiveQueue(4, 2, "axbn", kalman_r="sometimes")
    with pytest.raises(ValueError, match="non-negative"):
        AXBN(2, r="sampling", q=-1.0)


@pytest.mark.parametrize("value,expected", [
    (0.01, 0.01), ("0.5", 0.5), (" Sampling ", "sampling"), ("AUTO", "auto"),
    (0, None), (0.0, None), (-0.01, None), ("inf", None), ("nan", None), ("often", None), (None, None),
])
def test_one_rule_for_kalman_r_in_the_library_and_both_trainers(value, expected):
    """One bound (a finite number > 0, 'auto' or 'sampling'): AXBN, xbn-metric and xbn-selfsup apply the same."""
    from metric.config import kalman_r_value as metric_rule
    from selfsup.config import SelfSupConfig
    from xbn_queue.adaptation import AXBN, kalman_r_value
    from xbn_queue.training.cli import UsageError

    assert kalman_r_value(value) == expected and metric_rule is kalman_r_value
    if expected is None:
        with pytest.raises(ValueError, match="kalman_r must be a number > 0, 'auto' or 'sampling'"):
            AXBN(4, r=value)
        with pytest.raises(UsageError, match=r"--kalman-r .*: expected a number > 0, 'auto' or 'sampling'"):
            SelfSupConfig(kalman_r=value).kalman_r_value()
    else:
        assert AXBN(4, r=value).r == expected
        assert SelfSupConfig(kalman_r=value).kalman_r_value() == expected
