"""Benchmark: the faiss indexes of ``xbn-metric search`` at SOP scale (exact vs IVF vs HNSW).

Gallery: 60,502 x 512 float32 unit vectors, the size of SOP's test set, made from real images: the
60,000 CIFAR-10 JPEGs of ``../shared/data/cifar10-jpeg.tar.gz`` plus the first 502 of them flipped
left-right, each 32x32x3 image scaled to [-0.5, 0.5] and mapped to 512 dimensions by one fixed
Gaussian random projection, then L2-normalised. Queries: ``--queries`` gallery rows drawn at random.

For each index (built by :func:`metric.retrieval.build_index`, as ``search`` builds it) it measures
the build time, the queries per second of a ``k = 10`` search (all queries in one call, ``--threads``
faiss threads) and recall@10 against the exact index: the mean share of the exact 10 nearest
neighbours that the index returns. Each query leaves itself out (as ``search STORE --query STORE``).

    OMP_NUM_THREADS=1 python benchmarks/retrieval_index.py --json retrieval_index.json
    python benchmarks/retrieval_index.py --n 10000 --queries 500            # quick
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metric.retrieval import build_index, search  # noqa: E402

DEFAULT_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def load_pixels(tar_path: Path, n: int) -> np.ndarray:
    """(n, 3072) float32 pixels in [-0.5, 0.5]: the archive's JPEGs in name order, then flipped copies."""
    from PIL import Image

    images = []
    with tarfile.open(tar_path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
        for m in members[:n]:
            with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    base = len(images)
    i = 0
    while len(images) < n:  # SOP has 60,502 test images, CIFAR-10 60,000: add flipped copies
        images.append(images[i % base][:, ::-1])
        i += 1
    x = np.stack(images).reshape(n, -1).astype(np.float32)  # (n, 3072)
    return x / 255.0 - 0.5


def project(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Gaussian random projection to ``dim`` dimensions, rows L2-normalised: (n, dim) float32."""
    w = np.random.default_rng(seed).standard_normal((x.shape[1], dim)).astype(np.float32)  # (3072, dim)
    z = x @ w
    return np.ascontiguousarray(z / np.linalg.norm(z, axis=1, keepdims=True), dtype=np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tar", type=Path, default=DEFAULT_TAR, help="the CIFAR-10 JPEG archive")
    p.add_argument("--n", type=int, default=60502, help="gallery size (default: SOP's test set, 60,502)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads (default: 1)")
    p.add_argument("--nprobes", default="4,16,64", help="IVF settings to measure")
    p.add_argument("--efs", default="32,64,128", help="HNSW efSearch settings to measure")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    import faiss

    if not a.tar.is_file():
        raise SystemExit(f"{a.tar}: not found (the CIFAR-10 JPEG archive)")
    faiss.omp_set_num_threads(a.threads)
    t = time.perf_counter()
    x = project(load_pixels(a.tar, a.n), a.dim, seed=0)  # (n, dim)
    print(f"gallery {x.shape} from {a.tar.name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    picked = np.random.default_rng(1).choice(len(x), a.queries, replace=False)  # (Q,) rows; each leaves itself out
    q = x[picked]  # (Q, dim)

    rows = []
    exact = None
    for kind, settings in (("flat", [None]), ("ivf", [int(v) for v in a.nprobes.split(",")]),
                           ("hnsw", [int(v) for v in a.efs.split(",")])):
        t = time.perf_counter()
        index = build_index(x, kind)
        build_s = time.perf_counter() - t
        for s in settings:
            kw = {"nprobe": s} if kind == "ivf" else {"ef_search": s} if kind == "hnsw" else {}
            search(index, q[:50], a.k, picked[:50], **kw)  # warm-up
            t = time.perf_counter()
            res = search(index, q, a.k, picked, **kw)
            secs = time.perf_counter() - t
            if exact is None:
                exact = res.rows
            recall = float(np.mean([len(set(r) & set(e)) / a.k for r, e in zip(res.rows.tolist(), exact.tolist())]))
            setting = {"ivf": f"nlist {getattr(index, 'nlist', '')}, nprobe {s}", "hnsw": f"M 32, efSearch {s}"}.get(kind, "exact")
            row = {"index": kind, "setting": setting, "build_s": round(build_s, 2), "queries_per_s": round(len(q) / secs, 1),
                   "recall@10": round(recall, 4)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    load = os.getloadavg()
    result = {"n": a.n, "dim": a.dim, "queries": a.queries, "k": a.k, "threads": a.threads, "rows": rows,
              "faiss": faiss.__version__, "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "cpus": os.cpu_count(), "load_average": [round(v, 2) for v in load],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print("| index | setting | build (s) | queries/s | recall@10 vs exact |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['index']} | {r['setting']} | {r['build_s']:.1f} | {r['queries_per_s']:,.0f} | {r['recall@10']:.4f} |")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
