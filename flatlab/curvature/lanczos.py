r"""Top eigenvalues of a symmetric operator by Lanczos, each with its residual.

Two solvers find the ``k`` largest *algebraic* eigenvalues (a Hessian away from a minimum can have
negative ones; "largest magnitude" would mix them in). Both report, for every Ritz pair
:math:`(\theta_i, u_i)`, the residual :math:`\|H u_i - \theta_i u_i\|`: it bounds the distance of
:math:`\theta_i` to the spectrum (:math:`\min_j |\theta_i - \mu_j| \le \|r_i\|`, and
:math:`\|r_i\|^2/\text{gap}` for an isolated eigenvalue), so every number comes with its own
certificate. Start vectors are seeded, so a run is repeatable.

``method="lanczos"`` (default) runs Lanczos with full reorthogonalisation and stops as soon as the
top-``k`` Ritz pairs :math:`(\theta_i, V_m s_i)` of :math:`T_m` have small residual estimates,
:math:`|\beta_m s_{m,i}| \le \text{rtol}\,|\theta_i|`. Every product's coefficients on the basis
are kept (:math:`H V_m = V_{m+1} \bar H_m` exactly, :math:`\bar H_m` = :math:`T_m` plus the
reorthogonalisation corrections and :math:`\beta_m` below), so the true residual
:math:`\|H u_i - \theta_i u_i\| = \|\bar H_m s_i - \theta_i [s_i; 0]\|` costs no extra product.

``method="arpack"`` calls ``scipy.sparse.linalg.eigsh(op, k, which="LA")`` (implicitly restarted
Lanczos to relative accuracy ``tol``; it fills an ``ncv``-vector basis before it first checks) and
then spends one product per eigenvalue on its residual. It is the tight-tolerance reference.

Like power iteration, Lanczos can in rare cases miss an eigenvalue whose eigenvector is nearly
orthogonal to the start vector, and a single start vector does not resolve multiplicities of
exactly repeated eigenvalues.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from flatlab.curvature.operator import CountingOperator, torch_product
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
    note: str = ""  # why it stopped before converging, and what to do about it


def default_tolerance(operator: Any) -> float:
    """Relative Ritz-residual tolerance: tight for float64 models, 1e-5 for float32 ones, whose
    products carry ~1e-7 relative rounding noise."""
    torch_dtype = getattr(operator, "torch_dtype", None)
    return 1e-5 if torch_dtype is not None and str(torch_dtype) in ("torch.float32", "torch.float16", "torch.bfloat16") else 1e-10


LANCZOS_METHODS = ("lanczos", "arpack")
#: Default stopping rule of the early-stopping Lanczos (relative Ritz residual).
DEFAULT_RTOL = 1e-3
#: Default memory cap of the early-stopping Lanczos basis on CPU (8 GiB: 190 float32 vectors of
#: ResNet-18; a larger basis is thick-restarted).
DEFAULT_MAX_BASIS_BYTES = 8 * 1024**3


def lanczos_top_eigenvalues(operator: Any, k: int = 1, tol: float | None = None, ncv: int | None = None,
                            maxiter: int | None = None, seed: int = 0, method: str = "lanczos",
                            rtol: float = DEFAULT_RTOL, max_basis_bytes: int | None = None) -> EigenResult:
    r"""The ``k`` largest (algebraic) eigenvalues of a symmetric operator, with residuals.

    Args:
        operator: a scipy ``LinearOperator`` (any
            :class:`~flatlab.curvature.operator.CurvatureOperator`: Hessian, GGN, empirical
            Fisher), a matrix, or anything ``aslinearoperator`` accepts.
        k: number of eigenvalues (1 <= k <= n).
        tol: ARPACK's relative accuracy (default :func:`default_tolerance`); ``method="arpack"`` only.
        ncv: ARPACK's basis size (default ``max(2k + 1, 20)``, at most n); ``method="arpack"`` only.
        maxiter: ARPACK restarts (default scipy's); for ``method="lanczos"`` the most Lanczos steps
            (products), default ``min(n, max(300, 20k))``.
        seed: seeds the start vector.
        method: ``"lanczos"`` (default: early-stopping Lanczos, residuals from the Lanczos
            relation, no extra products) or ``"arpack"`` (scipy eigsh, then one residual product
            per eigenvalue).
        rtol: ``method="lanczos"``: stop when every top-``k`` residual estimate
            :math:`|\beta_m s_{m,i}| \le \text{rtol}\,|\theta_i|` (default 1e-3: each eigenvalue
            is then within 1e-3 relative of the spectrum, and in practice far closer).
        max_basis_bytes: ``method="lanczos"``: the most memory its basis may take (default
            :data:`DEFAULT_MAX_BASIS_BYTES` on CPU, half the free memory on CUDA). Each step
            stores one vector of the operator's size; a basis that would outgrow the cap is
            thick-restarted (see :func:`_early_stopping_lanczos`).

    Returns:
        :class:`EigenResult` with eigenvalues largest first. Eigenvectors are columns, in the
        operator's precision for ``method="lanczos"`` (float32 for a float32 model), float64 for
        ``"arpack"``.

    Raises:
        FlatlabError: ``k`` outside ``[1, n]``, an unknown ``method``, a non-positive ``rtol``, or
            ``tol``/``ncv`` given to ``method="lanczos"``.
    """
    counted = CountingOperator(operator)
    n = counted.shape[0]
    if not 1 <= k <= n:
        raise FlatlabError(f"k = {k} is outside [1, {n}] (the number of selected parameters)")
    if method not in LANCZOS_METHODS:
        raise FlatlabError(f"unknown eigenvalue method {method!r}: choose one of {', '.join(LANCZOS_METHODS)}")
    if method == "lanczos":
        if tol is not None or ncv is not None:
            raise FlatlabError("tol and ncv are ARPACK's settings: pass method='arpack' to use them, or set rtol "
                               "for the early-stopping Lanczos")
        if not rtol > 0:
            raise FlatlabError(f"rtol must be positive, got {rtol}")
        if k < n - 1 and n > 3:
            return _early_stopping_lanczos(counted, k, rtol, maxiter, seed, max_basis_bytes)
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


class _RowBasis:
    """Orthonormal Lanczos vectors stored as rows of fixed-size blocks.

    Rows make the projections read contiguous memory, and blocks let the basis grow without
    copying what it holds (for millions of parameters, regrowing one big matrix cost more than
    the products). ``w -= c @ V`` is done as a (1 x j)(j x n) ``addmm``, about 3x faster on CPU
    than ``mv(V.T, c)``.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, block_rows: int) -> None:
        self.n, self.dtype, self.device, self.block_rows = n, dtype, device, block_rows
        self.blocks: list[torch.Tensor] = []
        self.size = 0

    def append(self, vector: torch.Tensor, scale: float = 1.0) -> None:
        """Store ``scale * vector`` as the next row."""
        if self.size == len(self.blocks) * self.block_rows:
            self.blocks.append(torch.empty((self.block_rows, self.n), dtype=self.dtype, device=self.device))
        torch.mul(vector, scale, out=self.blocks[-1][self.size % self.block_rows])
        self.size += 1

    def row(self, i: int) -> torch.Tensor:
        return self.blocks[i // self.block_rows][i % self.block_rows]

    def _filled(self) -> list[torch.Tensor]:
        full, rest = divmod(self.size, self.block_rows)
        return self.blocks[:full] + ([self.blocks[full][:rest]] if rest else [])

    def project(self, w: torch.Tensor) -> torch.Tensor:
        """``V w``: the coefficients of ``w`` on every row."""
        return torch.cat([torch.mv(block, w) for block in self._filled()])

    def subtract(self, w: torch.Tensor, coefficients: torch.Tensor) -> None:
        """``w -= coefficients @ V`` in place."""
        start = 0
        for block in self._filled():
            rows = block.shape[0]
            w.unsqueeze(0).addmm_(coefficients[start: start + rows].unsqueeze(0), block, alpha=-1)
            start += rows

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``coefficients.T @ V`` for a (size x r) matrix: r combinations of the rows, as rows."""
        out = torch.zeros((coefficients.shape[1], self.n), dtype=self.dtype, device=self.device)
        start = 0
        for block in self._filled():
            rows = block.shape[0]
            out.addmm_(coefficients[start: start + rows].T, block)
            start += rows
        return out


def _basis_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    return DEFAULT_MAX_BASIS_BYTES


def _early_stopping_lanczos(counted: CountingOperator, k: int, rtol: float, max_steps: int | None,
                            seed: int, max_basis_bytes: int | None = None) -> EigenResult:
    r"""Lanczos with full reorthogonalisation from a seeded Gaussian start, stopped on the top-``k``
    Ritz residual estimates (see the module docstring).

    The basis lives in the operator's dtype and device (float32 for a float32 model: its products
    carry ~1e-7 relative rounding anyway, and the basis's memory traffic, which dominates for
    millions of parameters, halves). Each step subtracts the three-term recurrence first and then
    makes one classical Gram-Schmidt pass over the whole basis; a second pass runs only when the
    first removed a noticeable part of the vector (the "twice is enough" criterion of Daniel,
    Gragg, Kaufman and Stewart), which after the recurrence is rare.

    When the basis would outgrow ``max_basis_bytes`` it is thick-restarted (Wu and Simon 2000):
    the best Ritz vectors :math:`y_i = V s_i` are kept together with the next Lanczos vector
    :math:`q`, and since :math:`H y_i = \theta_i y_i + \beta_m s_{m,i}\, q` the projected matrix
    restarts as :math:`\mathrm{diag}(\theta)` bordered by :math:`\beta_m s_{m,i}`; the iteration
    goes on from :math:`q`. Ritz pairs come from the symmetrised coefficient matrix, which covers
    both the tridiagonal and the restarted (arrowhead) case.
    """
    n = counted.shape[0]
    steps = min(n, max(300, 20 * k)) if max_steps is None else max(k, min(n, max_steps))
    apply, dtype, device = torch_product(counted)
    budget = _basis_budget(device) if max_basis_bytes is None else int(max_basis_bytes)
    vector_bytes = n * torch.finfo(dtype).bits // 8
    affordable = budget // vector_bytes
    if affordable >= steps + 1:
        capacity = steps + 1  # the whole run fits: never restarts
    else:
        # A restart briefly holds the old basis and the kept Ritz vectors (up to half of it).
        capacity = (2 * affordable) // 3
        if capacity < k + 3:
            raise FlatlabError(f"the Lanczos basis for top-{k} of {n} parameters needs more than {budget} bytes "
                               f"({vector_bytes} per vector): raise max_basis_bytes, or use ARPACK (method='arpack', "
                               "with tol)")
    keep = min(capacity - 2, max(k + 1, capacity // 2))  # Ritz vectors kept at a restart
    # Start (and restart) vectors come from a seeded CPU generator in float64, so a run gives the
    # same numbers whatever the dtype or device.
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    # coefficients[:, j] holds H q_j on q_0..q_{j+1} (H V = V_{m+1} Hbar).
    basis = _RowBasis(n, dtype, device, block_rows=min(capacity, 16))
    coefficients = np.zeros((capacity, capacity - 1))
    basis.append(q, 1.0 / float(torch.linalg.vector_norm(q)))
    w = torch.empty(n, dtype=dtype, device=device)  # the one work vector, reused by every product
    scale = 0.0
    converged = False
    restarts = 0
    values = vectors_small = np.zeros(0)
    m = 0
    j = 0  # index of the basis vector the next product is applied to
    for _ in range(steps):
        apply(basis.row(j), w)
        column = np.zeros(j + 1)
        # Three-term recurrence: alpha_j on q_j and beta_{j-1} on q_{j-1}.
        column[j] = float(torch.dot(basis.row(j), w))
        w.sub_(basis.row(j), alpha=column[j])
        if j > 0:
            column[j - 1] = coefficients[j, j - 1]
            w.sub_(basis.row(j - 1), alpha=column[j - 1])
        before = float(torch.linalg.vector_norm(w))
        for _ in range(2):
            correction = basis.project(w)
            basis.subtract(w, correction)
            column += correction.double().cpu().numpy()
            after = float(torch.linalg.vector_norm(w))
            if after > 0.7071 * before:  # little was removed: w is orthogonal to working precision
                break
            before = after
        b = after
        coefficients[: j + 1, j] = column
        coefficients[j + 1, j] = b
        m = j + 1
        scale = max(scale, float(np.max(np.abs(column))), b)
        # V^T H V, symmetrised: tridiagonal up to reorthogonalisation corrections (~ rounding) until a
        # thick restart, then an arrowhead block on top of the tridiagonal part.
        values, vectors_small = np.linalg.eigh(0.5 * (coefficients[:m, :m] + coefficients[:m, :m].T))
        if m >= k:
            top_values = values[-k:]
            estimates = np.abs(b * vectors_small[-1, -k:])
            if np.all(estimates <= rtol * np.abs(top_values)) or b <= 1e-12 * max(scale, 1e-300):
                converged = True
                break
        if counted.count >= steps:
            break
        norm_next, coupled = b, b  # the next vector is w / norm_next; H couples it to the basis by b
        if b <= 1e-12 * max(scale, 1e-300):
            # Invariant subspace with fewer than k Ritz values: go on from a fresh orthogonal vector.
            w.copy_(torch.randn(n, generator=generator, dtype=torch.float64))
            for _ in range(2):
                basis.subtract(w, basis.project(w))
            norm_next, coupled = float(torch.linalg.vector_norm(w)), 0.0
            coefficients[m, j] = 0.0
        if m + 1 == capacity:
            # Thick restart: keep the top Ritz vectors and the next Lanczos vector w / b.
            kept = vectors_small[:, -keep:][:, ::-1]
            ritz = torch.from_numpy(np.ascontiguousarray(kept)).to(device=device, dtype=dtype)
            restarted = _RowBasis(n, dtype, device, block_rows=min(capacity, 16))
            rows = basis.combine(ritz)
            for i in range(keep):
                restarted.append(rows[i])
            del rows
            coupling = coupled * kept[-1, :]
            restarted.append(w, 1.0 / norm_next)
            basis = restarted
            coefficients = np.zeros_like(coefficients)
            coefficients[:keep, :keep] = np.diag(values[-keep:][::-1])
            coefficients[keep, :keep] = coupling
            restarts += 1
            j = keep
            continue
        basis.append(w, 1.0 / norm_next)
        j = m
    top = min(k, m)
    order = np.arange(m - 1, m - 1 - top, -1)
    values, small = values[order], vectors_small[:, order]
    ritz = torch.from_numpy(np.ascontiguousarray(small)).to(device=device, dtype=dtype)
    # Ritz vectors in the basis's precision (float32 for a float32 model), as columns.
    vectors = basis.combine(ritz).cpu().numpy().T
    # ||H u - theta u|| = ||Hbar s - theta [s; 0]|| because [V_m, q_{m+1}/beta_m] is orthonormal.
    hbar = coefficients[: m + 1, :m]
    padded = np.vstack([small, np.zeros((1, top))])
    residuals = np.linalg.norm(hbar @ small - values * padded, axis=0)
    note = ""
    if not converged:
        memory = f" ({restarts} thick restarts at the {budget}-byte basis cap)" if restarts else ""
        note = (f"Lanczos stopped after {counted.count} products{memory} before every top-{k} residual met "
                f"rtol {rtol:g}: raise rtol or maxiter, or use ARPACK (method='arpack', with tol)")
    return EigenResult(values, vectors, residuals, counted.count, converged, note)


def as_operator(operator: Any) -> LinearOperator:
    """A scipy LinearOperator view of an operator or matrix."""
    from scipy.sparse.linalg import aslinearoperator

    return operator if isinstance(operator, LinearOperator) else aslinearoperator(operator)


__all__ = ["DEFAULT_MAX_BASIS_BYTES", "DEFAULT_RTOL", "LANCZOS_METHODS", "EigenResult", "as_operator", "default_tolerance", "lanczos_top_eigenvalues"]
