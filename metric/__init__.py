"""Supervised metric-learning trainer (SOP, In-shop, DeepFashion2, image folders, digits) with an
adaptive cross-batch memory: ``none`` / ``xbm`` / ``xbn`` / ``axbn`` / ``xbn-cov``, each memory method also
with the batch loss added (``xbm-batch`` = XBM*, ``xbn-batch`` = XBN*, ``axbn-batch`` = AXBN*, ``xbn-cov-batch``).

Layout: :mod:`metric.config` (options), :mod:`metric.data` (datasets), :mod:`metric.sampler`
(m-per-class batches), :mod:`metric.model` (embedding network), :mod:`metric.train` (loop),
:mod:`metric.evaluate` (Recall@K, MAP@R), :mod:`metric.experiments.compare` (method comparison),
:mod:`metric.cli` (``xbn-metric``). See ``docs/metric.md``.
"""

from .config import MetricConfig

__all__ = ["MetricConfig"]
