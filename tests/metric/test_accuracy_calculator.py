"""Recall@K, MAP@R and R-Precision against PML's ``AccuracyCalculator`` and a plain float64 reference.

What PML's ``AccuracyCalculator`` does (``pytorch_metric_learning/utils/accuracy_calculator.py`` and
``utils/inference.py``, PML 2.9), and so what must agree:

* neighbours come from its ``knn_func`` (default ``FaissKNN``: an exact ``IndexFlatL2``); with the
  query set as the reference (``ref_includes_query``) it asks for k + 1 neighbours and removes the
  query itself *by index* (:func:`return_results`), as the trainer does;
* queries whose label has no other reference item ("lone" queries) are left out of every average,
  as the trainer leaves out (and counts) queries without a positive;
* ``avg_of_avgs=False`` (its default) averages over queries, as the trainer does; ``avg_of_avgs=True``
  averages per class first (a documented difference: not what the trainer reports);
* ``k="max_bin_count"`` retrieves as many neighbours as the largest class needs for MAP@R and
  R-Precision (R of every query); Recall@K needs ``k >= K``;
* ties: PML ranks items at equal distance in the order faiss returns them, which faiss does not
  document (on this machine ``IndexFlatIP`` gave the higher index first, ``IndexFlatL2`` the lower);
  the trainer counts a tie against the query (negatives first). So with ties between a positive and
  a negative the trainer's value is the lower end of what PML can report; without them, the two agree.

PML has Recall@1 (``precision_at_1``) but no Recall@K for K > 1; it is added the way PML documents
for custom metrics (a ``calculate_<name>`` method on a subclass, listed in ``requires_knn``), computed
from PML's own ``knn_labels`` and lone-query mask.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator  # noqa: E402
from pytorch_metric_learning.utils.inference import FaissKNN  # noqa: E402

from metric.evaluate import faiss_retrieval_metrics, retrieval_metrics  # noqa: E402

KS = (1, 2, 4, 8)
CPU = torch.device("cpu")


def _recall_at(k):
    def calculate(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        knn, ql = knn_labels[not_lone_query_mask], query_labels[not_lone_query_mask]  # PML's neighbours, lone left out
        return (knn[:, :k] == ql[:, None]).any(dim=1).double().mean().item()
    return calculate


class RecallAtK(AccuracyCalculator):
    """PML's documented extension point: ``calculate_recall_at_K`` for the K of :data:`KS`."""

    locals().update({f"calculate_recall_at_{k}": _recall_at(k) for k in KS})

    def requires_knn(self):
        return super().requires_knn() + [f"recall_at_{k}" for k in KS]


def pml_metrics(q, ql, g=None, gl=None, knn_func=None, avg_of_avgs=False):
    """PML's numbers under the trainer's keys (``g=None``: leave-one-out, ``ref_includes_query``), and PML's own
    ``precision_at_1`` (= Recall@1) from the ``k="max_bin_count"`` search (the custom Recall@K ignore ``avg_of_avgs``)."""
    kw = dict(device=CPU, knn_func=knn_func, avg_of_avgs=avg_of_avgs)
    at_r = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                              k="max_bin_count", **kw)
    at_k = RecallAtK(include=tuple(f"recall_at_{k}" for k in KS), k=max(KS), **kw)
    args = (q, ql) if g is None else (q, ql, g, gl, False)
    a, b = at_r.get_accuracy(*args), at_k.get_accuracy(*args)
    out = {f"recall@{k}": b[f"recall_at_{k}"] for k in KS}
    out.update(precision_at_1=a["precision_at_1"])
    out.update({"map@r": a["mean_average_precision_at_r"], "r_precision": a["r_precision"]})
    return out


