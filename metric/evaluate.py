"""Retrieval evaluation: Recall@K, MAP@R and R-Precision, computed in bounded memory.

The query x gallery similarity matrix is never materialised as a whole: queries are processed in
chunks of ``chunk_size`` rows, each chunk against the whole gallery (``chunk_size x G`` float32
similarities, about 0.5 GB at SOP scale with the default chunk of 2048), on the features' device
(GPU when the features live there).

Definitions (all over the queries that have at least one positive in the gallery; a query without a
positive is left out and counted in ``queries_without_positive``):

* similarity = inner product of the given features (cosine similarity for L2-normalised
  embeddings), computed in float32 by one matrix product per chunk;
* positives of a query = gallery items with the same label; in leave-one-out mode
  (``query_is_gallery=True``, SOP / folder / digits protocol) the query itself is removed from its
  own gallery;
* **ties count against the query** (pessimistic ranking): a negative whose similarity equals that of
  a positive is ranked before it. The ranking is thus the stable order of (similarity descending,
  negatives before positives among equal similarities); the order among equal positives does not
  change any metric;
* Recall@K = fraction of queries whose first positive is at rank <= K, i.e. with fewer than K
  negatives at least as similar as their most similar positive;
* MAP@R (Musgrave et al., "A metric learning reality check", 2020): with R the number of positives
  of the query, ``MAP@R = 1/R * sum_{i=1..R} P(i) * rel(i)`` where ``rel(i)`` says whether the item
  at rank i is a positive and ``P(i)`` is the precision of the top i.
* R-Precision (same paper): the fraction of positives among the first R ranked items,
  ``1/R * sum_{i=1..R} rel(i)``.

PML's ``AccuracyCalculator`` (``precision_at_1``, ``mean_average_precision_at_r``, ``r_precision``
with its default ``avg_of_avgs=False``) gives the same numbers wherever no positive ties with a
negative: it leaves out queries without a positive and removes the query itself by index as here,
and averages over queries; its ranking among equal distances is the order its k-NN search returns,
where here ties count against the query (``tests/metric/test_accuracy_calculator.py``).

Algorithm per query chunk: one ``(c, D) x (D, G)`` matrix product; the similarities of the positives
are read from that same product (so ties are decided on identical float32 values), then positives and
the query itself are masked to ``-inf``; the number of negatives ``>=`` the best positive is counted
(for Recall@K) and the top ``R_max`` negative similarities are kept (for MAP@R and R-Precision: the k-th positive in
ranked order has rank ``k + #{negatives >= its similarity}``, and only ranks <= R matter).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["retrieval_metrics", "count_true_per_row", "check_retrieval_inputs", "SCORE_PREFIXES", "is_score",
           "faiss_retrieval_metrics", "faiss_search"]

#: The prefixes of the retrieval scores in a result or record (``recall@K``, ``map@r``, ``r_precision``).
SCORE_PREFIXES = ("recall@", "map@r", "r_precision")


def is_score(key: str) -> bool:
    """Whether ``key`` is a retrieval score of :func:`retrieval_metrics` (a fraction in [0, 1] shown in %)."""
    return key.startswith(SCORE_PREFIXES)


def count_true_per_row(mask: Tensor) -> Tensor:
    """Number of True entries per row of a boolean matrix, fast on CPU.

    Summing a bool tensor goes through a slow int64 reduction on CPU; here the bytes are read eight
    at a time as int64 words, summed in groups of at most 255 words (so each byte lane stays below
    256) and the byte lanes are then added up.

    Args:
        mask: (c, L) contiguous bool tensor.

    Returns:
        (c,) int64 counts.
    """
    c, length = mask.shape
    if mask.device.type != "cpu" or length % 8 != 0 or not mask.is_contiguous():
        return mask.sum(dim=1)
    words = mask.view(torch.int64)  # (c, L/8), each byte lane 0 or 1
    total = torch.zeros(c, dtype=torch.int64)
    for s in range(0, words.shape[1], 255):
        part = words[:, s : s + 255].sum(dim=1)  # (c,) every byte lane <= 255: no carry between lanes
        for lane in range(8):
            total += (part >> (8 * lane)) & 255
    return total


def _group_positions(q_labels: Tensor, g_labels: Tensor):
    """CSR of the gallery positions of each query's label.

    Returns:
        ``order`` (G,) gallery positions sorted by label, and per query ``start`` (Q,), ``count`` (Q,)
        such that ``order[start[q] : start[q] + count[q]]`` are the gallery items with query q's label.
    """
    sorted_g, order = torch.sort(g_labels, stable=True)  # (G,), (G,)
    start = torch.searchsorted(sorted_g, q_labels, side="left")  # (Q,)
    end = torch.searchsorted(sorted_g, q_labels, side="right")  # (Q,)
    return order, start, end - start


def check_retrieval_inputs(query: Tensor, query_labels: Tensor, gallery: Optional[Tensor],
                           gallery_labels: Optional[Tensor], ks: Sequence[int], query_is_gallery: bool):
    """The argument checks of :func:`retrieval_metrics` (shared by its faiss twin).

    Returns:
        ``(gallery, gallery_labels, query_is_gallery, ks)``: the queries themselves when ``gallery`` is
        ``None`` (leave-one-out), and ``ks`` sorted without repeats.

    Raises:
        ValueError: on shape mismatches, leave-one-out with Q != G, or a K < 1.
    """
    if gallery is None:
        gallery, gallery_labels, query_is_gallery = query, query_labels, True
    if gallery_labels is None:
        raise ValueError("gallery_labels must be given with gallery")
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query (Q, D) and gallery (G, D) must share D, got {tuple(query.shape)} and {tuple(gallery.shape)}")
    if query_labels.shape != (query.shape[0],) or gallery_labels.shape != (gallery.shape[0],):
        raise ValueError(
            f"labels must be (Q,)=({query.shape[0]},) and (G,)=({gallery.shape[0]},), "
            f"got {tuple(query_labels.shape)} and {tuple(gallery_labels.shape)}"
        )
    if query_is_gallery and query.shape[0] != gallery.shape[0]:
        raise ValueError(f"query_is_gallery needs Q == G, got Q={query.shape[0]}, G={gallery.shape[0]}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return gallery, gallery_labels, query_is_gallery, ks


@torch.no_grad()
def retrieval_metrics(
    query: Tensor,
    query_labels: Tensor,
    gallery: Optional[Tensor] = None,
    gallery_labels: Optional[Tensor] = None,
    ks: Sequence[int] = (1, 10, 100, 1000),
    query_is_gallery: bool = False,
    chunk_size: int = 2048,
    map_at_r: bool = True,
) -> Dict[str, float]:
    """Recall@K, MAP@R and R-Precision of a retrieval problem, in chunks of queries (see the module docstring).

    Args:
        query: (Q, D) query features (float; computed in float32).
        query_labels: (Q,) integer labels.
        gallery: (G, D) gallery features; ``None`` means the queries are the gallery.
        gallery_labels: (G,) integer labels (``None`` with ``gallery=None``).
        ks: the K of Recall@K.
        query_is_gallery: leave-one-out: query i is gallery item i and is excluded from its own
            ranking (implied when ``gallery`` is None; requires Q == G).
        chunk_size: queries per chunk; memory is about ``chunk_size * G * 5`` bytes.
        map_at_r: also compute MAP@R and R-Precision.

    Returns:
        ``{"recall@K": float for each K, "map@r": float, "r_precision": float, "num_queries": int,
        "queries_without_positive": int}`` (the scores as fractions in [0, 1]; NaN when no query has
        a positive).

    Raises:
        ValueError: on shape mismatches, non-finite features, or leave-one-out with Q != G.
    """
    gallery, gallery_labels, query_is_gallery, ks = check_retrieval_inputs(query, query_labels, gallery, gallery_labels,
                                                                           ks, query_is_gallery)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    xq, lq, xg, lg = _on_gallery_device(query, query_labels, gallery, gallery_labels)  # (Q, D), (Q,), (G, D), (G,)
    n_q, n_g = xq.shape[0], xg.shape[0]
    order, start, count = _group_positions(lq, lg)  # (G,), (Q,), (Q,)
    n_pos = count - int(query_is_gallery)  # (Q,) positives R per query (self removed)
    has_pos = n_pos > 0  # (Q,)
    r_max = int(n_pos.max().item()) if n_q > 0 else 0
    hits = {k: torch.zeros((), dtype=torch.float64) for k in ks}
    ap_rp = torch.zeros(2, dtype=torch.float64)  # sums of AP@R and R-Precision
    c_max = min(chunk_size, max(n_q, 1))
    sim_buf = torch.empty(c_max * n_g, dtype=torch.float32, device=xg.device)
    ge_buf = torch.zeros(c_max * ((n_g + 7) // 8 * 8), dtype=torch.bool, device=xg.device)  # whole int64 words
    for s in range(0, n_q, chunk_size):
        e = min(s + chunk_size, n_q)
        sim = sim_buf[: (e - s) * n_g].view(e - s, n_g)
        torch.mm(xq[s:e], xg.t(), out=sim)  # (c, G) similarities
        pos_sim = _take_positives(sim, order, start, count, s, query_is_gallery)  # (c, P); sim: negatives only
        n_before = _negatives_before_first_positive(sim, pos_sim, ge_buf)  # (c,)
        ok = has_pos[s:e]  # (c,)
        for k in ks:
            hits[k] += ((n_before < k) & ok).sum().double().cpu()
        if map_at_r and r_max > 0:
            ap_rp += _ap_and_precision_at_r(sim, pos_sim, n_pos[s:e], r_max, ok)
    return _averages(hits, ap_rp[0], ap_rp[1], has_pos, n_q, ks, map_at_r)


def _on_gallery_device(query: Tensor, query_labels: Tensor, gallery: Tensor,
                       gallery_labels: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Features in float32 (the gallery's contiguous) and labels in int64, on the gallery's device.

    Raises:
        ValueError: if a feature is NaN or infinite.
    """
    device = gallery.device
    xq = query.to(device=device, dtype=torch.float32)  # (Q, D)
    xg = gallery.to(device=device, dtype=torch.float32).contiguous()  # (G, D)
    if not (torch.isfinite(xg).all() and (query is gallery or torch.isfinite(xq).all())):
        raise ValueError("retrieval_metrics: features contain NaN or Inf")
    return xq, query_labels.to(device=device, dtype=torch.int64), xg, gallery_labels.to(device=device, dtype=torch.int64)


