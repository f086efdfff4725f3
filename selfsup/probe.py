"""Linear probe: a linear classifier trained on frozen features, top-1 accuracy on the test features.

The standard linear evaluation of self-supervised features (MoCo's and lightly's benchmarks), in the
form of MAE's linear probe: the features are standardised per dimension with the training features'
mean and standard deviation (a ``BatchNorm1d`` without affine parameters, frozen at the training
set's statistics), then a linear layer, initialised at zero, is trained with cross-entropy by SGD
with momentum 0.9 and a cosine learning-rate schedule for a fixed number of epochs of shuffled
mini-batches. The features in are what the k-NN monitor already computed (:mod:`selfsup.knn`):
nothing is re-embedded.

Deterministic given ``seed`` on one device: the only randomness is the shuffling, drawn from a CPU
``torch.Generator``; the weights start at zero.
"""

import math
from dataclasses import dataclass
import torch
from torch import Tensor


@dataclass
class LinearProbe:
    """A trained probe: ``logits = ((x - mean) / std) @ weight.T + bias``.

    Attributes:
        mean: ``(D,)`` per-dimension mean of the training features.
        std: ``(D,)`` per-dimension standard deviation (biased, floored at ``eps``).
        weight: ``(C, D)`` weights of the linear layer.
        bias: ``(C,)`` bias of the linear layer.
    """

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    @torch.no_grad()
    def predict(self, features: Tensor, batch_size: int = 4096) -> Tensor:
        """``(M,)`` int64 predicted classes of ``features`` ``(M, D)`` (chunks of ``batch_size`` rows)."""
        preds = [self.logits(features[s : s + batch_size]).argmax(dim=1) for s in range(0, features.shape[0], batch_size)]
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=features.device)

    def logits(self, features: Tensor) -> Tensor:
        """``(M, C)`` logits of ``features`` ``(M, D)``."""
        x = (features.to(self.weight.dtype) - self.mean) / self.std  # (M, D) standardised
        return torch.addmm(self.bias, x, self.weight.t())  # (M, C)


def _check(features: Tensor, labels: Tensor, what: str, dim: int = -1) -> None:
    if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{what} features: expected a non-empty (N, D) tensor, got {tuple(getattr(features, 'shape', ()))}")
    if dim >= 0 and features.shape[1] != dim:
        raise ValueError(f"{what} features: expected {dim} columns as the training features, got {features.shape[1]}")
    if not isinstance(labels, Tensor) or tuple(labels.shape) != (features.shape[0],):
        raise ValueError(f"{what} labels: expected shape ({features.shape[0]},), got {tuple(getattr(labels, 'shape', ()))}")


def _standardise(x: Tensor, eps: float):
    """``((x - mean) / std, mean, std)`` per dimension of ``x`` ``(N, D)`` (biased std floored at ``eps``)."""
    mean = x.mean(dim=0)  # (D,)
    std = x.var(dim=0, unbiased=False).sqrt().clamp_min(eps)  # (D,)
    return (x - mean) / std, mean, std  # (N, D), (D,), (D,)


def _gradients(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor, weight_decay: float):
    """Gradients ``(C, D)``, ``(C,)`` of the mean cross-entropy of ``x @ weight.T + bias`` on the batch ``x`` ``(b, D)``,
    ``y`` ``(b,)``, plus ``weight_decay * weight``; in closed form: d(loss)/d(logits) = (softmax - one-hot) / b."""
    err = torch.softmax(torch.addmm(bias, x, weight.t()), dim=1)  # (b, C)
    err[torch.arange(len(y), device=err.device), y] -= 1.0
    err /= len(y)
    grad_w = torch.addmm(weight, err.t(), x, beta=weight_decay) if weight_decay else err.t() @ x  # (C, D)
    return grad_w, err.sum(dim=0)  # (C, D), (C,)