def reference(q, ql, g=None, gl=None, band=None, l2=False):
    """Plain float64 Recall@K, MAP@R and R-Precision, each as ``(pessimistic, optimistic)``, per query too.

    A query's positives are the gallery items with its label (itself left out in leave-one-out); a
    query without one is skipped. Items are ranked by inner product (``l2``: by ``-||q - g||^2``, the
    order of an L2 index), and each similarity may move by ``band`` (the float32 rounding of the
    backend, 0 for exact data): pessimistic = positives down and negatives up by it, negatives first on
    a tie; optimistic = the reverse. Every metric only improves when a positive moves above a negative.

    Returns:
        ``({key: (lo, hi)}, {key: per-query pessimistic values}, kept query labels)``.
    """
    loo = g is None
    xq = q.double().numpy()
    xg = xq if loo else g.double().numpy()
    yq = ql.numpy()
    yg = yq if loo else gl.numpy()
    sim = xq @ xg.T  # (Q, G)
    if l2:
        sim = sim - 0.5 * (xg**2).sum(1)[None, :]  # -||q - g||^2 / 2 up to a per-query constant
    band = np.zeros_like(sim) if band is None else band
    keys = [f"recall@{k}" for k in KS] + ["map@r", "r_precision"]
    lo, hi = {k: [] for k in keys}, {k: [] for k in keys}
    kept = []
    for i in range(len(xq)):
        keep = np.ones(len(xg), dtype=bool)
        if loo:
            keep[i] = False
        s, b, rel = sim[i, keep], band[i, keep], yg[keep] == yq[i]
        r = int(rel.sum())
        if r == 0:
            continue
        kept.append(yq[i])
        for side, out in ((-1.0, lo), (1.0, hi)):
            score = s + side * np.where(rel, b, -b)
            last = rel if side < 0 else ~rel  # sorted last among equal scores
            seq = rel[np.lexsort((last, -score))]  # relevance in ranked order
            for k in KS:
                out[f"recall@{k}"].append(float(seq[:k].any()))
            top = seq[:r]
            precision = np.cumsum(top) / np.arange(1, r + 1)
            out["map@r"].append(float(precision[top].sum()) / r)
            out["r_precision"].append(float(top.sum()) / r)
    bounds = {k: (float(np.mean(lo[k])), float(np.mean(hi[k]))) for k in keys}
    return bounds, {k: np.array(v) for k, v in lo.items()}, np.array(kept)


def rounding_band(q, g=None, l2=False):
    """How far a float32 similarity (``l2``: ``-||q - g||^2 / 2``) can be from the exact one, in any summation order.

    ``gamma_D * sum_i |x_i y_i|`` for a D-term dot product (Higham, eq. 3.5), ``u = 2^-24``; an L2
    distance, whether faiss sums ``(x_i - y_i)^2`` or forms ``|x|^2 + |y|^2 - 2 x.y``, is within
    ``gamma_{D+2} * sum_i (|x_i| + |y_i|)^2``, halved for the score. Doubled for the float64
    reference's own rounding and the normalisation.
    """
    xq = q.double().abs().numpy()
    xg = xq if g is None else g.double().abs().numpy()
    d = xq.shape[1] + 2
    gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
    if l2:
        return 2 * gamma * 0.5 * ((xq**2).sum(1)[:, None] + (xg**2).sum(1)[None, :] + 2 * xq @ xg.T)
    return 2 * gamma * (xq @ xg.T)


def assert_in(got, bounds, tol=1e-12):
    for key, (lo, hi) in bounds.items():
        assert lo - tol <= got[key] <= hi + tol, (key, got[key], lo, hi)


def ours(q, ql, g=None, gl=None, with_faiss=True):
    """The trainer's numbers: the chunked torch evaluation and (``with_faiss``) ``--eval-backend faiss``.

    The faiss backend's k-NN list may cut a run of tied items at its end (its docstring says so), so
    it is left out where positives and negatives tie."""
    t = retrieval_metrics(q, ql, g, gl, ks=KS, query_is_gallery=g is None, chunk_size=17)
    if not with_faiss:
        return (t,)
    return t, faiss_retrieval_metrics(q, ql, g, gl, ks=KS, query_is_gallery=g is None, chunk_size=17)


