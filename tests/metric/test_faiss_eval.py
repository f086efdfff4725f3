"""``--eval-backend faiss``: the same Recall@K and MAP@R as the chunked torch evaluation."""

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from metric.config import resolve_config  # noqa: E402
from metric.data import load_dataset, open_image  # noqa: E402
from metric.evaluate import retrieval_metrics  # noqa: E402
from metric.retrieval import faiss_retrieval_metrics  # noqa: E402
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


def _same(a, b, map_tol=1e-12):
    """Identical counts and Recall@K; MAP@R identical up to the order of its float64 sum over queries
    (``map_tol``: relative)."""
    assert set(a) == set(b)
    for k in a:
        if k == "map@r":
            assert a[k] == pytest.approx(b[k], rel=map_tol, abs=0), (a[k], b[k])
        else:
            assert a[k] == b[k], (k, a[k], b[k])


@pytest.mark.parametrize("name", ["digits", "sop", "inshop", "folder"])
def test_faiss_metrics_equal_torch_metrics_on_the_datasets(name, sop_root, inshop_root, folder_root):
    root = {"sop": sop_root, "inshop": inshop_root, "folder": folder_root}.get(name)
    data = load_dataset(name, root, split="instance" if name == "digits" else "auto")
    q, ql = _pixels(data.query.items), torch.as_tensor(data.query.labels)
    g, gl = (None, None) if data.query_is_gallery else (_pixels(data.gallery.items), torch.as_tensor(data.gallery.labels))
    for chunk in (7, 2048):
        ref = retrieval_metrics(q, ql, g, gl, ks=KS, query_is_gallery=data.query_is_gallery, chunk_size=chunk)
        got = faiss_retrieval_metrics(q, ql, g, gl, ks=KS, query_is_gallery=data.query_is_gallery, chunk_size=chunk)
        _same(got, ref)
    assert 0 < ref["recall@1"] < 1 or name != "digits"


def test_ties_count_against_the_query_in_both():
    # four identical vectors of two classes + noise: the positive ties with a negative at the top
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    y = torch.tensor([0, 1, 0, 1, 2, 2])
    ref = retrieval_metrics(x, y, ks=(1, 2, 3))
    _same(faiss_retrieval_metrics(x, y, ks=(1, 2, 3)), ref)
    assert ref["recall@1"] == pytest.approx(2 / 6)  # queries 0-3 lose the tie; 4 and 5 find each other


def test_trained_embeddings_give_identical_metrics(trained_run):
    """Features of a trained model (the digits run's test half), leave-one-out."""
    from metric.retrieval import load_run_model
    from metric.train import build_transforms

    lm = load_run_model(trained_run[0], "cpu")
    data = load_dataset("digits", split="instance", train_fraction=0.5)
    tf = build_transforms(lm.config)[1]
    with torch.no_grad():
        x = lm.model(torch.stack([tf(open_image(it)) for it in data.query.items]))  # (899, D)
    y = torch.as_tensor(data.query.labels)
    ref = retrieval_metrics(x, y, ks=KS)
    _same(faiss_retrieval_metrics(x, y, ks=KS), ref)
    assert ref["recall@1"] == trained_run[1]["best"]["recall@1"]


def test_training_with_the_faiss_backend_logs_the_same_metrics(trained_run, tmp_path):
    """The shared run again with ``--eval-backend faiss``: CPU training is deterministic, so every evaluation
    sees the same features. Recall@K agrees exactly; MAP@R to 1e-5 (measured: 6e-7): it ranks each
    query's ~90 positives among dense similarities, where the two float32 matrix products (torch's,
    faiss's BLAS) round a similarity differently by up to 4e-7 and can swap two nearly tied items."""
    train(resolve_config(tiny_cfg(tmp_path, eval_backend="faiss", **TRAINED_RUN)))
    logs = [[{k: v for k, v in r.items() if k.startswith(("recall@", "map@r"))}
             for r in read_metrics(out / "metrics.jsonl") if "recall@1" in r] for out in (trained_run[0], tmp_path)]
    assert len(logs[0]) == len(logs[1]) == 2
    for ref, got in zip(*logs):
        _same(got, ref, map_tol=1e-5)
