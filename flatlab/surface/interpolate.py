"""Interpolation between checkpoints: the line through two, the plane through three.

With ``w1, w2, w3`` the checkpoints' tensors (parameters *and* floating-point buffers such as
BatchNorm running statistics, so that every end point is exactly its checkpoint):

* line:  ``f(a) = L((1 - a) w1 + a w2) = L(w1 + a (w2 - w1))``, so ``f(0)`` is checkpoint 1 and
  ``f(1)`` checkpoint 2;
* plane: ``f(a, b) = L(w1 + a (w2 - w1) + b (w3 - w1))``, so ``(0, 0)``, ``(1, 0)`` and
  ``(0, 1)`` are checkpoints 1, 2 and 3.

"Same architecture" means the same base model, options, input shape and classes, and tensors of
the same names and shapes; quantized checkpoints enter with their effective (de-quantized)
weights, so an FP and a quantized checkpoint of one architecture share a line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flatlab.errors import FlatlabError
from flatlab.surface.directions import Direction
from flatlab.surface.evaluate import model_tensors

ARCH_KEYS = ("model", "model_options", "input_shape", "num_classes", "dataset", "domains", "test_envs")


def check_same_architecture(metas: Sequence[dict[str, Any]], paths: Sequence[str]) -> None:
    """Refuse checkpoints of different architectures or data (FlatlabError naming the field)."""
    first = metas[0]
    for meta, path in zip(metas[1:], paths[1:]):
        for key in ARCH_KEYS:
            a, b = first.get(key), meta.get(key)
            if _norm(a) != _norm(b):
                raise FlatlabError(
                    f"cannot interpolate {paths[0]} and {path}: different {key} ({a!r} vs {b!r}); "
                    "interpolation needs the same base model, shapes and data"
                )


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in sorted(value.items())}
    return value


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The tensors interpolation moves: parameters and floating-point buffers, on the CPU."""
    return {n: t.detach().cpu().clone() for n, t in model_tensors(model).items()}


def interpolation_directions(models: Sequence[nn.Module], paths: Sequence[str]) -> tuple[dict[str, Tensor], list[Direction]]:
    """The origin ``w1`` and the directions ``w2 - w1`` (and ``w3 - w1``).

    Raises:
        FlatlabError: the models' tensors differ in names or shapes.
    """
    states = [state_tensors(m) for m in models]
    base = states[0]
    for state, path in zip(states[1:], paths[1:]):
        if list(state) != list(base):
            only = sorted(set(state) ^ set(base))[:3]
            raise FlatlabError(f"cannot interpolate {paths[0]} and {path}: their tensors differ ({', '.join(only)}); "
                               "interpolation needs the same architecture")
        for n, t in state.items():
            if t.shape != base[n].shape:
                raise FlatlabError(f"cannot interpolate {paths[0]} and {path}: {n} has shape {tuple(t.shape)} "
                                   f"vs {tuple(base[n].shape)} (different architecture)")
    directions = [{n: (state[n].to(torch.float64) - base[n].to(torch.float64)).to(base[n].dtype) for n in base}
                  for state in states[1:]]
    return base, directions
