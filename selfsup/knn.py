"""Weighted k-NN monitor of InstDisc / the MoCo CIFAR demo, computed by lightly's ``knn_predict``.

The bank holds L2-normalized features of the (un-augmented) training set (the encoder output, or
the backbone's with ``--knn-features backbone``); each test feature takes its ``k`` most
cosine-similar bank entries, weights each by ``exp(s / t)`` and predicts the class with the largest
summed weight (:func:`lightly.utils.benchmarking.knn_predict`). Queries are processed in chunks so
that the similarity block stays below ``max_elements`` entries whatever the bank size.
"""

import torch
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
