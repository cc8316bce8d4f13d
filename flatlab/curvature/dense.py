r"""Dense curvature matrices in float64: the validation references for small models.

Every function differentiates a float64 copy of the model in eval mode (the caller's model is
left unchanged) under the math attention kernel (see :mod:`flatlab.curvature.operator`), with
batches weighted :math:`|B|/N`, and refuses more than :data:`MAX_DENSE_PARAMS` parameters (cost
and memory grow as :math:`n^2`):

* :func:`dense_hessian`: :math:`H = \sum_j \frac{|B_j|}{N} \nabla^2 L_{B_j}(w)`, column by
  column from Hessian-vector products of the unit vectors (``torch.func.vmap`` over chunks of
  ``jvp(grad)``), symmetrised;
* :func:`dense_ggn`: :math:`G = \sum_j \frac{|B_j|}{N} J_{B_j}^\top \Lambda_{B_j} J_{B_j}` with the
  full Jacobian :math:`J_B` of the outputs (``torch.func.jacrev``) and the full Hessian
  :math:`\Lambda_B` of the batch loss w.r.t. the outputs (``torch.func.hessian``, any loss);
* :func:`dense_empirical_fisher`: :math:`F = \frac1N \Gamma^\top \Gamma` with :math:`\Gamma` the
  ``N x n`` matrix of per-sample gradients (``vmap(grad)``).

:func:`dense_spectrum` diagonalises any of them with ``eigh``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flatlab.curvature.operator import Batch, LossFn, OutputFn, batch_size, to_device, unpack_batch
from flatlab.curvature.params import select_parameters
from flatlab.errors import FlatlabError

#: Largest parameter count for which a dense matrix is built (n^2 float64 entries).
MAX_DENSE_PARAMS = 5000


def _as_float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64) if value.is_floating_point() else value
    return torch.utils._pytree.tree_map(_as_float64, value) if isinstance(value, (tuple, list, dict)) else value


@dataclass
class _DenseSetup:
    model64: nn.Module
    names: list[str]
    shapes: dict[str, torch.Size]
    sizes: list[int]
    weights: dict[str, torch.Tensor]
    batches: list[tuple[Any, Any, float]]
    n_params: int
    device: torch.device


def _setup(model: nn.Module, data: Iterable[Batch], params: str | Sequence[str], max_params: int,
           what: str) -> _DenseSetup:
    names = [n for n, _ in select_parameters(model, params)]
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    if n_params > max_params:
        raise FlatlabError(f"the dense {what} is limited to {max_params} parameters (max_params); this model has "
                           f"{n_params} selected: use an iterative solver (lanczos_top_eigenvalues, estimate_trace) "
                           "or select fewer parameters (params)")
    device = next(model.parameters()).device
    model64 = copy.deepcopy(model).to(torch.float64).eval()
    weights = {n: p.detach() for n, p in model64.named_parameters() if n in names}
    pairs = [unpack_batch(b) for b in data]
    total = sum(batch_size(y) for _, y in pairs)
    if total == 0:
        raise FlatlabError(f"the data for the {what} are empty: pass at least one sample")
    batches = [(_as_float64(to_device(x, device)), to_device(y, device), batch_size(y) / total) for x, y in pairs]
    return _DenseSetup(model64, names, shapes, [int(np.prod(shapes[n])) for n in names], weights, batches,
                       n_params, device)


def _outputs(setup: _DenseSetup, output_fn: OutputFn | None, weights: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
    from torch.func import functional_call

    out = functional_call(setup.model64, weights, (x,))
    return out if output_fn is None else output_fn(out)


def dense_hessian(model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None,
                  params: str | Sequence[str] = "all", max_params: int = MAX_DENSE_PARAMS,
                  chunk_size: int = 64, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The exact Hessian of the data-set loss (eval mode, batches weighted |B|/N), in float64.

    Args:
        model: any module (left unchanged; a float64 copy is differentiated).
        data: ``(x, y)`` batches.
        loss_fn: mean-reduction loss (default cross-entropy).
        params: parameter choice (see :func:`~flatlab.curvature.params.select_parameters`).
        max_params: refuse larger parameter counts.
        chunk_size: Hessian columns computed per vectorised pass.
        output_fn: maps the model's output to the tensor ``loss_fn`` takes (default identity).

    Returns:
        An ``(n, n)`` float64 CPU tensor, symmetrised as :math:`(H + H^\\top)/2`.

    Raises:
        FlatlabError: more than ``max_params`` selected parameters, or empty data.
    """
    from torch.func import grad, jvp, vmap

    loss_fn = loss_fn or nn.functional.cross_entropy
    setup = _setup(model, data, params, max_params, "Hessian")
    names, shapes, sizes, n_params = setup.names, setup.shapes, setup.sizes, setup.n_params
    hessian = torch.zeros(n_params, n_params, dtype=torch.float64, device=setup.device)
    with sdpa_kernel(SDPBackend.MATH):
        for x, y, weight in setup.batches:
            def loss_of(w: dict[str, torch.Tensor], x: Any = x, y: Any = y) -> torch.Tensor:
                return loss_fn(_outputs(setup, output_fn, w, x), y)

            def column(e: torch.Tensor, loss_of: Callable[..., torch.Tensor] = loss_of) -> torch.Tensor:
                tangent = {n: c.view(shapes[n]) for n, c in zip(names, torch.split(e, sizes))}
                _, hv = jvp(grad(loss_of), (setup.weights,), (tangent,))
                return torch.cat([hv[n].reshape(-1) for n in names])

            try:
                block = vmap(column, chunk_size=chunk_size)(torch.eye(n_params, dtype=torch.float64,
                                                                      device=setup.device))
            except (RuntimeError, NotImplementedError):
                # Models torch.func cannot transform: one double-backward product per column.
                block = _columns_double_backward(setup, x, y, loss_fn, output_fn)
            hessian += block * weight
    hessian = 0.5 * (hessian + hessian.T)
    return hessian.cpu()


