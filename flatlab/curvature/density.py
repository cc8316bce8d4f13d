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

Lanczos here keeps its basis orthogonal (full reorthogonalisation, see
:func:`lanczos_tridiagonal`), so the quadrature stays exact in floating point; when :math:`m`
reaches the dimension the nodes are the exact eigenvalues. The basis lives in torch, in the
operator's dtype and device (float32 rows for a float32 model, as the top-k Lanczos of
:mod:`flatlab.curvature.lanczos` keeps it), so a run costs its products plus
:math:`O(m^2 n)` vector work, not a strided numpy matrix of :math:`n \times m` float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from flatlab.curvature.lanczos import _RowBasis
from flatlab.curvature.operator import CountingOperator, dot64, rademacher, torch_product
from flatlab.errors import FlatlabError

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz


@dataclass
class LanczosTridiagonal:
    """Diagonal ``alpha`` and off-diagonal ``beta`` of :math:`T_m`, and (if asked for) the
    orthonormal basis as columns (``n x m``, float64)."""

    alpha: np.ndarray
    beta: np.ndarray
    basis: np.ndarray | None = None


def lanczos_tridiagonal(operator: Any, v0: np.ndarray | torch.Tensor, num_steps: int, seed: int = 0,
                        keep_basis: bool = False) -> LanczosTridiagonal:
    r"""``num_steps`` Lanczos steps from ``v0`` with full reorthogonalisation.

    Step :math:`j` computes :math:`w = A q_j`, :math:`\alpha_j = q_j^\top w`,
    :math:`w \leftarrow w - \alpha_j q_j - \beta_{j-1} q_{j-1}`, then one classical Gram-Schmidt
    pass :math:`w \leftarrow w - V (V^\top w)` against the whole basis, and a second only when the
    first removed a noticeable part of :math:`w` (Daniel-Gragg-Kaufman-Stewart, "twice is
    enough"); :math:`\beta_j = \|w\|`, :math:`q_{j+1} = w / \beta_j`. The basis is a torch row
    basis in the operator's dtype and device (see the module docstring).

    When the Krylov space of ``v0`` is exhausted (:math:`\beta_j \approx 0`, an invariant
    subspace), the iteration restarts from a random vector (seeded by ``seed``) orthogonal to the
    basis with :math:`\beta_j = 0`.

    Args:
        operator: any curvature operator, scipy ``LinearOperator`` or matrix.
        v0: the start vector (any nonzero vector; it is normalised).
        num_steps: Lanczos steps (products), at most the dimension.
        seed: seeds the restart vectors.
        keep_basis: also return the basis (``n x m`` float64 numpy; off by default, it is large).
    """
    op = operator if isinstance(operator, CountingOperator) else CountingOperator(operator)
    n = op.shape[0]
    if num_steps < 1:
        raise FlatlabError(f"num_steps must be at least 1, got {num_steps}")
    steps = min(num_steps, n)
    rng = np.random.default_rng(seed)
    apply, dtype, device = torch_product(op)
    if isinstance(v0, torch.Tensor):
        q = v0.detach().reshape(-1).to(device=device, dtype=dtype)
    else:
        q = torch.from_numpy(np.asarray(v0, dtype=np.float64).reshape(-1)).to(device=device, dtype=dtype)
    if q.shape != (n,):
        raise FlatlabError(f"v0 has {q.shape[0]} entries; the operator needs {n}")
    norm = dot64(q, q) ** 0.5
    if norm == 0:
        raise FlatlabError("the Lanczos start vector v0 is zero")
    basis = _RowBasis(n, dtype, device, block_rows=min(steps, 16))
    basis.append(q, 1.0 / norm)
    w = torch.empty(n, dtype=dtype, device=device)  # the one work vector, reused by every product
    alpha: list[float] = []
    beta: list[float] = []
    scale = 0.0
    for j in range(steps):
        apply(basis.row(j), w)
        a = float(torch.dot(basis.row(j), w))
        alpha.append(a)
        w.sub_(basis.row(j), alpha=a)
        if j > 0:
            w.sub_(basis.row(j - 1), alpha=beta[-1])
        b = _orthogonalise(basis, w)
        scale = max(scale, abs(a), b)
        if j == steps - 1:
            break
        if b <= 1e-10 * max(scale, 1e-300):
            # Invariant subspace found (repeated eigenvalues): continue from a fresh vector
            # orthogonal to the basis, coupled by beta = 0, so m = n still yields every eigenvalue
            # (the new nodes get zero weight, leaving the quadrature unchanged).
            w.copy_(torch.from_numpy(rng.standard_normal(n)))
            for _ in range(2):
                basis.subtract(w, basis.project(w))
            beta.append(0.0)
            basis.append(w, 1.0 / float(torch.linalg.vector_norm(w)))
            continue
        beta.append(b)
        basis.append(w, 1.0 / b)
    kept = None
    if keep_basis:
        kept = torch.cat(basis._filled()).to(device="cpu", dtype=torch.float64).numpy().T.copy()
    return LanczosTridiagonal(np.array(alpha), np.array(beta), kept)


def _orthogonalise(basis: _RowBasis, w: torch.Tensor) -> float:
    """Remove from ``w`` (in place) its components on the basis; return its norm afterwards."""
    before = float(torch.linalg.vector_norm(w))
    after = before
    for _ in range(2):
        basis.subtract(w, basis.project(w))
        after = float(torch.linalg.vector_norm(w))
        if after > 0.7071 * before:  # little was removed: w is orthogonal to working precision
            break
        before = after
    return after


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
    Rademacher vectors (normalised to unit length), broadened into a density on a grid.

    Args:
        operator: any curvature operator (Hessian, GGN, empirical Fisher), ``LinearOperator`` or
            matrix.
        num_steps: Lanczos steps (products) per run; the quadrature is exact for polynomials of
            degree up to ``2 num_steps - 1``.
        num_runs: independent start vectors averaged.
        seed: seeds the start vectors (drawn on the CPU: the same on every device).
        sigma, num_points: see :func:`gaussian_broadening`.

    Returns:
        :class:`SpectralDensity`; ``products`` counts the operator products used.
    """
    if num_steps < 1 or num_runs < 1:
        raise FlatlabError(f"SLQ needs num_steps >= 1 and num_runs >= 1, got num_steps = {num_steps}, "
                           f"num_runs = {num_runs}")
    op = CountingOperator(operator)
    rng = np.random.default_rng(seed)
    n = op.shape[0]
    _, dtype, device = torch_product(op)
    nodes, weights = [], []
    for _ in range(num_runs):
        v = rademacher(rng, 1, n, dtype, device)[0]
        rule = quadrature_rule(lanczos_tridiagonal(op, v, num_steps, seed=int(rng.integers(2**31))))
        nodes.append(rule.nodes)
        weights.append(rule.weights)
    grid, density, width = gaussian_broadening(nodes, weights, sigma, num_points)
    return SpectralDensity(grid, density, nodes, weights, width, op.count)


__all__ = ["LanczosTridiagonal", "QuadratureRule", "SpectralDensity", "gaussian_broadening",
           "lanczos_tridiagonal", "quadrature_rule", "slq_density"]
