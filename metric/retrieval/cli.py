"""The retrieval subcommands of ``xbn-metric``: ``embed``, ``search`` and ``export`` (argument parsing only).

Each ``*_main(argv)`` parses ``argv`` (``argv[0]`` is the subcommand's name), calls the library function
(:func:`~metric.retrieval.embed`, :func:`~metric.retrieval.search_store`,
:func:`~metric.retrieval.export.export_model`) and returns the exit status; :mod:`metric.cli` dispatches
to them and turns bad input into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import List

from xbn_queue.training.cli import UsageError

from .checkpoint import PROG
from .embedding import embed
from .export import FORMATS, export_model
from .index import INDEX_KINDS
from .items import EMBED_SPLITS
from .neighbours import search_store

__all__ = ["embed_main", "search_main", "export_main"]

EMBED_DESCRIPTION = """Embed every image of a dataset or folder with a trained run's model and write an embedding store
(OUT/embeddings.npy: (N, D) float32, memory-mappable; OUT/items.csv: row,item,label; OUT/store.json: the
run, the checkpoint's SHA-256, the dimension, the source). The model is rebuilt from the checkpoint's own
configuration (no hub access) and uses the run's evaluation transform; batches run on the GPU with AMP when
there is one. --update embeds only the images not in the store yet (and extends the indexes saved beside it).
Exit status: 0 done; 2 bad input (one line, nothing written)."""

SEARCH_DESCRIPTION = """Find the nearest gallery images of each query in an embedding store, by the similarity the run was
evaluated with (inner product; cosine for L2-normalised embeddings), with faiss. The index is built on
first use, saved beside the store (index-<kind>.faiss) and reused. --k must be >= 1; a --k larger than the
gallery is clamped to it with a note. --query may be an image, a folder of images (sub-folder names are
labels), or a store: the gallery store itself searches it leave-one-out (each item's own entry left out).
Exit status: 0 done; 2 bad input (one line, nothing written)."""


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs (default: auto)")
    p.add_argument("--skip-bad-images", action="store_true", help="warn about and leave out unreadable images instead of stopping")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")


def embed_main(argv: List[str]) -> int:
    """``xbn-metric embed RUN --out DIR [...]``; returns the exit status."""
    from xbn_queue.training.config import _OneLineParser

    from ..data import DATASETS

    p = _OneLineParser(prog=f"{PROG} embed", description=EMBED_DESCRIPTION)
    p.add_argument("run", metavar="RUN", help="run folder (its best.pt) or checkpoint file")
    p.add_argument("--out", required=True, help="the store folder")
    p.add_argument("--data-root", help="the images' folder (default: the run's --data-root)")
    p.add_argument("--dataset", choices=["images", *DATASETS],
                   help="images (every image file under --data-root; a first-level sub-folder is the label) or a "
                        "dataset of the trainer (default: the run's)")
    p.add_argument("--split", choices=EMBED_SPLITS,
                   help="part of a dataset, split by the run's own rule: test (its held-out images, default), "
                        "query, gallery, train or all")
    p.add_argument("--update", action="store_true", help="embed only images not in the store yet, and append them")
    p.add_argument("--overwrite", action="store_true", help="replace the store --out holds")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the run's --eval-batch-size)")
    p.add_argument("--workers", type=int, help="data loader workers (default: the run's)")
    _device_arg(p)
    a = p.parse_args(argv[1:])
    for opt, v in (("--batch-size", a.batch_size), ("--workers", a.workers)):
        if v is not None and v < (1 if opt == "--batch-size" else 0):
            raise UsageError(f"{opt} {v}: expected an integer >= {1 if opt == '--batch-size' else 0}")
    embed(a.run, a.out, a.data_root, a.dataset, a.split, a.update, a.overwrite, a.batch_size, a.workers, a.device,
          a.skip_bad_images, a.progress)
    return 0


def search_main(argv: List[str]) -> int:
    """``xbn-metric search STORE --query IMG_OR_DIR [...]``; returns the exit status."""
    from xbn_queue.training.config import _OneLineParser

    p = _OneLineParser(prog=f"{PROG} search", description=SEARCH_DESCRIPTION)
    p.add_argument("store", metavar="STORE", help="the gallery store (made by embed)")
    p.add_argument("--query", required=True, help="an image, a folder of images, or a store")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default: 10) [valid: >= 1]")
    p.add_argument("--index", default="flat", choices=INDEX_KINDS,
                   help="flat (exact, default), ivf or hnsw (approximate, for large galleries; see BENCHMARKS.md)")
    p.add_argument("--nprobe", type=int, default=16, help="ivf: clusters searched (default: 16)")
    p.add_argument("--ef-search", type=int, default=64, help="hnsw: candidate list size (default: 64)")
    p.add_argument("--predict", action="store_true", help="add a k-NN class vote and its confidence (gallery labels needed)")
    p.add_argument("--out", help="write the results to a .json or .csv file (default: print them)")
    p.add_argument("--html", metavar="PAGE", help="a self-contained .html page of queries and neighbours")
    p.add_argument("--sheet", metavar="PNG", help="a .png contact sheet of queries and neighbours")
    p.add_argument("--show", type=int, default=20, help="queries shown in --html / --sheet, evenly spaced over all queries (default: 20)")
    p.add_argument("--run", help="model for query images (default: the checkpoint the store records)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out / --html / --sheet files")
    _device_arg(p)
    a = p.parse_args(argv[1:])
    for opt, v in (("--nprobe", a.nprobe), ("--ef-search", a.ef_search)):
        if v < 1:
            raise UsageError(f"{opt} {v}: expected an integer >= 1")
    search_store(a.store, a.query, a.k, a.index, a.predict, a.run, a.out, a.html, a.sheet, a.show, a.overwrite,
                 a.nprobe, a.ef_search, a.device, a.skip_bad_images, a.progress)
    return 0


EXPORT_DESCRIPTION = """Export a run's embedding model (backbone, head, normalisation; evaluation mode).
--format hf: a folder for the Hugging Face Hub (model.safetensors, config.json with the architecture and
preprocessing, README.md model card with the run's metrics), loaded back with
metric.hub.load_model(DIR or "user/repo"); --push-to-hub REPO uploads it (huggingface_hub; needs
pip install "xbn-queue[hub]"). --format torch-export: a torch.export program (.pt2, torch.export.load).
--format onnx: the dynamo exporter (the TorchScript-based one, with a warning, where it fails).
--format torchscript: kept for compatibility (torch.jit is deprecated; prefer torch-export).
Input images (B, 3, H, W) float32, output embeddings (B, D); the preprocessing constants, the run and the
checkpoint's SHA-256 are stored with the model as metadata (metadata.json in a file; config.json in a folder).
Exit status: 0 written; 2 bad input (one line, nothing written); 1 a missing package or a failed upload."""


def export_main(argv: List[str]) -> int:
    """``xbn-metric export RUN --format hf|torch-export|onnx|torchscript --out PATH``; returns the exit status."""
    from xbn_queue.training.config import _OneLineParser

    p = _OneLineParser(prog=f"{PROG} export", description=EXPORT_DESCRIPTION)
    p.add_argument("run", metavar="RUN", help="run folder (its best.pt) or checkpoint file")
    p.add_argument("--format", required=True, choices=FORMATS, help="hf (a Hub model folder), torch-export (.pt2), "
                   "onnx or torchscript")
    p.add_argument("--out", required=True, help="the folder (hf) or file to write (model.pt2, model.onnx, model.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (hf: the model files "
                   "in a folder that is not empty)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="hf only: upload the folder to the Hugging "
                   "Face Hub repository REPO (user/name; created if missing; token from HF_TOKEN or hf auth login)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    a = p.parse_args(argv[1:])
    res = export_model(a.run, a.out, a.format, a.overwrite, a.push_to_hub, a.private)
    sizes = ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in res["files"].items())
    how = f" ({res['exporter']} exporter)" if "exporter" in res else ""
    print(f"[{PROG}] {a.format}{how} written to {res['file']}: {sizes}; embedding dimension {res['embedding_dim']}; "
          f"max abs difference to PyTorch on a random batch: {res['max_abs_diff']:.2e}", file=sys.stderr)
    if a.format == "torchscript":
        print(f"[{PROG}] note: torch.jit is deprecated in PyTorch; --format torch-export is its successor", file=sys.stderr)
    if res.get("url"):
        print(f"[{PROG}] pushed to {res['url']}", file=sys.stderr)
    return 0