def _columns_double_backward(setup: _DenseSetup, x: Any, y: Any, loss_fn: LossFn,
                             output_fn: OutputFn | None) -> torch.Tensor:
    lookup = dict(setup.model64.named_parameters())
    params = [lookup[n] for n in setup.names]
    with torch.enable_grad():
        out = setup.model64(x)
        out = out if output_fn is None else output_fn(out)
        grads = torch.autograd.grad(loss_fn(out, y), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        rows = []
        for i in range(setup.n_params):
            row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([torch.zeros_like(p).reshape(-1) if r is None else r.reshape(-1)
                                   for p, r in zip(params, row)]))
    return torch.stack(rows).detach()


def dense_ggn(model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None,
              params: str | Sequence[str] = "all", max_params: int = MAX_DENSE_PARAMS,
              output_fn: OutputFn | None = None) -> torch.Tensor:
    r"""The exact generalized Gauss-Newton matrix
    :math:`G = \sum_j \frac{|B_j|}{N} J_{B_j}^\top \Lambda_{B_j} J_{B_j}` in float64 (eval mode).

    :math:`J_B` is the full Jacobian of the batch's outputs (``output_fn`` applied), flattened to
    ``(outputs, n)``; :math:`\Lambda_B` the full Hessian of ``loss_fn(outputs, y)`` w.r.t. the
    outputs (``(outputs, outputs)``; for batch-separable losses it is block diagonal, but nothing
    here assumes so). Arguments as :func:`dense_hessian`.

    Returns:
        An ``(n, n)`` float64 CPU tensor, symmetrised.
    """
    from torch.func import hessian, jacrev

    loss_fn = loss_fn or nn.functional.cross_entropy
    setup = _setup(model, data, params, max_params, "GGN")
    ggn = torch.zeros(setup.n_params, setup.n_params, dtype=torch.float64, device=setup.device)
    with sdpa_kernel(SDPBackend.MATH):
        for x, y, weight in setup.batches:
            def outputs_of(w: dict[str, torch.Tensor], x: Any = x) -> torch.Tensor:
                return _outputs(setup, output_fn, w, x)

            out = outputs_of(setup.weights).detach()
            jac = jacrev(outputs_of)(setup.weights)
            j = torch.cat([jac[n].reshape(out.numel(), -1) for n in setup.names], dim=1)
            lam = hessian(lambda o, y=y: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
            ggn += weight * (j.T @ lam @ j)
    return (0.5 * (ggn + ggn.T)).cpu()


def dense_empirical_fisher(model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None,
                           params: str | Sequence[str] = "all", max_params: int = MAX_DENSE_PARAMS,
                           output_fn: OutputFn | None = None) -> torch.Tensor:
    r"""The exact empirical Fisher :math:`F = \frac1N \sum_i g_i g_i^\top` in float64 (eval mode),
    :math:`g_i` the gradient of ``loss_fn`` on sample :math:`i` alone. Arguments as
    :func:`dense_hessian`.

    Returns:
        An ``(n, n)`` float64 CPU tensor.
    """
    from torch.func import grad, vmap

    loss_fn = loss_fn or nn.functional.cross_entropy
    setup = _setup(model, data, params, max_params, "empirical Fisher")
    total = sum(batch_size(y) for _, y, _ in setup.batches)
    fisher = torch.zeros(setup.n_params, setup.n_params, dtype=torch.float64, device=setup.device)

    def one_sample_loss(w: dict[str, torch.Tensor], xi: Any, yi: Any) -> torch.Tensor:
        x1 = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), xi)
        y1 = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), yi)
        return loss_fn(_outputs(setup, output_fn, w, x1), y1)

    with sdpa_kernel(SDPBackend.MATH):
        for x, y, _ in setup.batches:
            grads = vmap(grad(one_sample_loss), in_dims=(None, 0, 0))(setup.weights, x, y)
            gamma = torch.cat([grads[n].reshape(batch_size(y), -1) for n in setup.names], dim=1)
            fisher += gamma.T @ gamma / total
    return fisher.cpu()


