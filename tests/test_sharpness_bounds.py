"""PAC-Bayes, magnitude-aware and worst-case measures against closed-form truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from flatlab.errors import FlatlabError
from flatlab.sharpness import (
    magnitude_bounds,
    pacbayes_bounds,
    sigma_search,
    worst_case_alpha,
    worst_case_sharpness,
)


class BinaryLinear(nn.Module):
    """Two logits (0, w.x): predicts class 1 iff w.x > 0; the only parameter is w."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(w.clone().reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x @ self.weight.T
        return torch.cat([torch.zeros_like(score), score], dim=1)


def linear_problem(n: int = 600, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    noisy = x @ w + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    y = (noisy > 0).long()
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, n, 128)]
    w0 = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    return BinaryLinear(w), BinaryLinear(w0), x, y, batches


def expected_drop(model: BinaryLinear, x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """a(w) - E[a(w + sigma z)] = a(w) - mean_i Phi(y_i w.x_i / (sigma ||x_i||)), y in {-1, +1}."""
    w = model.weight.detach().reshape(-1).numpy()
    xs, ys = x.numpy(), 2 * y.numpy() - 1
    margins = ys * (xs @ w)
    base = float(np.mean(margins > 0))
    return base - float(np.mean(norm.cdf(margins / (sigma * np.linalg.norm(xs, axis=1)))))


def test_sigma_hits_the_closed_form_drop_and_bounds_equal_the_formulas():
    model, init, x, y, batches = linear_problem()
    out = pacbayes_bounds(model, batches, init, mc_samples=40, seed=1)
    sigma = out["sigma"]
    assert out["converged"]
    truth = expected_drop(model, x, y, sigma)
    # The Monte Carlo estimate is within the tolerance of the target; the truth within that plus MC error.
    assert abs(out["drop_at_sigma"] - 0.1) < 0.01
    assert abs(truth - 0.1) < 0.01 + 4 * out["drop_stderr"]
    w = model.weight.detach().reshape(-1)
    w0 = init.weight.detach().reshape(-1)
    m = len(y)
    assert out["m"] == m and out["omega"] == w.numel()
    assert out["weight_norm_sq"] == pytest.approx(float(w @ w), rel=1e-12)
    assert out["dist_init_sq"] == pytest.approx(float((w - w0) @ (w - w0)), rel=1e-12)
    assert out["orig"] == pytest.approx(float(w @ w) / (4 * sigma**2) + math.log(m / sigma) + 10, rel=1e-12)
    assert out["init"] == pytest.approx(float((w - w0) @ (w - w0)) / (4 * sigma**2) + math.log(m / sigma) + 10,
                                        rel=1e-12)
    assert out["inv_sigma_sq"] == pytest.approx(1 / sigma**2)
    assert "standard deviation" in out["sigma_note"]


def test_magnitude_bounds_equal_the_formula():
    model, init, x, y, batches = linear_problem(seed=3)
    out = magnitude_bounds(model, batches, init, mc_samples=20, seed=0)
    s, eps, m = out["sigma"], out["epsilon"], len(y)
    w = model.weight.detach().reshape(-1).numpy()
    w0 = init.weight.detach().reshape(-1).numpy()
    omega = w.size

    def bound(r: np.ndarray) -> float:
        num = eps**2 + (s**2 + 1) * float(r @ r) / omega
        den = eps**2 + s**2 * (w - w0) ** 2
        return 0.25 * float(np.log(num / den).sum()) + math.log(m / s) + 10

    assert out["converged"] and abs(out["drop_at_sigma"] - 0.1) < 0.01
    assert out["orig"] == pytest.approx(bound(w), rel=1e-10)
    assert out["init"] == pytest.approx(bound(w - w0), rel=1e-10)
    assert out["inv_sigma_sq"] == pytest.approx(1 / s**2)


def _relu_net(scale: float = 1.0) -> tuple[nn.Module, list]:
    g = torch.Generator().manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 24, bias=False), nn.ReLU(), nn.Linear(24, 24, bias=False), nn.ReLU(),
                        nn.Linear(24, 3, bias=False)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(p.shape[1]) * scale)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = (net(x) / scale**3).argmax(1)
    return net.eval(), [(x[i:i + 100], y[i:i + 100]) for i in range(0, 400, 100)]


