r"""The PyHessian comparator (``--solver pyhessian``): power iteration with deflation.

PyHessian (Yao et al. 2020, PyPI ``pyhessian`` 0.1) estimates the top eigenvalues by power
iteration :math:`v \leftarrow Hv / \|Hv\|` with deflation against the eigenvectors already found,
stopping when the relative change of the Rayleigh quotient falls below ``tol`` (1e-3) or after
``max_iter`` products per eigenvalue. Power iteration converges to the eigenvalue of *largest
magnitude* (a large negative eigenvalue wins over a small positive one), and with a small
eigengap it stops early, a few percent off. flatlab runs it on exactly the parameters and data of
its own Lanczos solver so the two can be compared; residuals :math:`\|Hv - \lambda v\|` are
computed afterwards with flatlab's operator (one extra product each).

PyHessian's ``density()`` calls ``torch.eig``, which current PyTorch removed, so it is not offered;
``eigenvalues()`` and ``trace()`` run unchanged on current PyTorch (checked with torch 2.x).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flatlab.curvature.hvp import HessianOperator
from flatlab.curvature.lanczos import EigenResult
from flatlab.curvature.operator import Batch, LossFn
from flatlab.curvature.trace import TraceEstimate
from flatlab.errors import FlatlabError

PYHESSIAN_DENSITY_REFUSAL = ("--density is not available with --solver pyhessian: PyHessian's density() calls "
                             "torch.eig, which current PyTorch removed; use --solver lanczos (flatlab's SLQ)")


def import_pyhessian() -> Any:
    """Import the ``pyhessian`` package or explain how to install it."""
    try:
        import pyhessian
    except ImportError:
        raise FlatlabError("the PyHessian comparator needs the pyhessian package: pip install 'flatlab[pyhessian]' "
                           "(or pip install pyhessian)") from None
    return pyhessian


@contextlib.contextmanager
def _only_these_require_grad(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """PyHessian differentiates every parameter with ``requires_grad``: restrict it, then restore."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    keep = set(names)
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None  # PyHessian leaves graph-carrying gradients behind


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PyHessian calls backward(create_graph=True), which warns about a reference cycle; flatlab
    clears the gradients afterwards (see _only_these_require_grad)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        yield


class _PyHessianRun:
    """A pyhessian ``hessian`` object on flatlab's data, with a product counter."""

    def __init__(self, model: nn.Module, data: Sequence[Batch], loss_fn: LossFn) -> None:
        import_pyhessian()
        # ``pyhessian.hessian`` is shadowed by the class of that name: take the submodule itself.
        self.module = sys.modules["pyhessian.hessian"]
        self.count = 0
        device = next(model.parameters()).device
        cuda = device.type == "cuda"
        batches = list(data)
        if len(batches) == 1:
            # One batch: pyhessian keeps the gradient graph and reuses it for every product.
            self.hessian = self.module.hessian(model, loss_fn, data=batches[0], cuda=cuda)
            inner = self.module.hessian_vector_product

            def counted(grads: Any, params: Any, v: Any) -> Any:
                self.count += 1
                return inner(grads, params, v)

            self._patch = (self.module, "hessian_vector_product", inner, counted)
        else:
            self.hessian = self.module.hessian(model, loss_fn, dataloader=batches, cuda=cuda)
            inner_loader = self.hessian.dataloader_hv_product

            def counted_loader(v: Any) -> Any:
                self.count += 1
                return inner_loader(v)

            self.hessian.dataloader_hv_product = counted_loader
            self._patch = None

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        if self._patch is None:
            yield
            return
        owner, name, inner, counted = self._patch
        setattr(owner, name, counted)
        try:
            yield
        finally:
            setattr(owner, name, inner)


def _check_comparable(operator: Any) -> None:
    """PyHessian computes Hessian products of ``loss_fn(model(x), y)`` in eval mode only."""
    if getattr(operator, "kind", "hessian") != "hessian":
        raise FlatlabError(f"PyHessian computes Hessian products only; this operator is the {operator.kind}")
    if getattr(operator, "output_fn", None) is not None or getattr(operator, "mode", "eval") != "eval":
        raise FlatlabError("PyHessian calls loss_fn(model(x), y) in eval mode: it cannot use output_fn or mode='train'")


@contextlib.contextmanager
def _pyhessian(operator: HessianOperator, seed: int) -> Iterator[_PyHessianRun]:
    """PyHessian on the operator's model, data and loss, counting its products: only the selected
    parameters require grad, the global RNG is forked and seeded, attention runs on the math kernel
    (as flatlab's operators: no fused kernel), and every module's train flag is restored after
    (PyHessian switches the model to eval)."""
    model = operator.model
    flags = [(m, m.training) for m in model.modules()]
    try:
        with _only_these_require_grad(model, operator.param_names), torch.random.fork_rng(devices=[]), _quiet(), \
                sdpa_kernel(SDPBackend.MATH):
            torch.manual_seed(seed)
            run = _PyHessianRun(model, operator.data, operator.loss_fn)
            with run.counting():
                yield run
    finally:
        for module, flag in flags:
            module.training = flag


def pyhessian_top_eigenvalues(operator: HessianOperator, k: int = 1, max_iter: int = 100, tol: float = 1e-3,
                              seed: int = 0, residuals: bool = True) -> EigenResult:
    """PyHessian's top-``k`` eigenvalues (largest in magnitude, deflated power iteration) on the
    model, data, loss and parameters of ``operator``.

    Returns:
        :class:`~flatlab.curvature.lanczos.EigenResult` in PyHessian's order (the order found);
        ``products`` counts PyHessian's products plus the residual checks.
    """
    _check_comparable(operator)
    if not 1 <= k <= operator.dim:
        raise FlatlabError(f"k = {k} is outside [1, {operator.dim}] (the number of selected parameters)")
    if operator.torch_dtype != torch.float32:
        raise FlatlabError("PyHessian works in float32 only (it draws float32 vectors): use a float32 model")
    with _pyhessian(operator, seed) as run:
        values, vectors = run.hessian.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    flat = np.column_stack([torch.cat([t.detach().reshape(-1) for t in vec]).cpu().double().numpy() for vec in vectors])
    flat /= np.linalg.norm(flat, axis=0, keepdims=True)
    values = np.asarray(values, dtype=np.float64)
    extra = 0
    res = np.full(len(values), np.nan)
    if residuals:
        for i in range(len(values)):
            res[i] = np.linalg.norm(operator.matvec(flat[:, i]) - values[i] * flat[:, i])
            extra += 1
    return EigenResult(values, flat, res, run.count + extra, converged=True)


def pyhessian_trace(operator: HessianOperator, max_iter: int = 100, tol: float = 1e-3, seed: int = 0) -> TraceEstimate:
    """PyHessian's Hutchinson trace (stops when the running mean changes by < ``tol`` relative)."""
    _check_comparable(operator)
    with _pyhessian(operator, seed) as run:
        samples = np.asarray(run.hessian.trace(maxIter=max_iter, tol=tol), dtype=np.float64)
    stderr = float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")
    return TraceEstimate(float(samples.mean()), stderr, run.count, "pyhessian-hutchinson", samples)


__all__ = ["PYHESSIAN_DENSITY_REFUSAL", "import_pyhessian", "pyhessian_top_eigenvalues", "pyhessian_trace"]