DENSE_CURVATURES: dict[str, Callable[..., torch.Tensor]] = {
    "hessian": dense_hessian, "ggn": dense_ggn, "empirical-fisher": dense_empirical_fisher,
}


def dense_curvature(kind: str, model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None,
                    params: str | Sequence[str] = "all", max_params: int = MAX_DENSE_PARAMS,
                    output_fn: OutputFn | None = None) -> torch.Tensor:
    """The dense float64 matrix of curvature ``kind`` (``hessian``, ``ggn``, ``empirical-fisher``)."""
    if kind not in DENSE_CURVATURES:
        raise FlatlabError(f"kind must be one of {', '.join(DENSE_CURVATURES)}, got {kind!r}")
    return DENSE_CURVATURES[kind](model, data, loss_fn, params, max_params, output_fn=output_fn)


@dataclass
class DenseSpectrum:
    """Every eigenvalue (descending) and eigenvector (columns) of a dense curvature matrix."""

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    hessian: np.ndarray


def dense_spectrum(hessian: torch.Tensor | np.ndarray) -> DenseSpectrum:
    """``eigh`` of a symmetric matrix, eigenvalues sorted largest first."""
    h = np.asarray(hessian.numpy() if isinstance(hessian, torch.Tensor) else hessian, dtype=np.float64)
    values, vectors = np.linalg.eigh(0.5 * (h + h.T))
    order = np.argsort(values)[::-1]
    return DenseSpectrum(values[order], vectors[:, order], h)


__all__ = ["DENSE_CURVATURES", "MAX_DENSE_PARAMS", "DenseSpectrum", "dense_curvature", "dense_empirical_fisher",
           "dense_ggn", "dense_hessian", "dense_spectrum"]
