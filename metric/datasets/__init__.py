"""Dataset modules and data files of the metric trainer: CUB-200-2011 and Cars196 through PML (:mod:`metric.datasets.pml`), the embedded Omniglot subset."""
