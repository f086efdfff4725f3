"""The math of cross-batch memory adaptation, as pure functions.

Everything a reader needs to check the implementation against the paper lives here:

* :func:`moments` - per-dimension mean and (Bessel-corrected) standard deviation over rows.
* :func:`moment_matching_affine` / :func:`match_moments` - XBN, Eq. 6 (and Eq. 23 with Kalman estimates)::

      z <- (z - mean_R) / (std_R + eps) * std_B + mean_B

* :func:`kalman_step` - the diagonal static-state Kalman filter of AXBN, Eq. 18-22.
* :func:`measurement_noise` - the per-dimension measurement noise used by ``kalman_r="auto"``.
* :func:`steady_state_gain` / :func:`sampling_gain` - the gain the Kalman filter settles at (the fixed
  point of its Riccati recursion), for the paper's noise and for ``kalman_r="sampling"``.
* :func:`shifted_sums` / :func:`moments_from_sums` / :func:`affine_sums` - running per-dimension
  sums that let the queue know its memory's moments in O(B * D) per step instead of a pass over
  the memory (see ``docs/performance.md``).
* :func:`batch_moments`, :func:`xbn_step_`, :func:`frame_step_`, :func:`kalman_step_`,
  :func:`update_sums_` - the O(D) bookkeeping of one queue step written as few, fusable tensor
  operations with no host synchronisation. Like ``torch.optim``'s functional API they update the
  state tensors they are given in place (the queue compiles :func:`xbn_step_` / :func:`frame_step_`
  on CUDA, where ``torch.compile`` fuses each into one or two kernels; :func:`kalman_step_` runs
  eagerly); they keep no state of their own.

* :func:`mean_cov` / :func:`covariance_matching_affine` / :func:`apply_linear_` - full-covariance
  matching (``adaptation="xbn-cov"``): whitening by the memory's covariance, colouring by a target's.
* :func:`wishart_noise` / :func:`shrink_to_diagonal` - the measurement noise of a sample covariance
  and the shrinkage of an estimated covariance towards its diagonal (the target of ``"xbn-cov"``).

No function here keeps state or touches a module; :mod:`xbn_queue.adaptation` owns the state.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "moments",
    "moment_matching_affine",
    "match_moments",
    "apply_affine_",
    "kalman_step",
    "measurement_noise",
    "steady_state_gain",
    "sampling_noise",
    "sampling_gain",
    "shifted_sums",
    "moments_from_sums",
    "affine_sums",
    "batch_moments",
    "xbn_step_",
    "frame_step_",
    "kalman_step_",
    "update_sums_",
    "mean_cov",
    "covariance_matching_affine",
    "apply_linear_",
    "wishart_noise",
    "shrink_to_diagonal",
]

#: Rows per chunk when a reduction over a large matrix is done in float64 (bounds the temporary).
_CHUNK_ROWS = 4096


def moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-dimension mean and standard deviation over the rows of ``x``.

    The standard deviation uses Bessel's correction, as ``torch.std`` does by default.
    Low-precision inputs are promoted to float32. On CUDA this is one ``torch.var_mean`` pass;
    on CPU, where ``var_mean`` over dim 0 is slow (a strided Welford reduction), it is one pass
    of float64 sums of deviations from the first row (:func:`shifted_sums`), which is as
    accurate and gives exactly zero for a constant column. Both agree up to float rounding.

    Args:
        x: ``(N, D)`` rows, ``N >= 2``.

    Returns:
        ``(mean, std)``, each ``(D,)``, float32 (float64 if ``x`` is float64).
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.device.type != "cpu":
        var, mean = torch.var_mean(x, dim=0, correction=1)  # (D,), (D,)
        return mean, var.clamp_min_(0).sqrt_()
    center = x[0].to(torch.float64)  # (D,) a constant column gives exactly zero deviations
    s1, s2 = shifted_sums(x, center)
    mean, var = moments_from_sums(center, s1, s2, x.shape[0])
    return mean.to(x.dtype), var.clamp_min_(0).sqrt_().to(x.dtype)


def moment_matching_affine(
    src_mean: Tensor, src_std: Tensor, tgt_mean: Tensor, tgt_std: Tensor, eps: float = 1e-6
) -> Tuple[Tensor, Tensor]:
    """Per-dimension affine map ``z -> z * scale + shift`` equal to Eq. 6.

    ``(z - src_mean) / (src_std + eps) * tgt_std + tgt_mean == z * scale + shift`` with
    ``scale = tgt_std / (src_std + eps)`` and ``shift = tgt_mean - src_mean * scale``.
    A dimension that is constant in the source (``src_std == 0``) has ``z == src_mean`` for
    every row, so Eq. 6 sends it to ``tgt_mean`` exactly; the scale of such a dimension is set
    to 0 so that the affine form gives that exact value too (no ``1 / eps`` blow-up).

    Args:
        src_mean: ``(D,)`` mean of the rows to be adapted (the memory).
        src_std: ``(D,)`` standard deviation of those rows.
        tgt_mean: ``(D,)`` target mean (the batch, or the Kalman estimate).
        tgt_std: ``(D,)`` target standard deviation.
        eps: Added to ``src_std`` before dividing.

    Returns:
        ``(scale, shift)``, each ``(D,)``.
    """
    scale = tgt_std / (src_std + eps)
    scale = torch.where(src_std > 0, scale, torch.zeros_like(scale))
    shift = tgt_mean - src_mean * scale
    return scale, shift


def match_moments(
    z: Tensor, src_mean: Tensor, src_std: Tensor, tgt_mean: Tensor, tgt_std: Tensor, eps: float = 1e-6
) -> Tensor:
    """Eq. 6 out of place: ``(z - src_mean) / (src_std + eps) * tgt_std + tgt_mean``.

    Args:
        z: ``(N, D)`` rows to adapt.
        src_mean, src_std, tgt_mean, tgt_std: ``(D,)`` statistics, see :func:`moment_matching_affine`.
        eps: Added to ``src_std`` before dividing.

    Returns:
        ``(N, D)`` adapted rows, in the dtype of ``z``.
    """
    scale, shift = moment_matching_affine(src_mean, src_std, tgt_mean, tgt_std, eps)
    return torch.addcmul(shift.to(z.dtype), z, scale.to(z.dtype))  # (N, D)


def apply_affine_(z: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """In place ``z <- z * scale + shift`` (per column), one pass over ``z``.

    Args:
        z: ``(N, D)`` tensor modified in place.
        scale: ``(D,)``.
        shift: ``(D,)``.

    Returns:
        ``z``.
    """
    return torch.addcmul(shift.to(z.dtype), z, scale.to(z.dtype), out=z)


def kalman_step(
    u: Tensor,
    p: Tensor,
    k: Tensor,
    v: Tensor,
    q: Tensor | float,
    r: Tensor | float,
    update_gain: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One step of the diagonal static-state Kalman filter (Eq. 18-22).

    ::

        P <- P + q                     (19, predicted variance; the predicted state is u, Eq. 18)
        K <- P / (P + r)               (20, only when ``update_gain``; otherwise the held gain;
                                           1 where P + r == 0, i.e. an exact measurement)
        u <- u + K (v - u)             (21)
        P <- (1 - K) P                 (22)

    Args:
        u: ``(D,)`` current estimate.
        p: ``(D,)`` current estimation variance.
        k: ``(D,)`` current (held) gain.
        v: ``(D,)`` new measurement (a batch statistic).
        q: Process noise variance (scalar or ``(D,)``).
        r: Measurement noise variance (scalar or ``(D,)``), already divided by the batch size.
        update_gain: Recompute the gain from ``P`` (Eq. 20) or keep ``k``.

    Returns:
        ``(u, P, K)`` after the step (new tensors).
    """
    p = p + q
    if update_gain:
        denom = p + r
        if isinstance(r, (int, float)) and r > 0:  # P >= 0, so P + r > 0: the plain formula
            k = p / denom
        else:
            # No uncertainty at all (P + R == 0) means the measurement is exact: gain 1, never 0 / 0.
            ok = denom > 0
            k = torch.where(ok, p / torch.where(ok, denom, torch.ones_like(denom)), torch.ones_like(denom))
    u = u + k * (v - u)
    p = p - k * p
    return u, p, k


