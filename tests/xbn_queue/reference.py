"""Plain float64 reference implementations of the paper's equations, written independently of the library.

Loops over rows and dimensions on purpose: these are meant to be read against the paper, not to be fast.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence


def ref_mean_std(rows: Sequence[Sequence[float]]) -> tuple[list, list]:
    """Per-dimension mean and Bessel-corrected standard deviation of a list of rows."""
    n = len(rows)
    d = len(rows[0])
    mean = [sum(r[j] for r in rows) / n for j in range(d)]
    std = [math.sqrt(sum((r[j] - mean[j]) ** 2 for r in rows) / (n - 1)) for j in range(d)]
    return mean, std


def ref_xbn(rows: List[List[float]], t_mean: Sequence[float], t_std: Sequence[float], eps: float) -> List[List[float]]:
    """Eq. 6 / Eq. 23: move every stored row to the target moments."""
    m_mean, m_std = ref_mean_std(rows)
    return [
        [(r[j] - m_mean[j]) / (m_std[j] + eps) * t_std[j] + t_mean[j] for j in range(len(r))] for r in rows
    ]


class RefKalman:
    """Scalar-per-dimension static-state Kalman filter, as spelled out in issue 2 / Eq. 18-22."""

    def __init__(self, p0: float, q: float, r, gain_every: int, stat: str):
        self.p0, self.q, self.r, self.gain_every, self.stat = p0, q, r, gain_every, stat
        self.u: Optional[list] = None
        self.P: Optional[list] = None
        self.K: Optional[list] = None
        self.t = 0

    def noise(self, batch_std: Sequence[float], b: int) -> tuple[list, list, list]:
        d = len(batch_std)
        if self.r == "auto":
            if self.stat == "mean":
                R = [s * s / b for s in batch_std]
            else:
                R = [s * s / (2 * (b - 1)) for s in batch_std]
            return [self.p0 * x for x in R], [self.q * x for x in R], R
        if self.r == "sampling":
            # Everything in units of the population variance sigma^2: R = 1/B (mean) or 1/(2(B-1)) (std), Q = q.
            r_rel = 1.0 / b if self.stat == "mean" else 1.0 / (2 * (b - 1))
            return [self.p0 * r_rel] * d, [self.q] * d, [r_rel] * d
        return [self.p0] * d, [self.q] * d, [self.r / b] * d

    def step(self, v: Sequence[float], batch_std: Sequence[float], b: int) -> list:
        p0, q, R = self.noise(batch_std, b)
        if self.t == 0:
            self.u = list(v)
            self.P = list(p0)
            self.K = [0.0] * len(v)
        else:
            for j in range(len(v)):
                self.P[j] = self.P[j] + q[j]
                if (self.t - 1) % self.gain_every == 0:
                    self.K[j] = self.P[j] / (self.P[j] + R[j])
                self.u[j] = self.u[j] + self.K[j] * (v[j] - self.u[j])
                self.P[j] = (1 - self.K[j]) * self.P[j]
        self.t += 1
        return list(self.u)


class RefQueue:
    """Ring buffer + adaptation, float64 lists, following issue 2 literally."""

    def __init__(self, size: int, adaptation: str = "xbn", eps: float = 1e-6, p0=1.0, q=1.0, r=0.01, gain_every=1):
        self.size, self.adaptation, self.eps = size, adaptation, eps
        self.rows: List[Optional[list]] = [None] * size
        self.labels: List[Optional[int]] = [None] * size
        self.ptr = 0
        self.n = 0
        if adaptation == "axbn":
            self.kf_mean = RefKalman(p0, q, r, gain_every, "mean")
            self.kf_std = RefKalman(p0, q, r, gain_every, "std")

    def valid(self) -> List[list]:
        return [self.rows[i] for i in range(self.n)]

    def adapt(self, batch: List[list]) -> None:
        if self.adaptation == "none" or len(batch) < 2 or self.n < 2:
            return
        b_mean, b_std = ref_mean_std(batch)
        if self.adaptation == "xbn":
            t_mean, t_std = b_mean, b_std
        else:
            t_mean = self.kf_mean.step(b_mean, b_std, len(batch))
            t_std = self.kf_std.step(b_std, b_std, len(batch))
        new = ref_xbn(self.valid(), t_mean, t_std, self.eps)
        for i in range(self.n):
            self.rows[i] = new[i]

    def enqueue(self, batch: List[list], labels: Optional[List[int]] = None) -> List[int]:
        pos = []
        for k, row in enumerate(batch):
            i = (self.ptr + k) % self.size
            self.rows[i] = list(row)
            self.labels[i] = None if labels is None else labels[k]
            pos.append(i)
        self.ptr = (self.ptr + len(batch)) % self.size
        self.n = min(self.n + len(batch), self.size)
        return pos
