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


def interpolating_mse_case(seed: int = 0, n: int = 30, batch: int = 12) -> Case:
    """MLP 4 -> 5 -> 2 (Tanh) with squared error against its own outputs: an interpolating
    minimum (every residual zero), where the GGN equals the Hessian and the empirical Fisher is 0."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    return Case("interpolating-mse", model.eval(), _batches(x, y, batch), nn.functional.mse_loss)


class OldStyleSquare(torch.autograd.Function):
    """x**2 as an autograd.Function without setup_context or jvp: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class OldStyleMLP(nn.Module):
    """Linear(3 -> 4), the old-style square, Linear(4 -> 3): a model only autograd differentiates."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(OldStyleSquare.apply(self.first(x)))


def old_style_case(seed: int = 0, n: int = 14, batch: int = 5) -> Case:
    g = torch.Generator().manual_seed(seed)
    model = OldStyleMLP().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Case("old-style", model.eval(), _batches(x, y, batch), nn.functional.cross_entropy)
