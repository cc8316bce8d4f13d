r"""Per-layer curvature: top eigenvalue and trace of each layer's diagonal curvature block.

For a layer :math:`\ell` with parameters :math:`w_\ell`, the block
:math:`H_{\ell\ell} = \partial^2 L / \partial w_\ell^2` is the curvature seen when only that layer
is perturbed, e.g. by quantizing it (HAWQ-style mixed-precision sensitivity ranks layers by its
top eigenvalue or its trace divided by the parameter count). The same holds for the GGN and the
empirical Fisher: the block of layer :math:`\ell` is :math:`G_{\ell\ell} = \sum_j
\frac{|B_j|}{N} J_{\ell}^\top \Lambda J_{\ell}` (the Jacobian restricted to the layer's
parameters), resp. :math:`F_{\ell\ell} = \frac1N \sum_i g_{i,\ell} g_{i,\ell}^\top`; each comes
from :meth:`~flatlab.curvature.operator.CurvatureOperator.restricted`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flatlab.curvature.lanczos import DEFAULT_RTOL, lanczos_top_eigenvalues
from flatlab.curvature.operator import CurvatureOperator
from flatlab.curvature.params import parameter_blocks
from flatlab.curvature.trace import estimate_trace


@dataclass
class LayerCurvature:
    """Curvature of one layer's diagonal block (of the Hessian, GGN or empirical Fisher)."""

    layer: str
    num_params: int
    top_eigenvalue: float
    residual: float
    trace: float
    trace_stderr: float
    products: int

    @property
    def mean_trace(self) -> float:
        """Trace per parameter (average curvature), comparable across layer sizes."""
        return self.trace / self.num_params


def per_layer_curvature(operator: CurvatureOperator, trace_products: int = 30, trace_method: str = "hutch++",
                        tol: float | None = None, seed: int = 0, method: str = "lanczos",
                        rtol: float = DEFAULT_RTOL) -> list[LayerCurvature]:
    """Top eigenvalue (Lanczos) and trace of every layer block of ``operator``'s parameters.

    Args:
        operator: any curvature operator (Hessian, GGN, empirical Fisher); its parameter names
            are grouped by owning layer.
        trace_products: products per layer for the trace (capped at the block size for tiny
            blocks, where Hutch++ is then exact).
        trace_method: ``hutch++`` or ``hutchinson``.
        tol: ARPACK's accuracy (``method="arpack"`` only; default by dtype).
        seed: seeds Lanczos and the trace probes.
        method, rtol: the eigenvalue solver and its stopping rule, as in
            :func:`~flatlab.curvature.lanczos.lanczos_top_eigenvalues`.
    """
    out = []
    for layer, names in parameter_blocks(operator.param_names).items():
        block = operator.restricted(names)
        eig = lanczos_top_eigenvalues(block, k=1, tol=tol, seed=seed, method=method, rtol=rtol)
        products = trace_products
        if trace_method == "hutch++":
            products = max(3, min(trace_products, 3 * block.dim))
        trace = estimate_trace(block, products, trace_method, seed)
        out.append(LayerCurvature(layer, block.dim, float(eig.eigenvalues[0]), float(eig.residuals[0]),
                                  trace.trace, trace.stderr, eig.products + trace.products))
    return out


__all__ = ["LayerCurvature", "per_layer_curvature"]