def _take_positives(sim: Tensor, order: Tensor, start: Tensor, count: Tensor, s: int,
                    query_is_gallery: bool) -> Tensor:
    """The similarities of a chunk's positives, taken out of ``sim`` (set to ``-inf`` there, with the query itself).

    Args:
        sim: (c, G) similarities of queries ``s .. s + c - 1``; afterwards only their negatives are finite.
        order, start, count: :func:`_group_positions` of all queries.
        s: the chunk's first query.
        query_is_gallery: leave-one-out (query i is gallery item i).

    Returns:
        (c, P) the positives' similarities, read from ``sim`` (ties are decided on identical values),
        ``-inf`` padded; P is the chunk's largest count.
    """
    c, n_g = sim.shape
    device = sim.device
    cnt = count[s : s + c]  # (c,)
    p_width = int(cnt.max().item()) if c > 0 else 0
    ar = torch.arange(p_width, device=device)  # (P,)
    valid = ar[None, :] < cnt[:, None]  # (c, P)
    pos_idx = order[(start[s : s + c, None] + ar[None, :]).clamp_(max=max(n_g - 1, 0))]  # (c, P)
    rows = torch.arange(c, device=device)[:, None].expand(c, p_width)  # (c, P)
    if query_is_gallery:
        valid &= pos_idx != (torch.arange(s, s + c, device=device)[:, None])  # drop self
    pos_sim = torch.where(valid, sim[rows, pos_idx], torch.tensor(float("-inf"), device=device))  # (c, P)
    sim[rows[valid], pos_idx[valid]] = float("-inf")
    if query_is_gallery:
        sim[torch.arange(c, device=device), torch.arange(s, s + c, device=device)] = float("-inf")
    return pos_sim


