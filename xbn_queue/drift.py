"""Feature-drift and memory-staleness diagnostics (paper Eq. 5 and Appendix C).

Three views of how far stored embeddings lag behind the current model:

* :func:`feature_drift` -- Eq. 5, ``D(x, k, dk) = ||z^k - z^(k - dk)||_2`` per sample, reduced to the
  mean and the max over a batch of samples.
* :func:`memory_staleness` / :func:`queue_staleness` -- stored memory rows against fresh embeddings
  of the same samples (mean / max L2 distance and mean cosine similarity). This is how a user sees
  that XBN keeps the memory closer to the current model than plain XBM does.
* :class:`DriftMonitor` -- holds a fixed probe batch and records the mean / max drift of its
  embeddings between consecutive measurements every ``every`` steps (Appendix C uses a probe batch
  of 64 training samples and ``dk = 1``).

All functions are pure and run under ``torch.no_grad()``; distances are computed in float32 (float64
if an input is float64), whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["feature_drift", "memory_staleness", "queue_staleness", "moment_gap", "DriftMonitor"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise ValueError(f"{name_a} and {name_b} must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{name_a} and {name_b} must be 2-D (N, D), got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (N, D), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] == 0:
        raise ValueError(f"{name_a} and {name_b} must hold at least one row, got shape {tuple(a.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"{name_a} and {name_b} must be floating point, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def _row_l2(a: Tensor, b: Tensor) -> Tensor:
    """Per-row L2 distance ``||a_i - b_i||_2``.

    Args:
        a: (N, D) tensor.
        b: (N, D) tensor.

    Returns:
        (N,) distances in float32 (float64 if an input is float64).
    """
    dtype = _compute_dtype(a, b)
    return torch.linalg.vector_norm(a.to(dtype) - b.to(dtype), dim=1)  # (N,)


@torch.no_grad()
def feature_drift(z_new: Tensor, z_old: Tensor) -> Dict[str, float]:
    """Feature drift of Eq. 5 over a batch of samples: mean and max of ``||z_new_i - z_old_i||_2``.

    Args:
        z_new: (N, D) embeddings of N samples under the current model.
        z_old: (N, D) embeddings of the same N samples (same order) under an earlier model.

    Returns:
        ``{"mean": float, "max": float}``: mean and max over the N rows of the per-row L2 distance.

    Raises:
        ValueError: if the inputs are not 2-D floating tensors of the same non-empty shape on the same
            device.
    """
    _check_pair(z_new, z_old, "z_new", "z_old")
    d = _row_l2(z_new, z_old)  # (N,)
    return {"mean": d.mean().item(), "max": d.max().item()}


@torch.no_grad()
def memory_staleness(stored: Tensor, fresh: Tensor) -> Dict[str, float]:
    """How far stored memory rows are from fresh embeddings of the same samples.

    Args:
        stored: (N, D) rows as they sit in a memory (after any adaptation).
        fresh: (N, D) embeddings of the same samples (same order) from the current model.

    Returns:
        ``{"mean_l2": float, "max_l2": float, "mean_cosine": float}``: mean and max over rows of
        ``||stored_i - fresh_i||_2`` and the mean cosine similarity ``<s, f> / max(|s| |f|, 1e-8)``.

    Raises:
        ValueError: if the inputs are not 2-D floating tensors of the same non-empty shape on the same
            device.
    """
    _check_pair(stored, fresh, "stored", "fresh")
    dtype = _compute_dtype(stored, fresh)
    s = stored.to(dtype)  # (N, D)
    f = fresh.to(dtype)  # (N, D)
    d = torch.linalg.vector_norm(s - f, dim=1)  # (N,)
    cos = torch.nn.functional.cosine_similarity(s, f, dim=1, eps=1e-8)  # (N,)
    return {"mean_l2": d.mean().item(), "max_l2": d.max().item(), "mean_cosine": cos.mean().item()}


@torch.no_grad()
def moment_gap(stored: Tensor, fresh: Tensor) -> float:
    """How far the per-dimension moments of stored rows are from those of fresh embeddings of the same samples.

    ``mean_d (|mean(s_d) - mean(f_d)| + |std(s_d) - std(f_d)|) / std(f_d)``: the error of the stored
    rows' per-dimension mean and standard deviation against those of the fresh rows, in units of the
    fresh spread. It says nothing about each row's direction. Moment matching (XBN, AXBN) does not
    remove all of it: XBN matches the stored rows to the moments of one batch of B rows, not to the
    fresh rows', so after XBN the gap is the batch's sampling error, about
    ``sqrt(2/pi) * (1/sqrt(B) + 1/sqrt(2 (B - 1)))`` for Gaussian rows. Under a pure per-dimension
    affine drift (d 256, 880 rows) the gap is 0.77 without adaptation and 0.35 after XBN with
    B = 16, 0.18 with B = 64 (``benchmarks/moment_gap_noise.py``). Dimensions where the fresh spread
    is 0 are left out (NaN when all are).

    Args:
        stored: (N, D) rows as they sit in a memory, N >= 2.
        fresh: (N, D) embeddings of the same samples (same order) from the current model.

    Raises:
        ValueError: if the inputs are not 2-D floating tensors of the same shape with at least 2 rows.
    """
    _check_pair(stored, fresh, "stored", "fresh")
    if stored.shape[0] < 2:
        raise ValueError(f"moment_gap needs at least 2 rows, got {stored.shape[0]}")
    s, f = stored.double(), fresh.double()
    f_std = f.std(dim=0)  # (D,)
    keep = f_std > 0
    if not bool(keep.any()):
        return math.nan
    gap = ((s.mean(dim=0) - f.mean(dim=0)).abs() + (s.std(dim=0) - f_std).abs())[keep] / f_std[keep]
    return gap.mean().item()


@torch.no_grad()
def queue_staleness(queue: Any, ids: Tensor, fresh_embeddings: Tensor) -> Dict[str, float]:
    """Staleness of a queue's stored rows against fresh embeddings of the same sample ids.

    Every stored row whose id appears in ``ids`` is compared with the fresh embedding of that id
    (a sample stored twice is compared twice); fresh rows whose id is not stored are ignored.

    Args:
        queue: an ``AdaptiveQueue`` that was given ``ids`` on enqueue (anything with ``.embeddings``
            (n, D) and ``.ids`` (n,) int64 or None).
        ids: (M,) integer sample ids of ``fresh_embeddings``, without duplicates.
        fresh_embeddings: (M, D) embeddings of those samples from the current model.

    Returns:
        ``{"mean_l2", "max_l2", "mean_cosine", "count", "moment_gap"}`` as in :func:`memory_staleness`,
        plus ``count``, the number of stored rows compared, and :func:`moment_gap` of those rows
        (NaN for fewer than 2). With no match, ``count`` is 0 and the statistics are NaN.

    Raises:
        ValueError: if the queue stores no ids, if ``ids`` is not a 1-D integer tensor without duplicates
            matching ``fresh_embeddings`` (M, D), or if D differs from the queue's.
    """
    stored_ids: Optional[Tensor] = queue.ids
    if stored_ids is None:
        raise ValueError(
            "queue stores no ids: pass ids= to enqueue()/update() (and store_ids=True where the queue takes it) "
            "to measure staleness"
        )
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"ids must be a 1-D integer tensor (M,), got {getattr(ids, 'shape', type(ids))}")
    if not isinstance(fresh_embeddings, Tensor) or fresh_embeddings.dim() != 2:
        raise ValueError(
            f"fresh_embeddings must be a 2-D tensor (M, D), got {getattr(fresh_embeddings, 'shape', type(fresh_embeddings))}"
        )
    if fresh_embeddings.shape[0] != ids.shape[0]:
        raise ValueError(
            f"ids and fresh_embeddings must have the same length, got {ids.shape[0]} and {fresh_embeddings.shape[0]}"
        )
    stored = queue.embeddings  # (n, D)
    if fresh_embeddings.shape[1] != stored.shape[1]:
        raise ValueError(
            f"fresh_embeddings must have the queue's dim {stored.shape[1]}, got {fresh_embeddings.shape[1]}"
        )
    match, fresh_index = _match_ids(stored_ids, ids.to(device=stored.device, dtype=torch.int64))
    count = int(match.sum())
    if count == 0:
        return {"mean_l2": math.nan, "max_l2": math.nan, "mean_cosine": math.nan, "count": 0, "moment_gap": math.nan}
    fresh_rows = fresh_embeddings.to(stored.device)[fresh_index]  # (count, D)
    out: Dict[str, Any] = memory_staleness(stored[match], fresh_rows)
    out["count"] = count
    out["moment_gap"] = moment_gap(stored[match], fresh_rows) if count >= 2 else math.nan
    return out


def _match_ids(stored_ids: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor]:
    """Which stored rows have a fresh counterpart, and which one.

    Args:
        stored_ids: (n,) int64 ids of the stored rows (repeats allowed).
        ids: (M,) int64 ids of the fresh rows, on ``stored_ids``' device.

    Returns:
        ``match`` (n,) bool, and ``index`` (count,): the fresh row of each matched stored row, in order.

    Raises:
        ValueError: if ``ids`` contains duplicates.
    """
    sorted_ids, order = torch.sort(ids)  # (M,), (M,)
    if sorted_ids.numel() > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
        raise ValueError("ids must not contain duplicates")
    if sorted_ids.numel() == 0:
        return torch.zeros_like(stored_ids, dtype=torch.bool), order
    pos = torch.searchsorted(sorted_ids, stored_ids).clamp_(max=sorted_ids.numel() - 1)  # (n,)
    match = sorted_ids[pos] == stored_ids  # (n,) stored row has a fresh counterpart
    return match, order[pos[match]]


class DriftMonitor(nn.Module):
    """Records the feature drift (Eq. 5) of a fixed probe batch between consecutive measurements.

    The probe inputs and the previous probe embeddings are registered buffers, so ``.to(device)`` and
    ``state_dict()`` carry them; the ``history`` list travels in the state dict as extra state.

    Example:
        >>> monitor = DriftMonitor(probe_images, every=100)
        >>> for step, batch in enumerate(loader):
        ...     ...  # train
        ...     rec = monitor.step(model, step)  # None, or {"step": ..., "mean": ..., "max": ...}

    Args:
        probe_inputs: (N, ...) fixed inputs (e.g. 64 training images) embedded at every measurement.
        every: measure when ``step % every == 0``.
    """

    probe: Tensor
    prev: Tensor

    def __init__(self, probe_inputs: Tensor, every: int = 1) -> None:
        super().__init__()
        if not isinstance(probe_inputs, Tensor) or probe_inputs.dim() < 1 or probe_inputs.shape[0] == 0:
            raise ValueError(
                f"probe_inputs must be a tensor (N, ...) with N >= 1, got {getattr(probe_inputs, 'shape', type(probe_inputs))}"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every = every
        self.register_buffer("probe", probe_inputs.detach().clone())
        self.register_buffer("prev", torch.empty(0))  # (N, D) once measured
        self.history: List[Dict[str, float]] = []

    @property
    def has_previous(self) -> bool:
        """Whether a previous measurement is held (the next measurement yields a drift record)."""
        return self.prev.numel() > 0

    @torch.no_grad()
    def step(self, model_fn: Callable[[Tensor], Tensor], step: int) -> Optional[Dict[str, float]]:
        """Embed the probe batch (every ``every`` steps) and record the drift since the last measurement.

        If ``model_fn`` is an ``nn.Module`` it is run in eval mode (its mode is restored afterwards) and
        the probe is moved to the device of its first parameter; any other callable gets the probe as
        stored (move the monitor with ``.to(device)``).

        Args:
            model_fn: maps the probe (N, ...) to embeddings (N, D) (or (N, ...), flattened per row).
            step: the training step; nothing happens unless ``step % every == 0``.

        Returns:
            ``{"step": step, "mean": float, "max": float}`` (also appended to ``history``) when a drift
            was measured; None when this step is skipped or is the first measurement.

        Raises:
            ValueError: if the embeddings do not have N rows or change shape between measurements.
        """
        if step % self.every != 0:
            return None
        probe = self.probe
        if isinstance(model_fn, nn.Module):
            param = next(model_fn.parameters(), None)
            if param is not None:
                probe = probe.to(param.device)
            was_training = model_fn.training
            model_fn.eval()
            try:
                z = model_fn(probe)
            finally:
                model_fn.train(was_training)
        else:
            z = model_fn(probe)
        if not isinstance(z, Tensor) or z.dim() < 1 or z.shape[0] != self.probe.shape[0]:
            raise ValueError(
                f"model_fn must return (N={self.probe.shape[0]}, D) embeddings, got {getattr(z, 'shape', type(z))}"
            )
        z = z.detach().reshape(z.shape[0], -1).float()  # (N, D)
        record: Optional[Dict[str, float]] = None
        if self.has_previous:
            if self.prev.shape != z.shape:
                raise ValueError(
                    f"embedding shape changed between measurements: {tuple(self.prev.shape)} -> {tuple(z.shape)}"
                )
            d = feature_drift(z, self.prev.to(z.device))
            record = {"step": step, "mean": d["mean"], "max": d["max"]}
            self.history.append(record)
        self.prev = z.to(self.probe.device).clone()
        return record

    def reset(self) -> None:
        """Forget the previous measurement and the history (the probe is kept)."""
        self.prev = torch.empty(0, device=self.probe.device)
        self.history = []

    def get_extra_state(self) -> Dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "every": self.every}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.history = [dict(r) for r in state["history"]]
        self.every = int(state["every"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        # ``prev`` is empty until the first measurement: take the saved shape before copying.
        key = prefix + "prev"
        if key in state_dict:
            self.prev = torch.empty_like(state_dict[key], device=self.probe.device, dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
