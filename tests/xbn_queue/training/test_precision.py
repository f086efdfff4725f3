"""The one AMP rule and loss scaler (xbn_queue.training.precision), on CPU (the CUDA runs: tests/*/test_cuda.py)."""

import torch

from xbn_queue.training.precision import amp_enabled, autocast, backward_step, grad_scaler


def _model_and_loss():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    return model, lambda: torch.nn.functional.mse_loss(model(x), y)


def _plain_step():
    model, loss = _model_and_loss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _scaled_step(scaler):
    model, loss = _model_and_loss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        backward_step(loss(), opt, scaler)
    return [p.detach().clone() for p in model.parameters()]


def test_off_cuda_amp_is_off_and_the_scaler_disabled():
    cpu = torch.device("cpu")
    assert not amp_enabled(True, cpu) and not grad_scaler(True, cpu).is_enabled()
    with autocast(True, cpu):
        assert not torch.is_autocast_enabled("cpu") and (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_backward_step_equals_a_plain_step_with_the_scaler_off_and_on():
    plain = _plain_step()
    off = _scaled_step(grad_scaler(False, torch.device("cpu")))
    on = _scaled_step(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))  # a power of two: scaling is exact
    for p, a, b in zip(plain, off, on):
        assert torch.equal(p, a) and torch.equal(p, b)
