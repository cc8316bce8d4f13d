r"""One entry point for every curvature: a validated configuration and a factory.

:data:`~flatlab.curvature.operator.CURVATURES` names the three matrices (one name, one meaning):

* ``hessian``: :math:`H = \sum_j \frac{|B_j|}{N} \nabla^2 L_{B_j}(w)`
  (:class:`~flatlab.curvature.hvp.HessianOperator`);
* ``ggn``: :math:`G = \sum_j \frac{|B_j|}{N} J_{B_j}^\top \Lambda_{B_j} J_{B_j}`
  (:class:`~flatlab.curvature.ggn.GGNOperator`; the Fisher for softmax cross-entropy);
* ``empirical-fisher``: :math:`F = \frac1N \sum_i g_i g_i^\top`
  (:class:`~flatlab.curvature.fisher.EmpiricalFisherOperator`).

Every consumer (``lanczos_top_eigenvalues``, ``estimate_trace``, ``slq_density``,
``per_layer_curvature``) takes the operator :func:`curvature_operator` returns, whatever its kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from flatlab.curvature.fisher import EmpiricalFisherOperator
from flatlab.curvature.ggn import GGNOperator
from flatlab.curvature.hvp import HessianOperator
from flatlab.curvature.operator import CURVATURES, MODES, Batch, CurvatureOperator, LossFn, OutputFn
from flatlab.curvature.params import check_params
from flatlab.errors import FlatlabError

#: kind -> operator class.
OPERATOR_CLASSES: dict[str, type[CurvatureOperator]] = {
    "hessian": HessianOperator, "ggn": GGNOperator, "empirical-fisher": EmpiricalFisherOperator,
}


@dataclass(frozen=True)
class CurvatureConfig:
    """What a curvature operator is, validated at construction (everything but the model, the
    data and the callables).

    Attributes:
        kind: one of :data:`~flatlab.curvature.operator.CURVATURES`.
        params: ``all``, ``weights``, ``no-bn`` or a tuple of parameter names.
        method: ``auto`` or a method of that kind (``HessianOperator.methods``, ...).
        mode: ``eval`` or ``train``.
        cache_bytes: the kind's cache budget in bytes (None: the default; 0: no cache).
        dropout_seed: ``mode="train"`` only: the seed re-drawn before every product.
        sample_chunk: ``empirical-fisher`` only: samples per chunk of per-sample gradients.
    """

    kind: str = "hessian"
    params: str | tuple[str, ...] = "all"
    method: str = "auto"
    mode: str = "eval"
    cache_bytes: int | None = None
    dropout_seed: int | None = None
    sample_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in CURVATURES:
            raise FlatlabError(f"kind must be one of {', '.join(CURVATURES)}, got {self.kind!r}")
        object.__setattr__(self, "params", check_params(self.params))
        methods = OPERATOR_CLASSES[self.kind].methods
        if self.method not in methods:
            raise FlatlabError(f"method {self.method!r} is not a {self.kind} method: method must be one of "
                               f"{', '.join(methods)}")
        if self.mode not in MODES:
            raise FlatlabError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.cache_bytes is not None and (isinstance(self.cache_bytes, bool) or self.cache_bytes < 0):
            raise FlatlabError(f"cache_bytes must be >= 0 (0 disables the cache), got {self.cache_bytes!r}")
        if self.dropout_seed is not None and self.mode != "train":
            raise FlatlabError("dropout_seed applies to mode='train' only (in eval mode Dropout is off)")
        if self.sample_chunk is not None:
            if self.kind != "empirical-fisher":
                raise FlatlabError(f"sample_chunk applies to kind 'empirical-fisher' only, not {self.kind!r}")
            if isinstance(self.sample_chunk, bool) or int(self.sample_chunk) != self.sample_chunk or self.sample_chunk < 1:
                raise FlatlabError(f"sample_chunk must be a positive integer, got {self.sample_chunk!r}")

    def build(self, model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None,
              output_fn: OutputFn | None = None, progress: Callable[[], Any] | None = None) -> CurvatureOperator:
        """The operator this configuration describes, on ``model`` and ``data``."""
        options: dict[str, Any] = {"method": self.method, "mode": self.mode, "output_fn": output_fn,
                                   "progress": progress, "cache_bytes": self.cache_bytes,
                                   "dropout_seed": self.dropout_seed}
        if self.kind == "empirical-fisher":
            options["sample_chunk"] = self.sample_chunk
        params = self.params if isinstance(self.params, str) else list(self.params)
        return OPERATOR_CLASSES[self.kind](model, data, loss_fn, params, **options)


def curvature_operator(kind: str, model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None,
                       params: str | Sequence[str] = "all", *, method: str = "auto", mode: str = "eval",
                       output_fn: OutputFn | None = None, progress: Callable[[], Any] | None = None,
                       cache_bytes: int | None = None, dropout_seed: int | None = None,
                       sample_chunk: int | None = None) -> CurvatureOperator:
    """The ``kind`` curvature operator (``hessian``, ``ggn`` or ``empirical-fisher``) of ``model``'s
    loss on ``data``; the arguments are those of :class:`CurvatureConfig` and
    :class:`~flatlab.curvature.operator.CurvatureOperator`.

    Example::

        op = curvature_operator("ggn", model, loader, params="no-bn")
        top = lanczos_top_eigenvalues(op, k=5)
    """
    config = CurvatureConfig(kind=kind, params=params if isinstance(params, str) else tuple(params), method=method,
                             mode=mode, cache_bytes=cache_bytes, dropout_seed=dropout_seed, sample_chunk=sample_chunk)
    return config.build(model, data, loss_fn, output_fn, progress)


def operator_config(operator: CurvatureOperator) -> CurvatureConfig:
    """The :class:`CurvatureConfig` of an operator (``method`` as requested, e.g. ``auto``)."""
    options = operator.options()
    return CurvatureConfig(kind=operator.kind, params=tuple(operator.param_names), method=options["method"],
                           mode=operator.mode, cache_bytes=options["cache_bytes"], dropout_seed=operator.dropout_seed,
                           sample_chunk=options.get("sample_chunk"))


__all__ = ["OPERATOR_CLASSES", "CurvatureConfig", "curvature_operator", "operator_config"]
