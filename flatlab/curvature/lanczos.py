r"""Top eigenvalues of a symmetric operator by implicitly restarted Lanczos (ARPACK).

``scipy.sparse.linalg.eigsh(op, k, which="LA")`` finds the ``k`` largest *algebraic* eigenvalues
(a Hessian away from a minimum can have negative ones; "largest magnitude" would mix them in). For
each Ritz pair :math:`(\lambda_i, u_i)` the residual :math:`\|H u_i - \lambda_i u_i\|` is computed
with one extra product each and reported: it bounds the distance of :math:`\lambda_i` to the
spectrum (:math:`\min_j |\lambda_i - \mu_j| \le \|r_i\|`), so every number comes with its own
certificate. The start vector is seeded, so a run is repeatable.

``method="lanczos"`` runs plain Lanczos with full reorthogonalisation instead and stops as soon as
the top-``k`` Ritz pairs :math:`(\theta_i, V_m s_i)` of :math:`T_m` have small residual estimates,
:math:`|\beta_m s_{m,i}| \le \text{rtol}\,|\theta_i|` (ARPACK first fills a ``ncv``-vector basis
and then checks). Every product's coefficients on the basis are kept (:math:`H V_m = V_{m+1}
\bar H_m` exactly, :math:`\bar H_m` = :math:`T_m` plus the reorthogonalisation corrections and
:math:`\beta_m` below), so the true residual :math:`\|H u_i - \theta_i u_i\| = \|\bar H_m s_i -
\theta_i [s_i; 0]\|` costs no extra product. A residual :math:`r` bounds the eigenvalue error by
:math:`r` (and by :math:`r^2/\text{gap}` for an isolated eigenvalue). Like power iteration, Lanczos
can in rare cases miss an eigenvalue whose eigenvector is nearly orthogonal to the start vector,
and a single start vector does not resolve multiplicities of exactly repeated eigenvalues.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from flatlab.curvature.hvp import CountingOperator
from flatlab.errors import FlatlabError


@dataclass
class EigenResult:
    """Largest eigenvalues (descending), their eigenvectors (columns), residual norms and the
    number of operator products used (including the residual checks)."""

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residuals: np.ndarray
    products: int
    converged: bool = True


def default_tolerance(operator: Any) -> float:
    """Relative Ritz-residual tolerance: tight for float64 models, 1e-5 for float32 ones, whose
    products carry ~1e-7 relative rounding noise."""
    torch_dtype = getattr(operator, "torch_dtype", None)
    return 1e-5 if torch_dtype is not None and str(torch_dtype) in ("torch.float32", "torch.float16", "torch.bfloat16") else 1e-10


LANCZOS_METHODS = ("arpack", "lanczos")


def lanczos_top_eigenvalues(operator: Any, k: int = 1, tol: float | None = None, ncv: int | None = None,
                            maxiter: int | None = None, seed: int = 0, method: str = "arpack",
                            rtol: float = 1e-3) -> EigenResult:
    r"""The ``k`` largest (algebraic) eigenvalues of a symmetric operator, with residuals.

    Args:
        operator: a scipy ``LinearOperator`` (e.g. :class:`~flatlab.curvature.hvp.HessianOperator`),
            a matrix, or anything ``aslinearoperator`` accepts.
        k: number of eigenvalues (1 <= k <= n).
        tol: ARPACK's relative accuracy (default :func:`default_tolerance`); ``method="arpack"`` only.
        ncv: Lanczos basis size (default ``max(2k + 1, 20)``, at most n); ``method="arpack"`` only.
        maxiter: ARPACK restarts (default scipy's); for ``method="lanczos"`` the most Lanczos steps
            (products), default ``min(n, max(300, 20k))``.
        seed: seeds the start vector.
        method: ``"arpack"`` (scipy eigsh, then one residual product per eigenvalue) or
            ``"lanczos"`` (early-stopping Lanczos, residuals from the Lanczos relation).
        rtol: ``method="lanczos"``: stop when every top-``k`` residual estimate
            :math:`|\beta_m s_{m,i}| \le \text{rtol}\,|\theta_i|`.

    Returns:
        :class:`EigenResult` with eigenvalues largest first.

    Raises:
        FlatlabError: ``k`` outside ``[1, n]``, an unknown ``method`` or a non-positive ``rtol``.
    """
    counted = CountingOperator(operator)
    n = counted.shape[0]
    if not 1 <= k <= n:
        raise FlatlabError(f"--top-k {k} is outside [1, {n}] (the number of selected parameters)")
    if method not in LANCZOS_METHODS:
        raise FlatlabError(f"unknown eigenvalue method {method!r}: choose one of {', '.join(LANCZOS_METHODS)}")
    if method == "lanczos" and k < n - 1 and n > 3:
        if not rtol > 0:
            raise FlatlabError(f"rtol must be positive, got {rtol}")
        return _early_stopping_lanczos(counted, k, rtol, maxiter, seed)
    tol = default_tolerance(operator) if tol is None else tol
    rng = np.random.RandomState(seed)
    converged = True
    if k >= n - 1 or n <= 3:
        # ARPACK needs k < n - 1 (ncv <= n); with so few parameters the matrix is built from n products.
        matrix = np.column_stack([counted.matvec(col) for col in np.eye(n)])
        values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
        values, vectors = values[-k:], vectors[:, -k:]
    else:
        basis = min(n, max(2 * k + 1, 20)) if ncv is None else min(n, ncv)
        v0 = rng.standard_normal(n)
        try:
            values, vectors = eigsh(counted, k=k, which="LA", tol=tol, ncv=basis, maxiter=maxiter, v0=v0)
        except ArpackNoConvergence as exc:
            converged = False
            values, vectors = exc.eigenvalues, exc.eigenvectors
            if len(values) == 0:
                raise FlatlabError(f"Lanczos did not converge for any of the top-{k} eigenvalues in {counted.count} "
                                   "products: raise the iteration limit or lower the accuracy (tol)") from None
    order = np.argsort(values)[::-1]
    values, vectors = np.asarray(values)[order], np.asarray(vectors)[:, order]
    residuals = np.array([np.linalg.norm(counted.matvec(vectors[:, i]) - values[i] * vectors[:, i])
                          for i in range(len(values))])
    return EigenResult(values, vectors, residuals, counted.count, converged)


def _early_stopping_lanczos(counted: CountingOperator, k: int, rtol: float, max_steps: int | None,
                            seed: int) -> EigenResult:
    """Lanczos with full reorthogonalisation from a seeded Gaussian start, stopped on the top-``k``
    Ritz residual estimates (see the module docstring)."""
    n = counted.shape[0]
    steps = min(n, max(300, 20 * k)) if max_steps is None else max(k, min(n, max_steps))
    rng = np.random.RandomState(seed)
    q = rng.standard_normal(n)
    # The basis grows by doubling; coefficients[:, j] holds H q_j on q_0..q_{j+1} (H V = V_{m+1} Hbar).
    # One basis vector per *row*: the projections below then read contiguous memory (with one
    # vector per column, a ResNet's 11M-long columns made every Gram-Schmidt pass crawl).
    capacity = min(steps + 1, max(2 * k + 2, 32))
    basis = np.zeros((capacity, n))
    coefficients = np.zeros((steps + 1, steps))
    basis[0] = q / np.linalg.norm(q)
    scale = 0.0
    converged = False
    values = vectors_small = np.zeros(0)
    m = 0
    for j in range(steps):
        w = counted.matvec(basis[j])
        column = basis[: j + 1] @ w
        w = w - column @ basis[: j + 1]
        # A second Gram-Schmidt pass (classical Gram-Schmidt twice is orthogonal to rounding).
        again = basis[: j + 1] @ w
        w -= again @ basis[: j + 1]
        column += again
        b = float(np.linalg.norm(w))
        coefficients[: j + 1, j] = column
        coefficients[j + 1, j] = b
        m = j + 1
        scale = max(scale, float(np.max(np.abs(column))), b)
        # T_m: the symmetric tridiagonal part (the rest are reorthogonalisation corrections ~ rounding).
        alpha = np.diag(coefficients[:m, :m])
        beta = np.diag(coefficients[1:m, : m - 1])
        tri = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        values, vectors_small = np.linalg.eigh(tri)
        if m >= k:
            top_values = values[-k:]
            estimates = np.abs(b * vectors_small[-1, -k:])
            if np.all(estimates <= rtol * np.abs(top_values)) or b <= 1e-12 * max(scale, 1e-300):
                converged = True
                break
        if m == steps:
            break
        if m + 1 > basis.shape[0]:
            basis = np.concatenate([basis, np.zeros((min(steps + 1, 2 * basis.shape[0]) - basis.shape[0], n))],
                                   axis=0)
        if b <= 1e-12 * max(scale, 1e-300):
            # Invariant subspace with fewer than k Ritz values: go on from a fresh orthogonal vector.
            w = rng.standard_normal(n)
            for _ in range(2):
                w -= (basis[:m] @ w) @ basis[:m]
            coefficients[m, j] = 0.0
            basis[m] = w / np.linalg.norm(w)
            continue
        basis[m] = w / b
    top = min(k, m)
    order = np.arange(m - 1, m - 1 - top, -1)
    values, small = values[order], vectors_small[:, order]
    vectors = basis[:m].T @ small
    # ||H u - theta u|| = ||Hbar s - theta [s; 0]|| because [V_m, q_{m+1}/beta_m] is orthonormal.
    hbar = coefficients[: m + 1, :m]
    padded = np.vstack([small, np.zeros((1, top))])
    residuals = np.linalg.norm(hbar @ small - values * padded, axis=0)
    return EigenResult(values, vectors, residuals, counted.count, converged)


def as_operator(operator: Any) -> LinearOperator:
    """A scipy LinearOperator view of an operator or matrix."""
    from scipy.sparse.linalg import aslinearoperator

    return operator if isinstance(operator, LinearOperator) else aslinearoperator(operator)


__all__ = ["LANCZOS_METHODS", "EigenResult", "as_operator", "default_tolerance", "lanczos_top_eigenvalues"]
