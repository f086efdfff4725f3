"""Two reference points for every comparison: raw pixels and the untrained network.

``xbn-metric compare`` and ``xbn-metric sweep`` print them beside the trained methods, on the same
evaluation split and with the same metrics, so a user sees at once whether training helped:

* **raw pixels**: each evaluation image under the evaluation transform (resize, centre crop, ImageNet
  normalisation) at ``min(--image-size, 32)`` px, flattened to ``3 * s * s`` values, L2-normalised;
  retrieval by cosine similarity;
* **untrained network**: the run's model (backbone, head, normalisation) as built with the run's seed
  before any training step (``seed_everything(seed)``, then the model is created as in :func:`metric.train.train`),
  in evaluation mode. Its BatchNorm layers first get the statistics of the training images: a fresh
  layer holds mean 0 / variance 1, which would compare the trained runs with a network that never
  saw the data's scale, so one no-grad pass over the training split (evaluation transform) in train
  mode re-estimates every running mean and variance (cumulative average, :func:`recompute_batchnorm`);
  no weight changes. A pretrained backbone keeps its own statistics (its ImageNet ones) and is this
  backbone under a random head. One value per seed; the table shows mean ± std over the seeds.

Both use the runs' own preprocessing: the tensor cache (:mod:`metric.fastdata`) when the runs use it.

Results are cached in ``OUTPUT_DIR/baselines.json`` together with the settings they depend on, and
recomputed when those differ.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from xbn_queue.training.progress import progress

from ..config import MetricConfig, resolve_config

if TYPE_CHECKING:
    from ..data import RetrievalData
    from ..train import EvaluationSets

__all__ = ["BASELINES", "RAW_PIXELS_MAX_SIZE", "compute_baselines", "load_or_compute_baselines", "summarize_baselines",
           "recompute_batchnorm"]

#: Row names of the baselines in the tables (in this order).
BASELINES = {"raw-pixels": "Raw pixels", "untrained": "Untrained net"}
#: Raw pixels are taken at ``min(image_size, RAW_PIXELS_MAX_SIZE)`` px.
RAW_PIXELS_MAX_SIZE = 32

#: Settings the baselines depend on (a cached ``baselines.json`` with other values is recomputed).
_KEYS = ["dataset", "data_root", "split", "train_fraction", "split_seed", "max_per_class", "image_size", "backbone",
         "width", "head", "pretrained", "pretrained_path", "embedding_dim", "embedding_norm", "recall_ks",
         "tensor_cache", "augment"]
#: How the untrained network's BatchNorm statistics are set (part of the cache key: older caches are recomputed).
UNTRAINED_BN = "re-estimated on the training split (no grad, evaluation transform), pretrained backbones keep theirs"


def compute_baselines(cfg: MetricConfig, seeds: Sequence[int]) -> Dict[str, List[Dict[str, float]]]:
    """Recall@K and MAP@R of raw pixels (once) and of the untrained network (once per seed).

    Runs on one process, on ``cfg.device`` (``auto``: CUDA when available), on the evaluation sets the
    runs build (:func:`metric.train.evaluation_sets`).

    Args:
        cfg: the comparison's configuration (``None`` fields take the dataset defaults).
        seeds: the seeds of the runs.

    Returns:
        ``{"raw-pixels": [metrics], "untrained": [metrics per seed]}``, metrics as fractions in [0, 1].

    Raises:
        metric.data.DataFormatError, ValueError, metric.model.PretrainedWeightsError: as :func:`metric.train.train`.
    """
    from ..data import load_dataset
    from ..train import evaluation_sets

    cfg = resolve_config(cfg)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.train_fraction, cfg.split_seed, max_per_class=cfg.max_per_class,
                        download=cfg.download, omniglot_rotations=cfg.omniglot_rotations)
    size = min(int(cfg.image_size), RAW_PIXELS_MAX_SIZE)
    raw_sets = evaluation_sets(cfg, data, device, size)
    sets = raw_sets if size == cfg.image_size else evaluation_sets(cfg, data, device)
    return {"raw-pixels": [_raw_pixel_scores(cfg, data, raw_sets, size, device)],
            "untrained": [_untrained_scores(cfg, data, sets, int(seed), device) for seed in seeds]}


def _raw_pixel_scores(cfg: MetricConfig, data: RetrievalData, sets: EvaluationSets, size: int,
                      device: torch.device) -> Dict[str, float]:
    """Raw pixels: the evaluation images at ``size`` px, flattened to ``3 * size * size`` values, L2-normalised."""
    flat = torch.nn.Sequential(torch.nn.Flatten(), _L2())
    return _scores(flat, data, sets, dataclasses.replace(cfg, embedding_dim=3 * size * size, amp=False), device)


def _untrained_scores(cfg: MetricConfig, data: RetrievalData, sets: EvaluationSets, seed: int,
                      device: torch.device) -> Dict[str, float]:
    """The network built with ``seed`` as a run builds it, no training step; a network trained from scratch gets
    the BatchNorm statistics of the training images (:func:`recompute_batchnorm`)."""
    from xbn_queue.training.seeding import seed_everything

    from ..model import build_model

    seed_everything(seed)
    model = build_model(cfg.backbone, cfg.embedding_dim, cfg.embedding_norm, cfg.pretrained, cfg.pretrained_path,
                        cfg.width, cfg.image_size, cfg.head).to(device)
    if not (cfg.pretrained or cfg.pretrained_path):
        recompute_batchnorm(model, sets.train, cfg.eval_batch_size, device, cfg.progress)
    return _scores(model, data, sets, cfg, device)


def _scores(model: torch.nn.Module, data: RetrievalData, sets: EvaluationSets, cfg: MetricConfig,
            device: torch.device) -> Dict[str, float]:
    """Embed the query (and the gallery) with ``model`` and score the retrieval: Recall@K, MAP@R, R-Precision."""
    from xbn_queue.training.distributed import DistContext

    from ..evaluate import SCORE_PREFIXES, retrieval_metrics
    from ..train import embed_split

    ctx = DistContext(device=device)
    q, ql, _ = embed_split(model, sets.query, cfg, ctx, device, desc="baseline query")  # (Q, D), (Q,)
    g, gl = (None, None) if data.query_is_gallery else embed_split(model, sets.gallery, cfg, ctx, device,
                                                                    desc="baseline gallery")[:2]  # (G, D), (G,)
    rec = retrieval_metrics(q, ql, g, gl, ks=cfg.recall_ks, query_is_gallery=data.query_is_gallery, chunk_size=cfg.eval_chunk)
    return {k: float(v) for k, v in rec.items() if k.startswith(SCORE_PREFIXES)}


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, dataset, batch_size: int, device: torch.device,
                        show_progress: Optional[bool] = None) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance on ``dataset``; no weight changes.

    The statistics are reset and accumulated as a cumulative average over all batches (``momentum=None``)
    in train mode without gradients; the model is left in evaluation mode with the layers' momentum
    restored.

    Args:
        model: the network.
        dataset: items ``(image, label, index, ok)`` (:class:`metric.data.ImageDataset` or a cached split).
        batch_size: images per forward pass.
        device: where the model lives.
        show_progress: a progress bar (``None``: only on a terminal).

    Returns:
        The number of BatchNorm layers updated (0: nothing to do).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, _, _, ok in progress(loader, desc="baseline BatchNorm statistics", enabled=show_progress, leave=False):
        if int(ok.sum()) >= 2:  # BatchNorm in train mode needs two values per channel
            model(x[ok].to(device))
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    model.eval()
    return len(norms)


class _L2(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=1)  # (B, F) unit rows


def _settings(cfg: MetricConfig, seeds: Sequence[int]) -> Dict[str, Any]:
    from xbn_queue.training.config import config_to_dict

    d = config_to_dict(resolve_config(cfg))
    out = dict({k: d[k] for k in _KEYS}, seeds=[int(s) for s in seeds], untrained_bn=UNTRAINED_BN)
    if d.get("omniglot_rotations", 1) != 1:  # only then: caches written before the option existed stay valid
        out["omniglot_rotations"] = d["omniglot_rotations"]
    return out


def load_or_compute_baselines(cfg: MetricConfig, seeds: Sequence[int], out_dir: Path) -> Dict[str, List[Dict[str, float]]]:
    """:func:`compute_baselines`, cached in ``out_dir / "baselines.json"`` (recomputed when its settings differ)."""
    path = Path(out_dir) / "baselines.json"
    settings = _settings(cfg, seeds)
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("settings") == settings:
                return cached["results"]
        except (OSError, ValueError, KeyError):
            pass
    results = compute_baselines(cfg, seeds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    tmp.replace(path)
    return results


def summarize_baselines(results: Dict[str, List[Dict[str, float]]], keys: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{baseline: {metric: {"mean", "std", "n"}}}`` (sample std over seeds; 0 for one value), as compare's summary."""
    import statistics

    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name in BASELINES:
        rows = results.get(name, [])
        out[name] = {}
        for k in keys:
            vals = [r[k] for r in rows if k in r]
            if vals:
                out[name][k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                "n": len(vals)}
    return out