def kalman_step_(
    u: Tensor, p: Tensor, k: Tensor, v: Tensor, q: float, r: float, update_gain: bool = True
) -> None:
    """:func:`kalman_step` in place on ``u``, ``p``, ``k`` (``(D,)`` each), for scalar noises ``q >= 0``, ``r > 0``.

    Six element-wise kernels (four when the gain is held), run eagerly by the queue's steady-state
    step; ``v`` may have a wider dtype than ``u``.

    Args:
        u, p, k: ``(D,)`` estimate, estimation variance and gain, updated in place.
        v: ``(D,)`` new measurement.
        q: Process noise variance.
        r: Measurement noise variance (already divided by the batch size), ``> 0``.
        update_gain: Recompute the gain (Eq. 20) or keep ``k``.
    """
    p.add_(q)  # (19)
    if update_gain:
        torch.div(p, p + r, out=k)  # (20)
    u.addcmul_(k, v - u)  # (21)
    p.addcmul_(k, p, value=-1)  # (22) (1 - K) P


def measurement_noise(batch_std: Tensor, batch_size: int, statistic: str) -> Tensor:
    """Per-dimension variance of a batch statistic, estimated from the batch itself.

    The variance of a mean of ``B`` samples is ``s^2 / B``; the variance of a sample standard
    deviation is about ``s^2 / (2 (B - 1))`` (normal approximation).

    Args:
        batch_std: ``(D,)`` standard deviation of the batch.
        batch_size: ``B``.
        statistic: ``"mean"`` or ``"std"``.

    Returns:
        ``(D,)`` measurement noise variance.

    Raises:
        ValueError: If ``statistic`` is neither ``"mean"`` nor ``"std"``.
    """
    var = batch_std.square()
    if statistic == "mean":
        return var / batch_size
    if statistic == "std":
        return var / (2 * max(batch_size - 1, 1))
    raise ValueError(f"statistic must be 'mean' or 'std', got {statistic!r}")


