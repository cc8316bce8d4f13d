r"""Per-domain curvature and the overlap of the domains' top Hessian eigenspaces.

For a model with weights :math:`w` and domains :math:`d = 1..D` (the source domains one by one,
and the target domain), each with its own batches and loss
:math:`L_d(w) = \sum_{B \in d} \frac{|B|}{N_d}\, L_B(w)`, this module computes per domain, on the
curvature operator :math:`C_d` (default the Hessian :math:`H_d = \nabla^2 L_d(w)`, see
:class:`~flatlab.curvature.hvp.HessianOperator`; any other operator, e.g. a generalized
Gauss-Newton matrix, through ``operator_fn``):

* the top-:math:`k` eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_k` (largest algebraic) by
  flatlab's early-stopping Lanczos, each with its residual :math:`\|C_d u_i - \lambda_i u_i\|`
  (a bound on its distance to the spectrum; :func:`~flatlab.curvature.lanczos.lanczos_top_eigenvalues`);
* the trace :math:`\operatorname{tr}(C_d)` by Hutch++ (or Hutchinson) with its standard error
  (:func:`~flatlab.curvature.trace.estimate_trace`);
* the top-:math:`k` eigenvectors :math:`U_d \in \mathbb R^{n \times k}`,

and then the **eigenspace overlap** (Gur-Ari, Roberts and Dyer 2018, "Gradient descent happens in
a tiny subspace", who compare Hessian top subspaces this way over training):

.. math::

    O_{ab} = \frac{\|U_a^\top U_b\|_F^2}{k} = \frac1k \sum_{i=1}^k \cos^2\theta_i \in [0, 1],

with :math:`U_a, U_b` orthonormal and :math:`\theta_i` the principal angles between the two
subspaces: :math:`O = 1` when the domains' top-:math:`k` subspaces coincide, :math:`O = 0` when
they are orthogonal, and :math:`k/n` is the expected overlap of two random subspaces. The matrix
is symmetric (:math:`\|A^\top\|_F = \|A\|_F`) with ones on the diagonal.

**Orthonormalization.** Lanczos returns Ritz vectors in the operator's precision (float32 for a
float32 model), orthonormal only to about :math:`10^{-7}`, and Ritz vectors of a not fully
converged run can be slightly dependent. Each domain's vectors are therefore re-orthonormalized
by a QR factorization in float64, :math:`U_d = Q`, :math:`[u_1 \dots u_k] = QR` (same span), before
any overlap; the bases are kept in the operator's precision and every product
:math:`U_a^\top U_b` is accumulated in float64. A nearly singular :math:`R` (dependent Ritz
vectors) is reported in :attr:`PerDomainCurvature.notes`.

Accuracy: given the data, the overlap has no sampling error (it is not an estimate of a mean);
its numerical error comes from the Ritz vectors, whose angle to the true top-:math:`k` subspace
is bounded by the Davis-Kahan :math:`\sin\Theta` theorem, :math:`\|\sin\Theta\|_F \le
\|R\|_F / \delta`, with :math:`R` the Ritz residuals (:attr:`PerDomainCurvature.residuals`) and
:math:`\delta` the gap between :math:`\lambda_k` and the rest of the spectrum.

Caveats: a single Lanczos start vector does not resolve exactly repeated eigenvalues, and when
:math:`\lambda_k \approx \lambda_{k+1}` the top-:math:`k` subspace itself is ill-defined (any
rotation inside the near-degenerate pair is as good), so overlaps are meaningful only with an
eigengap after :math:`\lambda_k`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from flatlab.curvature.hvp import Batch, HessianOperator, LossFn
from flatlab.curvature.lanczos import DEFAULT_RTOL, lanczos_top_eigenvalues
from flatlab.curvature.params import check_params
from flatlab.curvature.trace import TRACE_METHODS, estimate_trace
from flatlab.errors import FlatlabError

#: ``operator_fn(model, batches)`` -> a symmetric n x n operator (scipy ``LinearOperator`` or
#: anything :func:`~flatlab.curvature.lanczos.lanczos_top_eigenvalues` accepts).
OperatorFactory = Callable[[nn.Module, Sequence[Batch]], Any]

#: Rows of the bases multiplied per step when an overlap is accumulated in float64.
_CHUNK_ROWS = 1 << 20


@dataclass(frozen=True)
class PerDomainCurvatureConfig:
    """Settings of a per-domain curvature measurement, validated at construction.

    Attributes:
        k: eigenvalues and eigenvectors per domain (the overlap's subspace dimension).
        rtol: Lanczos stopping rule, relative Ritz residual :math:`\\le` rtol :math:`|\\lambda|`.
        max_steps: most Lanczos products per domain (``None``: Lanczos's default).
        trace_products: products per domain for the trace; 0 skips the trace.
        trace_method: ``"hutch++"`` (needs >= 3 products) or ``"hutchinson"``.
        params: the parameters of the default Hessian operator: ``"all"``, ``"weights"``,
            ``"no-bn"`` or a tuple of parameter names (unused with a custom ``operator_fn``).
        seed: seeds the Lanczos start vector and the trace probes (the same for every domain).
        keep_eigenvectors: keep each domain's orthonormalized eigenvectors in the result
            (n x k per domain: large for big models).
    """

    k: int = 5
    rtol: float = DEFAULT_RTOL
    max_steps: int | None = None
    trace_products: int = 99
    trace_method: str = "hutch++"
    params: str | tuple[str, ...] = "all"
    seed: int = 0
    keep_eigenvectors: bool = False

    def __post_init__(self) -> None:
        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not integer(self.k) or self.k < 1:
            raise FlatlabError(f"k must be a positive integer, got {self.k!r}")
        if isinstance(self.rtol, bool) or not isinstance(self.rtol, (int, float)) or not self.rtol > 0:
            raise FlatlabError(f"rtol must be positive, got {self.rtol!r}")
        if self.max_steps is not None and (not integer(self.max_steps) or self.max_steps < self.k):
            raise FlatlabError(f"max_steps must be an integer of at least k ({self.k}) or None, got {self.max_steps!r}")
        if self.trace_method not in TRACE_METHODS:
            raise FlatlabError(f"trace_method must be one of {', '.join(TRACE_METHODS)}, got {self.trace_method!r}")
        least = 3 if self.trace_method == "hutch++" else 1
        if not integer(self.trace_products) or (self.trace_products != 0 and self.trace_products < least):
            raise FlatlabError(f"trace_products must be 0 (no trace) or at least {least} for {self.trace_method}, "
                               f"got {self.trace_products!r}")
        object.__setattr__(self, "params", check_params(self.params))
        if not integer(self.seed):
            raise FlatlabError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.keep_eigenvectors, bool):
            raise FlatlabError(f"keep_eigenvectors must be true or false, got {self.keep_eigenvectors!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready settings."""
        out = asdict(self)
        out["params"] = self.params if isinstance(self.params, str) else list(self.params)
        return out


@dataclass(frozen=True)
class PerDomainCurvature:
    """Per-domain curvature and the eigenspace overlap matrix.

    Rows of the arrays follow :attr:`domains`.

    Attributes:
        domains: domain names, in the order given.
        k: eigenpairs per domain.
        eigenvalues: ``(D, k)``, largest first.
        residuals: ``(D, k)``, :math:`\\|C u_i - \\lambda_i u_i\\|`.
        converged: per domain, whether Lanczos met ``rtol``.
        traces, trace_stderrs: ``(D,)`` (NaN when ``trace_products == 0``).
        overlap: ``(D, D)``, :math:`\\|U_a^\\top U_b\\|_F^2 / k`.
        eigen_products, trace_products: ``(D,)`` operator products used per domain.
        num_samples: ``(D,)`` samples per domain.
        num_params: :math:`n`, the operator's size.
        config: the settings.
        eigenvectors: per domain the orthonormal ``(n, k)`` basis, if ``keep_eigenvectors``.
        notes: anything to know about the numbers (unconverged Lanczos, dependent Ritz vectors).
    """

    domains: tuple[str, ...]
    k: int
    eigenvalues: np.ndarray
    residuals: np.ndarray
    converged: tuple[bool, ...]
    traces: np.ndarray
    trace_stderrs: np.ndarray
    overlap: np.ndarray
    eigen_products: np.ndarray
    trace_products: np.ndarray
    num_samples: np.ndarray
    num_params: int
    config: PerDomainCurvatureConfig
    eigenvectors: dict[str, np.ndarray] | None = None
    notes: tuple[str, ...] = ()

    def overlap_between(self, a: str, b: str) -> float:
        """:math:`O_{ab}` by domain name."""
        for name in (a, b):
            if name not in self.domains:
                raise FlatlabError(f"unknown domain {name!r}: the domains are {', '.join(self.domains)}")
        return float(self.overlap[self.domains.index(a), self.domains.index(b)])


# -- the overlap ----------------------------------------------------------------------------------

def orthonormal_basis(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    """An orthonormal basis of the columns' span (QR in float64), in the input's float dtype.

    Returns:
        ``(Q, conditioning)``: ``Q`` of the input's shape; ``conditioning`` is
        :math:`\\min_i |R_{ii}| / \\max_i |R_{ii}|` (near 0: the columns were nearly dependent).

    Raises:
        FlatlabError: not a 2D array with at least as many rows as columns.
    """
    u = np.asarray(vectors)
    if u.ndim != 2 or u.shape[0] < u.shape[1] or u.shape[1] == 0:
        raise FlatlabError(f"an eigenvector matrix must be n x k with n >= k >= 1, got shape {u.shape}")
    q, r = np.linalg.qr(u.astype(np.float64, copy=False))
    diag = np.abs(np.diag(r))
    conditioning = float(diag.min() / diag.max()) if diag.max() > 0 else 0.0
    dtype = u.dtype if np.issubdtype(u.dtype, np.floating) else np.float64
    return q.astype(dtype, copy=False), conditioning


def _cross_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a.T @ b`` accumulated in float64, a block of rows at a time (the bases may be float32
    and too large to copy to float64 whole; numpy has no mixed-precision matmul)."""
    out = np.zeros((a.shape[1], b.shape[1]))
    for start in range(0, a.shape[0], _CHUNK_ROWS):
        out += a[start:start + _CHUNK_ROWS].astype(np.float64).T @ b[start:start + _CHUNK_ROWS].astype(np.float64)
    return out


def subspace_overlap(u: np.ndarray, v: np.ndarray) -> float:
    """:math:`\\|U^\\top V\\|_F^2 / k` for orthonormal ``(n, k)`` bases ``u`` and ``v``.

    Raises:
        FlatlabError: shapes that differ.
    """
    if u.shape != v.shape:
        raise FlatlabError(f"subspace overlap needs bases of one shape, got {u.shape} and {v.shape}")
    c = _cross_products(u, v)
    return float((c * c).sum() / u.shape[1])


def overlap_matrix(bases: Sequence[np.ndarray]) -> np.ndarray:
    """:math:`O_{ab} = \\|U_a^\\top U_b\\|_F^2 / k` for every pair of orthonormal bases (every
    entry computed, the diagonal included, so the symmetry and unit diagonal are checks, not
    assumptions)."""
    d = len(bases)
    out = np.empty((d, d))
    for i in range(d):
        for j in range(d):
            out[i, j] = subspace_overlap(bases[i], bases[j])
    return out


# -- per-domain measurement -----------------------------------------------------------------------

def _num_samples(y: Any) -> int:
    if isinstance(y, torch.Tensor):
        return int(y.shape[0]) if y.dim() > 0 else 1
    return len(y)


def hessian_factory(loss_fn: LossFn | None = None, params: str | Sequence[str] = "all",
                    method: str = "auto") -> OperatorFactory:
    """The default ``operator_fn``: ``HessianOperator(model, batches, loss_fn, params, method)``."""

    def make(model: nn.Module, batches: Sequence[Batch]) -> HessianOperator:
        return HessianOperator(model, list(batches), loss_fn, params if isinstance(params, str) else list(params),
                               method)

    return make


def per_domain_curvature(model: nn.Module, domains: Mapping[str, Sequence[Batch]], *,
                         loss_fn: LossFn | None = None, config: PerDomainCurvatureConfig | None = None,
                         operator_fn: OperatorFactory | None = None) -> PerDomainCurvature:
    """Top-k eigenvalues, trace and eigenvectors of each domain's curvature, and their overlaps.

    Args:
        model: any ``nn.Module`` (for a quantized flatlab model, pass its effective model, e.g.
            ``ckpt.build_model(device, effective=True)``); evaluated in eval mode.
        domains: domain name -> ``(x, y)`` batches (see :func:`domain_batches`).
        loss_fn: mean-reduction loss of the default Hessian operator (default cross-entropy).
        config: see :class:`PerDomainCurvatureConfig`.
        operator_fn: ``operator_fn(model, batches)`` -> the curvature operator of one domain
            (default: the Hessian, :func:`hessian_factory` with ``loss_fn`` and
            ``config.params``); every domain's operator must have the same size.

    Returns:
        :class:`PerDomainCurvature`.

    Raises:
        FlatlabError: no domains, an empty domain, operators of different sizes, or ``k`` larger
            than the number of parameters.
    """
    config = config or PerDomainCurvatureConfig()
    if not domains:
        raise FlatlabError("domains is empty: pass at least one domain name with its batches")
    factory = operator_fn or hessian_factory(loss_fn, config.params)
    names = tuple(str(n) for n in domains)
    values, residuals, converged = [], [], []
    traces, stderrs, eigen_products, trace_products, samples = [], [], [], [], []
    bases: list[np.ndarray] = []
    notes: list[str] = []
    size: int | None = None
    for name, batches in zip(names, domains.values()):
        batches = list(batches)
        count = sum(_num_samples(y) for _, y in batches)
        if count == 0:
            raise FlatlabError(f"domain {name!r} has no samples")
        operator = factory(model, batches)
        n = int(operator.shape[0])
        if size is None:
            size = n
            if config.k > n:
                raise FlatlabError(f"k ({config.k}) exceeds the {n} parameters the curvature is taken over")
        elif n != size:
            raise FlatlabError(f"the curvature operator of domain {name!r} has size {n}, that of {names[0]!r} {size}: "
                               "every domain must use the same parameters")
        eig = lanczos_top_eigenvalues(operator, k=config.k, rtol=config.rtol, maxiter=config.max_steps,
                                      seed=config.seed)
        if len(eig.eigenvalues) < config.k:
            raise FlatlabError(f"Lanczos found only {len(eig.eigenvalues)} of the top-{config.k} eigenpairs of domain "
                               f"{name!r}: lower k or raise max_steps")
        if not eig.converged:
            notes.append(f"{name}: {eig.note}")
        basis, conditioning = orthonormal_basis(eig.eigenvectors)
        if conditioning < 1e-6:
            notes.append(f"{name}: the top-{config.k} Ritz vectors are nearly dependent (R conditioning "
                         f"{conditioning:.1e}); the overlap uses their orthonormalized span")
        if config.trace_products:
            trace = estimate_trace(operator, config.trace_products, config.trace_method, config.seed)
            traces.append(trace.trace)
            stderrs.append(trace.stderr)
            trace_products.append(trace.products)
        else:
            traces.append(float("nan"))
            stderrs.append(float("nan"))
            trace_products.append(0)
        del operator  # frees a Hessian operator's cached gradient graphs before the next domain
        values.append(np.asarray(eig.eigenvalues, dtype=np.float64))
        residuals.append(np.asarray(eig.residuals, dtype=np.float64))
        converged.append(bool(eig.converged))
        eigen_products.append(int(eig.products))
        samples.append(count)
        bases.append(basis)
    assert size is not None
    arrays = {
        "eigenvalues": np.stack(values), "residuals": np.stack(residuals), "traces": np.asarray(traces),
        "trace_stderrs": np.asarray(stderrs), "overlap": overlap_matrix(bases),
        "eigen_products": np.asarray(eigen_products, dtype=np.int64),
        "trace_products": np.asarray(trace_products, dtype=np.int64), "num_samples": np.asarray(samples, dtype=np.int64),
    }
    for arr in arrays.values():
        arr.setflags(write=False)
    return PerDomainCurvature(domains=names, k=config.k, converged=tuple(converged), num_params=size, config=config,
                              eigenvectors=dict(zip(names, bases)) if config.keep_eigenvectors else None,
                              notes=tuple(notes), **arrays)


def domain_batches(splits: Any, *, batch_size: int = 512, source_part: str = "in", include_target: bool = True,
                   max_samples: int | None = None, seed: int = 0,
                   device: torch.device | str = "cpu") -> dict[str, list[Batch]]:
    """Each domain's batches from a :class:`~flatlab.data.DomainSplits` (e.g. ``ckpt.splits()``).

    Source domains contribute their ``in`` split (the training data of that domain, as in the
    ``source`` split) or, with ``source_part="out"``, their held-out split; each target domain
    contributes every sample (as in the ``target`` split). Keys are the domain names, source
    domains first, in the data set's order.

    Args:
        splits: the data set with its test domains and in/out splits.
        batch_size: samples per batch.
        source_part: ``"in"`` or ``"out"``.
        include_target: add the target domain(s).
        max_samples: per domain, a seeded random subset of at most this many samples.
        seed: seeds the subsets.
        device: where the tensors go.

    Raises:
        FlatlabError: a bad ``batch_size``, ``source_part`` or ``max_samples``, or an empty domain.
    """
    from flatlab.data.base import SplitPart, seed_hash

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FlatlabError(f"batch_size must be a positive integer, got {batch_size!r}")
    if source_part not in ("in", "out"):
        raise FlatlabError(f"source_part must be 'in' or 'out', got {source_part!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise FlatlabError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    parts = [(e, (splits.in_idx if source_part == "in" else splits.out_idx)[e]) for e in splits.source_envs]
    if include_target:
        parts += [(e, np.arange(splits.dataset.domain_size(e))) for e in splits.test_envs]
    out: dict[str, list[Batch]] = {}
    for env, indices in parts:
        name = splits.dataset.domains[env]
        if len(indices) == 0:
            raise FlatlabError(f"domain {name!r} has no samples in this split")
        if max_samples is not None and max_samples < len(indices):
            rng = np.random.RandomState(seed_hash("domain-subset", seed, env))
            indices = np.sort(rng.choice(indices, size=max_samples, replace=False))
        out[name] = [(x.to(device), y.to(device))
                     for x, y in splits.iter_batches([SplitPart(env, np.asarray(indices))], batch_size)]
    return out


__all__ = ["OperatorFactory", "PerDomainCurvature", "PerDomainCurvatureConfig", "domain_batches", "hessian_factory",
           "orthonormal_basis", "overlap_matrix", "per_domain_curvature", "subspace_overlap"]
