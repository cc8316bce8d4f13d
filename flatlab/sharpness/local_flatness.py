"""SWAD's local flatness (Cha et al. 2021; used by QT-DoG; docs/measures.md section 5).

    F_gamma(w) = E_{||Delta|| = gamma} [L(w + Delta)] - L(w)

with Delta uniform on the sphere of radius gamma in the space of *all* parameters (no filter
normalization, no BatchNorm folding: the model is perturbed as it is). The expectation is a
Monte Carlo mean over ``samples`` loss evaluations per radius, with its standard error.

**Sampling.** Split the loss at a direction into its even and odd parts,

    E(Delta) = (L(w + Delta) + L(w - Delta)) / 2,   O(Delta) = (L(w + Delta) - L(w - Delta)) / 2,

so L(w + Delta) = E + O and E[E O] = 0 (Delta and -Delta are equally likely). With N
evaluations, independent directions give Var = (Var E + Var O) / N; antithetic pairs
(Delta, -Delta) average to E exactly, N / 2 pairs give Var = 2 Var E / N. Pairs therefore reduce
the variance iff Var O > Var E: the odd part (to first order the gradient term g . Delta, of
variance gamma^2 ||g||^2 / n) must dominate the spread of the even part (to second order the
curvature term Delta^T H Delta / 2). At a trained model the gradient on the training data is
near zero, so on the ``source`` split the even part dominates and pairs *lose* (measured on the
demo's CNN: stderr 1.15-1.24x that of independent directions at radii 0.02-0.1 ||w||); on the
unseen ``target`` domain the gradient is large and pairs win at small radii (0.38x at 0.02,
0.76x at 0.05, 0.97x at 0.1; benchmarks/bench_local_flatness.py). Hence the default:
antithetic pairs on every split except ``source`` (``antithetic="target"`` in the measure;
here ``antithetic`` takes True, False or the names of the paired splits).

The standard error is that of the pair means (pairs) or of the single evaluations
(independent). The same directions serve every radius and every split (common random numbers:
direction k of the stream is the same everywhere, a split with pairs uses the first N / 2), so
F_gamma is a smooth curve in gamma.

Radii are absolute (QT-DoG uses 0..60 in steps of 5 for a ResNet-50) or relative to ||w||
(gamma = r ||w||, the default for small models, whose weights 60 would destroy).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flatlab.errors import FlatlabError
from flatlab.outputs import OutputFn, model_device, prepare_batches, with_output_fn
from flatlab.sharpness.perturb import Batch, LossFn, NoiseBank, check_batches, mean_loss

DEFAULT_RELATIVE_RADII = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1)


def check_radii(radii: Sequence[float], what: str = "--gammas") -> list[float]:
    """The radii as floats; FlatlabError unless non-negative, finite and strictly increasing."""
    values = [float(r) for r in radii]
    if not values:
        raise FlatlabError(f"{what} is empty: give at least one radius, e.g. 0,0.05,0.1")
    if any(not math.isfinite(r) or r < 0 for r in values):
        raise FlatlabError(f"{what} must be finite and non-negative, got {values}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise FlatlabError(f"{what} must be strictly increasing, got {values}")
    return values


def paired_splits(antithetic: bool | str | Iterable[str], names: Iterable[str]) -> set[str]:
    """The splits (of ``names``) whose directions come in antithetic pairs.

    ``True``: all; ``False``: none; a string: ``"none"``, ``"both"``/``"all"`` or one split name;
    an iterable of split names.
    """
    names = list(names)
    if antithetic is True or antithetic in ("both", "all"):
        return set(names)
    if antithetic is False or antithetic == "none":
        return set()
    chosen = {antithetic} if isinstance(antithetic, str) else set(antithetic)
    return {n for n in names if n in chosen}


def local_flatness(model: nn.Module, splits: Mapping[str, Sequence[Batch]], radii: Sequence[float], *,
                   relative: bool = True, samples: int = 100, seed: int = 0, loss_fn: LossFn = F.cross_entropy,
                   antithetic: bool | str | Iterable[str] = "target",
                   output_fn: OutputFn | None = None) -> dict[str, Any]:
    """F_gamma with Monte Carlo standard errors on each data split, for each radius.

    Args:
        model: any model; not modified (perturbed as it is: no BatchNorm folding).
        splits: name -> batches, e.g. ``{"source": ..., "target": ...}``: lists of (x, y) pairs
            or DataLoaders (read once), moved batch by batch to the model's device.
        radii: strictly increasing, non-negative; relative to ||w|| if ``relative``.
        relative: radii are fractions of ||w|| (all parameters) rather than absolute norms.
        samples: Monte Carlo evaluations per radius (SWAD: 100); on a paired split rounded up
            to an even number (samples / 2 directions, each used with both signs).
        seed: seeds the directions.
        loss_fn: mean-reduced loss, default cross-entropy; any model and loss (regression too):
            only the loss enters.
        output_fn: maps the model's output to the tensor ``loss_fn`` takes (default: as is).
        antithetic: which splits use antithetic pairs (:func:`paired_splits`; default the
            ``target`` split only, see the module docstring for why).

    Returns:
        ``gammas`` (absolute), ``radii`` (as given), ``relative``, ``weight_norm``, ``samples``
        (evaluations per radius on an unpaired split), ``num_parameters``, ``antithetic`` (the
        paired splits, sorted) and per split ``{name: {"loss": L(w), "flatness": [...],
        "stderr": [...], "n_eval", "antithetic", "evaluations"}}``.
    """
    values = check_radii(radii)
    if samples < 2:
        raise FlatlabError(f"local flatness needs at least 2 Monte Carlo samples for a standard error, got {samples}")
    device = model_device(model)
    splits = {name: prepare_batches(b, device, name="splits") for name, b in splits.items()}
    paired = paired_splits(antithetic, splits)
    work = copy.deepcopy(model).eval()
    params = [p for p in work.parameters()]
    work = with_output_fn(work, output_fn)  # perturbed through params, losses through output_fn
    base = [p.detach().clone() for p in params]
    weight_norm = math.sqrt(sum(float(b.double().pow(2).sum()) for b in base))
    gammas = [r * weight_norm for r in values] if relative else values
    bank = NoiseBank(base, samples, seed, "local-flatness")

    def unit(k: int) -> list[torch.Tensor]:
        z = bank.draw(k)
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in z))
        return [t / norm for t in z]

    results: dict[str, Any] = {}
    for name, batches in splits.items():
        check_batches(batches)
        base_loss = mean_loss(work, batches, loss_fn)
        directions = (samples + 1) // 2 if name in paired else samples
        signs = (1.0, -1.0) if name in paired else (1.0,)
        flat, stderr = [], []
        for gamma in gammas:
            if gamma == 0.0:
                flat.append(0.0)
                stderr.append(0.0)
                continue
            per_direction = []
            for k in range(directions):
                d = unit(k)
                losses = []
                for sign in signs:
                    with torch.no_grad():
                        for p, b, dk in zip(params, base, d):
                            p.copy_(b + (sign * gamma) * dk)
                    losses.append(mean_loss(work, batches, loss_fn))
                per_direction.append(sum(losses) / len(losses) - base_loss)
            arr = np.asarray(per_direction, dtype=np.float64)
            flat.append(float(arr.mean()))
            stderr.append(float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else float("nan"))
        with torch.no_grad():
            for p, b in zip(params, base):
                p.copy_(b)
        results[name] = {"loss": base_loss, "flatness": flat, "stderr": stderr, "n_eval": check_batches(batches),
                         "antithetic": name in paired, "evaluations": directions * len(signs)}
    return {
        "gammas": gammas,
        "radii": values,
        "relative": bool(relative),
        "weight_norm": weight_norm,
        "samples": int(samples),
        "antithetic": sorted(paired),
        "num_parameters": int(sum(b.numel() for b in base)),
        "seed": seed,
        "splits": results,
    }


__all__ = ["DEFAULT_RELATIVE_RADII", "check_radii", "local_flatness", "paired_splits"]