def _labels(n, classes, gen, lone=3):
    """Random labels with ``lone`` labels of one item each (queries without a positive)."""
    y = torch.randint(0, classes, (n,), generator=gen)
    y[:lone] = torch.arange(1000, 1000 + lone)
    return y


@pytest.mark.parametrize("protocol", ["leave-one-out", "query-gallery"])
def test_random_embeddings_equal_pmls_default_calculator(protocol):
    """Unit vectors, PML's defaults (FaissKNN, IndexFlatL2): the same numbers, the query itself and lone queries
    handled alike. The seed gives data where no float32 rounding can swap a positive and a negative
    (the reference's two ends are equal), so this holds on any CPU."""
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(90, 12, generator=gen, dtype=torch.float64), dim=1).float()
    ql = _labels(90, 12, gen)
    g = gl = None
    if protocol == "query-gallery":
        g = torch.nn.functional.normalize(torch.randn(70, 12, generator=gen, dtype=torch.float64), dim=1).float()
        gl = torch.randint(0, 12, (70,), generator=gen)
    for l2 in (False, True):
        bounds, _, kept = reference(q, ql, g, gl, band=rounding_band(q, g, l2), l2=l2)
        assert all(lo == hi for lo, hi in bounds.values()), bounds  # no pair within rounding distance
    assert 0 < len(kept) < 90  # some queries have no positive
    pml = pml_metrics(q, ql, g, gl)
    for got in (pml, *ours(q, ql, g, gl)):
        assert_in(got, bounds)
    for key in bounds:
        assert ours(q, ql, g, gl)[0][key] == pytest.approx(pml[key], abs=1e-12), key
    assert pml["precision_at_1"] == pytest.approx(pml["recall@1"], abs=1e-12)  # PML's own R@1 is the same
    assert ours(q, ql, g, gl)[0]["num_queries"] == len(kept)


def _integer_data(n, gen, dup_across_classes):
    """Integer features (every float32 product and sum exact: no rounding, exact ties only) with
    duplicates: each of n/3 vectors three times, within a class, or (``dup_across_classes``) also
    given to items of other classes."""
    base = torch.randint(-30, 31, (n // 3, 6), generator=gen).float()
    x = base.repeat_interleave(3, dim=0)  # (n, 6) exact duplicates in threes
    y = torch.arange(n // 3).repeat_interleave(3) % 9  # a vector's copies share its class
    if dup_across_classes:
        y[1::3] = (y[1::3] + 1) % 9  # one copy of each vector in the next class: positive-negative ties
    return x, y


def test_duplicates_within_a_class_equal_pml_exactly():
    """Exact ties only among items of one class (the query's own copies included): no tie changes a
    metric, and PML (ranking by the same inner product through IndexFlatIP) gives the same numbers."""
    x, y = _integer_data(60, torch.Generator().manual_seed(0), dup_across_classes=False)
    bounds, _, _ = reference(x, y)
    assert all(lo == hi for lo, hi in bounds.values())
    pml = pml_metrics(x, y, knn_func=FaissKNN(index_init_fn=__import__("faiss").IndexFlatIP))
    for got in ours(x, y):
        for key in bounds:
            assert got[key] == pytest.approx(bounds[key][0], abs=1e-12) == pytest.approx(pml[key], abs=1e-12), key


def test_ties_between_classes_ours_is_the_pessimistic_end_pml_lies_between():
    """Positives tie with negatives: the trainer's numbers are the pessimistic ranking's exactly; PML's,
    in faiss's undocumented tie order, lie between the pessimistic and the optimistic ranking."""
    import faiss

    x, y = _integer_data(60, torch.Generator().manual_seed(1), dup_across_classes=True)
    bounds, _, _ = reference(x, y)
    assert bounds["recall@1"][0] < bounds["recall@1"][1] and bounds["map@r"][0] < bounds["map@r"][1]  # ties matter
    for got in ours(x, y, with_faiss=False):
        for key, (lo, _) in bounds.items():
            assert got[key] == pytest.approx(lo, abs=1e-12), key
    assert_in(pml_metrics(x, y, knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP)), bounds)
    # the smallest case: the query's one positive ties with a negative at the top
    x = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1, 2, 2])
    # queries 0 and 1 (class 0) each tie their positive with item 2 (class 1, itself without a positive)
    assert retrieval_metrics(x, y, ks=(1,), query_is_gallery=True)["recall@1"] == 0.5  # 0 and 1 lose the tie
    assert reference(x, y)[0]["recall@1"] == (0.5, 1.0)
    pml = pml_metrics(x, y, knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP))
    # PML's tie order is faiss's, and it may change with the search's k: here its precision_at_1 (k = 2) and
    # its neighbours for Recall@K (k = 8) break the same tie differently; both lie within the bounds
    assert 0.5 <= pml["recall@1"] <= 1.0 and 0.5 <= pml["precision_at_1"] <= 1.0