def _negatives_before_first_positive(sim: Tensor, pos_sim: Tensor, ge_buf: Tensor) -> Tensor:
    """(c,) negatives at least as similar as each query's best positive (ties count against the query).

    ``sim`` (c, G) holds negatives only, ``pos_sim`` (c, P) the positives; ``ge_buf`` is scratch of at least
    ``c * G'`` bools, G' = G rounded up to a multiple of 8 (whole int64 words for :func:`count_true_per_row`).
    """
    c, n_g = sim.shape
    g_pad = (n_g + 7) // 8 * 8
    best = pos_sim.max(dim=1).values if pos_sim.shape[1] > 0 else torch.full((c,), float("-inf"), device=sim.device)
    ge = ge_buf[: c * g_pad].view(c, g_pad)
    torch.ge(sim, best[:, None], out=ge[:, :n_g])  # (c, G) negatives at least as similar as best positive
    return count_true_per_row(ge)


def _ap_and_precision_at_r(sim: Tensor, pos_sim: Tensor, r: Tensor, r_max: int, ok: Tensor) -> Tensor:
    """Sums over a chunk's queries with a positive (``ok``) of AP@R and R-Precision, ``(2,)`` float64 on the CPU.

    The k-th positive in ranked order has rank ``k + #{negatives >= its similarity}``; only ranks <= R (the
    query's positives ``r``, (c,)) matter, so the top ``r_max`` negatives of ``sim`` (c, G) suffice.
    """
    device = sim.device
    k_neg = min(r_max, sim.shape[1])
    top_neg = torch.topk(sim, k_neg, dim=1, largest=True, sorted=True).values  # (c, k_neg) descending
    top_neg_asc = top_neg.flip(1).contiguous()  # (c, k_neg) ascending, for searchsorted
    v = torch.sort(pos_sim, dim=1, descending=True).values[:, :r_max]  # (c, <=R_max) positive sims
    # negatives >= v_k among the top k_neg: exact whenever the true count is <= R
    n_ge = k_neg - torch.searchsorted(top_neg_asc, v.contiguous(), side="left")  # (c, <=R_max)
    kk = torch.arange(1, v.shape[1] + 1, device=device, dtype=torch.float64)  # (<=R_max,) k
    rank = kk[None, :] + n_ge.double()  # (c, <=R_max) rank of the k-th positive
    use = (kk[None, :] <= r[:, None]) & (rank <= r[:, None]) & torch.isfinite(v)  # (c, <=R_max)
    ap = torch.where(use, kk[None, :] / rank, torch.zeros((), dtype=torch.float64, device=device)).sum(1)
    map_part = (torch.where(ok, ap / r.clamp(min=1).double(), torch.zeros_like(ap))).sum().cpu()
    in_top_r = use.sum(1).double()  # (c,) positives among the first R
    rp_part = (torch.where(ok, in_top_r / r.clamp(min=1).double(), torch.zeros_like(ap))).sum().cpu()
    return torch.stack([map_part, rp_part])


