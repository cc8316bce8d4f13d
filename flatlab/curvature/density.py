r"""Spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao 2019).

For a unit start vector :math:`v`, :math:`m` Lanczos steps give a tridiagonal :math:`T_m` with
eigenpairs :math:`(\theta_i, y_i)`. The Gauss quadrature rule with nodes :math:`\theta_i` and
weights :math:`\omega_i = (y_i)_1^2` (they sum to 1) is exact for polynomials of degree up to
:math:`2m - 1`:

.. math:: v^\top H^k v = \sum_{i=1}^m \omega_i \theta_i^k, \qquad k \le 2m - 1.

Averaging over random start vectors estimates the spectral density
:math:`\phi(t) = \frac1n \sum_j \delta(t - \lambda_j)`, which is broadened by a Gaussian of
width :math:`\sigma`:

.. math:: \phi_\sigma(t) = \frac{1}{R} \sum_{r=1}^R \sum_{i=1}^m \omega_i^{(r)}
          \frac{1}{\sqrt{2\pi}\sigma} e^{-(t - \theta_i^{(r)})^2 / (2\sigma^2)},

evaluated on a grid reaching :math:`6\sigma` beyond the extreme nodes, and renormalised so that
its trapezoid integral over the grid is exactly 1 (the correction is below 1e-8 of the mass).

Lanczos here uses full reorthogonalisation (float64), which keeps the basis orthogonal so the
quadrature stays exact in floating point; when :math:`m` reaches the dimension the nodes are the
exact eigenvalues.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import eigh_tridiagonal

from flatlab.curvature.hvp import CountingOperator
from flatlab.errors import FlatlabError

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz


@dataclass
class LanczosTridiagonal:
    """Diagonal ``alpha`` and off-diagonal ``beta`` of :math:`T_m` and the orthonormal basis."""

    alpha: np.ndarray
    beta: np.ndarray
    basis: np.ndarray


def lanczos_tridiagonal(operator: Any, v0: np.ndarray, num_steps: int, seed: int = 0) -> LanczosTridiagonal:
    """``num_steps`` Lanczos steps from ``v0`` with full reorthogonalisation.

    When the Krylov space of ``v0`` is exhausted (:math:`\\beta_j \\approx 0`, an invariant
    subspace), the iteration restarts from a random vector (seeded by ``seed``) orthogonal to the
    basis with :math:`\\beta_j = 0`.
    """
    op = operator if isinstance(operator, CountingOperator) else CountingOperator(operator)
    n = op.shape[0]
    steps = min(num_steps, n)
    rng = np.random.default_rng(seed)
    q = np.asarray(v0, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(q)
    if norm == 0:
        raise FlatlabError("the Lanczos start vector is zero")
    # The basis is kept for reorthogonalisation; above ~800 MB it is stored in float32.
    basis = np.zeros((n, steps), dtype=np.float64 if n * steps <= 10**8 else np.float32)
    alpha, beta = [], []
    basis[:, 0] = q / norm
    scale = 0.0
    for j in range(steps):
        w = op.matvec(basis[:, j])
        a = float(basis[:, j] @ w)
        alpha.append(a)
        w = w - a * basis[:, j] - (beta[-1] * basis[:, j - 1] if j > 0 else 0.0)
        # Two passes of classical Gram-Schmidt against the whole basis (full reorthogonalisation).
        for _ in range(2):
            w -= basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        b = float(np.linalg.norm(w))
        scale = max(scale, abs(a), b)
        if j == steps - 1:
            break
        if b <= 1e-10 * max(scale, 1e-300):
            # Invariant subspace found (repeated eigenvalues): continue from a fresh vector
            # orthogonal to the basis, coupled by beta = 0, so m = n still yields every eigenvalue
            # (the new nodes get zero weight, leaving the quadrature unchanged).
            w = rng.standard_normal(n)
            for _ in range(2):
                w -= basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
            beta.append(0.0)
            basis[:, j + 1] = w / np.linalg.norm(w)
            continue
        beta.append(b)
        basis[:, j + 1] = w / b
    return LanczosTridiagonal(np.array(alpha), np.array(beta), basis[:, : len(alpha)])


@dataclass
class QuadratureRule:
    """Gauss quadrature nodes (Ritz values) and weights (squared first components) of one run."""

    nodes: np.ndarray
    weights: np.ndarray


def quadrature_rule(tri: LanczosTridiagonal) -> QuadratureRule:
    """Nodes and weights from the eigendecomposition of :math:`T`."""
    if len(tri.alpha) == 1:
        return QuadratureRule(tri.alpha.copy(), np.ones(1))
    nodes, vectors = eigh_tridiagonal(tri.alpha, tri.beta)
    return QuadratureRule(nodes, vectors[0, :] ** 2)


@dataclass
class SpectralDensity:
    """A broadened spectral density on a grid, with the raw quadrature rules it came from."""

    grid: np.ndarray
    density: np.ndarray
    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    sigma: float
    products: int


def gaussian_broadening(nodes: list[np.ndarray], weights: list[np.ndarray], sigma: float | None = None,
                        num_points: int = 1000, relative_sigma: float = 0.01) -> tuple[np.ndarray, np.ndarray, float]:
    """Average of the runs' weighted Gaussians on a grid; integrates to 1 on that grid.

    Args:
        nodes, weights: one array per run.
        sigma: broadening width; default ``relative_sigma`` times the node range (or 1e-3 for a
            single point).
        num_points: grid size.
    """
    all_nodes = np.concatenate(nodes)
    lo, hi = float(all_nodes.min()), float(all_nodes.max())
    if sigma is None:
        sigma = relative_sigma * (hi - lo) if hi > lo else max(1e-3, 1e-3 * abs(hi))
    if not sigma > 0:
        raise FlatlabError(f"the broadening width sigma must be positive, got {sigma}")
    grid = np.linspace(lo - 6 * sigma, hi + 6 * sigma, num_points)
    density = np.zeros_like(grid)
    for theta, omega in zip(nodes, weights):
        z = (grid[:, None] - theta[None, :]) / sigma
        density += (np.exp(-0.5 * z**2) / (np.sqrt(2 * np.pi) * sigma)) @ omega
    density /= len(nodes)
    density /= _trapezoid(density, grid)
    return grid, density, float(sigma)


def slq_density(operator: Any, num_steps: int = 80, num_runs: int = 1, seed: int = 0,
                sigma: float | None = None, num_points: int = 1000) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``num_runs`` runs of ``num_steps`` Lanczos steps from random
    Rademacher unit vectors, broadened into a density on a grid.

    Returns:
        :class:`SpectralDensity`; ``products`` counts the operator products used.
    """
    if num_steps < 1 or num_runs < 1:
        raise FlatlabError(f"SLQ needs at least one step and one run, got {num_steps} steps, {num_runs} runs")
    op = CountingOperator(operator)
    rng = np.random.default_rng(seed)
    n = op.shape[0]
    nodes, weights = [], []
    for _ in range(num_runs):
        v = rng.integers(0, 2, size=n).astype(np.float64) * 2.0 - 1.0
        rule = quadrature_rule(lanczos_tridiagonal(op, v, num_steps, seed=int(rng.integers(2**31))))
        nodes.append(rule.nodes)
        weights.append(rule.weights)
    grid, density, width = gaussian_broadening(nodes, weights, sigma, num_points)
    return SpectralDensity(grid, density, nodes, weights, width, op.count)


__all__ = ["LanczosTridiagonal", "QuadratureRule", "SpectralDensity", "gaussian_broadening",
           "lanczos_tridiagonal", "quadrature_rule", "slq_density"]
