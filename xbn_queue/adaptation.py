"""Adaptation strategies for the cross-batch memory: none (plain XBM), XBN, AXBN and full-covariance XBN.

All strategies share one hook, :meth:`Adaptation.target`: given the statistics of the
current batch, return the mean and standard deviation the stored rows should be moved to,
or ``None`` to leave the memory alone. :class:`~xbn_queue.queue.AdaptiveQueue` does the
rest (memory statistics and the in-place affine map of Eq. 6 / Eq. 23). A strategy with
``full_covariance = True`` implements :meth:`Adaptation.target_covariance` instead and the queue
matches the whole covariance (:class:`XBNCov`). Adding a strategy is adding one subclass. Every
piece of state is a registered buffer.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["Adaptation", "NoAdaptation", "XBN", "AXBN", "XBNCov", "ADAPTATIONS", "build_adaptation", "NOISE_MODELS",
           "kalman_r_value"]

#: The ``kalman_r`` strings AXBN accepts besides a number: per-dimension noise from the batch (``"auto"``)
#: and the sampling-variance model (``"sampling"``), see :class:`AXBN`.
NOISE_MODELS = ("auto", "sampling")
#: Default process noise of ``kalman_r="sampling"``, in units of the population variance per step.
SAMPLING_Q = 0.01


def kalman_r_value(value: Union[float, str]) -> Optional[Union[float, str]]:
    """``kalman_r`` as AXBN takes it, the one rule for the library and both trainers.

    Args:
        value: a number, or one of :data:`NOISE_MODELS` (case and surrounding spaces ignored).

    Returns:
        The number as a float when it is finite and > 0, the noise model's name, or ``None`` when the
        value is neither (the caller raises its own error: ``ValueError`` here, a one-line usage error
        in the trainers).
    """
    text = str(value).strip().lower()
    if text in NOISE_MODELS:
        return text
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if 0 < number < float("inf") else None


class Adaptation(nn.Module):
    """Base class: decides the target moments of the memory at each step.

    Subclasses implement :meth:`target`. They may keep state in registered buffers; the
    queue calls :meth:`target` only when an adaptation really happens (batch of at least two
    rows and at least two rows stored), so a skipped call leaves the state untouched.
    """

    #: Name used by ``AdaptiveQueue(adaptation=...)``.
    name: str = "base"
    #: Whether the queue calls :meth:`target_covariance` (full covariance) instead of :meth:`target`.
    full_covariance: bool = False

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = int(dim)
        self.eps = float(eps)

    @property
    def active(self) -> bool:
        """Whether this strategy ever changes the memory."""
        return True

    def target(self, batch_mean: Tensor, batch_std: Tensor, batch_size: int) -> Optional[Tuple[Tensor, Tensor]]:
        """Target statistics for the memory.

        Args:
            batch_mean: ``(D,)`` float32 mean of the current batch.
            batch_std: ``(D,)`` float32 standard deviation (Bessel-corrected) of the batch.
            batch_size: Number of rows ``B`` the statistics were computed on.

        Returns:
            ``(mean, std)``, each ``(D,)``, or ``None`` to leave the memory as it is.
        """
        raise NotImplementedError

    def target_covariance(
        self,
        batch_mean: Tensor,
        batch_cov: Tensor,
        batch_size: int,
        memory_cov: Optional[Tensor] = None,
        memory_rows: int = 0,
    ) -> Tuple[Tensor, Tensor]:
        """Target mean and covariance for the memory (strategies with ``full_covariance = True``).

        Args:
            batch_mean: ``(D,)`` float64 mean of the current batch.
            batch_cov: ``(D, D)`` float64 covariance (Bessel-corrected) of the batch.
            batch_size: Number of rows ``B``.
            memory_cov: ``(D, D)`` float64 covariance of the stored rows before the step.
            memory_rows: Number of stored rows ``n``.

        Returns:
            ``(mean, cov)``: ``(D,)`` and ``(D, D)`` symmetric positive semi-definite.
        """
        raise NotImplementedError

    def reset(self) -> None:
        """Forget any filter state."""

    def _refresh_host_state(self) -> None:
        """Re-read host mirrors of scalar buffers (after a load or a CUDA-graph replay); none here."""

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class NoAdaptation(Adaptation):
    """Plain XBM (Wang et al. 2020): the stored rows are never changed."""

    name = "none"

    @property
    def active(self) -> bool:
        return False

    def target(self, batch_mean: Tensor, batch_std: Tensor, batch_size: int) -> None:
        return None


class XBN(Adaptation):
    """Cross Batch Normalization (Eq. 6): match the moments of the current batch."""

    name = "xbn"

    def target(self, batch_mean: Tensor, batch_std: Tensor, batch_size: int) -> Tuple[Tensor, Tensor]:
        return batch_mean, batch_std


class _StepCounted:
    """Mixin for filters with a ``step`` buffer and its host mirror ``_t`` (the host decides with
    ``_t``, never reading the device): zeroed by ``reset``, re-read after a load."""

    step: Tensor
    _t: int

    def reset(self) -> None:
        for buf in self.buffers():  # type: ignore[attr-defined]
            buf.zero_()
        self._t = 0

    def _refresh_host_state(self) -> None:
        self._t = int(self.step)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._t = int(self.step)


class AXBN(_StepCounted, Adaptation):
    """Adaptive Cross Batch Normalization (Eq. 18-23).

    Two independent diagonal static-state Kalman filters estimate the dataset mean and
    standard deviation from the noisy batch statistics; the memory is matched to the
    estimates. Measurement noise is ``r / B``::

        first call:  u <- v, P <- p0, K <- 0, t <- 1
        later calls: P <- P + q
                     if (t - 1) % gain_every == 0:  K <- P / (P + r / B)
                     u <- u + K (v - u);  P <- (1 - K) P;  t <- t + 1

    The gain settles at :func:`~xbn_queue.functional.steady_state_gain` ``(q, r / B)``, which
    depends on ``q B / r`` alone. At the paper's ``q = 1``, ``r = 0.01`` that is 0.998753 for
    ``B = 8`` (0.999375 at the first step from ``p0 = 1``) and closer to 1 for larger batches: the
    estimates follow the batch moments to about 1e-3 of the innovation, and the memory is XBN's.

    ``kalman_r="sampling"`` (beyond the paper) is a noise model whose gain is below 1 where batches
    are small. Both noises are in units of the population variance ``sigma^2`` of the dimension:
    the measurement noise is the sampling variance of the batch statistic, ``sigma^2 / B`` for the
    mean and ``sigma^2 / (2 (B - 1))`` for the standard deviation
    (:func:`~xbn_queue.functional.sampling_noise`), and the process noise is ``Q = q sigma^2`` per
    step (the moments drift by ``sqrt(q)`` population standard deviations per step; ``p0`` is
    relative to the first measurement's noise, ``P0 = p0 R``). ``sigma^2`` cancels from the gain,
    so the filter runs in those units: ``P`` (stored in the ``*_variance`` buffers) is the
    estimation variance divided by ``sigma^2``, the same for every dimension and every embedding
    scale, and no per-dimension variance has to be estimated (an estimate from the batch's own
    ``s^2`` would give a batch whose ``s`` came out low more weight and bias the std filter down).
    ``Q / R = q B`` for the mean (``2 q (B - 1)`` for the std), so the steady gain is
    (:func:`~xbn_queue.functional.sampling_gain`)::

        K = (lam + sqrt(lam^2 + 4 lam)) / (lam + sqrt(lam^2 + 4 lam) + 2),   lam = q B

    0.246 / 0.328 / 0.542 at ``B = 8 / 16 / 64`` for the default ``q = 0.01`` (std filter: 0.311 /
    0.418 / 0.657). On a stationary dataset the filtered mean then has error variance
    ``K / (2 - K) sigma^2 / B`` (an exponential average of weight ``K``) against the batch mean's
    ``sigma^2 / B``; on moments that do drift by ``q sigma^2`` per step, ``K sigma^2 / B``.

    ``kalman_r="auto"`` estimates the measurement noise of each dimension from the batch itself:
    ``s^2 / B`` for the mean and ``s^2 / (2 (B - 1))`` for the standard deviation. In that
    mode ``q`` and ``p0`` are read *relative to* the measurement noise: ``Q = q * R`` and
    ``P0 = p0 * R`` per dimension, so they stay on the scale of the statistics whatever the
    embedding scale is. The ratio ``q`` alone then fixes the steady-state gain,
    ``K = (q + sqrt(q^2 + 4q)) / (q + sqrt(q^2 + 4q) + 2)`` (0.618 for the default ``q = 1``),
    whatever the batch size.

    Args:
        dim: Embedding dimension ``D``.
        eps: Added to the memory's standard deviation before dividing.
        p0: Initial estimation variance (relative to ``R`` with ``r="auto"`` / ``"sampling"``).
        q: Process noise variance (relative to ``R`` with ``r="auto"``, to ``sigma^2`` with
            ``r="sampling"``); ``None``: :meth:`default_q` of ``r`` (1, or 0.01 for ``"sampling"``).
        r: Measurement noise variance for a batch of one, ``"auto"`` or ``"sampling"``.
        gain_every: Recompute the gain every this many calls and hold it in between.

    Raises:
        ValueError: On a negative noise, a non-positive ``gain_every`` or an unknown ``r`` string.
    """

    name = "axbn"

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        p0: float = 1.0,
        q: Optional[float] = None,
        r: Union[float, str] = 0.01,
        gain_every: int = 1,
    ) -> None:
        super().__init__(dim, eps)
        parsed = kalman_r_value(r)
        if parsed is None:
            raise ValueError(f"kalman_r must be a number > 0, 'auto' or 'sampling', got {r!r}")
        r = parsed
        if q is None:
            q = self.default_q(r)
        if float(q) < 0 or float(p0) < 0:
            raise ValueError(f"kalman_q and kalman_p0 must be non-negative, got q={q}, p0={p0}")
        if int(gain_every) < 1:
            raise ValueError(f"kalman_gain_every must be >= 1, got {gain_every}")
        self.p0 = float(p0)
        self.q = float(q)
        self.r: Union[float, str] = r if isinstance(r, str) else float(r)
        self.gain_every = int(gain_every)
        for stat in ("mean", "std"):
            self.register_buffer(f"{stat}_estimate", torch.zeros(dim))  # u
            self.register_buffer(f"{stat}_variance", torch.zeros(dim))  # P
            self.register_buffer(f"{stat}_gain", torch.zeros(dim))  # K
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # t
        self._t = 0  # host mirror of ``step``: the host decides with it, never reading the device

    @staticmethod
    def default_q(r: Union[float, str]) -> float:
        """The process noise used when ``q`` is not given: 0.01 for ``r="sampling"``, else the paper's 1.

        With ``"sampling"``, ``q = 0.01`` says the moments drift by 0.1 population standard deviations
        per step; the steady gain is then 0.246 at ``B = 8`` and 0.542 at ``B = 64`` (see the class).
        """
        return SAMPLING_Q if r == "sampling" else 1.0

    def steady_gain(self, batch_size: int, statistic: str = "mean") -> float:
        """The gain this filter settles at for batches of ``batch_size`` rows (the fixed point of its recursion).

        ``"auto"``: ``steady_state_gain(q, 1)`` (no dependence on ``B``); ``"sampling"``:
        :func:`~xbn_queue.functional.sampling_gain`; a number: ``steady_state_gain(q, r / B)``.
        """
        if self.r == "auto":
            return F.steady_state_gain(self.q, 1.0)
        if self.r == "sampling":
            return F.sampling_gain(self.q, batch_size, statistic)
        return F.steady_state_gain(self.q, self.r / batch_size)

    def _noise(
        self, batch_std: Tensor, batch_size: int, stat: str
    ) -> Tuple[Union[Tensor, float], Union[Tensor, float], Union[Tensor, float]]:
        """Return (p0, q, r) for one filter: ``(D,)`` tensors in "auto" mode, else Python floats
        ("sampling": in units of the population variance)."""
        if self.r == "auto":
            r = F.measurement_noise(batch_std, batch_size, stat)  # (D,)
            return self.p0 * r, self.q * r, r
        if self.r == "sampling":  # in units of the population variance sigma^2, which cancels from the gain
            r_rel = F.sampling_noise(batch_size, stat)
            return self.p0 * r_rel, self.q, r_rel
        return self.p0, self.q, self.r / batch_size

    @torch.no_grad()
    def target(self, batch_mean: Tensor, batch_std: Tensor, batch_size: int) -> Tuple[Tensor, Tensor]:
        """Kalman step of both filters; returns the live estimates (read them before the next call)."""
        t = self._t
        update_gain = (t - 1) % self.gain_every == 0
        for stat, v in (("mean", batch_mean), ("std", batch_std)):
            u = getattr(self, f"{stat}_estimate")
            p = getattr(self, f"{stat}_variance")
            k = getattr(self, f"{stat}_gain")
            p0, q, r = self._noise(batch_std, batch_size, stat)
            if t == 0:
                u.copy_(v)
                p.copy_(p0) if isinstance(p0, Tensor) else p.fill_(p0)
                k.zero_()
            elif isinstance(r, float) and r > 0 and isinstance(q, float):
                F.kalman_step_(u, p, k, v, q, r, update_gain)  # 6 element-wise kernels (4 with a held gain), in place
            else:  # "auto" noise or r == 0 (guarded gain)
                u_new, p_new, k_new = F.kalman_step(u, p, k, v, q, r, update_gain=update_gain)
                u.copy_(u_new)
                p.copy_(p_new)
                k.copy_(k_new)
        self._t = t + 1
        self.step.add_(1)
        # A Kalman estimate of a standard deviation stays >= 0 (a convex combination of the
        # previous estimate and a measurement >= 0, gain in [0, 1]).
        return self.mean_estimate, self.std_estimate

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p0={self.p0}, q={self.q}, r={self.r!r}, gain_every={self.gain_every}"


class XBNCov(_StepCounted, Adaptation):
    """Full-covariance XBN: the memory is whitened by its covariance and coloured by a target's.

    The paper matches each dimension's mean and standard deviation (Eq. 6, its solution of the moment
    equations 8-9 under independent dimensions) and names higher-order moments as future work. This
    strategy solves Eq. 8-9 with full covariances. The map
    (:func:`~xbn_queue.functional.covariance_matching_affine`) is whitening-colouring,
    ``z -> (z - m_R) S_R^-1/2 T^1/2 + m_T``, not the paper's Eq. 10 ``(T S_R^-1)^1/2``: both give the
    memory the target's mean and covariance and differ by an orthogonal factor that second moments
    cannot determine. So it corrects correlated scale and shear of the embedding space, not a
    rotation (see that function for exactly which drifts it follows).

    The target mean is the batch mean (as Eq. 6). The target covariance is an estimate of the
    dataset's covariance, in two parts:

    1. **A Kalman filter** (AXBN's Eq. 18-22 extended to the matrix): the state ``T`` is the matrix,
       the measurement is the batch covariance ``S_t``; every entry has the same noise model, so the
       gain is one scalar::

           first call:  T <- C_mem, P <- p0 R(C_mem, n - 1)   if the memory holds n > D rows (prefilled, loaded)
                        T <- S_1,   P <- p0 R(S_1, B - 1)     otherwise (and no update below)
           each call:   P <- P + q R_t;  K <- P / (P + R_t);  T <- T + K (S_t - T);  P <- (1 - K) P

       ``R_t = mean_ij (S_ij^2 + S_ii S_jj) / (B - 1)`` is the Wishart noise of a sample covariance
       (:func:`~xbn_queue.functional.wishart_noise`). As in AXBN's ``kalman_r="auto"``, ``q`` and
       ``p0`` are relative to ``R``, so ``q`` alone fixes the steady gain
       ``K = (q + sqrt(q^2 + 4q)) / (q + sqrt(q^2 + 4q) + 2)``: 0.145 for the default ``q = 0.0246``.
       Starting from the memory's own covariance keeps a full-rank memory full-rank: the first
       batch's covariance has rank at most ``B - 1``, and starting from it alone mapped a prefilled
       memory onto ``B - 1`` directions for good (issue 22).
    2. **Shrinkage towards the diagonal** (:func:`~xbn_queue.functional.shrink_to_diagonal`).
       ``T = sum_s w_s S_s`` is a weighted mean of batch covariances, so each entry has the variance
       ``v (Sigma_ij^2 + Sigma_ii Sigma_jj)`` with ``v = sum_s w_s^2 / (B_s - 1)`` for i.i.d. Gaussian
       batches: the filter keeps ``v`` (``cov_dof_inv``; ``1 / v`` is its effective number of rows),
       ``v <- (1 - K)^2 v + K^2 / (B - 1)``, ``v = K / ((2 - K)(B - 1))`` in the steady state. With
       ``D`` larger than ``1 / v`` (``D = 256``, ``B = 16``: ``1 / v = 192``) ``T``'s eigenvalues
       spread far from the truth (0.03 to 5.0 for ``Sigma = I`` after 300 steps); the off-diagonal
       entries are then pulled towards 0 by the weight ``lam`` (``cov_intensity``) that minimises the
       expected squared Frobenius error. Its expected error, stated in that function, is
       ``v sum_i 2 Sigma_ii^2 + (1 - lam) v sum_{i != j} (Sigma_ij^2 + Sigma_ii Sigma_jj)`` against
       ``v (tr(Sigma^2) + tr(Sigma)^2)`` for ``T`` alone. Since ``lam >= v / (1 + v) > 0``, the
       target's smallest eigenvalue is at least ``v / (1 + v) min_i T_ii``: positive definite
       however few rows the batches have.
       ``v`` counts sampling noise only: under drift ``T`` also lags the truth, which ``q`` trades off.

    ``shrinkage="auto"`` (the default) uses that weight; a number ``a`` in ``[0, 1]`` fixes it
    (``(1 - a) T + a diag(T)``; ``0`` is the unshrunk filter of version 0.3.0).

    Cost: two ``D x D`` eigendecompositions (float64) and a ``(n, D) @ (D, D)`` product over the
    memory per step, against XBN's one element-wise pass; see ``BENCHMARKS.md``. **Host
    synchronisation:** ``torch.linalg.eigh`` makes the host wait for a CUDA device, twice per step;
    this is the one strategy whose steady-state step synchronises (``OpCounter`` counts it as
    ``aten._linalg_eigh.default``). Needs float32 or float64 storage (a bfloat16 / float16 memory
    keeps a per-dimension frame).

    Args:
        dim: Embedding dimension ``D``.
        eps: Added to the memory's standard deviations (square roots of eigenvalues).
        q: Relative process noise of the covariance filter.
        p0: Relative initial estimation variance.
        shrinkage: ``"auto"`` or a fixed weight ``a`` in ``[0, 1]`` of the diagonal in the target covariance.

    Raises:
        ValueError: On a negative ``q`` / ``p0`` or a ``shrinkage`` that is neither ``"auto"`` nor in ``[0, 1]``.
    """

    name = "xbn-cov"
    full_covariance = True

    def __init__(
        self, dim: int, eps: float = 1e-6, q: float = 0.0246, p0: float = 1.0, shrinkage: Union[float, str] = "auto"
    ) -> None:
        super().__init__(dim, eps)
        if float(q) < 0 or float(p0) < 0:
            raise ValueError(f"q and p0 must be non-negative, got q={q}, p0={p0}")
        if isinstance(shrinkage, str):
            if shrinkage != "auto":
                raise ValueError(f"shrinkage must be 'auto' or in [0, 1], got {shrinkage!r}")
        elif not 0.0 <= float(shrinkage) <= 1.0:
            raise ValueError(f"shrinkage must be 'auto' or in [0, 1], got {shrinkage}")
        self.q, self.p0 = float(q), float(p0)
        self.shrinkage: Union[float, str] = shrinkage if isinstance(shrinkage, str) else float(shrinkage)
        self.register_buffer("cov_estimate", torch.zeros(dim, dim, dtype=torch.float64))  # T
        self.register_buffer("cov_variance", torch.zeros((), dtype=torch.float64))  # P
        self.register_buffer("cov_gain", torch.zeros((), dtype=torch.float64))  # K
        self.register_buffer("cov_dof_inv", torch.zeros((), dtype=torch.float64))  # v = sum w^2 / (B - 1)
        self.register_buffer("cov_intensity", torch.zeros((), dtype=torch.float64))  # lam of the last target
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # t
        self._t = 0  # host mirror of ``step``

    def _apply(self, fn, recurse=True):
        """``.float()`` / ``.half()`` leave the filter in float64 (its state is a covariance)."""
        saved = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.dtype == torch.float64}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new.dtype != torch.float64:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float64)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Checkpoints of version 0.3.0 lack ``cov_dof_inv`` and ``cov_intensity``: ``v`` is then
        read from the filter's own variance, ``P / mean(T_ij^2 + T_ii T_jj)`` (``P`` counts the drift it
        allows too, so this ``v`` is larger than the sampling part: it shrinks more, never less)."""
        key_t, key_p = prefix + "cov_estimate", prefix + "cov_variance"
        if prefix + "cov_dof_inv" not in state_dict and key_t in state_dict and key_p in state_dict:
            t = state_dict[key_t].to(torch.float64)  # (D, D)
            scale = F.wishart_noise(t, 1)  # () mean_ij (T_ij^2 + T_ii T_jj)
            p = state_dict[key_p].to(torch.float64)
            state_dict[prefix + "cov_dof_inv"] = torch.where(scale > 0, p / scale.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(p))
        if prefix + "cov_intensity" not in state_dict and key_t in state_dict:
            state_dict[prefix + "cov_intensity"] = torch.zeros((), dtype=torch.float64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def target(self, batch_mean: Tensor, batch_std: Tensor, batch_size: int) -> None:
        raise NotImplementedError("XBNCov matches the full covariance: the queue calls target_covariance")

    @torch.no_grad()
    def target_covariance(
        self,
        batch_mean: Tensor,
        batch_cov: Tensor,
        batch_size: int,
        memory_cov: Optional[Tensor] = None,
        memory_rows: int = 0,
    ) -> Tuple[Tensor, Tensor]:
        """One step of the covariance filter, then the shrinkage; returns ``(batch_mean, target)``.

        Args:
            batch_mean: ``(D,)`` float64 mean of the batch.
            batch_cov: ``(D, D)`` float64 Bessel-corrected covariance of the batch.
            batch_size: ``B >= 2``.
            memory_cov: ``(D, D)`` float64 covariance of the stored rows (read on the first call only).
            memory_rows: Number ``n`` of stored rows ``memory_cov`` came from.

        Returns:
            ``(batch_mean, target)``: ``(D,)`` and ``(D, D)`` float64 symmetric positive semi-definite
            (a new tensor; the filter state stays in the buffers).
        """
        s = batch_cov.to(torch.float64)  # (D, D)
        dof = max(batch_size - 1, 1)
        r = F.wishart_noise(s, dof)  # () Wishart noise of S_t
        t, p, k, v = self.cov_estimate, self.cov_variance, self.cov_gain, self.cov_dof_inv
        first = self._t == 0
        if first and memory_cov is not None and memory_rows > self.dim:  # decided on the host
            t.copy_(memory_cov.to(torch.float64))
            p.copy_(F.wishart_noise(t, memory_rows - 1) * self.p0)
            v.fill_(1.0 / (memory_rows - 1))
            first = False  # and the first batch is a measurement like any other
        if first:
            t.copy_(s)
            p.copy_(r * self.p0)
            k.zero_()
            v.fill_(1.0 / dof)
        else:
            p.add_(r * self.q)  # (19)
            k.copy_(torch.where(p + r > 0, p / (p + r).clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(p)))  # (20)
            t.add_(k * (s - t))  # (21)
            p.mul_(1 - k)  # (22)
            v.copy_((1 - k).square() * v + k.square() / dof)  # sum of squared weights per degree of freedom
        self._t += 1
        self.step.add_(1)
        if self.shrinkage == "auto":
            out, lam = F.shrink_to_diagonal(t, v)  # (D, D), ()
            self.cov_intensity.copy_(lam)
            return batch_mean, out
        a = float(self.shrinkage)
        out = t * (1 - a)  # (D, D)
        out.diagonal().add_(torch.diagonal(t) * a)
        self.cov_intensity.fill_(a)
        return batch_mean, out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, q={self.q}, p0={self.p0}, shrinkage={self.shrinkage!r}"


ADAPTATIONS: Dict[str, Type[Adaptation]] = {cls.name: cls for cls in (NoAdaptation, XBN, AXBN, XBNCov)}


def build_adaptation(
    adaptation: Union[str, Adaptation],
    dim: int,
    eps: float = 1e-6,
    kalman_p0: float = 1.0,
    kalman_q: Optional[float] = None,
    kalman_r: Union[float, str] = 0.01,
    kalman_gain_every: int = 1,
) -> Adaptation:
    """Make an :class:`Adaptation` from its name (``"none"``, ``"xbn"``, ``"axbn"``, ``"xbn-cov"``) or pass one through.

    Raises:
        ValueError: Unknown name, or an instance built for another dimension.
    """
    if isinstance(adaptation, Adaptation):
        if adaptation.dim != dim:
            raise ValueError(f"adaptation was built for dim={adaptation.dim}, the queue has dim={dim}")
        return adaptation
    key = str(adaptation).lower()
    if key not in ADAPTATIONS:
        raise ValueError(f"adaptation must be one of {sorted(ADAPTATIONS)} or an Adaptation, got {adaptation!r}")
    if key == "axbn":
        return AXBN(dim, eps, p0=kalman_p0, q=kalman_q, r=kalman_r, gain_every=kalman_gain_every)
    return ADAPTATIONS[key](dim, eps)
