"""The queue's fast path (running sums, fused in-place affine, fixed frame) against a plain float64 computation.

The plain reference below does what Eq. 6 says, the slow way: at every step it recomputes the mean and
standard deviation of the valid rows with ``torch.var_mean`` in float64 and rewrites every row. The
queue instead keeps float64 running sums up to date on enqueue and moves them through each affine
map (O(B * D) per step), re-synchronising them only every ``stats_resync_every`` steps or at the
rounding floor; bfloat16 storage keeps raw rows plus a composed per-dimension map. These tests show
that the results are the same up to float rounding over long runs with wrap-around, through state
dict reloads, with constant dimensions, and (within bf16 rounding of each row, which does not grow)
for bfloat16 storage.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import pytest
import torch
from torch.testing import assert_close

from xbn_queue import AdaptiveQueue
from xbn_queue import functional as F

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64 = torch.float64


class PlainQueue:
    """Ring buffer with XBN (Eq. 6) / AXBN (Eq. 18-23) in float64, moments by a full pass every step."""

    def __init__(self, size: int, dim: int, adaptation: str, eps: float = 1e-6, p0=1.0, q=1.0, r=0.01, gain_every=1):
        self.mem = torch.zeros(size, dim, dtype=F64)
        self.size, self.adaptation, self.eps = size, adaptation, eps
        self.p0, self.q, self.r, self.gain_every = p0, q, r, gain_every
        self.n = self.ptr = self.t = 0
        self.kf = {}  # stat -> [u, P, K]

    def _kalman(self, stat: str, v: torch.Tensor, b: int) -> torch.Tensor:
        if self.t == 0:
            self.kf[stat] = [v.clone(), torch.full_like(v, self.p0), torch.zeros_like(v)]
        else:
            u, p, k = self.kf[stat]
            p = p + self.q
            if (self.t - 1) % self.gain_every == 0:
                k = p / (p + self.r / b)
            u = u + k * (v - u)
            p = (1 - k) * p
            self.kf[stat] = [u, p, k]
        return self.kf[stat][0]

    def update(self, x: torch.Tensor) -> None:
        x = x.to(F64)
        b = x.shape[0]
        if self.adaptation != "none" and b >= 2 and self.n >= 2:
            b_var, b_mean = torch.var_mean(x, dim=0, correction=1)
            b_std = b_var.sqrt()
            if self.adaptation == "xbn":
                t_mean, t_std = b_mean, b_std
            else:
                t_mean = self._kalman("mean", b_mean, b)
                t_std = self._kalman("std", b_std, b)
                self.t += 1
            rows = self.mem[: self.n]
            m_var, m_mean = torch.var_mean(rows, dim=0, correction=1)
            self.mem[: self.n] = (rows - m_mean) / (m_var.sqrt() + self.eps) * t_std + t_mean  # Eq. 6
        for i in range(b):
            self.mem[(self.ptr + i) % self.size] = x[i]
        self.ptr = (self.ptr + b) % self.size
        self.n = min(self.n + b, self.size)

    @property
    def rows(self) -> torch.Tensor:
        return self.mem[: self.n]


def _stream(n_steps: int, b: int, d: int, seed: int = 0) -> List[torch.Tensor]:
    """Batches whose per-dimension mean and scale wander over time (like embeddings during training)."""
    g = torch.Generator().manual_seed(seed)
    mean, log_scale = torch.randn(d, generator=g), torch.zeros(d)
    out = []
    for _ in range(n_steps):
        mean = mean + 0.2 * torch.randn(d, generator=g)
        log_scale = (log_scale + 0.1 * torch.randn(d, generator=g)).clamp(-3, 3)
        out.append(torch.randn(b, d, generator=g) * log_scale.exp() + mean)
    return out


def _assert_rows_close(q: AdaptiveQueue, ref: PlainQueue, rtol: float = 2e-5, atol: float = 2e-5) -> None:
    """Rows equal up to float32 rounding, measured on the scale of each column."""
    assert len(q) == ref.n
    got = q.embeddings.to(F64)
    scale = ref.rows.std(dim=0, correction=0).clamp_min(1e-3) + ref.rows.abs().mean(dim=0)  # (D,)
    assert_close(got / scale, ref.rows / scale, rtol=rtol, atol=atol)


def _count_syncs(q: AdaptiveQueue, monkeypatch) -> List[int]:
    calls: List[int] = []
    original = q._sync_stats

    def counted(n: int) -> None:
        calls.append(n)
        original(n)

    monkeypatch.setattr(q, "_sync_stats", counted)
    return calls


# ---------------------------------------------------------------------------------------------- long runs
@pytest.mark.parametrize("adaptation", ["xbn", "axbn"])
@pytest.mark.parametrize("size,b", [(37, 5), (64, 16), (50, 50)])
def test_fast_path_matches_plain_reference_over_a_long_run_with_wrap(adaptation, size, b, monkeypatch):
    kw = dict(kalman_r=4.0, kalman_gain_every=3)  # AXBN gain far from 1, held between recomputations
    q = AdaptiveQueue(size=size, dim=6, adaptation=adaptation, kalman_r=kw["kalman_r"], kalman_gain_every=3)
    ref = PlainQueue(size, 6, adaptation, r=kw["kalman_r"], gain_every=3)
    syncs = _count_syncs(q, monkeypatch)
    for step, x in enumerate(_stream(400, b, 6, seed=size + b)):
        q.update(x)
        ref.update(x)
        if step % 25 == 0 or step == 399:
            _assert_rows_close(q, ref)
    # The statistics really came from the running sums: one exact sync when the first rows arrived,
    # then one every min(stats_resync_every, len(q)) = size adaptations, not one per step.
    assert syncs[0] == b and len(syncs) <= 2 + 400 // size


@pytest.mark.parametrize("resync_every", [1, 7])
def test_periodic_resync_gives_the_same_results(resync_every, monkeypatch):
    q = AdaptiveQueue(size=29, dim=5, adaptation="xbn", stats_resync_every=resync_every)
    ref = PlainQueue(29, 5, "xbn")
    syncs = _count_syncs(q, monkeypatch)
    for x in _stream(100, 4, 5, seed=3):
        q.update(x)
        ref.update(x)
    _assert_rows_close(q, ref)
    adaptations = 100 - 1  # the first step has no stored rows to adapt
    assert abs(len(syncs) - adaptations // resync_every) <= 1


def test_adapt_and_enqueue_separately_and_enqueue_without_adapting(monkeypatch):
    q = AdaptiveQueue(size=23, dim=4, adaptation="xbn")
    ref = PlainQueue(23, 4, "xbn")
    syncs = _count_syncs(q, monkeypatch)
    for step, x in enumerate(_stream(120, 6, 4, seed=4)):
        if step % 3 == 2:  # plain enqueue (XBM warm-up style): the sums must follow it too
            q.enqueue(x)
            ref.adaptation = "none"
            ref.update(x)
            ref.adaptation = "xbn"
        else:
            q.adapt(x)
            q.enqueue(x)
            ref.update(x)
    _assert_rows_close(q, ref)
    assert syncs[0] == 6 and len(syncs) <= 2 + 80 // 23  # first rows, then every len(q) adaptations


def test_running_sums_equal_a_fresh_exact_pass():
    q = AdaptiveQueue(size=41, dim=7, adaptation="axbn", kalman_r=1.0)
    for x in _stream(150, 9, 7, seed=5):
        q.update(x)
    n = len(q)
    mean, var = F.moments_from_sums(q.stat_center, q.stat_sum, q.stat_sumsq, n)
    rows = q.memory[:n].to(F64)
    ref_var, ref_mean = torch.var_mean(rows, dim=0, correction=1)
    assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6 * float(ref_var.sqrt().max()))
    assert_close(var, ref_var, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("adaptation", ["xbn", "axbn"])
def test_reload_mid_run_continues_bit_identically_and_matches_reference(adaptation):
    stream = _stream(200, 7, 5, seed=6)
    kw = dict(size=31, dim=5, adaptation=adaptation, kalman_r=2.0, kalman_gain_every=2)
    a = AdaptiveQueue(**kw)
    ref = PlainQueue(31, 5, adaptation, r=2.0, gain_every=2)
    for x in stream[:90]:
        a.update(x)
        ref.update(x)
    b = AdaptiveQueue(**kw)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for x in stream[90:]:
        a.update(x)
        b.update(x)
        ref.update(x)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert {"stat_center", "stat_sum", "stat_sumsq", "stat_age", "frame_scale"} <= set(sa)
    _assert_rows_close(b, ref)


def test_state_dict_without_running_sums_is_refused():
    # The running statistics are part of the state: a truncated state dict must not load silently.
    a = AdaptiveQueue(size=20, dim=4, adaptation="xbn")
    for x in _stream(10, 6, 4, seed=7):
        a.update(x)
    truncated = {k: v for k, v in a.state_dict().items() if not k.startswith(("stat_", "frame_"))}
    b = AdaptiveQueue(size=20, dim=4, adaptation="xbn")
    with pytest.raises(RuntimeError, match="Missing key.*stat_sum"):
        b.load_state_dict(truncated)


def test_reset_forgets_the_statistics():
    q = AdaptiveQueue(size=10, dim=3, adaptation="xbn")
    for x in _stream(5, 4, 3):
        q.update(x)
    q.reset()
    assert not bool(q.stat_synced) and float(q.stat_sumsq.abs().sum()) == 0.0
    ref = PlainQueue(10, 3, "xbn")
    for x in _stream(8, 4, 3, seed=9):
        q.update(x)
        ref.update(x)
    _assert_rows_close(q, ref)


# ---------------------------------------------------------------------------------------------- constant dims
def _stream_with_constant_columns(n_steps: int, b: int, d: int, seed: int) -> List[torch.Tensor]:
    """Column 0 is dead (always 0); column 1 is constant 0.3 until step 40, then varies; column 2 varies
    until step 30, then is constant -2 (the memory column becomes constant once old rows are overwritten)."""
    out = []
    for t, x in enumerate(_stream(n_steps, b, d, seed=seed)):
        x = x.clone()
        x[:, 0] = 0.0
        if t < 40:
            x[:, 1] = 0.3
        if t >= 30:
            x[:, 2] = -2.0
        out.append(x)
    return out


@pytest.mark.parametrize("adaptation", ["xbn", "axbn"])
def test_constant_dimensions_match_the_reference_and_stay_finite(adaptation, monkeypatch):
    q = AdaptiveQueue(size=26, dim=5, adaptation=adaptation, kalman_r=1.0)
    ref = PlainQueue(26, 5, adaptation, r=1.0)
    syncs = _count_syncs(q, monkeypatch)
    for step, x in enumerate(_stream_with_constant_columns(120, 6, 5, seed=11)):
        q.update(x)
        ref.update(x)
        emb = q.embeddings
        assert torch.isfinite(emb).all(), step
        _assert_rows_close(q, ref)
        assert float(q.embeddings[:, 0].abs().max()) == 0.0  # a dead unit stays exactly 0
    # Only transitions (a column becoming constant) need an exact re-synchronisation, not every step.
    assert len(syncs) < 10


def test_constant_memory_column_goes_to_the_batch_mean():
    q = AdaptiveQueue(size=10, dim=3, adaptation="xbn")
    x = torch.randn(10, 3)
    x[:, 1] = 0.1
    q.enqueue(x)
    batch = torch.randn(4, 3)
    batch[:, 2] = -3.0
    q.adapt(batch)
    emb = q.embeddings
    assert torch.isfinite(emb).all()
    assert_close(emb[:, 1], batch[:, 1].mean().expand(10))
    assert_close(emb[:, 2], torch.full((10,), -3.0))


# ---------------------------------------------------------------------------------------------- bfloat16
def _max_col_error(q: AdaptiveQueue, ref: PlainQueue) -> float:
    scale = ref.rows.std(dim=0, correction=0).clamp_min(1e-3)  # (D,)
    return float(((q.embeddings.to(F64) - ref.rows) / scale).abs().max())


@pytest.mark.parametrize("adaptation", ["xbn", "axbn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage_error_is_one_rounding_and_does_not_grow(adaptation, dtype):
    """Stated tolerance: every row is off by at most a few storage roundings, i.e. a few units of
    2^-8 (bf16) / 2^-11 (fp16) of its column's spread, at any step of a long run."""
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    q = AdaptiveQueue(size=48, dim=6, adaptation=adaptation, dtype=dtype, kalman_r=1.0)
    ref = PlainQueue(48, 6, adaptation, r=1.0)
    errors = []
    for step, x in enumerate(_stream(500, 8, 6, seed=12)):
        q.update(x)
        ref.update(x)
        if step % 20 == 19:
            errors.append(_max_col_error(q, ref))
    assert q.memory.dtype == dtype and q.embeddings.dtype == torch.float32
    assert max(errors) < 8 * unit, errors
    assert max(errors[-5:]) < 2 * max(errors[:5]) + unit, errors  # no accumulation over the run


