r"""Stochastic trace estimates with standard errors: Hutchinson and Hutch++.

Hutchinson: for Rademacher vectors :math:`z_i` (entries :math:`\pm 1`),
:math:`\mathbb E[z^\top A z] = \operatorname{tr}(A)`, so

.. math:: \widehat{\operatorname{tr}} = \frac1m \sum_{i=1}^m z_i^\top A z_i, \qquad
          \mathrm{se} = \frac{s}{\sqrt m}

with :math:`s` the sample standard deviation of the :math:`z_i^\top A z_i`.

Hutch++ (Meyer, Musco, Musco, Woodruff 2021): spend a third of the products on a sketch
:math:`Q = \operatorname{orth}(A S)` of the dominant range, a third on
:math:`\operatorname{tr}(Q^\top A Q)` (exact for that part) and a third on Hutchinson for the
deflated rest :math:`(I - QQ^\top) A (I - QQ^\top)`. For a decaying spectrum (a Hessian's) the
rest is small, so the error falls as :math:`1/m` instead of :math:`1/\sqrt m`. Its standard
error is that of the Hutchinson part (the sketch part has no sampling variance given :math:`Q`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flatlab.curvature.hvp import CountingOperator
from flatlab.errors import FlatlabError


@dataclass
class TraceEstimate:
    """A trace estimate with its standard error, the method and the products it used."""

    trace: float
    stderr: float
    products: int
    method: str
    samples: np.ndarray


def _rademacher(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    return rng.integers(0, 2, size=(n, count)).astype(np.float64) * 2.0 - 1.0


def _apply(op: CountingOperator, vectors: np.ndarray) -> np.ndarray:
    return np.column_stack([op.matvec(vectors[:, i]) for i in range(vectors.shape[1])])


def _stderr(samples: np.ndarray) -> float:
    return float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")


def hutchinson_trace(operator: Any, num_products: int = 100, seed: int = 0) -> TraceEstimate:
    """Hutchinson's estimate of :math:`\\operatorname{tr}(A)` from ``num_products`` Rademacher probes."""
    if num_products < 1:
        raise FlatlabError(f"the trace needs at least one product, got {num_products}")
    op = CountingOperator(operator)
    rng = np.random.default_rng(seed)
    n = op.shape[0]
    samples = np.empty(num_products)
    for i in range(num_products):
        z = _rademacher(rng, n, 1)[:, 0]
        samples[i] = z @ op.matvec(z)
    return TraceEstimate(float(samples.mean()), _stderr(samples), op.count, "hutchinson", samples)


def hutchpp_trace(operator: Any, num_products: int = 99, seed: int = 0) -> TraceEstimate:
    """Hutch++'s estimate of :math:`\\operatorname{tr}(A)` from ``num_products`` products (>= 3)."""
    if num_products < 3:
        raise FlatlabError(f"Hutch++ needs at least 3 products, got {num_products}")
    op = CountingOperator(operator)
    rng = np.random.default_rng(seed)
    n = op.shape[0]
    sketch = num_products // 3
    probes = num_products - 2 * sketch
    s = _rademacher(rng, n, sketch)
    g = _rademacher(rng, n, probes)
    q, _ = np.linalg.qr(_apply(op, s))
    low_rank = float(np.trace(q.T @ _apply(op, q)))
    g_perp = g - q @ (q.T @ g)
    samples = np.einsum("ij,ij->j", g_perp, _apply(op, g_perp))
    trace = low_rank + float(samples.mean())
    return TraceEstimate(trace, _stderr(samples), op.count, "hutch++", samples + low_rank)


TRACE_METHODS = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace}


def estimate_trace(operator: Any, num_products: int = 99, method: str = "hutch++", seed: int = 0) -> TraceEstimate:
    """Dispatch to :func:`hutchinson_trace` or :func:`hutchpp_trace`."""
    if method not in TRACE_METHODS:
        raise FlatlabError(f"unknown trace method {method!r}: choose one of {', '.join(TRACE_METHODS)}")
    return TRACE_METHODS[method](operator, num_products, seed)


__all__ = ["TRACE_METHODS", "TraceEstimate", "estimate_trace", "hutchinson_trace", "hutchpp_trace"]
