"""``--eval-backend faiss``: the same Recall@K and MAP@R as the chunked torch evaluation."""

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from metric.config import resolve_config  # noqa: E402
from metric.data import load_dataset, open_image  # noqa: E402
from metric.evaluate import faiss_retrieval_metrics, retrieval_metrics  # noqa: E402
from metric.train import train  # noqa: E402
from xbn_queue.training.tracking import read_metrics  # noqa: E402

from .conftest import TRAINED_RUN  # noqa: E402
from .helpers import tiny_cfg  # noqa: E402

KS = (1, 2, 4, 8, 100)


def _pixels(items) -> torch.Tensor:
    """Random projections of the images' pixels (8x8 RGB thumbnails) to 32 dimensions, L2-normalised: (N, 32).

    The projection makes the features continuous, like a network's: raw quantised pixels have many
    exactly equal similarities, which two float32 matrix products (torch's, faiss's) with different
    summation orders break differently.
    """
    x = np.stack([np.asarray(open_image(it).resize((8, 8))) for it in items]).reshape(len(items), -1).astype(np.float32)
    w = np.random.default_rng(0).standard_normal((x.shape[1], 32)).astype(np.float32)  # (192, 32)
    return torch.nn.functional.normalize(torch.from_numpy((x / 255.0) @ w), dim=1)


def _bounds(q, ql, g=None, gl=None, ks=KS, query_is_gallery=False):
    """Float64 reference of Recall@K and MAP@R with the float32 rounding of the similarities made explicit.

    Both backends compute each similarity as a float32 dot product of float32 features, each in its own
    summation order (torch's ``mm``, faiss's BLAS or SIMD loop). Whatever the order, such a product lies
    within ``gamma_D * sum_i |x_i y_i|`` of the exact one, ``gamma_D = D u / (1 - D u)``, ``u = 2^-24``
    (Higham, *Accuracy and Stability of Numerical Algorithms*, eq. 3.5); the exact one is computed here in
    float64 (float32 products are exact there; its own rounding, ``gamma_D`` with ``u = 2^-53``, is added).
    So a positive and a negative may come out in either order when their similarities are that close:
    these are the only ties a backend can break differently, on this CPU or another one.

    Each query's metrics are therefore bounded by two rankings: pessimistic (every positive pushed down by
    its bound, every negative up, negatives first on a tie) and optimistic (the reverse). Recall@K and
    MAP@R only improve when a positive moves above a negative, so any float32 backend's value lies in
    ``[lo, hi]``. Returns ``{key: (lo, hi)}`` for ``recall@K`` and ``map@r`` and the exact counts.
    """
    xq = q.detach().double().numpy()  # (Q, D)
    xg = xq if g is None else g.detach().double().numpy()  # (G, D)
    yq = ql.numpy()
    yg = yq if gl is None else gl.numpy()
    d = xq.shape[1]
    gamma = sum(d * u / (1 - d * u) for u in (2.0**-24, 2.0**-53))
    sim = xq @ xg.T  # (Q, G) exact up to float64 rounding
    bound = gamma * (np.abs(xq) @ np.abs(xg).T)  # (Q, G) |float32 result - exact| <= bound
    lo = {f"recall@{k}": 0 for k in ks} | {"map@r": 0.0, "r_precision": 0.0}
    hi = dict(lo)
    n_valid = 0
    for i in range(len(xq)):
        keep = np.ones(len(xg), dtype=bool)
        if query_is_gallery:
            keep[i] = False
        s, b, rel = sim[i, keep], bound[i, keep], yg[keep] == yq[i]
        r = int(rel.sum())
        if r == 0:
            continue
        n_valid += 1
        for side, out in ((-1.0, lo), (1.0, hi)):
            score = s + side * np.where(rel, b, -b)  # positives down and negatives up when side = -1
            tie = rel if side < 0 else ~rel  # sorted last among equal scores: pessimistic puts positives last
            seq = rel[np.lexsort((tie, -score))]  # relevance in ranked order
            first = int(np.argmax(seq))
            for k in ks:
                out[f"recall@{k}"] += int(first < k)
            top = seq[:r]
            out["map@r"] += float(np.sum(np.cumsum(top)[top] / (np.flatnonzero(top) + 1.0))) / r
            out["r_precision"] += float(top.sum()) / r
    slack = 1e-12  # the float64 sums of per-query fractions, in the backends' own order
    res = {key: (lo[key] / n_valid - (slack if not key.startswith("recall@") else 0),
                 hi[key] / n_valid + (slack if not key.startswith("recall@") else 0))
           for key in lo}
    res["num_queries"] = n_valid
    res["queries_without_positive"] = len(xq) - n_valid
    return res


def _within(got, bounds):
    """Every metric of ``got`` inside the float64 reference's interval; the counts exact."""
    assert set(got) == set(bounds)
    for key, ref in bounds.items():
        if isinstance(ref, tuple):
            assert ref[0] <= got[key] <= ref[1], (key, got[key], ref)
        else:
            assert got[key] == ref, (key, got[key], ref)