def test_bfloat16_naive_in_place_rounding_would_accumulate():
    """Why the fixed frame: re-rounding the memory to bf16 at every step drifts away from the
    reference, while the fixed frame stays within one rounding."""
    stream = _stream(400, 8, 6, seed=13)
    ref = PlainQueue(400, 6, "xbn")  # large memory: rows live long, so errors could pile up
    q = AdaptiveQueue(size=400, dim=6, adaptation="xbn", dtype=torch.bfloat16)
    naive = torch.zeros(400, 6, dtype=torch.bfloat16)
    n = ptr = 0
    for x in stream:
        if n >= 2:
            rows = naive[:n].float()
            m, s = rows.mean(0), rows.std(0)
            bm, bs = x.mean(0), x.std(0)
            naive[:n] = ((rows - m) / (s + 1e-6) * bs + bm).to(torch.bfloat16)  # re-rounded every step
        for i in range(x.shape[0]):
            naive[(ptr + i) % 400] = x[i].to(torch.bfloat16)
        ptr, n = (ptr + x.shape[0]) % 400, min(n + x.shape[0], 400)
        q.update(x)
        ref.update(x)
    scale = ref.rows.std(dim=0, correction=0)
    naive_err = float(((naive.to(F64) - ref.rows) / scale).abs().max())
    fixed_err = _max_col_error(q, ref)
    assert fixed_err < 8 * 2.0**-8
    assert naive_err > 3 * fixed_err, (naive_err, fixed_err)


