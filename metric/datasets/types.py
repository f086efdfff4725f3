"""The types every dataset loader returns: :class:`Split`, :class:`RetrievalData`, :class:`DataFormatError`.

They live below both :mod:`metric.data` (the on-disk formats, Omniglot, folders) and
:mod:`metric.datasets.pml` (CUB-200-2011 and Cars196 through PML), so that neither loader imports the
other's module; :mod:`metric.data` re-exports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple, Union

import numpy as np

__all__ = ["DataFormatError", "Item", "Split", "RetrievalData"]

Item = Union[str, Tuple[str, Tuple[float, float, float, float]], np.ndarray]


class DataFormatError(ValueError):
    """A dataset file is missing or malformed; the message names the file (and line)."""


@dataclass
class Split:
    """Items and their labels.

    Attributes:
        items: N items: an image path, ``(path, (x1, y1, x2, y2))`` for a crop, or a uint8 array.
        labels: (N,) int64 labels.
    """

    items: List[Item]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return int(np.unique(self.labels).size)


@dataclass
class RetrievalData:
    """A training split plus the evaluation protocol.

    Attributes:
        name: dataset name.
        train: training split.
        query: query split.
        gallery: gallery split (the same object as ``query`` when ``query_is_gallery``).
        query_is_gallery: leave-one-out evaluation.
        info: free-form description of how the split was made (saved with the run).
    """

    name: str
    train: Split
    query: Split
    gallery: Split
    query_is_gallery: bool
    info: Dict[str, Any] = field(default_factory=dict)
