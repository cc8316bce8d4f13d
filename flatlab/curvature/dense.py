r"""The dense Hessian in float64: the validation mode (``--solver dense``) for small models.

:math:`H = \sum_j \frac{|B_j|}{N} \nabla^2 L_{B_j}(w)` is built column by column from
Hessian-vector products of the unit vectors, vectorised with ``torch.vmap`` over chunks of columns,
on a float64 copy of the model, then symmetrised and diagonalised with ``eigh``. Cost and memory
grow as :math:`n^2`, so models above :data:`MAX_DENSE_PARAMS` parameters are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flatlab.curvature.hvp import Batch, LossFn, _batch_size
from flatlab.curvature.params import select_parameters
from flatlab.errors import FlatlabError

#: Largest parameter count for which the dense Hessian is built (n^2 float64 entries).
MAX_DENSE_PARAMS = 5000


def _as_float64(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.float64) if value.is_floating_point() else value


def dense_hessian(model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None,
                  params: str | Sequence[str] = "all", max_params: int = MAX_DENSE_PARAMS,
                  chunk_size: int = 64) -> torch.Tensor:
    """The exact Hessian of the data-set loss (eval mode, batches weighted |B|/N), in float64.

    Args:
        model: any module (left unchanged; a float64 copy is differentiated).
        data: ``(x, y)`` batches.
        loss_fn: mean-reduction loss (default cross-entropy).
        params: parameter choice (see :func:`~flatlab.curvature.params.select_parameters`).
        max_params: refuse larger parameter counts.
        chunk_size: Hessian columns computed per vectorised pass.

    Returns:
        An ``(n, n)`` float64 CPU tensor, symmetrised as :math:`(H + H^\\top)/2`.

    Raises:
        FlatlabError: more than ``max_params`` selected parameters, or empty data.
    """
    from torch.func import functional_call, grad, jvp, vmap

    loss_fn = loss_fn or nn.functional.cross_entropy
    names = [n for n, _ in select_parameters(model, params)]
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    if n_params > max_params:
        raise FlatlabError(f"the dense Hessian is limited to {max_params} parameters; this model has {n_params} "
                           "selected: use --solver lanczos (or --params weights on a smaller model)")
    device = next(model.parameters()).device
    model64 = copy.deepcopy(model).to(torch.float64).eval()
    weights = {n: p.detach() for n, p in model64.named_parameters() if n in names}
    batches = [(_as_float64(x.to(device)), y.to(device)) for x, y in data]
    total = sum(_batch_size(y) for _, y in batches)
    if total == 0:
        raise FlatlabError("the data for the Hessian are empty: pass at least one sample")
    sizes = [int(np.prod(shapes[n])) for n in names]
    hessian = torch.zeros(n_params, n_params, dtype=torch.float64, device=device)
    for x, y in batches:
        def loss_of(w: dict[str, torch.Tensor], x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            return loss_fn(functional_call(model64, w, (x,)), y)

        def column(e: torch.Tensor, loss_of=loss_of) -> torch.Tensor:
            tangent = {n: c.view(shapes[n]) for n, c in zip(names, torch.split(e, sizes))}
            _, hv = jvp(grad(loss_of), (weights,), (tangent,))
            return torch.cat([hv[n].reshape(-1) for n in names])

        try:
            block = vmap(column, chunk_size=chunk_size)(torch.eye(n_params, dtype=torch.float64, device=device))
        except (RuntimeError, NotImplementedError):
            # Models torch.func cannot transform: one double-backward product per column.
            block = _columns_double_backward(model64, names, x, y, loss_fn, n_params)
        hessian += block * (_batch_size(y) / total)
    hessian = 0.5 * (hessian + hessian.T)
    return hessian.cpu()


def _columns_double_backward(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor,
                             loss_fn: LossFn, n_params: int) -> torch.Tensor:
    lookup = dict(model.named_parameters())
    params = [lookup[n] for n in names]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        rows = []
        for i in range(n_params):
            row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([torch.zeros_like(p).reshape(-1) if r is None else r.reshape(-1)
                                   for p, r in zip(params, row)]))
    return torch.stack(rows).detach()


@dataclass
class DenseSpectrum:
    """Every eigenvalue (descending) and eigenvector (columns) of a dense Hessian."""

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    hessian: np.ndarray


def dense_spectrum(hessian: torch.Tensor | np.ndarray) -> DenseSpectrum:
    """``eigh`` of a symmetric matrix, eigenvalues sorted largest first."""
    h = np.asarray(hessian.numpy() if isinstance(hessian, torch.Tensor) else hessian, dtype=np.float64)
    values, vectors = np.linalg.eigh(0.5 * (h + h.T))
    order = np.argsort(values)[::-1]
    return DenseSpectrum(values[order], vectors[:, order], h)


__all__ = ["MAX_DENSE_PARAMS", "DenseSpectrum", "dense_hessian", "dense_spectrum"]
