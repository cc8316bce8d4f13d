"""Small problems with known answers, shared by the correctness tests (curvlinops style).

Every case builds, in float64, a model, a loss and a list of batches small enough that the dense
Hessian, exact traces and closed-form surfaces can be computed by brute force.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Case:
    name: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def tiny_mlp_case(seed: int = 0, n: int = 40, batch: int = 16) -> Case:
    """MLP 6 -> 5 -> 3 with ReLU, cross-entropy, uneven last batch (weights |B|/N matter)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Case("tiny-mlp", model.eval(), _batches(x, y, batch), nn.functional.cross_entropy)


def tiny_cnn_bn_case(seed: int = 0, n: int = 24, batch: int = 10) -> Case:
    """Conv(1->2) + BatchNorm (eval statistics) + Tanh + pool + Linear(2->3)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        bn = model[1]
        bn.running_mean.copy_(torch.randn(2, generator=g, dtype=torch.float64) * 0.1)
        bn.running_var.copy_(torch.rand(2, generator=g, dtype=torch.float64) + 0.5)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Case("tiny-cnn-bn", model.eval(), _batches(x, y, batch), nn.functional.cross_entropy)


class Quadratic(nn.Module):
    """f(w) = 1/2 (w - c)^T A (w - c), independent of the data: a model whose loss surface,
    Hessian (A) and local flatness are known in closed form."""

    def __init__(self, a: torch.Tensor, center: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("center", center)
        self.w = nn.Parameter(center.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One "logit" per sample carrying the quadratic; the loss_fn below reads it.
        d = self.w - self.center
        return (0.5 * d @ self.a @ d).expand(x.shape[0]).unsqueeze(1)


def quadratic_case(n_params: int = 8, seed: int = 0) -> Case:
    """Quadratic with a known positive-definite A and a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_params, n_params, generator=g, dtype=torch.float64))
    eig = torch.logspace(1, -2, n_params, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    model = Quadratic(a, torch.randn(n_params, generator=g, dtype=torch.float64))
    x = torch.zeros(6, 1, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)

    def loss_fn(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return out.mean()

    return Case("quadratic", model, _batches(x, y, 4), loss_fn)


def linear_regression_case(n: int = 12, k: int = 3, batch: int = 5, seed: int = 0) -> Case:
    """Least squares at its interpolating minimum: ``nn.Linear(k, 1, bias=False)`` holding w*,
    targets y = X w*, loss 1/2 mean (x.w - y)^2. On any subset S of the samples
    L_S(w* + delta) = 1/2 delta^T A_S delta with A_S = X_S^T X_S / |S| exactly, so sharpness over
    subsets (m-sharpness) and the layer's Hessian (A = X^T X / N) have closed forms."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(k, 1, bias=False).double()
    # Isotropic inputs: few samples per subset, so the subsets' top eigenvectors point apart.
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    w_star = torch.randn(k, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(w_star.reshape(1, k))
    y = x @ w_star

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out.reshape(-1) - target).pow(2).mean()

    return Case("linear-regression", model.eval(), _batches(x, y, batch), loss_fn)


def relu_two_layer_case(seed: int = 0, n: int = 30, batch: int = 10, d_in: int = 4, hidden: int = 6,
                        classes: int = 3) -> Case:
    """Linear(d_in -> hidden) -> ReLU -> Linear(hidden -> classes), no BatchNorm, cross-entropy:
    the network whose layer rescaling (:func:`rescale_relu_layers`) leaves the function unchanged."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return Case("relu-two-layer", model.eval(), _batches(x, y, batch), nn.functional.cross_entropy)


def rescale_relu_layers(model: nn.Sequential, a: float, first: int = 0, second: int = 2) -> nn.Sequential:
    """A copy of ``model`` with layer ``first`` (weight and bias) scaled by ``a > 0`` and layer
    ``second``'s weight by ``1 / a``: the same function when a ReLU sits between them
    (relu(a z) = a relu(z)); the ``second`` layer's bias is unchanged."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        out[first].weight.mul_(a)
        if out[first].bias is not None:
            out[first].bias.mul_(a)
        out[second].weight.div_(a)
    return out
