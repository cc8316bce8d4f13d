"""Curvature of a model's loss: Hessian-vector products, top eigenvalues, trace, spectral density.

Works on any ``nn.Module``, a list (or loader) of ``(x, y)`` batches and a mean-reduction loss::

    from flatlab.curvature import HessianOperator, lanczos_top_eigenvalues, hutchpp_trace
    op = HessianOperator(model, batches, torch.nn.functional.cross_entropy, params="all")
    top = lanczos_top_eigenvalues(op, k=5)          # eigenvalues, residuals, products
    tr = hutchpp_trace(op, num_products=99)         # trace, stderr
"""

from flatlab.curvature.dense import MAX_DENSE_PARAMS, DenseSpectrum, dense_hessian, dense_spectrum
from flatlab.curvature.density import (
    SpectralDensity,
    lanczos_tridiagonal,
    quadrature_rule,
    slq_density,
)
from flatlab.curvature.hvp import (
    DEFAULT_METHOD,
    HVP_METHODS,
    CountingOperator,
    HessianOperator,
    hessian_vector_product,
)
from flatlab.curvature.lanczos import EigenResult, lanczos_top_eigenvalues
from flatlab.curvature.params import PARAM_CHOICES, parameter_blocks, select_parameters
from flatlab.curvature.per_layer import LayerCurvature, per_layer_curvature
from flatlab.curvature.trace import TraceEstimate, estimate_trace, hutchinson_trace, hutchpp_trace

__all__ = [
    "DEFAULT_METHOD",
    "HVP_METHODS",
    "MAX_DENSE_PARAMS",
    "PARAM_CHOICES",
    "CountingOperator",
    "DenseSpectrum",
    "EigenResult",
    "HessianOperator",
    "LayerCurvature",
    "SpectralDensity",
    "TraceEstimate",
    "dense_hessian",
    "dense_spectrum",
    "estimate_trace",
    "hessian_vector_product",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_top_eigenvalues",
    "lanczos_tridiagonal",
    "parameter_blocks",
    "per_layer_curvature",
    "quadrature_rule",
    "select_parameters",
    "slq_density",
]
