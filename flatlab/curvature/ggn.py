r"""The generalized Gauss-Newton matrix (GGN) of a model's data-set loss, as a linear operator.

For a batch :math:`B` with model outputs :math:`f = f_B(w)` (after ``output_fn``; shape e.g.
``(|B|, C)`` logits), :math:`J_B = \partial f / \partial w` and the batch loss
:math:`L_B(f)`, the chain rule splits the Hessian into

.. math::

    \nabla^2 L_B(w) = J_B^\top \Lambda_B J_B + \sum_k \frac{\partial L_B}{\partial f_k} \nabla^2 f_k,
    \qquad \Lambda_B = \frac{\partial^2 L_B}{\partial f^2},

and the GGN keeps the first term, weighted over the batches as the loss is:

.. math:: G = \sum_j \frac{|B_j|}{N} J_{B_j}^\top \Lambda_{B_j} J_{B_j}, \qquad
          G v = \sum_j \frac{|B_j|}{N} J_{B_j}^\top \bigl(\Lambda_{B_j} (J_{B_j} v)\bigr).

* :math:`G` is positive semi-definite whenever the loss is convex in the outputs (cross-entropy,
  squared error), whatever the network: :math:`v^\top G v = \sum_j \frac{|B_j|}{N}
  (J v)^\top \Lambda (J v) \ge 0`.
* The dropped term is weighted by the residuals :math:`\partial L / \partial f`, so at an
  interpolating minimum (every residual zero, e.g. squared error fitted exactly) :math:`G = H`,
  and near one :math:`G \approx H`.
* For softmax cross-entropy with mean reduction over :math:`M` target positions (``M = |B|``
  for ``(|B|, C)`` logits, :math:`|B| \cdot d_1 \cdots` for ``(|B|, C, d_1, ...)``),
  :math:`\Lambda_B` is block diagonal with blocks :math:`\frac1M (\operatorname{diag}(p) - p p^\top)`,
  :math:`p = \operatorname{softmax}(f)` per position (applied in closed form, no autograd). Then
  :math:`G` equals the (true) Fisher information of the model's predictive distribution,
  :math:`\frac1N \sum_i \mathbb E_{y \sim p(\cdot | x_i)} [\nabla \log p(y|x_i) \nabla \log p(y|x_i)^\top]`,
  because :math:`\mathbb E_y[(e_y - p)(e_y - p)^\top] = \operatorname{diag}(p) - p p^\top`.
* For any other loss, :math:`\Lambda_B u` is a double backward through ``loss_fn`` alone w.r.t.
  the outputs (cheap: no pass through the network). flatlab uses the closed form for
  ``torch.nn.functional.cross_entropy`` and ``nn.CrossEntropyLoss()`` with default settings and
  integer class targets without ignored entries; every other case (weights, ``ignore_index`` hits,
  soft targets, other losses, wrappers such as ``lambda z, y: F.cross_entropy(z, y)``) uses the
  double backward, which is exact too.

Each product makes one Jacobian-vector product (:math:`J v`) and one vector-Jacobian product
(:math:`J^\top u`) per batch. Two ways to get :math:`J v`:

* ``double-vjp``: :math:`g(u) = J^\top u` with ``create_graph=True`` for a dummy :math:`u`, then
  :math:`J v = \partial (g(u)^\top v) / \partial u` (reverse-over-reverse, "double-vjp trick";
  works with any autograd op, including custom ``autograd.Function`` quantizers). The forward
  graph and :math:`g(u)`'s graph do not depend on :math:`v`: each batch's graphs are built once
  and reused by every product while their saved tensors fit in ``cache_bytes``, so a cached
  product is two backward passes;
* ``forward-mode``: dual numbers (``torch.autograd.forward_ad``) carry :math:`v` through one
  forward pass that also records the reverse graph, giving :math:`f` and :math:`J v` together;
  then one backward pass gives :math:`J^\top u`. ``auto`` falls back to ``double-vjp`` when an op
  has no forward derivative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from flatlab.curvature.operator import CurvatureOperator

GGN_METHODS = ("auto", "double-vjp", "forward-mode")
#: The method ``auto`` picks (the faster on CPU in benchmarks/bench_curvature_ops.py).
DEFAULT_GGN_METHOD = "double-vjp"
#: How the output Hessian is applied: the closed form of softmax cross-entropy, or a double
#: backward through the loss w.r.t. the outputs.
OUTPUT_HESSIANS = ("cross-entropy", "autograd")

OutputCurvature = Callable[[torch.Tensor], torch.Tensor]


def is_plain_cross_entropy(loss_fn: Any) -> bool:
    """True for ``F.cross_entropy`` and an ``nn.CrossEntropyLoss`` with default settings (no class
    weights, mean reduction): the losses whose output Hessian flatlab applies in closed form."""
    if loss_fn is nn.functional.cross_entropy:
        return True
    return (isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None and loss_fn.reduction == "mean"
            and loss_fn.label_smoothing == 0.0)


def _ignore_index(loss_fn: Any) -> int:
    return int(loss_fn.ignore_index) if isinstance(loss_fn, nn.CrossEntropyLoss) else -100


def cross_entropy_output_hessian(logits: torch.Tensor) -> OutputCurvature:
    r""":math:`u \mapsto \frac1M (p \odot u - p\,(p^\top u))` per position, :math:`p` the softmax
    over dimension 1 of ``logits`` and :math:`M` the number of positions (all but dimension 1):
    the Hessian of mean-reduction softmax cross-entropy w.r.t. the logits, for any targets."""
    p = torch.softmax(logits.detach(), dim=1)
    positions = logits.numel() // logits.shape[1]

    def apply(u: torch.Tensor) -> torch.Tensor:
        return (p * u - p * (p * u).sum(dim=1, keepdim=True)) / positions

    return apply


class GGNOperator(CurvatureOperator):
    r"""The generalized Gauss-Newton matrix
    :math:`G = \sum_j \frac{|B_j|}{N} J_{B_j}^\top \Lambda_{B_j} J_{B_j}` (see the module
    docstring) w.r.t. chosen parameters, as a scipy ``LinearOperator`` and a torch product.

    Args:
        model, data, loss_fn, params, mode, output_fn, progress, cache_bytes, dropout_seed: see
            :class:`~flatlab.curvature.operator.CurvatureOperator`. ``cache_bytes`` bounds the
            per-batch graphs ``double-vjp`` keeps.
        method: ``auto``, ``double-vjp`` or ``forward-mode``.

    The output Hessian :math:`\Lambda` is the closed form of the cross-entropy
    (:attr:`output_hessian` ``cross-entropy``) or a double backward through the loss
    (``autograd``); a cross-entropy batch whose targets are not plain class indices (or hit
    ``ignore_index``) uses ``autograd``.
    """

    kind: ClassVar[str] = "ggn"
    methods: ClassVar[tuple[str, ...]] = GGN_METHODS
    default_method: ClassVar[str] = DEFAULT_GGN_METHOD
    fallbacks: ClassVar[dict[str, str]] = {"forward-mode": "double-vjp"}

    @property
    def output_hessian(self) -> str:
        """``cross-entropy`` (closed form) or ``autograd``: decided from ``loss_fn``."""
        return "cross-entropy" if is_plain_cross_entropy(self.loss_fn) else "autograd"

    # -- the output Hessian --------------------------------------------------------------------
    def output_curvature(self, out: torch.Tensor, y: Any) -> OutputCurvature:
        r""":math:`u \mapsto \Lambda_B u` at the batch's outputs ``out`` and targets ``y``."""
        if self.output_hessian == "cross-entropy" and self._closed_form_applies(out, y):
            return cross_entropy_output_hessian(out)
        o = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.loss_value(o, y), o, create_graph=True)
        if not g.requires_grad:  # the loss is linear in the outputs: Lambda = 0
            return torch.zeros_like

        def apply(u: torch.Tensor) -> torch.Tensor:
            (hu,) = torch.autograd.grad(g, o, grad_outputs=u, retain_graph=True, allow_unused=True)
            return torch.zeros_like(u) if hu is None else hu

        return apply

    def _closed_form_applies(self, out: torch.Tensor, y: Any) -> bool:
        """Integer class targets of the logits' shape without dimension 1, none ignored."""
        if not (isinstance(y, torch.Tensor) and out.dim() >= 2 and not y.is_floating_point()
                and not y.is_complex() and tuple(y.shape) == (out.shape[0], *out.shape[2:])):
            return False
        return not bool((y == _ignore_index(self.loss_fn)).any())

    # -- products ------------------------------------------------------------------------------
    def _batch_graphs(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...],
                                                     OutputCurvature]:
        """What a ``double-vjp`` product needs from one batch, independent of :math:`v`: the
        outputs (with their graph), the dummy :math:`u`, :math:`J^\\top u` (with its graph) and
        :math:`\\Lambda_B`."""
        with torch.enable_grad():
            out = self.outputs(x)
            u = torch.zeros_like(out, requires_grad=True)
            jtu = torch.autograd.grad(out, self.params, grad_outputs=u, create_graph=True, allow_unused=True)
        jtu = tuple(g if g is not None and g.requires_grad else None for g in jtu)
        return out, u, jtu, self.output_curvature(out, y)

    def _apply_graphs(self, graphs: tuple[Any, ...], pieces: list[torch.Tensor], acc: list[torch.Tensor],
                      weight: float) -> None:
        out, u, jtu, curvature = graphs
        pairs = [(g, vi) for g, vi in zip(jtu, pieces) if g is not None]
        if not pairs:
            return
        (jv,) = torch.autograd.grad([g for g, _ in pairs], u, grad_outputs=[vi for _, vi in pairs],
                                    retain_graph=True)
        grads = torch.autograd.grad(out, self.params, grad_outputs=curvature(jv), retain_graph=True,
                                    allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a.add_(g, alpha=weight)

    def _build_cache(self) -> bool:
        return self._build_cache_of(self._batch_graphs)

    def _product(self, pieces: list[torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        if self.method == "double-vjp" and self._cache_usable():
            if self._cache is not None or self._build_cache():
                flat, acc = self._zero_output(out)
                for graphs, weight in self._cache:
                    self._apply_graphs(graphs, pieces, acc, weight)
                return flat
            self._cache_refused = True
        flat, acc = self._zero_output(out)
        for x, y, weight in self.batches():
            if self.method == "double-vjp":
                self._apply_graphs(self._batch_graphs(x, y), pieces, acc, weight)
            else:
                self._forward_mode(x, y, pieces, acc, weight)
        return flat

    def _forward_mode(self, x: Any, y: Any, pieces: list[torch.Tensor], acc: list[torch.Tensor],
                      weight: float) -> None:
        import torch.autograd.forward_ad as fwad

        with torch.enable_grad(), fwad.dual_level():
            duals = {n: fwad.make_dual(p, t) for n, p, t in zip(self.param_names, self.params, pieces)}
            primal, jv = fwad.unpack_dual(self.functional_outputs(duals, x))
            if jv is None:  # the outputs do not depend on these parameters
                return
            hjv = self.output_curvature(primal.detach(), y)(jv.detach())
            grads = torch.autograd.grad(primal, self.params, grad_outputs=hjv, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a.add_(g, alpha=weight)


__all__ = ["DEFAULT_GGN_METHOD", "GGN_METHODS", "OUTPUT_HESSIANS", "GGNOperator", "cross_entropy_output_hessian",
           "is_plain_cross_entropy"]