def test_avg_of_avgs_is_the_per_class_mean_not_what_the_trainer_reports():
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(90, 12, generator=gen, dtype=torch.float64), dim=1).float()
    ql = _labels(90, 12, gen)
    bounds, per_query, kept = reference(q, ql, band=rounding_band(q, l2=True), l2=True)
    pml = pml_metrics(q, ql, avg_of_avgs=True)
    assert pml["precision_at_1"] == pytest.approx(np.mean([per_query["recall@1"][kept == c].mean() for c in np.unique(kept)]))
    for key in ("map@r", "r_precision"):
        per_class = np.mean([per_query[key][kept == c].mean() for c in np.unique(kept)])
        assert pml[key] == pytest.approx(per_class, abs=1e-12)
        assert abs(per_class - bounds[key][0]) > 1e-4  # unbalanced classes: the two averages differ here


def test_r_precision_against_a_plain_float64_reference():
    """R-Precision on data with many exact ties (a few distinct values), both protocols, several chunk sizes."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-2, 3, (80, 4), generator=gen).float()  # 5^4 points, many exact ties
    y = torch.randint(0, 6, (80,), generator=gen)
    g, gl = torch.randint(-2, 3, (50, 4), generator=gen).float(), torch.randint(0, 8, (50,), generator=gen)
    for args in ((x, y), (x, y, g, gl)):
        lo, hi = reference(*args)[0]["r_precision"]
        assert lo < hi  # ties decide
        for chunk in (1, 9, 4096):
            t = retrieval_metrics(*args, ks=KS, query_is_gallery=len(args) == 2, chunk_size=chunk)
            assert t["r_precision"] == pytest.approx(lo, abs=1e-12)
    # the faiss backend is left out here: its k-NN list may cut a run of tied items (see ours())


def test_trained_embeddings_pml_and_ours_within_the_rounding_bounds(trained_run):
    """Features of a trained model (400 images of the digits run's test half, leave-one-out): PML's default L2 search and
    its inner-product search, and the trainer's, all within the float64 reference's rounding bounds."""
    import faiss

    from metric.data import load_dataset, open_image
    from metric.retrieval import load_run_model
    from metric.train import build_transforms

    lm = load_run_model(trained_run[0], "cpu")
    data = load_dataset("digits", split="instance", train_fraction=0.5)
    tf = build_transforms(lm.config)[1]
    with torch.no_grad():
        x = lm.model(torch.stack([tf(open_image(it)) for it in data.query.items[:400]]))  # (400, D)
    y = torch.as_tensor(data.query.labels[:400])
    ip, _, _ = reference(x, y, band=rounding_band(x))
    l2, _, _ = reference(x, y, band=rounding_band(x, l2=True), l2=True)
    assert ip["map@r"][1] - ip["map@r"][0] < 1e-3 and l2["map@r"][1] - l2["map@r"][0] < 1e-3  # tight enough to mean it
    assert_in(pml_metrics(x, y), l2)
    assert_in(pml_metrics(x, y, knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP)), ip)
    for got in ours(x, y):
        assert_in(got, ip)
