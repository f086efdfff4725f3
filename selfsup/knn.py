"""Weighted k-NN monitor of InstDisc / the MoCo CIFAR demo, computed by lightly's ``knn_predict``.

The bank holds L2-normalized features of the (un-augmented) training set (the encoder output, or
the backbone's with ``--knn-features backbone``); each test feature takes its ``k`` most
cosine-similar bank entries, weights each by ``exp(s / t)`` and predicts the class with the largest
summed weight (:func:`lightly.utils.benchmarking.knn_predict`). Queries are processed in chunks so
that the similarity block stays below ``max_elements`` entries whatever the bank size.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    max_elements: int = 1 << 24,
) -> Tensor:
    """Weighted k-NN predictions.

    Args:
        queries: ``(M, D)`` L2-normalized query features.
        bank: ``(N, D)`` L2-normalized bank features.
        bank_labels: ``(N,)`` int64 labels of the bank in ``[0, num_classes)``.
        num_classes: number of classes.
        k: neighbours (clamped to ``N``).
        t: temperature of the weights ``exp(s / t)``.
        max_elements: largest similarity block ``chunk x N`` held at once.

    Returns:
        ``(M,)`` int64 predicted classes (an exact tie of summed weights goes to either class).

    Raises:
        ValueError: on mismatched shapes or an empty bank.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"expected queries (M, D) and bank (N, D), got {tuple(queries.shape)} and {tuple(bank.shape)}")
    if bank.shape[0] == 0 or bank_labels.shape[0] != bank.shape[0]:
        raise ValueError(f"bank of {bank.shape[0]} rows with {bank_labels.shape[0]} labels")
    from lightly.utils.benchmarking import knn_predict as lightly_knn_predict

    k = min(k, bank.shape[0])
    chunk = max(1, max_elements // bank.shape[0])
    bank_t = bank.t().contiguous()  # (D, N)
    preds = []
    for start in range(0, queries.shape[0], chunk):
        ranked = lightly_knn_predict(queries[start : start + chunk], bank_t, bank_labels, num_classes, knn_k=k, knn_t=t)
        preds.append(ranked[:, 0])  # (b,) the class with the largest summed weight
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=queries.device)


@torch.no_grad()
def knn_accuracy(
    queries: Tensor,
    query_labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    max_elements: int = 1 << 24,
) -> float:
    """Fraction of queries whose weighted k-NN prediction equals their label (in [0, 1])."""
    pred = knn_predict(queries, bank, bank_labels.to(bank.device), num_classes, k, t, max_elements)
    return (pred == query_labels.to(pred.device)).float().mean().item()


@torch.no_grad()
def extract_features(
    encode: Callable[[Tensor], Tensor],
    images: Tensor,
    batch_size: int,
    device: torch.device,
    prepare: Callable[[Tensor], Tensor],
    indices: Optional[Tensor] = None,
    normalize: bool = True,
) -> Tensor:
    """L2-normalized features of uint8 images.

    Args:
        encode: maps a prepared batch to ``(b, F)`` features (e.g. the query encoder's backbone, in eval mode).
        images: ``(N, 3, H, W)`` uint8 on any device.
        batch_size: images per forward.
        device: where to run.
        prepare: uint8 batch on ``device`` -> network input (normalization, memory format).
        indices: optional subset of rows to encode (e.g. this rank's share).
        normalize: L2-normalize each row (``False``: ``encode`` returns features to keep as they are).

    Returns:
        ``(n, F)`` float32 features on ``device``, L2-normalized if ``normalize``.
    """
    idx = torch.arange(images.shape[0]) if indices is None else indices
    out = []
    for start in range(0, idx.numel(), batch_size):
        batch = images[idx[start : start + batch_size].to(images.device)].to(device, non_blocking=True)
        f = encode(prepare(batch)).float()  # (b, F)
        out.append(F.normalize(f, dim=1) if normalize else f)
    if not out:
        return torch.empty(0, 0, device=device)
    return torch.cat(out)
