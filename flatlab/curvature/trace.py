r"""Stochastic trace estimates with standard errors: Hutchinson and Hutch++.

Hutchinson: for Rademacher vectors :math:`z_i` (entries :math:`\pm 1`),
:math:`\mathbb E[z^\top A z] = \operatorname{tr}(A)`, so

.. math:: \widehat{\operatorname{tr}} = \frac1m \sum_{i=1}^m z_i^\top A z_i, \qquad
          \mathrm{se} = \frac{s}{\sqrt m}

with :math:`s` the sample standard deviation of the :math:`z_i^\top A z_i`.

Hutch++ (Meyer, Musco, Musco, Woodruff 2021): spend a third of the products on a sketch
:math:`Q = \operatorname{orth}(A S)` of the dominant range, a third on
:math:`\operatorname{tr}(Q^\top A Q)` (exact for that part) and a third on Hutchinson for the
deflated rest :math:`(I - QQ^\top) A (I - QQ^\top)`:

.. math:: \widehat{\operatorname{tr}} = \operatorname{tr}(Q^\top A Q)
          + \frac1p \sum_{i=1}^p g_i^\top (I - QQ^\top) A (I - QQ^\top) g_i .

For a decaying spectrum (a Hessian's) the rest is small, so the error falls as :math:`1/m`
instead of :math:`1/\sqrt m`. Its standard error is that of the Hutchinson part (the sketch part
has no sampling variance given :math:`Q`).

Probes, products, the QR factorisation (``torch.linalg.qr``) and the projections stay in torch in
the operator's dtype and device (float32 for a float32 model), so the cost is the products';
quadratic forms are partial dots summed in float64. Probes are the numbers the former numpy
estimators drew from ``numpy.random.default_rng(seed)`` (``rng.integers(0, 2, size=(n, m))``,
column by column, see :func:`~flatlab.curvature.operator.rademacher`), drawn on the CPU, so a
seed gives the same probes as before and on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flatlab.curvature.operator import CountingOperator, dot64, rademacher, torch_product
from flatlab.errors import FlatlabError


@dataclass
class TraceEstimate:
    """A trace estimate with its standard error, the method and the products it used."""

    trace: float
    stderr: float
    products: int
    method: str
    samples: np.ndarray


def _stderr(samples: np.ndarray) -> float:
    return float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")


def _probed(operator: Any, num_products: int, least: int, method: str
            ) -> tuple[CountingOperator, Callable[[torch.Tensor, torch.Tensor], None], torch.dtype, torch.device, int]:
    """The counted operator, its product ``apply(v, out)`` in its own dtype and device, and its
    dimension; FlatlabError when ``num_products`` is below the estimator's ``least``."""
    if num_products < least:
        raise FlatlabError(f"num_products must be at least {least} for {method}, got {num_products}")
    op = CountingOperator(operator)
    apply, dtype, device = torch_product(op)
    return op, apply, dtype, device, op.shape[0]


def hutchinson_trace(operator: Any, num_products: int = 100, seed: int = 0) -> TraceEstimate:
    """Hutchinson's estimate of :math:`\\operatorname{tr}(A)` from ``num_products`` Rademacher probes.

    Args:
        operator: any curvature operator (Hessian, GGN, empirical Fisher), ``LinearOperator`` or
            matrix.
        num_products: probes (one product each), at least 1.
        seed: seeds the probes.
    """
    op, apply, dtype, device, n = _probed(operator, num_products, 1, "Hutchinson's trace")
    rng = np.random.default_rng(seed)
    product = torch.empty(n, dtype=dtype, device=device)
    probe = torch.empty((1, n), dtype=dtype, device=device)
    z = probe[0]
    samples = np.empty(num_products)
    for i in range(num_products):
        rademacher(rng, 1, n, dtype, device, out=probe)
        apply(z, product)
        samples[i] = dot64(z, product)
    return TraceEstimate(float(samples.mean()), _stderr(samples), op.count, "hutchinson", samples)


def hutchpp_trace(operator: Any, num_products: int = 99, seed: int = 0) -> TraceEstimate:
    """Hutch++'s estimate of :math:`\\operatorname{tr}(A)` from ``num_products`` products (>= 3).

    ``num_products // 3`` sketch vectors :math:`S`, as many products with :math:`Q`, and the rest
    Hutchinson probes :math:`g` of the deflated operator (see the module docstring). When the
    sketch spans the whole space (``num_products // 3 >= n``) the estimate is exact.
    """
    op, apply, dtype, device, n = _probed(operator, num_products, 3, "Hutch++")
    rng = np.random.default_rng(seed)
    sketch = num_products // 3
    probes = num_products - 2 * sketch
    s = rademacher(rng, sketch, n, dtype, device)
    g = rademacher(rng, probes, n, dtype, device)
    for i in range(sketch):  # A S, in place of S (rows)
        apply(s[i].clone(), s[i])
    q = torch.linalg.qr(s.T).Q.T.contiguous()  # orthonormal rows spanning A S (at most n of them)
    del s
    product = torch.empty(n, dtype=dtype, device=device)
    low_rank = 0.0
    for row in q:
        apply(row, product)
        low_rank += dot64(row, product)
    g -= (g @ q.T) @ q  # deflate: g_perp = (I - Q Q^T) g
    samples = np.empty(probes)
    for i in range(probes):
        apply(g[i], product)
        samples[i] = dot64(g[i], product)
    trace = low_rank + float(samples.mean())
    return TraceEstimate(trace, _stderr(samples), op.count, "hutch++", samples + low_rank)


TRACE_METHODS = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace}


def estimate_trace(operator: Any, num_products: int = 99, method: str = "hutch++", seed: int = 0) -> TraceEstimate:
    """Dispatch to :func:`hutchinson_trace` or :func:`hutchpp_trace`."""
    if method not in TRACE_METHODS:
        raise FlatlabError(f"unknown trace method {method!r}: method must be one of {', '.join(TRACE_METHODS)}")
    return TRACE_METHODS[method](operator, num_products, seed)


__all__ = ["TRACE_METHODS", "TraceEstimate", "estimate_trace", "hutchinson_trace", "hutchpp_trace"]
