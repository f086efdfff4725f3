"""Chunked Recall@K / MAP@R against a brute-force float64 reference with explicit tie handling."""

import math

import pytest
import torch

from metric.evaluate import count_true_per_row, retrieval_metrics


def reference_metrics(q, lq, g, lg, ks, loo, optimistic=False):
    """Plain float64 loops: rank every gallery item, ties count against the query (for the query
    with ``optimistic``)."""
    q, g = q.double(), g.double()
    recalls = {k: 0 for k in ks}
    map_sum, n_valid = 0.0, 0
    for i in range(q.shape[0]):
        items = []
        for j in range(g.shape[0]):
            if loo and i == j:
                continue
            s = float(torch.dot(q[i], g[j]))
            pos = int(lq[i]) == int(lg[j])
            tie = (0 if pos else 1) if optimistic else (1 if pos else 0)
            items.append((-s, tie, j, 1 if pos else 0))  # pessimistic: negatives first on equal similarity
        items.sort()
        rel = [it[3] for it in items]
        r = sum(rel)
        if r == 0:
            continue
        n_valid += 1
        first = rel.index(1) + 1
        for k in ks:
            recalls[k] += first <= k
        hits, ap = 0, 0.0
        for rank in range(1, r + 1):
            if rel[rank - 1]:
                hits += 1
                ap += hits / rank
        map_sum += ap / r
    out = {f"recall@{k}": recalls[k] / n_valid for k in ks}
    out["map@r"] = map_sum / n_valid
    out["num_queries"] = n_valid
    return out


def check(ours, ref):
    for key, val in ref.items():
        assert ours[key] == pytest.approx(val, abs=1e-12), key


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_leave_one_out_with_ties_matches_reference(chunk):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-1, 2, (60, 3), generator=gen).float()  # few distinct vectors: many exact ties
    labels = torch.randint(0, 6, (60,), generator=gen)
    labels[0] = 99  # a singleton class: no positive, excluded
    ks = (1, 2, 5, 10, 100)
    ours = retrieval_metrics(x, labels, ks=ks, query_is_gallery=True, chunk_size=chunk)
    ref = reference_metrics(x, labels, x, labels, ks, loo=True)
    check(ours, ref)
    assert ours["queries_without_positive"] == 1
    # the tie rule matters on this data: optimistic ranking gives a higher recall@1
    optimistic = reference_metrics(x, labels, x, labels, ks, loo=True, optimistic=True)
    assert optimistic["recall@1"] > ours["recall@1"] + 0.05


def test_query_vs_gallery_with_duplicates_and_queries_in_gallery():
    gen = torch.Generator().manual_seed(1)
    g = torch.randint(-2, 3, (80, 4), generator=gen).float()
    lg = torch.randint(0, 8, (80,), generator=gen)
    q = torch.cat([g[:10], torch.randint(-2, 3, (25, 4), generator=gen).float()])  # 10 queries also in the gallery
    lq = torch.cat([lg[:10], torch.randint(0, 9, (25,), generator=gen)])  # label 8 has no gallery item
    ks = (1, 3, 10)
    ours = retrieval_metrics(q, lq, g, lg, ks=ks, query_is_gallery=False, chunk_size=6)
    ref = reference_metrics(q, lq, g, lg, ks, loo=False)
    check(ours, ref)


def test_continuous_normalized_features():
    gen = torch.Generator().manual_seed(2)
    centers = torch.randn(30, 16, generator=gen)
    labels = torch.randint(0, 30, (150,), generator=gen)
    x = torch.nn.functional.normalize(centers[labels] + 0.8 * torch.randn(150, 16, generator=gen), dim=1)
    ks = (1, 4, 16)
    ours = retrieval_metrics(x, labels, ks=ks, chunk_size=64)
    ref = reference_metrics(x, labels, x, labels, ks, loo=True)
    # exact on any CPU although ours ranks float32 similarities and the reference float64 ones: no positive
    # and negative of a query are within twice the float32 error bound of a 16-d dot product (gamma_16 =
    # 1e-6) of each other here (checked with tests/metric/test_faiss_eval.py's _bounds: the interval of
    # every metric has width 0), so no summation order can reorder them
    check(ours, ref)
    assert 0.0 < ours["map@r"] < 1.0


def test_perfect_and_worst_cases():
    x = torch.eye(4).repeat_interleave(3, dim=0)  # 4 classes, 3 identical vectors each
    y = torch.arange(4).repeat_interleave(3)
    out = retrieval_metrics(x, y, ks=(1,))
    assert out["recall@1"] == 1.0 and out["map@r"] == 1.0
    # all vectors identical: every negative ties with every positive -> ranked first
    z = torch.ones(12, 4)
    out = retrieval_metrics(z, y, ks=(1, 9, 10))
    assert out["recall@1"] == 0.0 and out["recall@9"] == 0.0 and out["recall@10"] == 1.0
    assert out["map@r"] == 0.0


def test_count_true_per_row_matches_sum():
    gen = torch.Generator().manual_seed(3)
    m = torch.rand(5, 8 * 700, generator=gen) < 0.7  # > 255 words per row
    m[0] = True
    torch.testing.assert_close(count_true_per_row(m), m.sum(1))


def test_errors():
    x = torch.randn(5, 3)
    y = torch.arange(5)
    with pytest.raises(ValueError, match="share D"):
        retrieval_metrics(x, y, torch.randn(5, 4), y)
    with pytest.raises(ValueError, match="labels must be"):
        retrieval_metrics(x, y[:4])
    with pytest.raises(ValueError, match="NaN or Inf"):
        retrieval_metrics(torch.full((5, 3), math.nan), y)
    with pytest.raises(ValueError, match="Q == G"):
        retrieval_metrics(x, y, torch.randn(6, 3), torch.arange(6), query_is_gallery=True)
