"""Adaptation strategies for the cross-batch memory: none (plain XBM), XBN and AXBN.

All strategies share one hook, :meth:`Adaptation.target`: given the statistics of the
current batch, return the mean and standard deviation the stored rows should be moved to,
or ``None`` to leave the memory alone. :class:`~xbn_queue.queue.AdaptiveQueue` does the
rest (memory statistics and the in-place affine map of Eq. 6 / Eq. 23). Adding a strategy
is adding one subclass. Every piece of state is a registered buffer.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["Adaptation", "NoAdaptation", "XBN", "AXBN", "ADAPTATIONS", "build_adaptation"]


class Adaptation(nn.Module):
    """Base class: decides the target moments of the memory at each step.

    Subclasses implement :meth:`target`. They may keep state in registered buffers; the
    queue calls :meth:`target` only when an adaptation really happens (batch of at least two
    rows and at least two rows stored), so a skipped call leaves the state untouched.
    """

    #: Name used by ``AdaptiveQueue(adaptation=...)``.
    name: str = "base"

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


class AXBN(Adaptation):
    """Adaptive Cross Batch Normalization (Eq. 18-23).

    Two independent diagonal static-state Kalman filters estimate the dataset mean and
    standard deviation from the noisy batch statistics; the memory is matched to the
    estimates. Measurement noise is ``r / B``::

        first call:  u <- v, P <- p0, K <- 0, t <- 1
        later calls: P <- P + q
                     if (t - 1) % gain_every == 0:  K <- P / (P + r / B)
                     u <- u + K (v - u);  P <- (1 - K) P;  t <- t + 1

    ``kalman_r="auto"`` (beyond the paper, which names the choice of noise as its limitation)
    estimates the measurement noise of each dimension from the batch itself:
    ``s^2 / B`` for the mean and ``s^2 / (2 (B - 1))`` for the standard deviation. In that
    mode ``q`` and ``p0`` are read *relative to* the measurement noise: ``Q = q * R`` and
    ``P0 = p0 * R`` per dimension, so they stay on the scale of the statistics whatever the
    embedding scale is. The ratio ``q`` alone then fixes the steady-state gain,
    ``K = (q + sqrt(q^2 + 4q)) / (q + sqrt(q^2 + 4q) + 2)`` (0.618 for the default ``q = 1``).

    Args:
        dim: Embedding dimension ``D``.
        eps: Added to the memory's standard deviation before dividing.
        p0: Initial estimation variance.
        q: Process noise variance (relative to ``R`` when ``r="auto"``).
        r: Measurement noise variance for a batch of one, or ``"auto"``.
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
        q: float = 1.0,
        r: Union[float, str] = 0.01,
        gain_every: int = 1,
    ) -> None:
        super().__init__(dim, eps)
        if isinstance(r, str):
            if r != "auto":
                raise ValueError(f"kalman_r must be a non-negative number or 'auto', got {r!r}")
        elif float(r) < 0:
            raise ValueError(f"kalman_r must be non-negative, got {r}")
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

    def reset(self) -> None:
        for name, buf in self.named_buffers():
            buf.zero_()
        self._t = 0

    def _refresh_host_state(self) -> None:
        self._t = int(self.step)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._t = int(self.step)

    def _noise(
        self, batch_std: Tensor, batch_size: int, stat: str
    ) -> Tuple[Union[Tensor, float], Union[Tensor, float], Union[Tensor, float]]:
        """Return (p0, q, r) for one filter: ``(D,)`` tensors in "auto" mode, else Python floats."""
        if self.r == "auto":
            r = F.measurement_noise(batch_std, batch_size, stat)  # (D,)
            return self.p0 * r, self.q * r, r
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


ADAPTATIONS: Dict[str, Type[Adaptation]] = {cls.name: cls for cls in (NoAdaptation, XBN, AXBN)}


def build_adaptation(
    adaptation: Union[str, Adaptation],
    dim: int,
    eps: float = 1e-6,
    kalman_p0: float = 1.0,
    kalman_q: float = 1.0,
    kalman_r: Union[float, str] = 0.01,
    kalman_gain_every: int = 1,
) -> Adaptation:
    """Make an :class:`Adaptation` from its name (``"none"``, ``"xbn"``, ``"axbn"``) or pass one through.

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
