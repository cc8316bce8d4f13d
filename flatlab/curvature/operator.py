r"""The interface every curvature operator of flatlab offers, and what they share.

A curvature operator is a symmetric ``dim x dim`` matrix :math:`A` of a model's loss over a whole
data set, available only through products :math:`A v`. For parameters :math:`w`, batches
:math:`B_1, \dots, B_J` of :math:`N` samples in all, and a loss with mean reduction
:math:`L_B(w) = \frac{1}{|B|} \sum_{i \in B} \ell_i(w)`, the data-set loss is

.. math:: L(w) = \sum_j \frac{|B_j|}{N} L_{B_j}(w) = \frac1N \sum_{i=1}^N \ell_i(w),

and flatlab offers three matrices (:data:`CURVATURES`), one name each:

* ``hessian`` (:class:`~flatlab.curvature.hvp.HessianOperator`):
  :math:`H = \nabla^2 L(w) = \sum_j \frac{|B_j|}{N} \nabla^2 L_{B_j}(w)`;
* ``ggn`` (:class:`~flatlab.curvature.ggn.GGNOperator`), the generalized Gauss-Newton matrix
  :math:`G = \sum_j \frac{|B_j|}{N} J_{B_j}^\top \Lambda_{B_j} J_{B_j}` with :math:`J_B` the
  Jacobian of the model's outputs on batch :math:`B` and :math:`\Lambda_B` the Hessian of
  :math:`L_B` with respect to those outputs;
* ``empirical-fisher`` (:class:`~flatlab.curvature.fisher.EmpiricalFisherOperator`):
  :math:`F = \frac1N \sum_i g_i g_i^\top`, :math:`g_i = \nabla \ell_i(w)`.

Every consumer (top-k Lanczos, Hutchinson/Hutch++ traces, SLQ densities, per-layer blocks) takes
any of them, because they share this interface (:class:`CurvatureOperator`): ``dim``,
``torch_dtype``, ``device``, ``num_samples``, ``num_products``, a torch product
:meth:`~CurvatureOperator.product` (``v`` -> :math:`A v`, optionally into a caller's buffer), the
scipy ``LinearOperator`` ``matvec`` (float64 numpy), :meth:`~CurvatureOperator.restricted`
(the diagonal block of a subset of the parameters, e.g. one layer),
:meth:`~CurvatureOperator.parameter_vector`, a ``progress`` callback per product, the ``method``
in use, a cache of what products can reuse, and ``notes`` on how products were computed.

What every product does, whatever the curvature:

* **Mode.** The model is put in ``mode="eval"`` (default: BatchNorm uses its running statistics,
  Dropout is off, so :math:`A` is a fixed matrix of the weights) or ``mode="train"`` (Dropout
  draws masks, BatchNorm normalizes by batch statistics; then each product sees fresh masks, i.e.
  the operator is random, unless ``dropout_seed`` re-seeds torch's generator before every
  product, which makes it the curvature of one fixed draw of masks). The training flag of every
  submodule is saved before and restored after each product; in ``mode="train"`` BatchNorm
  normalizes each batch by its own statistics without updating its running statistics, and
  every buffer is restored after each product anyway, so the caller's model is never left
  changed. Parameters are never moved or copied.
* **Data.** ``data`` is a sequence of ``(x, y)`` batches (a list is used as it is) or any other
  iterable of them, e.g. a ``torch.utils.data.DataLoader``, which is iterated **once** at
  construction and kept as a list (so a shuffling or augmenting loader gives one fixed data set,
  and a one-shot generator works). ``x`` and ``y`` may be tensors or nested tuples/lists/dicts of
  tensors; they are moved to the parameters' device inside each product (``.to(device)``), so
  they may stay on the CPU. :math:`|B|` is the length of ``y``.
* **Outputs.** ``output_fn`` maps the model's raw output to the tensor ``loss_fn`` takes (e.g.
  ``lambda out: out["logits"]`` for a model returning a dict); default identity.
* **Attention.** Products, gradients and losses run under
  ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: PyTorch's fused scaled-dot-product
  attention kernels (flash / memory-efficient, picked by default on CPU and GPU) have no double
  backward and no forward-mode derivative, so any second-order product through
  ``nn.MultiheadAttention(..., need_weights=False)`` or ``F.scaled_dot_product_attention`` fails
  with them. The math kernel computes the same function (softmax(QK^T/sqrt(d)) V) from
  differentiable primitives. It is applied always, because entering the context costs about
  10 microseconds and changes nothing for models without attention; when the model contains an
  ``nn.MultiheadAttention`` the operator says so once (a note and a :class:`CurvatureWarning`).
* **Eval-mode BatchNorm** runs as the equivalent per-channel affine map
  (:func:`affine_eval_batchnorm`), whose second derivatives are cheap.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from flatlab.curvature.params import select_parameters
from flatlab.errors import FlatlabError

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]
OutputFn = Callable[[Any], torch.Tensor]
Batch = tuple[Any, Any]

#: The curvature matrices flatlab computes, by name (see the module docstring).
CURVATURES = ("hessian", "ggn", "empirical-fisher")
#: Model modes during products: ``eval`` (deterministic) or ``train`` (Dropout on, batch statistics).
MODES = ("eval", "train")

ATTENTION_NOTE = ("products run under the math scaled-dot-product-attention kernel "
                  "(torch.nn.attention.sdpa_kernel(SDPBackend.MATH)): the fused attention kernels have no "
                  "double backward or forward-mode derivative; the function computed is the same")


class CurvatureWarning(UserWarning):
    """How a curvature operator computes its products differs from what one may assume (random
    products in train mode, the math attention kernel, a fallback method)."""


def batch_size(y: Any) -> int:
    """:math:`|B|`: the length of the targets ``y`` (a tensor's first dimension, or ``len``)."""
    if isinstance(y, torch.Tensor):
        return int(y.shape[0]) if y.dim() > 0 else 1
    return len(y)


def unpack_batch(batch: Any) -> tuple[Any, Any]:
    """``(x, y)`` from one batch (a tuple or a DataLoader's list), or a clear error."""
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise FlatlabError(f"every batch in data must be a pair (x, y); got a {type(batch).__name__}") from None
    return x, y


def to_device(tree: Any, device: torch.device) -> Any:
    """Every tensor in ``tree`` (a tensor, or nested tuples/lists/dicts of them) moved to ``device``."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def materialize_batches(data: Iterable[Any]) -> Sequence[Any]:
    """``data`` itself if it is a sequence (a list, a tuple), otherwise its batches iterated once
    into a list (a DataLoader, a generator): the operator is then one fixed matrix."""
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return data
    if isinstance(data, torch.Tensor):
        raise FlatlabError("data must be batches of (x, y) pairs, not a single tensor")
    return [tuple(unpack_batch(batch)) for batch in data]


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
    r"""Within the block, every BatchNorm of ``model`` that is in eval mode and has running
    statistics computes its output as the equivalent affine map
    :math:`y = \gamma (x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta = x\,s + t`.

    PyTorch's generic BatchNorm double backward (written for batch statistics) made a Hessian
    product cost 3x a gradient on the digits CNN; the affine form costs a multiply-add. Modules
    that use batch statistics (training mode, or ``track_running_stats=False``) and modules whose
    ``forward`` is already overridden on the instance are left alone.
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


def uses_batch_statistics(model: nn.Module, mode: str) -> bool:
    """True when some BatchNorm of ``model`` normalizes by the statistics of the batch in ``mode``
    (training mode, or ``track_running_stats=False``): samples of a batch then interact."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if mode == "train" or module.running_mean is None:
                return True
    return False


def contains_attention(model: nn.Module) -> bool:
    """True when ``model`` has an ``nn.MultiheadAttention`` (which calls scaled-dot-product attention)."""
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def default_cache_budget(device: torch.device) -> int:
    """Bytes a cache may take by default: 2 GiB on CPU, half the free memory on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    return 2 * 1024**3


def torch_func_unsupported(exc: BaseException) -> bool:
    """True for the errors torch.func / forward-mode AD raise on what they cannot transform (a
    custom ``autograd.Function`` without ``setup_context`` or ``jvp``, an op without a forward
    derivative)."""
    text = str(exc)
    return any(s in text for s in ("setup_context", "functorch", "torch.func", "vmap", "autograd.Function",
                                   "forward AD", "jvp", "forward-mode"))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _outside_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller of this function) of the first
    frame outside this package and scipy: where the user called flatlab."""
    frame = sys._getframe(2)  # the frame that called the function calling warn
    level = 2
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or f"{os.sep}scipy{os.sep}" in frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


class CurvatureOperator(LinearOperator):
    r"""A curvature matrix of a model's data-set loss (see the module docstring), as a scipy
    ``LinearOperator`` and as a torch product.

    ``op @ v`` (numpy, float64) or :meth:`product` (torch, in the parameters' dtype and device)
    computes :math:`A v` over the whole data. Vectors are the selected parameters flattened and
    concatenated in :attr:`param_names` order; :attr:`num_products` counts the products.

    Args:
        model: any ``nn.Module``; its training flags, buffers and parameters are left as found.
        data: ``(x, y)`` batches: a sequence, or an iterable (DataLoader) read once.
        loss_fn: ``loss_fn(outputs, y)``, a scalar with mean reduction over the batch (default
            cross-entropy).
        params: ``all``, ``weights``, ``no-bn`` or a list of parameter names
            (see :func:`flatlab.curvature.params.select_parameters`).
        method: how products are computed (``auto`` or one of the subclass's :attr:`methods`).
        mode: ``eval`` (default) or ``train`` (see the module docstring).
        output_fn: maps the model's output to the tensor ``loss_fn`` takes (default identity).
        progress: called once per product (e.g. a tqdm bar's ``update``).
        cache_bytes: most memory the subclass's cache may take (default
            :func:`default_cache_budget`); 0 disables it. The cache follows in-place changes of
            the parameters (rebuilt when a version counter moves); call :meth:`clear_cache` after
            changing buffers such as BatchNorm statistics. In ``mode="train"`` without
            ``dropout_seed`` nothing is cached (each product must see fresh masks).
        dropout_seed: ``mode="train"`` only: re-seed torch's generator with it before every
            product, so every product sees the same Dropout masks (a fixed operator).
    """

    kind: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ("auto",)
    default_method: ClassVar[str] = ""
    #: method -> the method ``auto`` falls back to when torch.func cannot transform the model.
    fallbacks: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None,
                 params: str | Sequence[str] = "all", *, method: str = "auto", mode: str = "eval",
                 output_fn: OutputFn | None = None, progress: Callable[[], Any] | None = None,
                 cache_bytes: int | None = None, dropout_seed: int | None = None,
                 notes: Sequence[str] | None = None) -> None:
        if method not in self.methods:
            raise FlatlabError(f"unknown {self.kind} method {method!r}: method must be one of {', '.join(self.methods)}")
        if mode not in MODES:
            raise FlatlabError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if cache_bytes is not None and cache_bytes < 0:
            raise FlatlabError(f"cache_bytes must be >= 0 (0 disables the cache), got {cache_bytes}")
        if dropout_seed is not None and mode != "train":
            raise FlatlabError("dropout_seed applies to mode='train' only (in eval mode Dropout is off)")
        if output_fn is not None and not callable(output_fn):
            raise FlatlabError(f"output_fn must be callable (model output -> tensor), got {type(output_fn).__name__}")
        self.model = model
        self.data = materialize_batches(data)
        self.loss_fn: LossFn = loss_fn or nn.functional.cross_entropy
        self.output_fn = output_fn
        selected = select_parameters(model, params)
        self.param_names = [n for n, _ in selected]
        self.params = [p for _, p in selected]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        first = self.params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in self.params):
            raise FlatlabError("the selected parameters must share one dtype and one device; found "
                               f"{sorted({f'{p.dtype} on {p.device}' for p in self.params})}")
        self.torch_dtype = first.dtype
        self.device = first.device
        self.method = self.default_method if method == "auto" else method
        self._fallback_allowed = method == "auto"
        self._requested_method = method
        self.mode = mode
        self.dropout_seed = dropout_seed
        self.progress = progress
        self.num_products = 0
        self.num_samples = self._count_samples()
        self.cache_bytes = default_cache_budget(self.device) if cache_bytes is None else int(cache_bytes)
        self._cache_setting = cache_bytes
        self._cache: Any = None
        self._cache_versions: list[int] = []
        self._cache_refused = False
        self.notes: list[str] = []
        if notes is not None:  # a restricted copy: the parent already said it
            self.notes.extend(notes)
        else:
            if contains_attention(model):
                self._note(ATTENTION_NOTE)
            if mode == "train":
                seeded = (f"dropout_seed={dropout_seed} re-seeds torch's generator before every product, so the "
                          "operator is the curvature for one fixed draw of Dropout masks"
                          if dropout_seed is not None else
                          "Dropout draws new masks at every product, so products are random while Lanczos, SLQ and "
                          "Hutch++ assume one fixed operator (pass dropout_seed for a fixed draw)")
                self._note(f"mode='train': {seeded}; BatchNorm normalizes by batch statistics (buffers are restored "
                           "after every product)")
        super().__init__(dtype=np.dtype(np.float64), shape=(sum(self.sizes), sum(self.sizes)))

    # -- bookkeeping -----------------------------------------------------------------------------
    def _note(self, text: str) -> None:
        """Record how products are computed, and warn about it once (per operator), pointing the
        warning at the first caller outside flatlab.curvature (and scipy's LinearOperator)."""
        if text not in self.notes:
            self.notes.append(text)
            warnings.warn(f"{self.kind}: {text}", CurvatureWarning, stacklevel=_outside_stacklevel())

    def _count_samples(self) -> int:
        total = sum(batch_size(unpack_batch(batch)[1]) for batch in self.data)
        if total == 0:
            raise FlatlabError(f"the data for the {self.kind} are empty: pass at least one sample")
        return total

    @property
    def dim(self) -> int:
        """Number of scalar parameters (the operator is dim x dim)."""
        return self.shape[0]

    def options(self) -> dict[str, Any]:
        """The keyword settings this operator was built with (``restricted`` copies reuse them)."""
        return {"method": self._requested_method if self._fallback_allowed else self.method, "mode": self.mode,
                "output_fn": self.output_fn, "progress": self.progress, "cache_bytes": self._cache_setting,
                "dropout_seed": self.dropout_seed}

    def restricted(self, names: Sequence[str]) -> CurvatureOperator:
        r"""The diagonal block :math:`A_{SS}` of this operator for a subset :math:`S` of its
        parameters (same data, loss, settings), e.g. one layer's block for per-layer curvature."""
        unknown = [n for n in names if n not in self.param_names]
        if unknown:
            raise FlatlabError(f"names must be parameters of this operator; {unknown[0]!r} is not one")
        return type(self)(self.model, self.data, self.loss_fn, list(names), notes=self.notes, **self.options())

    # -- vector helpers --------------------------------------------------------------------------
    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Cut a flat vector into tensors shaped like the selected parameters (views)."""
        return [c.view(s) for c, s in zip(torch.split(flat, self.sizes), self.shapes)]

    @staticmethod
    def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def parameter_vector(self) -> torch.Tensor:
        """The selected parameters' current values, flattened."""
        return self.flatten([p.detach() for p in self.params])

    def _zero_output(self, out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A flat zero vector (``out`` zeroed, or a new one) and its per-parameter views:
        accumulating into the views fills the flat result directly (no concatenation per product)."""
        flat = torch.zeros(self.dim, dtype=self.torch_dtype, device=self.device) if out is None else out.zero_()
        return flat, self.split(flat)

    # -- evaluation context ----------------------------------------------------------------------
    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """The model as products see it: in :attr:`mode`, eval BatchNorm as an affine map, the math
        attention kernel, seeded Dropout if asked; every training flag (and, in train mode, every
        buffer) restored on exit."""
        flags = [(m, m.training) for m in self.model.modules()]
        train = self.mode == "train"
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()] if train else []
        # Training-mode BatchNorm with track_running_stats=False computes the same batch-statistics
        # function without updating its buffers in place (which torch.func transforms refuse).
        tracking = [m for m in self.model.modules()
                    if train and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        devices = [self.device] if self.device.type == "cuda" else []
        seeded = torch.random.fork_rng(devices=devices) if self.dropout_seed is not None else nullcontext()
        try:
            self.model.train(train)
            for module in tracking:
                module.track_running_stats = False
            with sdpa_kernel(SDPBackend.MATH), affine_eval_batchnorm(self.model), seeded:
                if self.dropout_seed is not None:
                    torch.manual_seed(self.dropout_seed)
                yield
        finally:
            for module in tracking:
                module.track_running_stats = True
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for module, flag in flags:
                module.training = flag

    def batches(self) -> Iterator[tuple[Any, Any, float]]:
        """``(x, y, |B|/N)`` for every batch, ``x`` and ``y`` on the parameters' device."""
        for batch in self.data:
            x, y = unpack_batch(batch)
            yield to_device(x, self.device), to_device(y, self.device), batch_size(y) / self.num_samples

    def outputs(self, x: Any, model: Callable[[Any], Any] | None = None) -> torch.Tensor:
        """``output_fn(model(x))``, checked to be a tensor."""
        raw = (model or self.model)(x)
        out = raw if self.output_fn is None else self.output_fn(raw)
        if not isinstance(out, torch.Tensor):
            raise FlatlabError(f"the model's output{' after output_fn' if self.output_fn else ''} is a "
                               f"{type(out).__name__}, not a tensor: pass output_fn, which maps the model's output to "
                               "the tensor loss_fn takes (e.g. output_fn=lambda out: out['logits'])")
        return out

    def loss_value(self, out: torch.Tensor, y: Any) -> torch.Tensor:
        """``loss_fn(out, y)``, checked to be a scalar (a mean-reduction loss)."""
        loss = self.loss_fn(out, y)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise FlatlabError(f"loss_fn must return a scalar (the batch mean), got {shape}: use reduction='mean'")
        return loss

    def functional_outputs(self, weights: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
        """:meth:`outputs` with the selected parameters replaced by ``weights`` (torch.func)."""
        from torch.func import functional_call

        return self.outputs(x, lambda inputs: functional_call(self.model, weights, (inputs,)))

    # -- cache -----------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Drop what products cached (it is rebuilt on the next product if it fits)."""
        self._cache = None
        self._cache_refused = False

    def _cache_usable(self) -> bool:
        """Caching is on, the cache was not refused for size, and products are deterministic."""
        if self.cache_bytes <= 0 or self._cache_refused:
            return False
        if self.mode == "train" and self.dropout_seed is None:
            return False
        if self._cache is not None and self._cache_versions != [p._version for p in self.params]:
            self._cache = None  # the weights changed in place: the cache is stale
        return True

    def _stamp_cache(self, cache: Any) -> None:
        self._cache = cache
        self._cache_versions = [p._version for p in self.params]

    def _build_cache_of(self, graphs_of: Callable[[Any, Any], Any]) -> bool:
        """Cache ``graphs_of(x, y)`` (a batch's differentiable graph) for every batch, counting the
        bytes autograd saves for them; give up, caching nothing, once they exceed ``cache_bytes``."""
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        cache = []
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for x, y, weight in self.batches():
                cache.append((graphs_of(x, y), weight))
                if saved > self.cache_bytes:
                    return False
        self._stamp_cache(cache)
        return True

    # -- products --------------------------------------------------------------------------------
    def product(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`A v` for a flat torch vector ``v`` (converted to the parameters' dtype and device).

        ``out``: a flat tensor of the parameters' dtype and device to write the product into (an
        iterative solver reuses one buffer instead of allocating a fresh vector per product).
        """
        if v.shape != (self.dim,):
            raise ValueError(f"v has shape {tuple(v.shape)}; this {self.kind} needs a flat vector of size {self.dim}")
        if out is not None and (out.shape != (self.dim,) or out.dtype != self.torch_dtype
                                or out.device != self.device):
            raise ValueError(f"out must be a flat {self.torch_dtype} tensor of size {self.dim} on {self.device}")
        v = v.to(device=self.device, dtype=self.torch_dtype)
        pieces = self.split(v)
        with self.evaluation():
            result = self._with_fallback(lambda: self._product(pieces, out))
        self.num_products += 1
        if self.progress is not None:
            self.progress()
        return result

    def hvp(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Same as :meth:`product` (the name Hessian-vector-product callers use)."""
        return self.product(v, out)

    def _with_fallback(self, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except (RuntimeError, NotImplementedError) as exc:
            fallback = self.fallbacks.get(self.method)
            if fallback is None or not torch_func_unsupported(exc):
                raise
            if not self._fallback_allowed:
                raise FlatlabError(
                    f"method {self.method!r} (torch.func / forward-mode AD) cannot differentiate this model: it uses a "
                    "custom autograd.Function without setup_context or jvp (e.g. a straight-through quantizer) or an "
                    f"op without a forward derivative; use method {fallback!r} or 'auto'") from None
            self._note(f"method {self.method!r} cannot differentiate this model (torch.func / forward-mode AD); "
                       f"products use {fallback!r}")
            self.method = fallback
            return run()

    def _product(self, pieces: list[torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(-1)))
        return self.product(v).detach().to(device="cpu", dtype=torch.float64).numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)  # every curvature here is symmetric

    def _adjoint(self) -> CurvatureOperator:
        return self

    # -- loss and gradient (same weighting; for the cost ratio product / gradient) ----------------
    def gradient(self) -> torch.Tensor:
        r"""The full-data gradient :math:`\nabla L(w) = \sum_j \frac{|B_j|}{N} \nabla L_{B_j}(w)` (flat)."""
        acc = [torch.zeros_like(p) for p in self.params]
        with self.evaluation():
            for x, y, weight in self.batches():
                with torch.enable_grad():
                    loss = self.loss_value(self.outputs(x), y)
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g, alpha=weight)
        return self.flatten(acc)

    def loss(self) -> float:
        r"""The full-data loss :math:`L(w) = \sum_j \frac{|B_j|}{N} L_{B_j}(w)`."""
        total = 0.0
        with self.evaluation(), torch.no_grad():
            for x, y, weight in self.batches():
                total += float(self.loss_value(self.outputs(x), y)) * weight
        return total


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


def torch_product(counted: CountingOperator) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], torch.dtype,
                                                       torch.device]:
    """A counted product ``apply(v, out)`` (writes :math:`A v` into ``out``) for iterative solvers,
    in the operator's own dtype and device.

    A :class:`CurvatureOperator` in float32/float64 is applied directly, into the caller's buffer
    (no float64 numpy round trip, no fresh vector per product); anything else goes through its
    numpy ``matvec`` in float64 on the CPU (a half-precision model: a float32 basis on its device).
    """
    inner = counted.inner
    if isinstance(inner, CurvatureOperator) and inner.torch_dtype in (torch.float32, torch.float64):

        def apply(v: torch.Tensor, out: torch.Tensor) -> None:
            counted.count += 1
            inner.product(v, out=out)

        return apply, inner.torch_dtype, inner.device

    def apply_numpy(v: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(torch.from_numpy(counted.matvec(v.double().cpu().numpy())))

    if isinstance(inner, CurvatureOperator):
        return apply_numpy, torch.float32, inner.device
    return apply_numpy, torch.float64, torch.device("cpu")


#: Entries drawn per call to the generator in :func:`rademacher` (bounds its temporary memory).
RADEMACHER_CHUNK = 1 << 20


def rademacher(rng: np.random.Generator, count: int, n: int, dtype: torch.dtype,
               device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` Rademacher vectors (entries +-1 with probability 1/2) of length ``n``, as rows.

    Row ``j`` holds column ``j`` of ``2 rng.integers(0, 2, size=(n, count)) - 1``: the very
    numbers flatlab's numpy estimators drew, so seeded estimates stay what they were. They are
    drawn on the CPU whatever the device (the same seed gives the same probes on every device), in
    chunks of :data:`RADEMACHER_CHUNK` rows (numpy's stream does not depend on the chunking), and
    converted once into ``out`` (a ``(count, n)`` tensor, or a new one). Drawing one random bit per
    entry instead would cost a fifth of the time (0.011 s against 0.05 s per 11M entries, a tenth
    of a ResNet-18 product) but change every seeded estimate by its sampling error.
    """
    out = torch.empty((count, n), dtype=dtype, device=device) if out is None else out
    for start in range(0, n, RADEMACHER_CHUNK):
        stop = min(n, start + RADEMACHER_CHUNK)
        draws = torch.from_numpy(rng.integers(0, 2, size=(stop - start, count)).astype(np.int8))
        out[:, start:stop].copy_(draws.T.mul_(2).sub_(1))
    return out


#: Entries per partial dot product in :func:`dot64`.
DOT_CHUNK = 1 << 16


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """:math:`a^\\top b` of two flat vectors, as partial dots of :data:`DOT_CHUNK` entries (BLAS, in
    the vectors' dtype) summed in float64.

    One float32 dot over 11M entries had a relative error of 3e-6; ``sum(a * b, dtype=float64)``
    is exact to 3e-8 but cost 0.15 s (a third of a ResNet-18 product); the chunks reach 9e-8 in
    0.007 s. On other devices (where each partial would be a host sync) the products are summed in
    float64 in one reduction.
    """
    if a.device.type != "cpu":
        return float(torch.sum(a * b, dtype=torch.float64))
    return sum(float(torch.dot(x, y)) for x, y in zip(torch.split(a, DOT_CHUNK), torch.split(b, DOT_CHUNK)))


__all__ = ["ATTENTION_NOTE", "CURVATURES", "MODES", "Batch", "CountingOperator", "CurvatureOperator",
           "CurvatureWarning", "LossFn", "OutputFn", "affine_eval_batchnorm", "batch_size", "contains_attention",
           "DOT_CHUNK", "RADEMACHER_CHUNK", "default_cache_budget", "dot64", "materialize_batches", "rademacher", "to_device", "torch_func_unsupported",
           "torch_product", "unpack_batch", "uses_batch_statistics"]
