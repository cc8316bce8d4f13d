r"""Top eigenvalues of a symmetric operator by implicitly restarted Lanczos (ARPACK).

``scipy.sparse.linalg.eigsh(op, k, which="LA")`` finds the ``k`` largest *algebraic* eigenvalues
(a Hessian away from a minimum can have negative ones; "largest magnitude" would mix them in). For
each Ritz pair :math:`(\lambda_i, u_i)` the residual :math:`\|H u_i - \lambda_i u_i\|` is computed
with one extra product each and reported: it bounds the distance of :math:`\lambda_i` to the
spectrum (:math:`\min_j |\lambda_i - \mu_j| \le \|r_i\|`), so every number comes with its own
certificate. The start vector is seeded, so a run is repeatable.
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


def lanczos_top_eigenvalues(operator: Any, k: int = 1, tol: float | None = None, ncv: int | None = None,
                            maxiter: int | None = None, seed: int = 0) -> EigenResult:
    """The ``k`` largest (algebraic) eigenvalues of a symmetric operator, with residuals.

    Args:
        operator: a scipy ``LinearOperator`` (e.g. :class:`~flatlab.curvature.hvp.HessianOperator`),
            a matrix, or anything ``aslinearoperator`` accepts.
        k: number of eigenvalues (1 <= k <= n).
        tol: ARPACK's relative accuracy (default :func:`default_tolerance`).
        ncv: Lanczos basis size (default ``max(2k + 1, 20)``, at most n).
        maxiter: ARPACK restarts (default scipy's).
        seed: seeds the start vector.

    Returns:
        :class:`EigenResult` with eigenvalues largest first.

    Raises:
        FlatlabError: ``k`` outside ``[1, n]``.
    """
    counted = CountingOperator(operator)
    n = counted.shape[0]
    if not 1 <= k <= n:
        raise FlatlabError(f"--top-k {k} is outside [1, {n}] (the number of selected parameters)")
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


def as_operator(operator: Any) -> LinearOperator:
    """A scipy LinearOperator view of an operator or matrix."""
    from scipy.sparse.linalg import aslinearoperator

    return operator if isinstance(operator, LinearOperator) else aslinearoperator(operator)


__all__ = ["EigenResult", "as_operator", "default_tolerance", "lanczos_top_eigenvalues"]
