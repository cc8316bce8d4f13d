"""Directions in weight space for loss surfaces (Li et al. 2018, docs/measures.md section 6).

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
from flatlab.errors import ConfigError, FlatlabError

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
        raise ConfigError("ignore", f"must be one of {', '.join(IGNORES)}, got {ignore!r}")
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
                       seed: int = 0) -> tuple[list[Direction], np.ndarray, np.ndarray]:
    """The top-``k`` Hessian eigenvectors (largest algebraic eigenvalues) as unit directions.

    The Hessian ``H = sum_B |B|/N grad^2 L_B(w)`` is taken with respect to the named parameters
    of the model in eval mode (:class:`flatlab.curvature.hvp.HessianOperator`), its top
    eigenpairs found by ARPACK's Lanczos (:func:`flatlab.curvature.lanczos.lanczos_top_eigenvalues`).
    Each eigenvector has unit Euclidean norm over the named parameters; its sign is fixed so that
    its largest-magnitude entry is positive (eigenvectors are defined up to sign; this makes runs
    repeatable).

    Returns:
        (directions, eigenvalues, residuals), largest eigenvalue first.
    """
    from flatlab.curvature.hvp import HessianOperator
    from flatlab.curvature.lanczos import lanczos_top_eigenvalues

    params = parameter_tensors(model, names)
    operator = HessianOperator(model, list(batches), loss_fn=loss_fn, params=list(names))
    if operator.dim <= k:
        raise FlatlabError(f"{k} Hessian directions need more than {operator.dim} perturbed parameters")
    # ARPACK to its tight tolerance: an eigenvector's error is residual / eigengap, and surface
    # directions should not depend on a loose early stop.
    result = lanczos_top_eigenvalues(operator, k=k, seed=seed, method="arpack")
    template = {n: p.detach().cpu() for n, p in params.items()}
    directions = []
    for i in range(len(result.eigenvalues)):
        vec = np.asarray(result.eigenvectors[:, i], dtype=np.float64)
        vec = vec / np.linalg.norm(vec)
        if vec[np.argmax(np.abs(vec))] < 0:
            vec = -vec
        directions.append(unflatten_direction(vec, template))
    return directions, np.asarray(result.eigenvalues), np.asarray(result.residuals)