def _sgd_momentum_step(params, velocities, grads, momentum: float, step: float, first: bool) -> None:
    """PyTorch's SGD with momentum, in place: ``v = g`` on the first step, then ``v = m v + g``; ``p -= step v``."""
    for param, vel, grad in zip(params, velocities, grads):
        vel.copy_(grad) if first else vel.mul_(momentum).add_(grad)
        param.sub_(vel, alpha=step)


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    eps: float = 1e-6,
) -> LinearProbe:
    """Train a linear classifier on frozen ``features``.

    Args:
        features: ``(N, D)`` training features (any floating dtype; the probe is trained in float32, or
            float64 for float64 features), on the device the probe is trained on.
        labels: ``(N,)`` integer classes in ``[0, num_classes)``.
        num_classes: number of classes ``C``.
        epochs: passes over the shuffled training features.
        batch_size: rows per SGD step (the last step of an epoch takes the remainder).
        lr: peak learning rate; cosine decay to 0 over ``epochs * ceil(N / batch_size)`` steps.
        momentum: SGD momentum (PyTorch's ``torch.optim.SGD`` form: ``v = m v + g``, ``w -= lr_t v``).
        weight_decay: L2 penalty on the weight (not the bias), added to the gradient.
        seed: seed of the shuffling.
        eps: floor of the standard deviation (constant dimensions).

    Returns:
        The trained :class:`LinearProbe`.

    Raises:
        ValueError: on empty or mismatched features / labels, ``num_classes < 2``, ``epochs < 1`` or
            ``batch_size < 1``.
    """
    _check(features, labels, "training")
    if num_classes < 2 or epochs < 1 or batch_size < 1:
        raise ValueError(f"expected num_classes >= 2, epochs >= 1, batch_size >= 1, got {num_classes}, {epochs}, {batch_size}")
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    with torch.no_grad():  # the gradient of the linear layer in closed form: no autograd, no torch.optim
        x_all, mean, std = _standardise(features.detach().to(dtype), eps)  # once: the features are frozen
        y_all = labels.to(device=x_all.device, dtype=torch.long)  # (N,)
        n, d = x_all.shape
        weight = torch.zeros(num_classes, d, dtype=dtype, device=x_all.device)  # (C, D)
        bias = torch.zeros(num_classes, dtype=dtype, device=x_all.device)  # (C,)
        vel_w, vel_b = torch.zeros_like(weight), torch.zeros_like(bias)  # momentum buffers
        total = epochs * -(-n // batch_size)  # steps of the cosine schedule
        g = torch.Generator().manual_seed(int(seed))
        t = 0
        for _ in range(epochs):
            order = torch.randperm(n, generator=g).to(x_all.device)  # (N,)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]  # (b,) the step's rows
                grads = _gradients(weight, bias, x_all[idx], y_all[idx], weight_decay)  # (C, D), (C,)
                step = lr * (1 + math.cos(math.pi * t / total)) / 2  # cosine from lr to 0
                _sgd_momentum_step((weight, bias), (vel_w, vel_b), grads, momentum, step, first=t == 0)
                t += 1
    return LinearProbe(mean, std, weight, bias)


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    seed: int = 0,
    **fit_kwargs,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) on the test features of a probe trained on the training features.

    Args:
        train_features: ``(N, D)`` frozen training features; ``train_labels``: ``(N,)`` classes.
        test_features: ``(M, D)`` frozen test features; ``test_labels``: ``(M,)`` classes.
        num_classes: number of classes.
        epochs: training epochs of the probe.
        seed: seed of the shuffling.
        **fit_kwargs: further :func:`fit_linear_probe` arguments (``batch_size``, ``lr``, ...).

    Raises:
        ValueError: as :func:`fit_linear_probe`, or test features of another width / labels of another length.
    """
    _check(test_features, test_labels, "test", dim=train_features.shape[1] if isinstance(train_features, Tensor) and train_features.ndim == 2 else -1)
    probe = fit_linear_probe(train_features, train_labels, num_classes, epochs=epochs, seed=seed, **fit_kwargs)
    pred = probe.predict(test_features.to(probe.weight.device))
    return (pred == test_labels.to(pred.device)).float().mean().item()

