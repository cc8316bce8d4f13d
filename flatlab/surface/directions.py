"""Directions in weight space for loss surfaces (Li et al. 2018, REFERENCE.md section 6).

A *direction* is a ``dict`` mapping parameter names to tensors of the parameters' shapes. The
surface is ``f(a, b) = L(w + a d1 + b d2)``.

Random directions are drawn ``d ~ N(0, I)`` per tensor from a generator seeded by
``(seed, direction index, parameter name)``, so a parameter's draw does not depend on which other
parameters exist (the same draw serves a checkpoint's effective and latent weights) and the raw
draws of one run can be re-normalized to another checkpoint of the same architecture.

Normalizations (``norm``), for a tensor ``w`` with more than one dimension and its draw ``d``:

* ``filter``: for every output filter ``i`` (index along dimension 0),
  ``d_i <- d_i * ||w_i|| / (||d_i|| + 1e-10)``;
* ``layer``:  ``d <- d * ||w|| / (||d|| + 1e-10)``;
* ``weight``: ``d <- d * w`` (elementwise);
* ``none``:   ``d`` unchanged.

One-dimensional tensors (biases, BatchNorm affine parameters): with ``ignore="biasbn"`` (default)
their direction is zero; with ``ignore="none"`` it is the weight itself, ``d = w``, as in Li et
al.'s reference code (``normalize_directions_for_weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from flatlab.data.base import seed_hash
from flatlab.errors import FlatlabError

Direction = dict[str, Tensor]

NORMS = ("filter", "layer", "weight", "none")
IGNORES = ("biasbn", "none")
EPS = 1e-10


def parameter_tensors(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """The model's floating-point parameters by name (all of them, or the named ones, in order)."""
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    if names is None:
        return params
    missing = [n for n in names if n not in params]
    if missing:
        raise FlatlabError(f"the model has no parameter(s) {', '.join(missing[:5])}")
    return {n: params[n] for n in names}


def random_direction(weights: dict[str, Tensor], seed: int, index: int = 0) -> Direction:
    """Raw Gaussian draws ``N(0, I)``, one tensor per weight, on the CPU in the weights' dtypes.

    Args:
        weights: name -> tensor; only the names, shapes and dtypes are used.
        seed: the user's seed.
        index: which direction (0 for x, 1 for y).
    """
    out: Direction = {}
    for name, w in weights.items():
        g = torch.Generator().manual_seed(seed_hash("surface-direction", int(seed), int(index), name))
        out[name] = torch.randn(tuple(w.shape), generator=g, dtype=w.dtype)
    return out


def filter_norms(t: Tensor) -> Tensor:
    """Euclidean norm of every output filter ``t[i]`` (dimension 0), shape ``(t.shape[0],)``."""
    return t.reshape(t.shape[0], -1).norm(dim=1)


def normalize_direction(raw: Direction, weights: dict[str, Tensor], norm: str = "filter",
                        ignore: str = "biasbn") -> Direction:
    """Scale raw draws to the weights (module docstring gives the rules). Returns new tensors.

    Raises:
        FlatlabError: unknown ``norm``/``ignore``, or ``raw`` does not match the weights' names
            and shapes.
    """
    if norm not in NORMS:
        raise FlatlabError(f"unknown normalization {norm!r}: choose one of {', '.join(NORMS)}")
    if ignore not in IGNORES:
        raise FlatlabError(f"unknown --ignore {ignore!r}: choose one of {', '.join(IGNORES)}")
    check_matches(raw, weights, "the directions")
    out: Direction = {}
    for name, w in weights.items():
        w = w.detach().cpu()
        d = raw[name].detach().cpu().to(w.dtype).clone()
        if d.dim() <= 1:
            out[name] = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
            continue
        if norm == "filter":
            scale = filter_norms(w) / (filter_norms(d) + EPS)
            d.mul_(scale.reshape((-1,) + (1,) * (d.dim() - 1)))
        elif norm == "layer":
            d.mul_(w.norm() / (d.norm() + EPS))
        elif norm == "weight":
            d.mul_(w)
        out[name] = d
    return out