def test_fixed_frame_rebases_a_collapsed_column():
    """A constant batch column maps a varying memory column to a constant (frame scale 0): that
    column is folded into the raw rows so later rows can still be stored in the frame."""
    q = AdaptiveQueue(size=12, dim=3, adaptation="xbn", dtype=torch.bfloat16)
    ref = PlainQueue(12, 3, "xbn")
    for t, x in enumerate(_stream(30, 4, 3, seed=14)):
        if t == 10:
            x = x.clone()
            x[:, 1] = 0.5
        q.update(x)
        ref.update(x)
        assert torch.isfinite(q.embeddings).all()
        assert bool((q.frame_scale != 0).all())
        assert _max_col_error(q, ref) < 8 * 2.0**-8
    assert torch.isfinite(q.frame_scale).all() and bool((q.frame_scale > 0).all())  # frame stays finite
    assert torch.isfinite(q.frame_shift).all()


# ---------------------------------------------------------------------------------------------- functional
def test_functional_sums_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9000, 5, generator=g, dtype=F64) * 3 + 7  # more rows than one chunk
    x[:, 3] = 0.25
    c = x[0].clone()
    s1, s2 = F.shifted_sums(x.float(), c)
    xf = x.float().to(F64)
    assert_close(s1, (xf - c).sum(0))
    assert_close(s2, ((xf - c) ** 2).sum(0))
    assert float(s1[3]) == 0.0 and float(s2[3]) == 0.0
    mean, var = F.moments_from_sums(c, s1, s2, x.shape[0])
    ref_var, ref_mean = torch.var_mean(xf, dim=0, correction=1)
    assert_close(mean, ref_mean)
    assert_close(var, ref_var)
    scale, shift = torch.rand(5, generator=g, dtype=F64) * 2, torch.randn(5, generator=g, dtype=F64)
    c2, t1, t2 = F.affine_sums(c, s1, s2, scale, shift)
    y = xf * scale + shift
    assert_close(t1, (y - c2).sum(0))
    assert_close(t2, ((y - c2) ** 2).sum(0))


