"""Curvature of a model's loss: Hessian, GGN and empirical Fisher products, top eigenvalues,
trace, spectral density, per-layer blocks.

Works on any ``nn.Module`` (convolutions, BatchNorm, attention, LayerNorm, GELU, ...), a list or
DataLoader of ``(x, y)`` batches and a mean-reduction loss; every consumer takes any curvature::

    from flatlab.curvature import curvature_operator, lanczos_top_eigenvalues, hutchpp_trace
    op = curvature_operator("ggn", model, batches, torch.nn.functional.cross_entropy, params="all")
    top = lanczos_top_eigenvalues(op, k=5)          # eigenvalues, residuals, products
    tr = hutchpp_trace(op, num_products=99)         # trace, stderr

``kind`` is one of :data:`CURVATURES`: ``hessian``, ``ggn`` (= the Fisher for softmax
cross-entropy), ``empirical-fisher``. The formulas are in the module docstrings and in
``docs/curvature.md``.
"""

from flatlab.curvature.dense import (
    MAX_DENSE_PARAMS,
    DenseSpectrum,
    dense_curvature,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    dense_spectrum,
)
from flatlab.curvature.density import (
    SpectralDensity,
    lanczos_tridiagonal,
    quadrature_rule,
    slq_density,
)
from flatlab.curvature.factory import CurvatureConfig, curvature_operator, operator_config
from flatlab.curvature.fisher import EMPIRICAL_FISHER_METHODS, EmpiricalFisherOperator
from flatlab.curvature.ggn import GGN_METHODS, GGNOperator
from flatlab.curvature.hvp import (
    DEFAULT_METHOD,
    HVP_METHODS,
    HessianOperator,
    hessian_vector_product,
)
from flatlab.curvature.lanczos import EigenResult, lanczos_top_eigenvalues
from flatlab.curvature.operator import (
    CURVATURES,
    MODES,
    CountingOperator,
    CurvatureOperator,
    CurvatureWarning,
)
from flatlab.curvature.params import PARAM_CHOICES, parameter_blocks, select_parameters
from flatlab.curvature.per_layer import LayerCurvature, per_layer_curvature
from flatlab.curvature.trace import TraceEstimate, estimate_trace, hutchinson_trace, hutchpp_trace

__all__ = [
    "CURVATURES",
    "DEFAULT_METHOD",
    "EMPIRICAL_FISHER_METHODS",
    "GGN_METHODS",
    "HVP_METHODS",
    "MAX_DENSE_PARAMS",
    "MODES",
    "PARAM_CHOICES",
    "CountingOperator",
    "CurvatureConfig",
    "CurvatureOperator",
    "CurvatureWarning",
    "DenseSpectrum",
    "EigenResult",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LayerCurvature",
    "SpectralDensity",
    "TraceEstimate",
    "curvature_operator",
    "dense_curvature",
    "dense_empirical_fisher",
    "dense_ggn",
    "dense_hessian",
    "dense_spectrum",
    "estimate_trace",
    "hessian_vector_product",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_top_eigenvalues",
    "lanczos_tridiagonal",
    "operator_config",
    "parameter_blocks",
    "per_layer_curvature",
    "quadrature_rule",
    "select_parameters",
    "slq_density",
]
