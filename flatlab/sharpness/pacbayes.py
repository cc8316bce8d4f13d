"""PAC-Bayes bounds from the noise search (Jiang et al. 2019; docs/measures.md section 4, items 1-2).

With sigma the largest noise standard deviation whose expected training-accuracy drop is the
target (:func:`~flatlab.sharpness.sigma_search.sigma_search`), m the training-set size, w the
weights (no biases) and w0 the initial weights:

    PAC-Bayes-orig = ||w||^2 / (4 sigma^2) + log(m / sigma) + 10
    PAC-Bayes-init = ||w - w0||^2 / (4 sigma^2) + log(m / sigma) + 10
    inv_sigma_sq   = 1 / sigma^2          (Jiang et al.'s "flatness"; larger = sharper)

BatchNorm is folded first (into both w and w0); the noise goes on every parameter of the folded
model. Pass the de-quantized model for a quantized network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from flatlab.sharpness.bn_fold import fold_batchnorm
from flatlab.sharpness.perturb import Batch, aligned_weight_vectors, check_batches, weight_vector
from flatlab.sharpness.sigma_search import SIGMA_IS_STD_NOTE, SearchResult, sigma_search


def pacbayes_bound(norm_sq: float, sigma: float, m: int) -> float:
    """||r||^2 / (4 sigma^2) + log(m / sigma) + 10, for r = w (orig) or w - w0 (init)."""
    return norm_sq / (4.0 * sigma ** 2) + math.log(m / sigma) + 10.0


class FoldedPair:
    """A model and its initial model with BatchNorm folded, plus their weight vectors and norms."""

    def __init__(self, model: nn.Module, initial_model: nn.Module | None, fold_bn: bool = True) -> None:
        if fold_bn:
            self.model, self.fold = fold_batchnorm(model)
            self.initial, _ = fold_batchnorm(initial_model) if initial_model is not None else (None, None)
        else:
            self.model, self.fold = model.eval(), None
            self.initial = initial_model.eval() if initial_model is not None else None
        if self.initial is not None:
            self.w, self.w0 = aligned_weight_vectors(self.model, self.initial)
        else:
            self.w, self.w0 = weight_vector(self.model), None
        self.omega = int(self.w.numel())
        self.num_parameters = int(sum(p.numel() for p in self.model.parameters()))
        self.weight_norm_sq = float(self.w.pow(2).sum())
        self.dist_init_sq = float((self.w - self.w0).pow(2).sum()) if self.w0 is not None else None

    def inputs(self) -> dict[str, Any]:
        return {
            "omega": self.omega,
            "num_parameters_perturbed": self.num_parameters,
            "weight_norm_sq": self.weight_norm_sq,
            "dist_init_sq": self.dist_init_sq,
            "batchnorm_folded": self.fold.folded if self.fold else 0,
            "batchnorm_unfolded": self.fold.remaining if self.fold else None,
        }


def search_inputs(search: SearchResult) -> dict[str, Any]:
    """The search's settings and outcome, as flat attributes."""
    return {
        "target_drop": search.target_drop,
        "tolerance": search.tolerance,
        "drop_at_sigma": search.drop,
        "drop_stderr": search.drop_stderr,
        "train_accuracy": search.base_accuracy,
        "passes": search.passes,
        "steps": search.steps,
        "depth": search.depth,
        "mc_samples": search.samples,
        "sigma_max": search.radius_max,
        "converged": search.converged,
        "n_eval": search.n,
        "num_classes": search.num_classes,
    }


def pacbayes_bounds(model: nn.Module, batches: Sequence[Batch], initial_model: nn.Module | None = None, *,
                    m: int | None = None, target_drop: float = 0.1, tolerance: float = 0.01, mc_samples: int = 10,
                    depth: int = 15, sigma_max: float = 2.0, seed: int = 0, fold_bn: bool = True,
                    early_stop: bool = True) -> dict[str, Any]:
    """PAC-Bayes-orig, PAC-Bayes-init and 1/sigma^2 of a classifier on its training data.

    Args:
        model: the trained classifier (de-quantized if quantized); not modified.
        batches: the training set (or a subset of it) on the model's device.
        initial_model: the same architecture holding w0; without it ``init`` is None.
        m: training-set size in the bound (default: the number of samples in ``batches``).
        target_drop, tolerance, mc_samples, depth, sigma_max, seed, early_stop: see
            :func:`~flatlab.sharpness.sigma_search.sigma_search`.
        fold_bn: fold BatchNorm first (docs/measures.md section 4).

    Returns:
        ``sigma`` (noise standard deviation), ``orig``, ``init``, ``inv_sigma_sq`` and every
        input: ``m``, ``omega``, ``weight_norm_sq``, ``dist_init_sq``, the target drop, passes,
        converged, ... plus ``sigma_note`` saying that sigma is a standard deviation.
    """
    pair = FoldedPair(model, initial_model, fold_bn)
    n = check_batches(batches)
    m = int(m if m is not None else n)
    search = sigma_search(pair.model, batches, target_drop=target_drop, tolerance=tolerance,
                          mc_samples=mc_samples, depth=depth, sigma_max=sigma_max, seed=seed,
                          early_stop=early_stop)
    sigma = search.radius
    return {
        "sigma": sigma,
        "orig": pacbayes_bound(pair.weight_norm_sq, sigma, m),
        "init": pacbayes_bound(pair.dist_init_sq, sigma, m) if pair.dist_init_sq is not None else None,
        "inv_sigma_sq": 1.0 / sigma ** 2,
        "m": m,
        **pair.inputs(),
        **search_inputs(search),
        "seed": seed,
        "sigma_note": SIGMA_IS_STD_NOTE,
    }


__all__ = ["FoldedPair", "pacbayes_bound", "pacbayes_bounds", "search_inputs"]