def test_scale_identity_sigma_scales_and_sigma_prime_does_not():
    net1, batches = _relu_net(1.0)
    net2, _ = _relu_net(2.0)
    s1 = sigma_search(net1, batches, mc_samples=8, seed=0)
    s2 = sigma_search(net2, batches, mc_samples=8, seed=0)
    assert s1.converged and s2.converged
    assert s2.radius == pytest.approx(2 * s1.radius, rel=0.05)
    m1 = sigma_search(net1, batches, mc_samples=8, seed=0, magnitude_eps=1e-3)
    m2 = sigma_search(net2, batches, mc_samples=8, seed=0, magnitude_eps=1e-3)
    assert m2.radius == pytest.approx(m1.radius, rel=0.1)


def test_early_stopping_changes_passes_not_the_answer():
    """Fixed draws (flatlab 0.2's search): deciding probes early saves passes, not the answer."""
    model, _, _, _, batches = linear_problem(seed=2)
    fast = sigma_search(model, batches, mc_samples=10, seed=4, fixed_draws=True)
    full = sigma_search(model, batches, mc_samples=10, seed=4, early_stop=False, fixed_draws=True)
    assert fast.radius == full.radius
    assert fast.drop == full.drop
    assert fast.passes < full.passes
    assert full.passes == pytest.approx(10 * full.steps)


def test_same_seed_same_numbers():
    model, init, _, _, batches = linear_problem(seed=4)
    a = pacbayes_bounds(model, batches, init, mc_samples=6, seed=7)
    b = pacbayes_bounds(model, batches, init, mc_samples=6, seed=7)
    assert a == b


def test_worst_case_alpha_hits_the_target_and_bound_formula():
    model, init, _, y, batches = linear_problem(seed=6)
    out = worst_case_sharpness(model, batches, init, ascent_steps=10)
    alpha, m, omega = out["alpha"], len(y), out["omega"]
    assert out["converged"] and abs(out["drop_at_alpha"] - 0.1) < 0.01
    expected = out["weight_norm_sq"] * math.log(2 * omega) / (4 * alpha**2) + math.log(m / alpha) + 10
    assert out["orig"] == pytest.approx(expected, rel=1e-12)
    assert out["inv_alpha_sq"] == pytest.approx(1 / alpha**2)
    assert out["magnitude_inv_alpha_sq"] == pytest.approx(1 / out["magnitude_alpha"] ** 2)
    assert out["keskar"] == pytest.approx(100 * (out["keskar_perturbed_loss"] - out["keskar_loss"])
                                          / (1 + out["keskar_loss"]))
    assert out["keskar"] > 0


def test_worst_case_on_a_linear_model_matches_the_l1_margin():
    """The box |u| <= a lowers the margin y w.x by at most a ||x||_1, reached at u = -a y sign(x).

    Four copies of one point (margin ratio w.x / ||x||_1 = 1.15 / 1.1) and six points that only
    fall at ratio 2: the worst-case drop jumps from 0 to 0.4 at a = 1.15 / 1.1, so the bisection
    for a 0.2 drop closes on that threshold (it cannot land inside the tolerance band).
    """
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    hard = torch.tensor([[0.6, -0.2, 0.3]] * 4, dtype=torch.float64)
    easy = torch.tensor([[0.0, -3.0, 0.0]] * 6, dtype=torch.float64)
    xs = torch.cat([hard, easy])
    ys = torch.ones(10, dtype=torch.long)
    threshold = float(hard[0] @ w) / float(hard[0].abs().sum())
    res = worst_case_alpha(BinaryLinear(w), [(xs, ys)], target_drop=0.2, tolerance=0.05, ascent_steps=30, depth=20)
    assert not res.converged
    assert res.radius == pytest.approx(threshold, rel=1e-4)


def test_bad_inputs_raise_flatlab_errors():
    model, init, _, y, batches = linear_problem()
    for target in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(FlatlabError, match="target accuracy drop"):
            sigma_search(model, batches, target_drop=target)
    # Random labels: accuracy near chance (1/2), no room for a 0.1 drop.
    g = torch.Generator().manual_seed(0)
    xr = torch.randn(200, 8, generator=g, dtype=torch.float64)
    yr = torch.randint(0, 2, (200,), generator=g)
    with pytest.raises(FlatlabError, match="chance"):
        pacbayes_bounds(model, [(xr, yr)], init)
