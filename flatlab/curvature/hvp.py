r"""Hessian-vector products of a model's loss over a whole data set, as a linear operator.

For parameters :math:`w`, batches :math:`B_1, \dots, B_J` of a data set of :math:`N` samples and
a loss with mean reduction :math:`L_B(w)`, the loss over the whole set is

.. math::

    L(w) = \sum_j \frac{|B_j|}{N} L_{B_j}(w), \qquad
    H v = \sum_j \frac{|B_j|}{N} \nabla^2 L_{B_j}(w)\, v,

so each product is one pass over the data (one "HVP" in the counts flatlab reports). The model is
evaluated in eval mode, so BatchNorm uses its running statistics and the loss is a deterministic
function of the weights. In eval mode BatchNorm is the per-channel affine map
:math:`y = \gamma (x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta`, and products evaluate it in
exactly that form: PyTorch's generic BatchNorm double backward (written for batch statistics)
made a product cost 3x a gradient on the digits CNN, the affine form costs the same as a
multiply-add.

Two ways to compute :math:`H v` are implemented and tested against the dense Hessian:

* ``double-backward``: :math:`g = \nabla L` with ``create_graph=True``, then
  :math:`\nabla (g^\top v)` (reverse-over-reverse);
* ``forward-over-reverse``: ``torch.func.jvp(torch.func.grad(L), (w,), (v,))``.

``auto`` uses :data:`DEFAULT_METHOD` (the faster one in ``benchmarks/bench_curvature.py``) and
falls back to ``double-backward`` for models that torch.func cannot transform (custom
``autograd.Function`` without ``setup_context``, e.g. a straight-through quantizer).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from flatlab.curvature.params import select_parameters
from flatlab.errors import FlatlabError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

HVP_METHODS = ("auto", "double-backward", "forward-over-reverse")
#: The method ``auto`` picks: double backward measured faster on CPU for the digits CNN and
#: ResNet-18 (see benchmarks/README.md, "Curvature").
DEFAULT_METHOD = "double-backward"


def _batch_size(y: Any) -> int:
    if isinstance(y, torch.Tensor):
        return int(y.shape[0]) if y.dim() > 0 else 1
    return len(y)


class HessianOperator(LinearOperator):
    r"""The Hessian of a model's data-set loss w.r.t. chosen parameters, as a scipy ``LinearOperator``.

    ``op @ v`` (numpy, float64) or :meth:`hvp` (torch) computes :math:`H v` over the whole data
    with batches weighted :math:`|B|/N`. Vectors are the selected parameters flattened and
    concatenated in :attr:`param_names` order. :attr:`num_products` counts the products computed.

    Args:
        model: any ``nn.Module``; it is evaluated in eval mode (its mode is restored after each
            product).
        data: a list of ``(x, y)`` batches or any re-iterable loader of them (e.g. a DataLoader).
        loss_fn: ``loss_fn(outputs, y)`` with mean reduction (default cross-entropy).
        params: ``all``, ``weights``, ``no-bn`` or a list of parameter names
            (see :func:`flatlab.curvature.params.select_parameters`).
        method: ``auto``, ``double-backward`` or ``forward-over-reverse``.
        progress: optional callable invoked once per product (e.g. a tqdm bar's ``update``).
        graph_cache_bytes: ``double-backward`` keeps each batch's gradient graph (built once with
            ``create_graph=True``) and reuses it for every product, which saves the forward and
            first backward pass, as long as the graphs' saved tensors fit in this many bytes
            (measured while building; default: 2 GiB on CPU, half the free memory on CUDA). 0
            disables the cache. The cache follows in-place changes of the parameters (it is
            rebuilt when a parameter's version counter moves); call :meth:`clear_cache` after
            changing buffers such as BatchNorm statistics.
    """

    def __init__(self, model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None,
                 params: str | Sequence[str] = "all", method: str = "auto",
                 progress: Callable[[], Any] | None = None, graph_cache_bytes: int | None = None) -> None:
        if method not in HVP_METHODS:
            raise FlatlabError(f"unknown HVP method {method!r}: choose one of {', '.join(HVP_METHODS)}")
        self.model = model
        self.data = data
        self.loss_fn: LossFn = loss_fn or nn.functional.cross_entropy
        selected = select_parameters(model, params)
        self.param_names = [n for n, _ in selected]
        self.params = [p for _, p in selected]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.method = DEFAULT_METHOD if method == "auto" else method
        self._fallback_allowed = method == "auto"
        self.progress = progress
        self.num_products = 0
        first = self.params[0]
        self.torch_dtype = first.dtype
        self.device = first.device
        self.num_samples = self._count_samples()
        self.graph_cache_bytes = _default_cache_budget(self.device) if graph_cache_bytes is None else int(graph_cache_bytes)
        self._cache: list[tuple[tuple[torch.Tensor | None, ...], float]] | None = None
        self._cache_versions: list[int] = []
        self._cache_refused = False
        super().__init__(dtype=np.dtype(np.float64), shape=(sum(self.sizes), sum(self.sizes)))

    # -- data ------------------------------------------------------------------------------------
    def _count_samples(self) -> int:
        total = sum(_batch_size(y) for _, y in self.data)
        if total == 0:
            raise FlatlabError("the data for the Hessian are empty: pass at least one sample")
        return total

    @property
    def dim(self) -> int:
        """Number of scalar parameters (the Hessian is dim x dim)."""
        return self.shape[0]

    # -- vector helpers --------------------------------------------------------------------------
    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Cut a flat vector into tensors shaped like the selected parameters."""
        return [c.view(s) for c, s in zip(torch.split(flat, self.sizes), self.shapes)]

    @staticmethod
    def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def parameter_vector(self) -> torch.Tensor:
        """The selected parameters' current values, flattened."""
        return self.flatten([p.detach() for p in self.params])

    # -- products --------------------------------------------------------------------------------
    def hvp(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`H v` for a flat torch vector ``v`` (converted to the model's dtype and device).

        ``out``: a flat tensor of the model's dtype and device to write the product into (an
        iterative solver reuses one buffer instead of allocating a fresh vector per product).
        """
        if v.shape != (self.dim,):
            raise ValueError(f"vector of shape {tuple(v.shape)} for a Hessian of size {self.dim}")
        if out is not None and (out.shape != (self.dim,) or out.dtype != self.torch_dtype
                                or out.device != self.device):
            raise ValueError(f"out must be a flat {self.torch_dtype} tensor of size {self.dim} on {self.device}")
        v = v.to(device=self.device, dtype=self.torch_dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            try:
                with affine_eval_batchnorm(self.model):
                    result = self._product(v, out)
            except (RuntimeError, NotImplementedError) as exc:
                if not (self.method == "forward-over-reverse" and _torch_func_unsupported(exc)):
                    raise
                if not self._fallback_allowed:
                    raise FlatlabError(
                        "forward-over-reverse (torch.func) cannot differentiate this model: it uses a custom "
                        "autograd.Function without setup_context (e.g. a straight-through quantizer); "
                        "use method 'double-backward' or 'auto'") from None
                self.method = "double-backward"
                with affine_eval_batchnorm(self.model):
                    result = self._product(v, out)
        finally:
            self.model.train(was_training)
        self.num_products += 1
        if self.progress is not None:
            self.progress()
        return result

    def clear_cache(self) -> None:
        """Drop the cached gradient graphs (they are rebuilt on the next product if they fit)."""
        self._cache = None
        self._cache_refused = False

    def _build_cache(self) -> bool:
        """Build every batch's gradient graph, measuring its saved tensors; give up above budget."""
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        cache = []
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for x, y in self.data:
                with torch.enable_grad():
                    loss = self.loss_fn(self.model(x), y)
                    grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                cache.append((tuple(g if g is not None and g.requires_grad else None for g in grads),
                              _batch_size(y) / self.num_samples))
                if saved > self.graph_cache_bytes:
                    return False
        self._cache = cache
        self._cache_versions = [p._version for p in self.params]
        return True

    def _cached_product(self, pieces: list[torch.Tensor], out: torch.Tensor | None) -> torch.Tensor | None:
        if self.graph_cache_bytes <= 0 or self._cache_refused:
            return None
        if self._cache is not None and self._cache_versions != [p._version for p in self.params]:
            self._cache = None  # the weights changed in place: the graphs are stale
        if self._cache is None and not self._build_cache():
            self._cache_refused = True
            return None
        assert self._cache is not None
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

    def _zero_output(self, out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A flat zero vector (``out`` zeroed, or a new one) and its per-parameter views:
        accumulating into the views fills the flat result directly (no concatenation per product)."""
        flat = torch.zeros(self.dim, dtype=self.torch_dtype, device=self.device) if out is None else out.zero_()
        return flat, self.split(flat)

    def _product(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        pieces = self.split(v)
        if self.method == "double-backward":
            cached = self._cached_product(pieces, out)
            if cached is not None:
                return cached
        flat, acc = self._zero_output(out)
        for x, y in self.data:
            weight = _batch_size(y) / self.num_samples
            if self.method == "double-backward":
                hv = self._hvp_double_backward(x, y, pieces)
            else:
                hv = self._hvp_forward_over_reverse(x, y, pieces)
            for a, h in zip(acc, hv):
                a.add_(h, alpha=weight)
        return flat

    def _hvp_double_backward(self, x: torch.Tensor, y: torch.Tensor, v: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), y)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            pairs = [(g, vi) for g, vi in zip(grads, v) if g is not None and g.requires_grad]
            if not pairs:
                return [torch.zeros_like(p) for p in self.params]
            dot = sum((g * vi).sum() for g, vi in pairs)
            hv = torch.autograd.grad(dot, self.params, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, hv)]

    def _hvp_forward_over_reverse(self, x: torch.Tensor, y: torch.Tensor, v: list[torch.Tensor]) -> list[torch.Tensor]:
        from torch.func import functional_call, grad, jvp

        names = self.param_names
        model, loss_fn = self.model, self.loss_fn

        def loss_of(weights: dict[str, torch.Tensor]) -> torch.Tensor:
            return loss_fn(functional_call(model, weights, (x,)), y)

        primals = {n: p.detach() for n, p in zip(names, self.params)}
        tangents = dict(zip(names, v))
        _, hv = jvp(grad(loss_of), (primals,), (tangents,))
        return [hv[n] for n in names]

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(-1)))
        return self.hvp(v).detach().to(device="cpu", dtype=torch.float64).numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)  # the Hessian is symmetric

    def _adjoint(self) -> HessianOperator:
        return self

    # -- gradient (for the cost ratio HVP / gradient) ---------------------------------------------
    def gradient(self) -> torch.Tensor:
        """The full-data gradient :math:`\\nabla L(w)` (flat), with the same batch weighting."""
        was_training = self.model.training
        self.model.eval()
        try:
            acc = [torch.zeros_like(p) for p in self.params]
            for x, y in self.data:
                with torch.enable_grad():
                    loss = self.loss_fn(self.model(x), y)
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g, alpha=_batch_size(y) / self.num_samples)
        finally:
            self.model.train(was_training)
        return self.flatten(acc)

    def loss(self) -> float:
        """The full-data loss :math:`L(w)` (weights |B|/N)."""
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for x, y in self.data:
                    total += float(self.loss_fn(self.model(x), y)) * _batch_size(y) / self.num_samples
        finally:
            self.model.train(was_training)
        return total

    def restricted(self, names: Sequence[str]) -> HessianOperator:
        """The diagonal block of this Hessian for a subset of its parameters (same data, loss,
        method), e.g. one layer."""
        return HessianOperator(self.model, self.data, self.loss_fn, list(names), self.method, self.progress,
                               self.graph_cache_bytes)


def _affine_batchnorm_forward(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm as ``x * scale + shift`` (same function, cheap second derivatives)."""
    assert module.running_var is not None and module.running_mean is not None
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


@contextmanager
def affine_eval_batchnorm(model: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm of ``model`` that is in eval mode and has running
    statistics computes its output as the equivalent affine map (see the module docstring).

    Modules that use batch statistics (training mode, or ``track_running_stats=False``) and
    modules whose ``forward`` is already overridden on the instance are left alone.
    """
    patched = []
    for module in model.modules():
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training
                and module.running_mean is not None and module.running_var is not None
                and "forward" not in module.__dict__):
            module.forward = types.MethodType(_affine_batchnorm_forward, module)  # type: ignore[method-assign]
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _default_cache_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    return 2 * 1024**3


def _torch_func_unsupported(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in ("setup_context", "functorch", "torch.func", "vmap", "autograd.Function"))


def hessian_vector_product(model: nn.Module, data: Iterable[Batch], v: torch.Tensor,
                           loss_fn: LossFn | None = None, params: str | Sequence[str] = "all",
                           method: str = "auto") -> torch.Tensor:
    """:math:`H v` over the whole data for a flat vector ``v`` (see :class:`HessianOperator`)."""
    return HessianOperator(model, data, loss_fn, params, method).hvp(v)


class CountingOperator(LinearOperator):
    """Wrap any linear operator (or matrix) and count its matrix-vector products."""

    def __init__(self, operator: Any) -> None:
        from scipy.sparse.linalg import aslinearoperator

        self.inner = operator if isinstance(operator, LinearOperator) else aslinearoperator(operator)
        self.count = 0
        super().__init__(dtype=np.dtype(np.float64), shape=self.inner.shape)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        self.count += 1
        return np.asarray(self.inner.matvec(np.asarray(x, dtype=np.float64)), dtype=np.float64).reshape(-1)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)


__all__ = ["DEFAULT_METHOD", "HVP_METHODS", "CountingOperator", "HessianOperator", "hessian_vector_product"]
