"""MoCo self-supervised trainer with the adaptive queue plugged into lightly (the paper's Appendix B).

Modules by role: :mod:`selfsup.config` (options), :mod:`selfsup.data` (datasets, sampling),
:mod:`selfsup.augment` (PIL and batched tensor augmentations), :mod:`selfsup.model` (CIFAR ResNet,
split BN, momentum encoder), :mod:`selfsup.knn` (k-NN monitor), :mod:`selfsup.train` (the loop),
:mod:`selfsup.compare` and :mod:`selfsup.cli`.
"""

from selfsup.config import SelfSupConfig

__all__ = ["SelfSupConfig"]
