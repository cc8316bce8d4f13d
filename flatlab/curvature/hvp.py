r"""Hessian-vector products of a model's loss over a whole data set, as a linear operator.

For parameters :math:`w`, batches :math:`B_1, \dots, B_J` of a data set of :math:`N` samples and
a loss with mean reduction :math:`L_B(w)`, the loss over the whole set is

.. math::

    L(w) = \sum_j \frac{|B_j|}{N} L_{B_j}(w), \qquad
    H v = \sum_j \frac{|B_j|}{N} \nabla^2 L_{B_j}(w)\, v,

so each product is one pass over the data (one "HVP" in the counts flatlab reports). What every
product shares with the other curvatures (mode, data, ``output_fn``, the math attention kernel,
eval BatchNorm as an affine map) is in :mod:`flatlab.curvature.operator`.

Two ways to compute :math:`H v` are implemented and tested against the dense Hessian:

* ``double-backward``: :math:`g = \nabla L` with ``create_graph=True``, then
  :math:`\nabla (g^\top v)` (reverse-over-reverse). Each batch's gradient graph is built once and
  reused for every product while it fits in ``graph_cache_bytes`` (it does not depend on
  :math:`v`), which saves the forward and the first backward pass;
* ``forward-over-reverse``: ``torch.func.jvp(torch.func.grad(L), (w,), (v,))``.

``auto`` uses :data:`DEFAULT_METHOD` (the faster one in ``benchmarks/bench_curvature.py``) and
falls back to ``double-backward`` for models that torch.func cannot transform (custom
``autograd.Function`` without ``setup_context``, e.g. a straight-through quantizer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from flatlab.curvature.operator import (
    Batch,
    CountingOperator,
    CurvatureOperator,
    LossFn,
    OutputFn,
    affine_eval_batchnorm,
    batch_size,
    default_cache_budget,
)

HVP_METHODS = ("auto", "double-backward", "forward-over-reverse")
#: The method ``auto`` picks: double backward measured faster on CPU for the digits CNN and
#: ResNet-18 (see benchmarks/README.md, "Curvature").
DEFAULT_METHOD = "double-backward"

# Kept under their former names for the modules that imported them from here.
_batch_size = batch_size
_default_cache_budget = default_cache_budget


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`H = \sum_j \frac{|B_j|}{N} \nabla^2 L_{B_j}(w)` of a model's data-set
    loss w.r.t. chosen parameters, as a scipy ``LinearOperator`` and a torch product.

    Args:
        model, data, loss_fn, params, progress, mode, output_fn, dropout_seed: see
            :class:`~flatlab.curvature.operator.CurvatureOperator`.
        method: ``auto``, ``double-backward`` or ``forward-over-reverse``.
        graph_cache_bytes: ``double-backward`` keeps each batch's gradient graph (built once with
            ``create_graph=True``) and reuses it for every product, as long as the graphs' saved
            tensors fit in this many bytes (measured while building; default: 2 GiB on CPU, half
            the free memory on CUDA). 0 disables the cache. ``cache_bytes`` is the same setting
            under the name every curvature operator uses.
    """

    kind: ClassVar[str] = "hessian"
    methods: ClassVar[tuple[str, ...]] = HVP_METHODS
    default_method: ClassVar[str] = DEFAULT_METHOD
    fallbacks: ClassVar[dict[str, str]] = {"forward-over-reverse": "double-backward"}

    def __init__(self, model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None,
                 params: str | Sequence[str] = "all", method: str = "auto",
                 progress: Callable[[], Any] | None = None, graph_cache_bytes: int | None = None, *,
                 mode: str = "eval", output_fn: OutputFn | None = None, cache_bytes: int | None = None,
                 dropout_seed: int | None = None, notes: Sequence[str] | None = None) -> None:
        budget = graph_cache_bytes if graph_cache_bytes is not None else cache_bytes
        super().__init__(model, data, loss_fn, params, method=method, mode=mode, output_fn=output_fn,
                         progress=progress, cache_bytes=budget, dropout_seed=dropout_seed, notes=notes)

    @property
    def graph_cache_bytes(self) -> int:
        """The gradient-graph cache budget in bytes (0: no cache)."""
        return self.cache_bytes

    def _build_cache(self) -> bool:
        """Build every batch's gradient graph, measuring its saved tensors; give up above budget."""
        return self._build_cache_of(self._gradient_graph)

    def _gradient_graph(self, x: Any, y: Any) -> tuple[torch.Tensor | None, ...]:
        """The batch's loss gradient with its graph kept (None for parameters it does not reach)."""
        with torch.enable_grad():
            loss = self.loss_value(self.outputs(x), y)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return tuple(g if g is not None and g.requires_grad else None for g in grads)

    def _cached_product(self, pieces: list[torch.Tensor], out: torch.Tensor | None) -> torch.Tensor | None:
        if not self._cache_usable():
            return None
        if self._cache is None and not self._build_cache():
            self._cache_refused = True
            return None
        flat, acc = self._zero_output(out)
        for grads, weight in self._cache:
            pairs = [(g, vi) for g, vi in zip(grads, pieces) if g is not None]
            if not pairs:
                continue
            hv = torch.autograd.grad([g for g, _ in pairs], self.params, grad_outputs=[vi for _, vi in pairs],
                                     retain_graph=True, allow_unused=True)
            for a, h in zip(acc, hv):
                if h is not None:
                    a.add_(h, alpha=weight)
        return flat

    def _product(self, pieces: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        if self.method == "double-backward":
            cached = self._cached_product(pieces, out)
            if cached is not None:
                return cached
        flat, acc = self._zero_output(out)
        for x, y, weight in self.batches():
            if self.method == "double-backward":
                hv = self._hvp_double_backward(x, y, pieces)
            else:
                hv = self._hvp_forward_over_reverse(x, y, pieces)
            for a, h in zip(acc, hv):
                a.add_(h, alpha=weight)
        return flat

    def _hvp_double_backward(self, x: Any, y: Any, v: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.enable_grad():
            loss = self.loss_value(self.outputs(x), y)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            pairs = [(g, vi) for g, vi in zip(grads, v) if g is not None and g.requires_grad]
            if not pairs:
                return [torch.zeros_like(p) for p in self.params]
            dot = sum((g * vi).sum() for g, vi in pairs)
            hv = torch.autograd.grad(dot, self.params, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, hv)]

    def _hvp_forward_over_reverse(self, x: Any, y: Any, v: list[torch.Tensor]) -> list[torch.Tensor]:
        from torch.func import grad, jvp

        names = self.param_names

        def loss_of(weights: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.loss_value(self.functional_outputs(weights, x), y)

        primals = {n: p.detach() for n, p in zip(names, self.params)}
        tangents = dict(zip(names, v))
        with torch.no_grad():  # no outer graph through the parameters left out (restricted operators)
            _, hv = jvp(grad(loss_of), (primals,), (tangents,))
        return [hv[n] for n in names]


def hessian_vector_product(model: nn.Module, data: Iterable[Batch], v: torch.Tensor,
                           loss_fn: LossFn | None = None, params: str | Sequence[str] = "all",
                           method: str = "auto") -> torch.Tensor:
    """:math:`H v` over the whole data for a flat vector ``v`` (see :class:`HessianOperator`)."""
    return HessianOperator(model, data, loss_fn, params, method).hvp(v)


__all__ = ["DEFAULT_METHOD", "HVP_METHODS", "CountingOperator", "HessianOperator", "affine_eval_batchnorm",
           "hessian_vector_product"]
