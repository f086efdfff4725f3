"""The retrieval application: embed images with a trained run into a store, search it with faiss, predict
classes by k-NN vote, export the model.

Modules, by what they do: :mod:`~metric.retrieval.checkpoint` (a run's model rebuilt from its
checkpoint), :mod:`~metric.retrieval.items` (which images: a dataset's split or a folder, as item keys),
:mod:`~metric.retrieval.store` (the store's files: open, check, write), :mod:`~metric.retrieval.embedding`
(``embed``: images -> a store, ``--update``), :mod:`~metric.retrieval.index` (faiss indexes beside a
store), :mod:`~metric.retrieval.neighbours` (``search``: neighbours, k-NN vote, top-1 accuracy, results),
:mod:`~metric.retrieval.visualize` (HTML page, contact sheet), :mod:`~metric.retrieval.export`
(``export``: Hub folder, torch.export, ONNX, TorchScript) and :mod:`~metric.retrieval.cli` (the three
subcommands' arguments). The trainer (the top level of :mod:`metric`) never imports this package; the
exact faiss evaluation the trainer uses (``--eval-backend faiss``) is
:func:`metric.evaluate.faiss_retrieval_metrics`.

A **store** is a folder that other tools can read without this package:

* ``embeddings.npy``: (N, D) float32, row i = item i (``numpy.load(path, mmap_mode="r")`` maps it);
* ``items.csv``: header ``row,item,label``; ``item`` is the image's path relative to the store's
  data root (``path#x1,y1,x2,y2`` for a crop, ``digits/<split>/<position>`` for the bundled digits),
  ``label`` the class name or id (empty when unknown);
* ``store.json``: the run folder, the checkpoint and its SHA-256, the embedding dimension, the row
  count, where the images came from (dataset, data root, split) and a random store id;
* ``index-<kind>.faiss`` + ``index-<kind>.json``: a faiss index of the rows (built by the first
  search with that kind, reused afterwards, extended by ``embed --update``); the JSON names the store
  id and the row count it was built for, so an index that does not match its store is refused.

Similarity: the inner product of the stored embeddings, the same one the trainer evaluates with
(:mod:`metric.evaluate`); for the default ``--embedding-norm l2`` the embeddings are unit vectors and
this is the cosine similarity. Index kinds: ``flat`` (exact, the default), ``ivf`` (inverted lists,
``nlist = 4 sqrt(N)`` clusters, ``nprobe`` of them searched) and ``hnsw`` (graph, 32 links per node,
``ef_search`` candidates); their recall and speed at SOP scale are in ``BENCHMARKS.md``. With
``faiss-gpu`` and a CUDA device the flat and IVF indexes are searched on the GPU.

k policy: ``k`` must be >= 1; a ``k`` larger than the gallery (less the query itself when a store
searches itself, leave-one-out) is clamped to the gallery's size with a note on stderr.

k-NN vote (``predict``): each of the k neighbours with a label votes for it; the prediction is the
label with the most votes, a tie going to the label of the better-ranked neighbour; the confidence
is votes / (neighbours with a label).

Top-1 accuracy (labelled queries, labelled gallery): computed by the rules of Recall@1 in
:mod:`metric.evaluate`, so that a store searching itself reports the run's Recall@1. Only queries
with at least one gallery item of their label (leaving the query itself out) count; the others are
reported as ``queries_without_positive``. Ties count against the query: a hit needs every gallery
item with the top similarity to share the query's label (faiss's order among equal similarities
does not decide it; when all k neighbours tie, the query is searched again with a larger k until
the tie ends). With the exact ``flat`` index this equals Recall@1 up to the float rounding of
similarities that differ in the last bits; ``ivf`` / ``hnsw`` may miss the best neighbour. The k-NN
vote's accuracy is over every labelled query (one whose label the gallery lacks is a miss).
"""

from .checkpoint import LoadedModel, checkpoint_of, file_sha256, load_run_model
from .cli import embed_main, export_main, search_main
from .embedding import embed, embed_images
from .export import export_model, read_metadata, run_exported
from .index import INDEX_KINDS, build_index, load_index
from .items import EMBED_SPLITS, list_items, split_rule
from .neighbours import SearchResult, knn_vote, search, search_store
from .store import STORE_FILES, Store, is_store, open_store

__all__ = ["LoadedModel", "Store", "SearchResult", "load_run_model", "checkpoint_of", "file_sha256", "open_store",
           "is_store", "list_items", "split_rule", "embed", "embed_images", "build_index", "load_index", "search",
           "knn_vote", "search_store", "export_model", "read_metadata", "run_exported", "embed_main", "search_main",
           "export_main", "STORE_FILES", "INDEX_KINDS", "EMBED_SPLITS"]
