"""``search``: the nearest gallery items of each query (faiss), the k-NN vote, top-1 accuracy, results and pictures."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from xbn_queue.training.cli import UsageError, warn

from ..evaluate import faiss_search
from .checkpoint import PROG, PathLike, load_run_model
from .embedding import embed_images
from .index import INDEX_KINDS, load_index, require_faiss
from .items import item_opener, list_items, open_item
from .store import Store, check_same_model, is_store, open_store

__all__ = ["SearchResult", "search", "knn_vote", "search_store"]


@dataclasses.dataclass
class SearchResult:
    """Neighbours of each query, best first.

    Attributes:
        rows: (Q, k) int64 gallery rows (-1 where an approximate index found fewer than k).
        scores: (Q, k) float32 similarities (``-inf`` where ``rows`` is -1).
        k: Neighbours per query after clamping.
    """

    rows: np.ndarray
    scores: np.ndarray
    k: int


def search(index, queries: np.ndarray, k: int, exclude: Optional[np.ndarray] = None, nprobe: int = 16,
           ef_search: int = 64) -> SearchResult:
    """The ``k`` most similar gallery rows of each query (inner product), optionally leaving one row out.

    Args:
        index: A faiss index of the gallery (:func:`~metric.retrieval.load_index`, :func:`~metric.retrieval.build_index`).
        queries: (Q, D) float32.
        k: Neighbours per query, >= 1; clamped to the gallery's size (less one with ``exclude``).
        exclude: (Q,) gallery row to leave out of each query's list (leave-one-out: the query itself).
        nprobe: IVF clusters searched.
        ef_search: HNSW candidate list size.

    Raises:
        UsageError: ``k < 1``, or queries of another dimension.
    """
    faiss = require_faiss()
    if k < 1:
        raise UsageError(f"--k {k}: expected an integer >= 1")
    q = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
    if q.ndim != 2 or q.shape[1] != index.d:
        raise UsageError(f"queries of shape {tuple(q.shape)}: expected (Q, {index.d})")
    avail = int(index.ntotal) - (1 if exclude is not None else 0)
    k = max(min(k, avail), 0)
    if k > 0 and (isinstance(index, faiss.IndexIVF) or hasattr(index, "nprobe")):
        index.nprobe = nprobe  # the search parameters of the approximate kinds (an empty search needs none)
    if k > 0 and isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(ef_search, k + 1)
    rows, scores = faiss_search(index, q, k, exclude)  # (Q, k), (Q, k)
    return SearchResult(rows, scores, k)


def knn_vote(labels: Sequence[str]) -> Tuple[Optional[str], float, int]:
    """The k-NN vote over neighbours' labels, best-ranked first (see :mod:`metric.retrieval`).

    Args:
        labels: The k neighbours' labels in rank order (``""``: unknown, not voting).

    Returns:
        ``(label or None, confidence in [0, 1], votes)``.
    """
    votes: Dict[str, int] = {}
    first: Dict[str, int] = {}
    for rank, lab in enumerate(labels):
        if lab:
            votes[lab] = votes.get(lab, 0) + 1
            first.setdefault(lab, rank)
    if not votes:
        return None, 0.0, 0
    best = min(votes, key=lambda lab: (-votes[lab], first[lab]))
    return best, votes[best] / sum(votes.values()), votes[best]


@dataclasses.dataclass
class _Queries:
    """The queries of a search.

    Attributes:
        emb: (Q, D) float32 embeddings.
        keys: Q names (item keys of a query store, paths relative to a query folder, a file's name).
        labels: Q label strings (``""``: unknown).
        exclude: (Q,) the gallery row each query leaves out (the gallery searching itself), else ``None``.
        open: ``key -> PIL image`` for the pictures.
    """

    emb: np.ndarray
    keys: List[str]
    labels: List[str]
    exclude: Optional[np.ndarray]
    open: Callable[[str], Any]


def search_store(store: PathLike, query: PathLike, k: int = 10, index: str = "flat", predict: bool = False,
                 run: Optional[PathLike] = None, out: Optional[PathLike] = None, html: Optional[PathLike] = None,
                 sheet: Optional[PathLike] = None, show: int = 20, overwrite: bool = False, nprobe: int = 16,
                 ef_search: int = 64, device: str = "auto", skip_bad_images: bool = False,
                 progress: Optional[bool] = None, quiet: bool = False) -> Dict[str, Any]:
    """Search a store with query images (or another store), optionally predicting classes; write the results.

    Args:
        store: The gallery store.
        query: An image file, a folder of images (searched recursively; the first sub-folder's name is
            the label), or a store (its embeddings are the queries; the gallery store itself means
            leave-one-out: each row's own entry is left out).
        k: Neighbours per query (>= 1; clamped to the gallery with a note).
        index: ``flat``, ``ivf`` or ``hnsw``; built on first use and saved beside the store.
        predict: Add the k-NN vote (needs gallery labels).
        run: The model for query images (default: the checkpoint the store records; it must have the
            recorded SHA-256).
        out: ``results.json`` or ``results.csv``.
        html: A self-contained HTML page of ``show`` queries (evenly spaced over all) and their neighbours.
        sheet: A PNG contact sheet of the same.
        show: Queries shown in ``html`` / ``sheet``.
        overwrite: Replace existing ``out`` / ``html`` / ``sheet`` files.
        nprobe, ef_search: See :func:`search`.
        device, skip_bad_images, progress: For embedding query images (see :func:`~metric.retrieval.embed`).
        quiet: Do not print the neighbours to stdout.

    Returns:
        ``{"k", "index", "results": [{"query", "query_label", "neighbours": [{"rank", "item", "label",
        "score"}], "prediction"?: {"label", "confidence", "votes"}}], "top1_accuracy"?,
        "queries_without_positive"?, "knn_accuracy"?}``; the accuracies when the gallery has labels and
        some query a known label (top-1 by the rules of Recall@1, see :mod:`metric.retrieval`).

    Raises:
        UsageError: bad ``k``, a query store or model of another model or dimension, an index that does
            not match, ``--predict`` without gallery labels, an output file that exists, no query images.
        BadImageError: an unreadable query image without ``skip_bad_images``.
    """
    _check_search_options(k, index, show, overwrite, {"--out": out, "--html": html, "--sheet": sheet})
    gallery = open_store(store)
    if predict and not gallery.has_labels:
        raise UsageError(f"--predict: the store {gallery.path} has no labels to vote with")
    queries = (_store_queries(gallery, query) if is_store(query)
               else _image_queries(gallery, query, run, device, skip_bad_images, progress))
    idx, res = _neighbours(gallery, queries, k, index, nprobe, ef_search)
    summary: Dict[str, Any] = {"store": str(gallery.path), "query": str(query), "k": res.k, "index": index,
                               "similarity": gallery.meta.get("similarity"),
                               "leave_one_out": queries.exclude is not None,
                               "results": _entries(gallery, queries, res, predict)}
    summary.update(_accuracy(gallery, queries, summary["results"], predict, res.k,
                             lambda qi: _top1_hit(idx, queries, qi, res, gallery.labels, nprobe, ef_search)))
    _write_outputs(summary, gallery, queries, out, html, sheet, show)
    if not quiet and out is None:
        _print_results(summary["results"])
    return summary


def _check_search_options(k: int, index: str, show: int, overwrite: bool, outputs: Dict[str, Any]) -> None:
    """Refuse bad options of ``search`` before anything is read: ``k``, ``index``, ``show``, the output files."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"--k {k}: expected an integer >= 1")
    suffixes = {"--out": ((".json", ".csv"), "a .json or .csv"), "--html": ((".html", ".htm"), "an .html"),
                "--sheet": ((".png",), "a .png")}
    for opt, path in outputs.items():
        if path is not None and Path(path).suffix.lower() not in suffixes[opt][0]:
            raise UsageError(f"{opt} {path}: expected {suffixes[opt][1]} file")
    for opt, path in outputs.items():
        if path is not None and Path(path).exists() and not overwrite:
            raise UsageError(f"{opt} {path}: exists; replace it with --overwrite or choose another name")
    if show < 1:
        raise UsageError(f"--show {show}: expected an integer >= 1")
    if index not in INDEX_KINDS:
        raise UsageError(f"--index {index}: expected one of {', '.join(INDEX_KINDS)}")


def _store_queries(gallery: Store, query: PathLike) -> _Queries:
    """A query store's rows as queries (the gallery itself: leave-one-out).

    Raises:
        UsageError: a store of another dimension or another model than the gallery.
    """
    qs = open_store(query, "--query")
    if qs.dim != gallery.dim:
        raise UsageError(f"--query {query}: a store of dimension {qs.dim}, the gallery {gallery.path} has {gallery.dim}")
    if qs.meta.get("checkpoint_sha256") != gallery.meta.get("checkpoint_sha256"):
        raise UsageError(f"--query {query}: built by another model than the gallery {gallery.path} "
                         "(their checkpoints' SHA-256 differ)")
    exclude = np.arange(len(gallery), dtype=np.int64) if qs.meta["id"] == gallery.meta["id"] else None
    return _Queries(np.asarray(qs.embeddings), qs.items, qs.labels, exclude, item_opener(qs))


def _image_queries(gallery: Store, query: PathLike, run: Optional[PathLike], device: str, skip_bad_images: bool,
                   progress: Optional[bool]) -> _Queries:
    """An image or a folder of images, embedded by the gallery's model (or ``run``, which must be that model).

    Raises:
        FileNotFoundError: ``query`` does not exist.
        UsageError: a model other than the gallery's, or no readable image.
    """
    lm = load_run_model(run if run is not None else gallery.meta["checkpoint"], device)
    check_same_model(gallery, lm, "STORE")
    qp = Path(query)
    if qp.is_dir():
        keys, labels, items = list_items("images", qp, option="--query")
    elif qp.is_file():
        keys, labels, items = [qp.name], [""], [str(qp)]
    else:
        raise FileNotFoundError(f"--query {query}: no such image, folder or store")
    emb, kept = embed_images(lm, items, lm.config.eval_batch_size, 0, skip_bad_images, progress, names=keys,
                             desc="queries")
    keys, labels = [keys[i] for i in kept], [labels[i] for i in kept]
    if not keys:
        raise UsageError(f"--query {query}: no readable image")
    paths = {key: items[i] for key, i in zip(keys, kept)}
    return _Queries(emb, keys, labels, None, lambda key: open_item(paths[key]))


def _neighbours(gallery: Store, queries: _Queries, k: int, index: str, nprobe: int,
                ef_search: int) -> Tuple[Any, SearchResult]:
    """The gallery's index of ``index`` kind and each query's ``k`` neighbours (a note when ``k`` is clamped)."""
    avail = len(gallery) - (1 if queries.exclude is not None else 0)
    if k > avail:
        warn(PROG, f"--k {k} is more than the {avail} gallery items"
             + (" (leave-one-out)" if queries.exclude is not None else "") + f": using --k {avail}")
    idx = load_index(gallery, index)
    return idx, search(idx, queries.emb, k, queries.exclude, nprobe=nprobe, ef_search=ef_search)


def _entries(gallery: Store, queries: _Queries, res: SearchResult, predict: bool) -> List[Dict[str, Any]]:
    """One result per query: its neighbours (rank, item, label, score) and, with ``predict``, the k-NN vote."""
    results = []
    for qi, (key, qlab) in enumerate(zip(queries.keys, queries.labels)):
        nbrs = [{"rank": r + 1, "item": gallery.items[g], "label": gallery.labels[g], "score": float(s)}
                for r, (g, s) in enumerate(zip(res.rows[qi].tolist(), res.scores[qi].tolist())) if g >= 0]
        entry: Dict[str, Any] = {"query": key, "query_label": qlab or None, "neighbours": nbrs}
        if predict:
            lab, conf, votes = knn_vote([n["label"] for n in nbrs])
            entry["prediction"] = {"label": lab, "confidence": conf, "votes": votes}
        results.append(entry)
    return results


def _accuracy(gallery: Store, queries: _Queries, results: List[Dict[str, Any]], predict: bool, k: int,
              top1_hit: Callable[[int], bool]) -> Dict[str, Any]:
    """Top-1 accuracy by the rules of Recall@1 and the k-NN vote's accuracy, also reported on stderr.

    ``top1_accuracy`` is over the labelled queries with a positive in the gallery (leaving the query
    itself out), ties against the query (:func:`_top1_hit`); ``knn_accuracy`` over every labelled query.

    Returns:
        ``{"top1_accuracy", "queries_without_positive", "knn_accuracy"?}``; ``{}`` when no query has a
        known label or the gallery has no labels.
    """
    loo = 1 if queries.exclude is not None else 0
    label_count: Dict[str, int] = {}
    for lab in gallery.labels:
        label_count[lab] = label_count.get(lab, 0) + 1
    top1 = knn = n_known = n_pos = 0
    for qi, (qlab, entry) in enumerate(zip(queries.labels, results)):
        if qlab and gallery.has_labels:
            n_known += 1
            knn += predict and entry["prediction"]["label"] == qlab
            if label_count.get(qlab, 0) - loo > 0:  # has a positive, as Recall@1 asks
                n_pos += 1
                top1 += top1_hit(qi)
    if not n_known:
        return {}
    acc: Dict[str, Any] = {"top1_accuracy": top1 / n_pos if n_pos else float("nan"),
                           "queries_without_positive": n_known - n_pos}
    line = (f"[{PROG}] {n_known} labelled queries: top-1 neighbour of the same label (Recall@1: over the {n_pos} "
            f"with a positive, ties against the query) {100 * top1 / max(n_pos, 1):.2f}%")
    if predict:
        acc["knn_accuracy"] = knn / n_known
        line += f", k-NN vote (k={k}) accuracy {100 * knn / n_known:.2f}%"
    print(line, file=sys.stderr)
    return acc


def _top1_hit(index, queries: _Queries, qi: int, res: SearchResult, labels: Sequence[str], nprobe: int,
              ef_search: int) -> bool:
    """Whether query ``qi`` is a Recall@1 hit: every gallery item at the top similarity has its label.

    A tie between a positive and a negative at the top counts against the query, as in
    :mod:`metric.evaluate`. When all returned neighbours share the top similarity the tie may go on
    past them, so the query is searched again with twice the k until it ends (or the gallery does).
    """
    exclude = queries.exclude
    avail = len(labels) - (1 if exclude is not None else 0)
    rows, scores = res.rows[qi], res.scores[qi]  # (k,), (k,)
    k = res.k
    while k > 0 and k < avail and bool(np.all(scores == scores[0])):
        k = min(2 * k, avail)
        again = search(index, queries.emb[qi : qi + 1], k, None if exclude is None else exclude[qi : qi + 1],
                       nprobe=nprobe, ef_search=ef_search)
        rows, scores = again.rows[0], again.scores[0]
    if k == 0 or rows[0] < 0:
        return False
    top = rows[(scores == scores[0]) & (rows >= 0)]  # gallery rows at the top similarity
    return all(labels[g] == queries.labels[qi] for g in top.tolist())


def _write_outputs(summary: Dict[str, Any], gallery: Store, queries: _Queries, out: Optional[PathLike],
                   html: Optional[PathLike], sheet: Optional[PathLike], show: int) -> None:
    """The results file and the pictures of ``show`` queries, evenly spaced over all (many classes, not the first)."""
    if out is not None:
        _write_results(Path(out), summary)
    if html is None and sheet is None:
        return
    from .visualize import write_html, write_sheet

    results = summary["results"]
    picks = sorted(set(np.linspace(0, len(results) - 1, min(show, len(results))).round().astype(int).tolist()))
    shown = [results[i] for i in picks]
    if html is not None:
        write_html(Path(html), shown, queries.open, item_opener(gallery))
    if sheet is not None:
        write_sheet(Path(sheet), shown, queries.open, item_opener(gallery))


def _write_results(path: Path, summary: Dict[str, Any]) -> None:
    """``summary`` as JSON, or as CSV: one line per (query, neighbour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(summary, indent=1) + "\n")
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["query", "query_label", "rank", "item", "label", "score", "predicted", "confidence"])
        for e in summary["results"]:
            pred = e.get("prediction") or {}
            for n in e["neighbours"]:
                w.writerow([e["query"], e["query_label"] or "", n["rank"], n["item"], n["label"], f"{n['score']:.6f}",
                            pred.get("label") or "", f"{pred['confidence']:.4f}" if pred else ""])


def _print_results(results: List[Dict[str, Any]]) -> None:
    """Each query (with its predicted label and confidence) and its neighbours, on stdout."""
    for entry in results:
        pred = entry.get("prediction")
        print(entry["query"] + (f"  -> {pred['label']} ({pred['confidence']:.2f})" if pred else ""))
        for n in entry["neighbours"]:
            print(f"  {n['rank']:>3}  {n['score']:+.4f}  {n['item']}" + (f"  [{n['label']}]" if n["label"] else ""))