def _averages(hits: Dict[int, Tensor], map_sum: Tensor, rp_sum: Tensor, has_pos: Tensor, n_q: int, ks: Sequence[int],
              map_at_r: bool) -> Dict[str, float]:
    """The scores: sums over the queries with a positive divided by their number (NaN for none), and the counts."""
    n_valid = int(has_pos.sum().item())
    out: Dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(hits[k] / n_valid) if n_valid else float("nan")
    if map_at_r:
        out["map@r"] = float(map_sum / n_valid) if n_valid else float("nan")
        out["r_precision"] = float(rp_sum / n_valid) if n_valid else float("nan")
    out["num_queries"] = n_valid
    out["queries_without_positive"] = n_q - n_valid
    return out


# ------------------------------------------------------------------------------------ faiss backend
def _faiss():
    from xbn_queue.training._optional import require

    return require("faiss", "searching with faiss")


def _on_gpu(index):
    """The index moved to the GPU when faiss has GPU support and a CUDA device is present (HNSW stays)."""
    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources") or not torch.cuda.is_available() or isinstance(index, faiss.IndexHNSW):
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except (RuntimeError, AttributeError):  # an index type without a GPU version
        return index


def faiss_search(index, queries: np.ndarray, k: int, exclude: Optional[np.ndarray] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar rows of a faiss index for each query, optionally leaving one row out of each list.

    Searched on the GPU when faiss has GPU support and a CUDA device is present (an HNSW index stays on
    the CPU). Used by :func:`faiss_retrieval_metrics` and by ``xbn-metric search``
    (:func:`metric.retrieval.search`, which sets the IVF / HNSW search parameters first).

    Args:
        index: A faiss index of the gallery (``ntotal`` rows of dimension ``d``).
        queries: (Q, d) float32, C-contiguous.
        k: Neighbours per query, ``0 <= k <= ntotal`` (less one with ``exclude``).
        exclude: (Q,) the gallery row to leave out of each query's list (leave-one-out: the query itself).

    Returns:
        ``(rows, scores)``: (Q, k) int64 gallery rows best first (-1 where an approximate index found
        fewer than k) and (Q, k) float32 similarities (``-inf`` where ``rows`` is -1).
    """
    if k == 0:
        return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
    kk = k + (1 if exclude is not None else 0)
    scores, rows = _on_gpu(index).search(queries, kk)  # (Q, kk), (Q, kk)
    if exclude is not None:
        drop = rows == exclude[:, None]  # (Q, kk) the excluded row, at most once per line
        drop[~drop.any(1), -1] = True  # not found among the kk: drop the last instead
        keep = ~drop
        rows = rows[keep].reshape(len(queries), k)
        scores = scores[keep].reshape(len(queries), k)
    scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
    return rows.astype(np.int64), scores


def _pessimistic_relevance(index, xq: np.ndarray, lq: np.ndarray, lg: np.ndarray, depth: int,
                           exclude: Optional[np.ndarray]) -> np.ndarray:
    """(c, depth) bool: whether each query's i-th ranked gallery item is a positive, ties against the query.

    The ``depth`` nearest items come from the exact index; within a run of equal similarities the
    negatives are put before the positives.
    """
    k = max(min(max(depth, 1), int(index.ntotal) - (1 if exclude is not None else 0)), 0)
    rows, scores = faiss_search(index, xq, k, exclude)  # (c, k), (c, k)
    rel = lg[rows] == lq[:, None]  # (c, k) relevant
    order = np.lexsort((rel, -scores), axis=1)  # per row: score descending, negatives first among ties
    return np.take_along_axis(rel, order, axis=1)  # (c, k) pessimistic ranking


def _precision_at_r(rel: np.ndarray, r: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per query: MAP@R's average precision and R-Precision of a ranked relevance list.

    Args:
        rel: (c, depth) bool, the ranked relevance (:func:`_pessimistic_relevance`), depth >= R.
        r: (c,) R, the number of positives of each query (0 gives 0).

    Returns:
        ``(ap, rp)``: (c,) ``1/R * sum_{i<=R} P(i) rel(i)`` and ``1/R * sum_{i<=R} rel(i)``.
    """
    ranks = np.arange(1, rel.shape[1] + 1)  # (depth,)
    prec = np.cumsum(rel, axis=1) / ranks  # (c, depth) P(i)
    use = rel & (ranks[None, :] <= r[:, None])  # (c, depth) rel(i), i <= R
    return (prec * use).sum(1) / np.maximum(r, 1), use.sum(1) / np.maximum(r, 1)


def faiss_retrieval_metrics(query: Tensor, query_labels: Tensor, gallery: Optional[Tensor] = None,
                            gallery_labels: Optional[Tensor] = None, ks: Sequence[int] = (1, 10, 100, 1000),
                            query_is_gallery: bool = False, chunk_size: int = 2048,
                            map_at_r: bool = True) -> Dict[str, float]:
    """Recall@K, MAP@R and R-Precision through an exact faiss search (``--eval-backend faiss``): the same
    definitions and tie rule as :func:`retrieval_metrics` (same arguments, same result keys).

    Each query's ``max(max(ks), R_max)`` nearest gallery items (plus itself in leave-one-out) come
    from ``IndexFlatIP``; within a run of equal similarities negatives are put before positives
    (ties count against the query). The two can differ only where the similarities themselves do:
    faiss's float32 matrix product rounds a similarity differently from torch's (by up to ~4e-7 for
    unit vectors), which can swap two items whose similarities are that close, and a tie that
    straddles the end of the list. On trained embeddings Recall@K agrees exactly and MAP@R to 1e-5
    (``tests/metric/test_faiss_eval.py``).

    Returns:
        ``{"recall@K", "map@r", "r_precision", "num_queries", "queries_without_positive"}``.

    Raises:
        ValueError: as :func:`retrieval_metrics` (shapes, non-finite features).
    """
    gallery, gallery_labels, query_is_gallery, ks = check_retrieval_inputs(query, query_labels, gallery, gallery_labels,
                                                                           ks, query_is_gallery)
    xq = np.ascontiguousarray(query.detach().float().cpu().numpy())  # (Q, D)
    xg = np.ascontiguousarray(gallery.detach().float().cpu().numpy())  # (G, D)
    if not (np.isfinite(xq).all() and np.isfinite(xg).all()):
        raise ValueError("retrieval_metrics: features contain NaN or Inf")
    lq = query_labels.detach().cpu().numpy().astype(np.int64)  # (Q,)
    lg = gallery_labels.detach().cpu().numpy().astype(np.int64)  # (G,)
    n_q, n_g = len(xq), len(xg)
    uniq, counts = np.unique(lg, return_counts=True)
    pos = dict(zip(uniq.tolist(), counts.tolist()))
    n_pos = np.array([pos.get(int(c), 0) for c in lq], dtype=np.int64) - int(query_is_gallery)  # (Q,) R
    has_pos = n_pos > 0
    depth = min(n_g - int(query_is_gallery), max(ks[-1], int(n_pos.max()) if n_q else 0))
    index = _faiss().IndexFlatIP(xg.shape[1])
    index.add(xg)
    hits = {k: 0 for k in ks}
    map_sum = rp_sum = 0.0
    for s in range(0, n_q, chunk_size):
        e = min(s + chunk_size, n_q)
        rel = _pessimistic_relevance(index, xq[s:e], lq[s:e], lg, depth, np.arange(s, e) if query_is_gallery else None)
        first = np.where(rel.any(1), rel.argmax(1), n_g)  # (c,) 0-based rank of the first positive
        ok = has_pos[s:e]  # (c,)
        for k in ks:
            hits[k] += int(((first < k) & ok).sum())
        if map_at_r:
            ap, rp = _precision_at_r(rel, n_pos[s:e])  # (c,), (c,)
            map_sum += float(np.where(ok, ap, 0.0).sum())
            rp_sum += float(np.where(ok, rp, 0.0).sum())
    n_valid = int(has_pos.sum())
    out: Dict[str, float] = {f"recall@{k}": hits[k] / n_valid if n_valid else float("nan") for k in ks}
    if map_at_r:
        out.update({"map@r": map_sum / n_valid if n_valid else float("nan"),
                    "r_precision": rp_sum / n_valid if n_valid else float("nan")})
    return dict(out, num_queries=n_valid, queries_without_positive=n_q - n_valid)