def test_moments_equal_var_mean_and_constant_columns_are_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, 6, generator=g) * 4 - 1
    x[:, 2] = 0.1
    mean, std = F.moments(x)
    ref_var, ref_mean = torch.var_mean(x.to(F64), dim=0, correction=1)
    assert mean.dtype == torch.float32
    assert_close(mean.to(F64), ref_mean, rtol=1e-6, atol=1e-6)
    assert_close(std.to(F64), ref_var.sqrt(), rtol=1e-6, atol=1e-6)
    assert float(std[2]) == 0.0 and float(mean[2]) == float(torch.tensor(0.1))


# ---------------------------------------------------------------------------------------------- API kept
def test_float32_valid_memory_is_still_a_live_view():
    q = AdaptiveQueue(size=8, dim=3, adaptation="xbn")
    q.update(torch.randn(5, 3))
    assert q.valid_memory().data_ptr() == q.memory.data_ptr()
    qb = AdaptiveQueue(size=8, dim=3, adaptation="xbn", dtype=torch.bfloat16)
    qb.update(torch.randn(5, 3))
    assert qb.valid_memory().dtype == torch.float32


def test_bad_stats_resync_every_is_refused():
    with pytest.raises(ValueError, match="stats_resync_every must be >= 1, got 0"):
        AdaptiveQueue(size=4, dim=2, stats_resync_every=0)