@pytest.mark.parametrize("name", ["digits", "sop", "inshop", "folder"])
def test_faiss_metrics_equal_torch_metrics_on_the_datasets(name, sop_root, inshop_root, folder_root):
    root = {"sop": sop_root, "inshop": inshop_root, "folder": folder_root}.get(name)
    data = load_dataset(name, root, split="instance" if name == "digits" else "auto")
    q, ql = _pixels(data.query.items), torch.as_tensor(data.query.labels)
    g, gl = (None, None) if data.query_is_gallery else (_pixels(data.gallery.items), torch.as_tensor(data.gallery.labels))
    bounds = _bounds(q, ql, g, gl, query_is_gallery=data.query_is_gallery)
    for chunk in (7, 2048):
        ref = retrieval_metrics(q, ql, g, gl, ks=KS, query_is_gallery=data.query_is_gallery, chunk_size=chunk)
        got = faiss_retrieval_metrics(q, ql, g, gl, ks=KS, query_is_gallery=data.query_is_gallery, chunk_size=chunk)
        _within(ref, bounds)
        _within(got, bounds)
    assert 0 < ref["recall@1"] < 1 or name != "digits"


def test_ties_count_against_the_query_in_both():
    # four identical vectors of two classes + noise: the positive ties with a negative at the top
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    y = torch.tensor([0, 1, 0, 1, 2, 2])
    ref = retrieval_metrics(x, y, ks=(1, 2, 3))
    # every similarity here is exact in float32 (products 0, 0.6, 0.8 and 1, at most one non-zero per sum;
    # the only inexact one, row 5 with itself, is left out), so the two backends see the same exact ties
    # on any CPU and must agree to the last bit
    assert faiss_retrieval_metrics(x, y, ks=(1, 2, 3)) == ref
    assert ref["recall@1"] == pytest.approx(2 / 6)  # queries 0-3 lose the tie; 4 and 5 find each other


def test_trained_embeddings_give_identical_metrics(trained_run):
    """Features of a trained model (the digits run's test half), leave-one-out."""
    from metric.retrieval import load_run_model
    from metric.transforms import build_transforms

    lm = load_run_model(trained_run[0], "cpu")
    data = load_dataset("digits", split="instance", train_fraction=0.5)
    tf = build_transforms(lm.config)[1]
    with torch.no_grad():
        x = lm.model(torch.stack([tf(open_image(it)) for it in data.query.items]))  # (899, D)
    y = torch.as_tensor(data.query.labels)
    bounds = _bounds(x, y, query_is_gallery=True)
    ref = retrieval_metrics(x, y, ks=KS)
    _within(ref, bounds)
    _within(faiss_retrieval_metrics(x, y, ks=KS), bounds)
    # the interval is narrow on trained features (measured: MAP@R hi - lo = 4e-5 of 0.60, Recall@K 0):
    # near-ties between a positive and a negative are rare, so "within the bounds" is a real check
    assert bounds["map@r"][1] - bounds["map@r"][0] < 1e-3 and bounds["recall@1"][1] - bounds["recall@1"][0] <= 2 / 899
    # these features come through the PIL pipeline in one batch; training embedded the same images through
    # its own (possibly cached) pipeline in batches of 512: close, not bit-identical features
    assert ref["recall@1"] == pytest.approx(trained_run[1]["best"]["recall@1"], abs=0.01)


def test_training_with_the_faiss_backend_logs_the_same_metrics(trained_run, tmp_path, monkeypatch):
    """The shared run again with ``--eval-backend faiss``: CPU training is deterministic on one machine, so
    every evaluation sees the same features as the torch run's. Both runs' logged Recall@K and MAP@R lie
    within the float64 reference's float32-rounding interval (:func:`_bounds`) of those features; they
    may differ inside it where a positive and a negative are within rounding of each other."""
    import metric.evaluate

    seen = []
    real = metric.evaluate.faiss_retrieval_metrics

    def spy(q, ql, g, gl, **kw):  # the features each evaluation ranks
        seen.append((q.clone(), ql.clone(), kw["query_is_gallery"], tuple(kw["ks"])))
        return real(q, ql, g, gl, **kw)

    monkeypatch.setattr(metric.evaluate, "faiss_retrieval_metrics", spy)
    train(resolve_config(tiny_cfg(tmp_path, eval_backend="faiss", **TRAINED_RUN)))
    logs = [[{k: v for k, v in r.items() if k.startswith(("recall@", "map@r", "r_precision"))}
             for r in read_metrics(out / "metrics.jsonl") if "recall@1" in r] for out in (trained_run[0], tmp_path)]
    assert len(logs[0]) == len(logs[1]) == len(seen) == 2
    for torch_log, faiss_log, (q, ql, query_is_gallery, ks) in zip(*logs, seen):
        assert query_is_gallery  # digits, instance split: leave-one-out
        bounds = _bounds(q, ql, ks=ks, query_is_gallery=True)
        bounds = {k: v for k, v in bounds.items() if k in torch_log}
        _within(torch_log, bounds)
        _within(faiss_log, bounds)