def steady_state_gain(q: Union[Tensor, float], r: Union[Tensor, float]) -> Union[Tensor, float]:
    """The gain :func:`kalman_step` settles at with constant noises: the fixed point of Eq. 19-22.

    With ``P'`` the predicted variance, one step is ``P' <- P + q``, ``K = P' / (P' + r)``,
    ``P <- (1 - K) P' = P' r / (P' + r)``. At the fixed point ``P' = q + P' r / (P' + r)``, i.e.
    ``P'^2 - q P' - q r = 0``, whose positive root gives::

        P' = (q + S) / 2,   S = sqrt(q^2 + 4 q r)
        K  = P' / (P' + r) = (q + S) / (q + S + 2 r)

    It depends on the ratio ``lam = q / r`` alone, ``K = (lam + sqrt(lam^2 + 4 lam)) / (lam +
    sqrt(lam^2 + 4 lam) + 2)``: ``K ~ sqrt(lam)`` for a small ratio, ``K ~ 1 - 1 / lam`` for a large
    one. The recursion reaches it from any ``P >= 0`` (geometrically). ``r = 0`` (an exact
    measurement, also with ``q = 0``, as in :func:`kalman_step`) gives 1; ``q = 0 < r`` gives 0 (a
    static state: the gain decays like ``1 / t`` towards it).

    The paper's AXBN (``q = 1``, ``r = 0.01`` per row, ``r / B`` per batch) settles at 0.998753 for
    ``B = 8``, 0.999376 for 16 and 0.999844 for 64: its memory follows the batch as XBN's does.

    Args:
        q: Process noise variance per step, ``>= 0`` (a float or a tensor).
        r: Measurement noise variance of one measurement, ``>= 0`` (a float or a tensor).

    Returns:
        ``K`` in ``[0, 1]``: a float for floats, else a tensor of the broadcast shape.
    """
    if isinstance(q, Tensor) or isinstance(r, Tensor):
        q_t = torch.as_tensor(q, dtype=torch.float64)
        r_t = torch.as_tensor(r, dtype=torch.float64)
        s = torch.sqrt(q_t * q_t + 4 * q_t * r_t)
        num, den = q_t + s, q_t + s + 2 * r_t
        return torch.where(r_t > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
    q, r = float(q), float(r)
    if r == 0:
        return 1.0
    s = math.sqrt(q * q + 4 * q * r)
    return (q + s) / (q + s + 2 * r)


def sampling_noise(batch_size: int, statistic: str) -> float:
    """Sampling variance of a batch statistic in units of the population variance ``sigma^2`` (``kalman_r="sampling"``).

    The mean of ``B`` independent rows has variance ``sigma^2 / B``; the Bessel-corrected standard
    deviation has about ``sigma^2 / (2 (B - 1))`` (normal approximation; see
    :func:`measurement_noise`). Expressed in units of ``sigma^2`` these are ``1 / B`` and
    ``1 / (2 (B - 1))``: the same for every dimension and every embedding scale.

    Args:
        batch_size: ``B >= 2``.
        statistic: ``"mean"`` or ``"std"``.

    Returns:
        The relative measurement noise ``R / sigma^2``.

    Raises:
        ValueError: If ``statistic`` is neither ``"mean"`` nor ``"std"``.
    """
    if statistic == "mean":
        return 1.0 / batch_size
    if statistic == "std":
        return 1.0 / (2 * max(batch_size - 1, 1))
    raise ValueError(f"statistic must be 'mean' or 'std', got {statistic!r}")


def sampling_gain(q: float, batch_size: int, statistic: str = "mean") -> float:
    """Steady-state gain of AXBN's ``kalman_r="sampling"`` filter for batches of ``B`` rows.

    Process noise ``Q = q sigma^2`` per step and measurement noise ``R`` from
    :func:`sampling_noise`, so ``Q / R = q B`` for the mean and ``2 q (B - 1)`` for the standard
    deviation, and :func:`steady_state_gain` gives::

        K = (lam + sqrt(lam^2 + 4 lam)) / (lam + sqrt(lam^2 + 4 lam) + 2),   lam = q B  (mean)

    For the default ``q = 0.01``: 0.246 / 0.328 / 0.542 for the mean at ``B = 8 / 16 / 64``
    (0.311 / 0.418 / 0.657 for the standard deviation). The gain grows with ``B``: a larger batch
    is a better measurement.

    Args:
        q: Process noise per step in units of the population variance, ``>= 0``.
        batch_size: ``B >= 2``.
        statistic: ``"mean"`` or ``"std"``.

    Returns:
        ``K`` in ``[0, 1]``.
    """
    return steady_state_gain(float(q), sampling_noise(batch_size, statistic))


def shifted_sums(x: Tensor, center: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-dimension sums of deviations from ``center`` and of their squares, in float64.

    ``s1 = sum_i (x_i - c)`` and ``s2 = sum_i (x_i - c)^2``. With a center close to the data
    (the queue uses one of the stored rows) ``s2 - s1^2 / n`` does not suffer the cancellation
    of the textbook ``sum x^2 - n mean^2``, and a column whose values all equal the center gives
    exactly zero. One pass over ``x``, in row chunks (the float64 temporary stays small).

    Args:
        x: ``(N, D)`` rows, any floating dtype.
        center: ``(D,)`` float64.

    Returns:
        ``(s1, s2)``, each ``(D,)`` float64.
    """
    if x.shape[0] <= _CHUNK_ROWS:
        dev = x.to(torch.float64) - center  # (N, D)
        return dev.sum(dim=0), dev.mul_(dev).sum(dim=0)
    s1 = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)  # (D,)
    s2 = torch.zeros_like(s1)  # (D,)
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        dev = x[start : start + _CHUNK_ROWS].to(torch.float64) - center  # (c, D)
        s1 += dev.sum(dim=0)
        s2 += dev.mul_(dev).sum(dim=0)
    return s1, s2


def moments_from_sums(center: Tensor, s1: Tensor, s2: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """Mean and Bessel-corrected variance of ``n >= 2`` rows from their :func:`shifted_sums`.

    ``mean = c + s1 / n``, ``var = (s2 - s1^2 / n) / (n - 1)``.

    Args:
        center: ``(D,)`` the center the sums were taken about.
        s1: ``(D,)`` sum of deviations.
        s2: ``(D,)`` sum of squared deviations.
        n: number of rows.

    Returns:
        ``(mean, var)``, each ``(D,)``, in the dtype of the sums. ``var`` is not clamped: a
        negative value is rounding noise the caller may want to see.
    """
    mean = center + s1 / n
    var = (s2 - s1 * s1 / n) / (n - 1)
    return mean, var


def affine_sums(
    center: Tensor, s1: Tensor, s2: Tensor, scale: Tensor, shift: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """The :func:`shifted_sums` of the rows after ``z -> z * scale + shift``, exactly.

    Moving the center with the rows, ``c' = c * scale + shift``, every deviation is multiplied
    by ``scale``: ``s1' = scale * s1`` and ``s2' = scale^2 * s2`` (no term in ``shift``, so no
    cancellation).

    Args:
        center, s1, s2: ``(D,)`` current center and sums.
        scale, shift: ``(D,)`` the per-dimension affine map applied to every row.

    Returns:
        ``(center', s1', s2')``, each ``(D,)``.
    """
    return torch.addcmul(shift, center, scale), s1 * scale, s2 * scale * scale


# ---------------------------------------------------------------------------------------------- steady-state step
def batch_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-dimension mean and Bessel-corrected standard deviation of a batch, in few kernels.

    On CUDA one ``torch.var_mean`` (float32) and a square root. On CPU, where ``var_mean`` over
    dim 0 is a slow strided Welford reduction, a two-pass float64 computation (mean, then the norm
    of the deviations): exactly 0 for a constant column. Agrees with :func:`moments` up to float
    rounding.

    Args:
        x: ``(B, D)`` float rows, ``B >= 2``.

    Returns:
        ``(mean, std)``, each ``(D,)``: float32 on CUDA, float64 on CPU.
    """
    if x.device.type != "cpu":
        var, mean = torch.var_mean(x, dim=0, correction=1)  # (D,), (D,)
        return mean, var.sqrt_()
    x64 = x.to(torch.float64)  # (B, D)
    mean = x64.mean(dim=0)  # (D,)
    std = torch.linalg.vector_norm(x64 - mean, dim=0).mul_(1.0 / math.sqrt(x.shape[0] - 1))  # (D,)
    return mean, std


def xbn_step_(
    center: Tensor,
    s1: Tensor,
    s2: Tensor,
    n: int,
    tgt_mean: Tensor,
    tgt_std: Tensor,
    eps: float,
    floor: float,
    a: Tensor,
    b: Tensor,
) -> None:
    """Eq. 6 from the running sums of the memory, in place: the map into ``(a, b)``, the sums re-centred.

    From the :func:`shifted_sums` ``(center, s1, s2)`` of the ``n >= 2`` stored rows: their mean
    ``m = c + s1 / n`` and sum of squared deviations ``ss = s2 - s1^2 / n``; the affine map
    ``z -> a z + b`` of :func:`moment_matching_affine` to ``(tgt_mean, tgt_std)``, written into
    ``a`` and ``b`` in the memory's dtype (what is really applied); then the sums of the rows after
    that map, centred on the new mean: ``center = a m + b``, ``s1 = 0``, ``s2 = a^2 ss`` (exact,
    no cancellation).

    A dimension whose ``ss`` is at the rounding floor of the sums (``ss <= floor * s2``: a column
    that became constant, whose variance from the sums would be rounding noise) or exactly 0 is
    treated as constant: scale 0, every row goes to the target mean (what Eq. 6 does for a
    constant column), decided on the device without a host synchronisation.

    Args:
        center, s1, s2: ``(D,)`` float64 running sums, updated in place.
        n: Number of stored rows.
        tgt_mean, tgt_std: ``(D,)`` target moments.
        eps: Added to the memory's standard deviation before dividing.
        floor: Relative rounding floor of ``ss`` (e.g. ``1e-9``).
        a, b: ``(D,)`` outputs in the memory's dtype: apply as ``addcmul(b, memory, a)`` (one pass).
    """
    mean = center.add_(s1, alpha=1.0 / n)  # (D,) the new center, in place
    thr = s2 * floor  # (D,)
    ss = s2.addcmul_(s1, s1, value=-1.0 / n)  # (D,) sum of squared deviations from the mean, in place
    flat = ss <= thr  # (D,) constant, at the rounding floor, or rounding noise < 0
    std = ss.mul(1.0 / (n - 1)).sqrt_()  # (D,) NaN where ss < 0, masked below
    torch.div(tgt_std, std.add_(eps), out=a).masked_fill_(flat, 0.0)  # (D,) Eq. 6 scale
    torch.addcmul(tgt_mean, mean, a, value=-1, out=b)  # (D,) shift
    torch.addcmul(b, mean, a, out=center)  # the mean moves with the rows
    ss.mul_(a).mul_(a)  # deviations scale by a: s2 = a^2 ss
    s1.zero_()


def frame_step_(
    center: Tensor,
    s1: Tensor,
    s2: Tensor,
    n: int,
    tgt_mean: Tensor,
    tgt_std: Tensor,
    frame_scale: Tensor,
    frame_shift: Tensor,
    eps: float,
    floor: float,
    flat_std: float,
    min_scale: float,
) -> None:
    """Eq. 6 for a fixed-frame (bfloat16 / float16) memory: compose the map into the frame, in place.

    The stored raw rows ``r`` read as ``r * A + B`` (``A = frame_scale > 0``, ``B = frame_shift``,
    float64); the running sums describe the raw rows. The memory's moments are ``A m_raw + B`` and
    ``A std_raw``; the map ``z -> a z + b`` of Eq. 6 is composed into the frame (``A <- a A``,
    ``B <- a B + b``) and the raw rows are never rewritten. The sums are re-centred on the raw mean.

    A column that is constant (at the rounding floor of the sums, see :func:`xbn_step_`, or read
    with a standard deviation ``<= flat_std``) keeps its frame scale (``a = 1``) and its shift
    moves so that it reads the target mean. A column whose target standard deviation is 0 would
    make ``A`` 0 (and later rows unstorable): its scale is held at ``min_scale`` instead, so it
    reads the target mean within ``min_scale`` of its former spread and counts as constant from
    then on.

    Args:
        center, s1, s2: ``(D,)`` float64 running sums of the raw rows, updated in place.
        n: Number of stored rows.
        tgt_mean, tgt_std: ``(D,)`` target moments.
        frame_scale, frame_shift: ``(D,)`` float64 frame, updated in place.
        eps: Added to the memory's standard deviation before dividing.
        floor: Relative rounding floor, see :func:`xbn_step_`.
        flat_std: A column read with at most this standard deviation is constant.
        min_scale: Smallest scale composed into the frame (e.g. ``2 ** -60``).
    """
    raw_mean = center.add_(s1, alpha=1.0 / n)  # (D,) re-centred in place
    thr = s2 * floor  # (D,)
    ss = s2.addcmul_(s1, s1, value=-1.0 / n)  # (D,) (n - 1) raw variance, in place
    mem_mean = torch.addcmul(frame_shift, raw_mean, frame_scale)  # (D,) rows as read
    mem_std = ss.mul(1.0 / (n - 1)).sqrt_().mul_(frame_scale)  # (D,) NaN where ss < 0 (then flat)
    flat = (ss <= thr).logical_or_(mem_std <= flat_std)  # (D,)
    scale = torch.div(tgt_std, mem_std.add_(eps)).clamp_min_(min_scale).masked_fill_(flat, 1.0)  # (D,)
    shift = torch.addcmul(tgt_mean, mem_mean, scale, value=-1)  # (D,) flat: tgt_mean - A m_raw - B
    torch.addcmul(shift, frame_shift, scale, out=frame_shift)  # B <- a B + b
    frame_scale.mul_(scale)  # A <- a A
    ss.masked_fill_(flat, 0.0)  # a constant column has no spread
    s1.zero_()


def update_sums_(
    s1: Tensor, s2: Tensor, center: Tensor, rows: Sequence[Tensor], weights: Tensor, work: Tensor, work_t: Tensor
) -> None:
    """Add ``weights``-signed rows to the running sums, in place: ``s1 += w @ (r - c)``, ``s2 += w @ (r - c)^2``.

    Used with weights ``+1`` for rows written and ``-1`` for the rows they overwrite.

    Args:
        s1, s2: ``(D,)`` float64 sums, updated in place.
        center: ``(D,)`` float64 center of the sums.
        rows: sequence of ``(k_i, D)`` row blocks (any float dtype), concatenated in order.
        weights: ``(R,)`` float64 signs, ``R = sum k_i``.
        work: ``(D, R)`` contiguous float64 scratch (overwritten), and ``work_t = work.t()``.
    """
    torch.cat(list(rows), out=work_t)  # (R, D) float64 copy of the rows
    work_t.sub_(center)  # (R, D) deviations
    s1.addmv_(work, weights)
    s2.addmv_(work.square(), weights)


# ---------------------------------------------------------------------------------------------- full covariance
def mean_cov(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and Bessel-corrected covariance of the rows of ``x``, in float64, in row chunks.

    Args:
        x: ``(N, D)`` rows, ``N >= 2``, any floating dtype.

    Returns:
        ``(mean, cov)``: ``(D,)`` and ``(D, D)`` float64.
    """
    mean = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)  # (D,)
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        mean += x[start : start + _CHUNK_ROWS].to(torch.float64).sum(dim=0)
    mean /= x.shape[0]
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)  # (D, D)
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        dev = x[start : start + _CHUNK_ROWS].to(torch.float64) - mean  # (c, D)
        cov.addmm_(dev.t(), dev)
    return mean, cov.div_(x.shape[0] - 1)


def covariance_matching_affine(
    src_mean: Tensor, src_cov: Tensor, tgt_mean: Tensor, tgt_cov: Tensor, eps: float = 1e-6, floor: float = 1e-10
) -> Tuple[Tensor, Tensor]:
    """The affine map ``z -> z @ A + b`` that moves rows with moments ``(src_mean, src_cov)`` to ``(tgt_mean, tgt_cov)``.

    Whitening by the source covariance ``S``, colouring by the target's ``T`` (both symmetric square
    roots, from float64 eigendecompositions)::

        A = S^-1/2 T^1/2,   S^-1/2 = V diag(1 / (sqrt(l) + eps)) V^T,   b = tgt_mean - src_mean @ A

    so that ``A^T S A = T`` up to ``eps``: the rows get the target's mean and covariance.

    **Which map.** Matching the first two moments (the paper's Eq. 8-9) does not determine ``A``:
    every ``S^-1/2 Q T^1/2`` with ``Q`` orthogonal satisfies ``A^T S A = T``. The paper writes one
    solution, Eq. 10, ``(T S^-1)^1/2`` (column vectors; the principal square root of a non-symmetric
    matrix); the optimal-transport map ``S^-1/2 (S^1/2 T S^1/2)^1/2 S^-1/2`` is another (the one that
    moves the rows least). This function takes ``Q = I`` (whitening-colouring), because it needs only
    the two symmetric eigendecompositions of ``S`` and ``T`` taken separately, and a rank-deficient
    ``S`` degrades gracefully (below). All three agree when ``S`` and ``T`` commute (share
    eigenvectors), and with diagonal covariances they are Eq. 6 exactly (scale
    ``t_std / (s_std + eps)``).

    **What it can correct.** The mean and the covariance always. The rows themselves follow a true
    drift ``z' = z M + c`` only when ``S^1/2 M`` is symmetric positive semi-definite (for example
    ``M`` a positive diagonal with a diagonal ``S``: Eq. 6's model; or ``M`` a stretch along the
    eigenvectors of ``S``). **It cannot correct a rotation:** second moments cannot tell a rotated
    memory from an unrotated one when its covariance is isotropic (``M^T S M = S``, so ``A = I``),
    and for other ``S`` the map is not the rotation either (``tests/xbn_queue/test_xbn_cov.py``
    shows both).

    A source direction whose variance is at most ``floor`` times the largest (a rank-deficient
    memory, or a constant column) gets whitening 0, so those rows go to the target mean there, as
    Eq. 6 does for a constant column.

    Args:
        src_mean: ``(D,)`` mean of the rows to adapt (the memory).
        src_cov: ``(D, D)`` their covariance (symmetric positive semi-definite).
        tgt_mean: ``(D,)`` target mean.
        tgt_cov: ``(D, D)`` target covariance (symmetric positive semi-definite).
        eps: added to the source's standard deviations (square roots of eigenvalues).
        floor: relative eigenvalue floor of the source.

    Returns:
        ``(A, b)``: ``(D, D)`` and ``(D,)`` float64.

    Note:
        ``torch.linalg.eigh`` synchronises a CUDA device with the host (PyTorch's documentation):
        this function makes two host synchronisations, counted by :class:`~xbn_queue.opcount.OpCounter`.
    """
    s_val, s_vec = torch.linalg.eigh(src_cov.to(torch.float64))  # ascending eigenvalues, (D,), (D, D)
    s_val = s_val.clamp_min(0)
    keep = s_val > floor * s_val.max().clamp_min(torch.finfo(torch.float64).tiny)  # (D,) on the device
    inv_sqrt = torch.where(keep, 1.0 / (s_val.sqrt() + eps), torch.zeros_like(s_val))  # (D,)
    whiten = (s_vec * inv_sqrt) @ s_vec.t()  # (D, D) S^-1/2
    t_val, t_vec = torch.linalg.eigh(tgt_cov.to(torch.float64))
    colour = (t_vec * t_val.clamp_min(0).sqrt()) @ t_vec.t()  # (D, D) T^1/2
    a = whiten @ colour  # (D, D)
    b = tgt_mean.to(torch.float64) - src_mean.to(torch.float64) @ a  # (D,)
    return a, b


def apply_linear_(z: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """In place ``z <- z @ a + b``, in row chunks (the temporary stays small).

    Args:
        z: ``(N, D)`` rows, modified in place (the product is computed in ``z``'s dtype).
        a: ``(D, D)``.
        b: ``(D,)``.

    Returns:
        ``z``.
    """
    a, b = a.to(z.dtype), b.to(z.dtype)
    for start in range(0, z.shape[0], _CHUNK_ROWS):
        chunk = z[start : start + _CHUNK_ROWS]  # (c, D), a view
        chunk.copy_(torch.addmm(b, chunk, a))
    return z


def wishart_noise(cov: Tensor, dof: Union[int, float, Tensor]) -> Tensor:
    """Mean variance of the entries of a sample covariance of Gaussian rows (the Wishart distribution).

    ``Var(S_ij) = (C_ij^2 + C_ii C_jj) / dof`` for a Bessel-corrected sample covariance with ``dof``
    degrees of freedom (``B - 1`` for ``B`` rows), ``C`` the true covariance; ``cov`` stands in for ``C``.

    Args:
        cov: ``(D, D)`` float64 covariance.
        dof: Degrees of freedom (``> 0``).

    Returns:
        ``()`` float64: the mean over the ``D^2`` entries.
    """
    diag = torch.diagonal(cov)  # (D,)
    return (cov.square() + diag[:, None] * diag[None, :]).mean() / dof  # ()


def shrink_to_diagonal(cov: Tensor, dof_inv: Tensor) -> Tuple[Tensor, Tensor]:
    """Shrink the off-diagonal entries of an estimated covariance towards 0, by the estimated optimal weight.

    ``cov`` is an unbiased estimate ``C`` of a covariance ``Sigma`` whose entries have the Gaussian
    (Wishart) variance ``Var(C_ij) = v (Sigma_ij^2 + Sigma_ii Sigma_jj)``, ``v = dof_inv``: ``1 / (B - 1)``
    for one batch of ``B`` rows, ``sum_s w_s^2 / (B_s - 1)`` for a weighted mean ``sum_s w_s S_s`` of
    independent batch covariances (what :class:`~xbn_queue.adaptation.XBNCov` keeps). The result is::

        out = (1 - lam) C + lam diag(C)
        lam = min(1, sum_{i != j} Var^(C_ij) / sum_{i != j} C_ij^2),   Var^(C_ij) = v / (1 + v) (C_ij^2 + C_ii C_jj)

    the intensity that minimises the expected squared Frobenius error, ``sum Var / sum (Var + Sigma_ij^2)``
    over ``i != j`` (Ledoit and Wolf 2004; Schaefer and Strimmer 2005, target "D"), estimated by
    plugging in ``C`` (``E[C_ij^2] = Sigma_ij^2 + Var`` estimates the denominator without bias; the
    ``1 / (1 + v)`` makes the numerator's plug-in nearly unbiased). At that intensity the expected error is::

        E ||out - Sigma||_F^2 = v sum_i 2 Sigma_ii^2 + (1 - lam) v sum_{i != j} (Sigma_ij^2 + Sigma_ii Sigma_jj)

    against ``v (tr(Sigma^2) + tr(Sigma)^2)`` without shrinkage. For ``Sigma = s^2 I`` that is
    ``2 D v s^4`` against ``(D^2 + D) v s^4``, a factor ``(D + 1) / 2`` (and ``lam`` is then 1 up to the
    noise of its estimate, leaving the diagonal, whose entries have relative error ``sqrt(2 v)``).
    ``out`` is positive definite whenever ``lam > 0`` and the diagonal is positive (its smallest
    eigenvalue is at least ``lam min_i C_ii``), however few rows ``C`` came from. No host
    synchronisation.

    Args:
        cov: ``(D, D)`` float64 symmetric estimate ``C``.
        dof_inv: ``()`` float64 ``v``, the inverse effective degrees of freedom of ``C``.

    Returns:
        ``(out, lam)``: ``(D, D)`` float64 and ``()`` float64 in ``[0, 1]``.
    """
    diag = torch.diagonal(cov)  # (D,)
    diag_sq = diag.square().sum()  # ()
    off_sq = cov.square().sum() - diag_sq  # () sum_{i != j} C_ij^2
    cross = diag.sum().square() - diag_sq  # () sum_{i != j} C_ii C_jj
    var = dof_inv / (1 + dof_inv) * (off_sq + cross)  # () sum_{i != j} Var^(C_ij)
    tiny = torch.finfo(torch.float64).tiny
    lam = torch.where(off_sq > tiny, var / off_sq.clamp_min(tiny), torch.ones_like(off_sq)).clamp(0, 1)  # ()
    out = cov * (1 - lam)  # (D, D)
    out.diagonal().add_(diag * lam)
    return out, lam