def check_matches(direction: Direction, weights: dict[str, Tensor], what: str) -> None:
    """Raise a FlatlabError unless ``direction`` has exactly the weights' names and shapes."""
    missing = [n for n in weights if n not in direction]
    extra = [n for n in direction if n not in weights]
    if missing or extra:
        detail = (f"missing {', '.join(missing[:3])}" if missing else "") + \
                 (f" extra {', '.join(extra[:3])}" if extra else "")
        raise FlatlabError(f"{what} do not fit this model's parameters ({detail.strip()}): "
                           "they belong to another architecture")
    for n, w in weights.items():
        if tuple(direction[n].shape) != tuple(w.shape):
            raise FlatlabError(f"{what} do not fit this model: {n} has shape {tuple(direction[n].shape)}, "
                               f"the model's has {tuple(w.shape)} (another architecture)")


def flatten_direction(direction: Direction, names: Sequence[str]) -> np.ndarray:
    """One vector of the direction's tensors in ``names`` order (float64 if any tensor is)."""
    parts = [direction[n].detach().cpu().reshape(-1) for n in names]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    return torch.cat([p.to(dtype) for p in parts]).numpy()


def unflatten_direction(vector: np.ndarray, weights: dict[str, Tensor]) -> Direction:
    """Inverse of :func:`flatten_direction` for the given weights (names, shapes, dtypes)."""
    total = sum(w.numel() for w in weights.values())
    if vector.ndim != 1 or vector.size != total:
        raise FlatlabError(f"the stored direction has {vector.size} numbers, this model has {total} parameters "
                           "in the perturbed tensors: it belongs to another architecture")
    out: Direction = {}
    offset = 0
    flat = torch.from_numpy(np.ascontiguousarray(vector))
    for n, w in weights.items():
        out[n] = flat[offset:offset + w.numel()].reshape(w.shape).to(w.dtype).clone()
        offset += w.numel()
    return out


# ---------------------------------------------------------------------------------------------
# Hessian directions
# ---------------------------------------------------------------------------------------------

def hessian_directions(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]],
                       loss_fn: Callable[[Tensor, Tensor], Tensor], names: Sequence[str], k: int = 2,
                       seed: int = 0, tol: float = 1e-6) -> tuple[list[Direction], np.ndarray]:
    """The top-``k`` Hessian eigenvectors (largest algebraic eigenvalues) as unit directions.

    The Hessian is taken with respect to the named parameters of the model in eval mode over all
    batches, each weighted ``|B| / N``. Uses ``flatlab.curvature`` when it provides a Lanczos
    solver; otherwise Lanczos (``scipy.sparse.linalg.eigsh``, ``which="LA"``) on Hessian-vector
    products by double backward. Each eigenvector has unit Euclidean norm over all named
    parameters; its sign is fixed so that its largest-magnitude entry is positive (eigenvectors
    are defined up to sign; this makes runs repeatable).

    Returns:
        (directions, eigenvalues), largest eigenvalue first.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = parameter_tensors(model, names)
    plist = list(params.values())
    n_total = sum(int(len(y)) for _, y in batches)
    sizes = [p.numel() for p in plist]
    dim = sum(sizes)
    if k >= dim:
        raise FlatlabError(f"{k} Hessian directions need more than {dim} parameters")
    dtype = plist[0].dtype

    def hvp(v_np: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.asarray(v_np, dtype=np.float64).ravel()).to(plist[0].device)
        vs = [t.reshape(p.shape).to(p.dtype) for t, p in zip(torch.split(v, sizes), plist)]
        acc = torch.zeros(dim, dtype=torch.float64, device=plist[0].device)
        for x, y in batches:
            loss = loss_fn(model(x), y) * (len(y) / n_total)
            grads = torch.autograd.grad(loss, plist, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(grads, vs))
            hv = torch.autograd.grad(dot, plist)
            acc += torch.cat([h.reshape(-1).double() for h in hv])
        return acc.cpu().numpy()

    was_training = model.training
    model.eval()
    try:
        op = LinearOperator((dim, dim), matvec=hvp, dtype=np.float64)
        v0 = np.random.RandomState(seed_hash("hessian-directions", seed)).standard_normal(dim)
        values, vectors = eigsh(op, k=k, which="LA", v0=v0, tol=tol)
    finally:
        model.train(was_training)
    order = np.argsort(values)[::-1]
    directions = []
    for idx in order:
        vec = vectors[:, idx]
        vec = vec / np.linalg.norm(vec)
        if vec[np.argmax(np.abs(vec))] < 0:
            vec = -vec
        directions.append(unflatten_direction(vec.astype(np.float64), {n: p.detach().cpu().to(dtype)
                                                                          for n, p in params.items()}))
    return directions, values[order]
