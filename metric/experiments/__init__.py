"""Experiment series over the metric trainer: many runs, one table.

:mod:`metric.experiments.compare` (``xbn-metric compare``: every method x seed, mean ± std, paired gains),
:mod:`metric.experiments.sweep` (``xbn-metric sweep``: any training option against Recall@1 and the gains)
and :mod:`metric.experiments.baselines` (raw pixels and the untrained network on the same evaluation split).
The series machinery they share with ``selfsup`` (plan, folder check, signals, resume, table helpers) is
:mod:`xbn_queue.training.series`. These modules import the trainer (:mod:`metric.train`, :mod:`metric.config`,
...); the trainer never imports them.
"""