def test_none_adaptation_keeps_no_statistics():
    q = AdaptiveQueue(size=6, dim=2, adaptation="none")
    for x in _stream(4, 4, 2):
        q.update(x)
    assert not bool(q.stat_synced)


def test_dtype_conversions_keep_rows_and_float64_statistics():
    stream = _stream(60, 5, 4, seed=16)
    q = AdaptiveQueue(size=17, dim=4, adaptation="xbn", dtype=torch.bfloat16)
    ref = PlainQueue(17, 4, "xbn")
    for x in stream[:30]:
        q.update(x)
        ref.update(x)
    before = q.embeddings
    q.float()  # raw bf16 rows + frame -> float32 rows as read
    assert q.memory.dtype == torch.float32 and q.stat_sum.dtype == F64 and q.frame_scale.dtype == F64
    assert_close(q.embeddings, before)
    q.half()  # float32 rows -> fp16 rows in an identity frame
    assert q.memory.dtype == torch.float16 and q.stat_sumsq.dtype == F64
    assert_close(q.embeddings, before, rtol=2e-3, atol=2e-3 * float(before.abs().max()))
    for x in stream[30:]:
        q.update(x)
        ref.update(x)
    assert _max_col_error(q, ref) < 8 * 2.0**-8


def test_benchmark_scripts_run_on_a_tiny_problem(tmp_path, monkeypatch):
    """Smoke test of the benchmarks (tiny sizes, one round): they run and write the contracted columns."""
    pytest.importorskip("pytorch_metric_learning")
    pytest.importorskip("lightly")
    import importlib
    import json
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    for name in ("common", "queue_overhead", "lightly_bank"):
        sys.modules.pop(name, None)
    qo = importlib.import_module("queue_overhead")
    lb = importlib.import_module("lightly_bank")
    out = tmp_path / "qo.json"
    qo.main(["--sizes", "96", "--dim", "16", "--batch", "8", "--classes", "5", "--repeats", "1", "--warmup", "0",
             "--naive", "--bf16-steps", "14", "--bf16-memory", "32", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["adaptation"] for r in rows} == {"xbn", "axbn", "xbn-naive"}
    assert all({"memory_size", "adaptation", "ms", "pml_ms", "ratio"} <= set(r) for r in rows)
    out = tmp_path / "lb.json"
    lb.main(["--sizes", "64", "--dim", "8", "--batch", "8", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert json.loads(out.read_text())["rows"][0]["lightly_ms"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fast_path_matches_reference(dtype):
    q = AdaptiveQueue(size=37, dim=6, adaptation="axbn", kalman_r=4.0, dtype=dtype).cuda()
    ref = PlainQueue(37, 6, "axbn", r=4.0)
    for x in _stream(200, 5, 6, seed=15):
        q.update(x.cuda())
        ref.update(x)
    got = q.embeddings.cpu().to(F64)
    scale = ref.rows.std(dim=0, correction=0).clamp_min(1e-3)
    tol = 1e-4 if dtype == torch.float32 else 8 * 2.0**-8
    assert float(((got - ref.rows) / scale).abs().max()) < tol
