"""PAC-Bayes bounds from the noise search (Jiang et al. 2019; docs/measures.md section 4, items 1-2).

With sigma the largest noise standard deviation whose expected training-accuracy drop is the
target (:func:`~flatlab.sharpness.sigma_search.sigma_search`), m the training-set size, w the
weights (no biases) and w0 the initial weights:

    PAC-Bayes-orig = ||w||^2 / (4 sigma^2) + log(m / sigma) + 10
    PAC-Bayes-init = ||w - w0||^2 / (4 sigma^2) + log(m / sigma) + 10
    inv_sigma_sq   = 1 / sigma^2          (Jiang et al.'s "flatness"; larger = sharper)

sigma comes with a 95% interval [sigma_lo, sigma_hi] (the drop's interval inverted through the
drop curve's local slope, see ``sigma_search``); every quantity above decreases in sigma, so
its interval is the quantity at the ends swapped: 1/sigma^2 in [1/sigma_hi^2, 1/sigma_lo^2],
with the standard error its width / (2 x 1.96) (``inv_sigma_sq_stderr``, what the report shows).

BatchNorm is folded first (into both w and w0); the noise goes on every parameter of the folded
model. Pass the de-quantized model for a quantized network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from flatlab.outputs import OutputFn, model_device, prepare_batches, with_output_fn
from flatlab.sharpness.bn_fold import fold_batchnorm
from flatlab.sharpness.perturb import (
    Batch,
    aligned_weight_vectors,
    check_batches,
    num_classes_of,
    weight_vector,
)
from flatlab.sharpness.sigma_search import (
    SIGMA_IS_STD_NOTE,
    Z_CONFIDENCE,
    SearchResult,
    sigma_search,
)


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
            # As given: the searches evaluate eval-mode copies, and the caller's mode stays.
            self.model, self.fold = model, None
            self.initial = initial_model
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
    """The search's settings and outcome, as flat attributes (interval, draws, notes included)."""
    out: dict[str, Any] = {
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
        "sigma_ci_low": search.radius_ci_low,
        "sigma_ci_high": search.radius_ci_high,
        "ci_level": search.confidence,
        "ci_quantile": search.ci_quantile,
        "ci_method": search.ci_method,
        "drop_slope": search.slope,
        "slope_sigma": search.slope_radius,
        "draws_at_sigma": search.draws,
        "draw_examples": search.draw_examples,
        "max_mc_samples": search.max_samples,
        "fixed_draws": not search.adaptive,
        "capped": search.capped,
    }
    if search.note:
        out["note"] = search.note
    return out


def interval_of(sigma: float, low: float, high: float, z: float = Z_CONFIDENCE) -> dict[str, float]:
    """1/sigma^2 and its interval and standard error from sigma's interval [low, high].

    1/sigma^2 decreases in sigma: its interval is [1/high^2, 1/low^2] (infinite for low = 0);
    its standard error is the interval's width / (2 z), the normal-theory reading of a 95%
    interval (NaN when there is no interval).
    """
    inv_low = 1.0 / high ** 2 if math.isfinite(high) and high > 0 else math.nan
    inv_high = (1.0 / low ** 2 if low > 0 else math.inf) if math.isfinite(low) else math.nan
    return {"inv_sigma_sq": 1.0 / sigma ** 2, "inv_sigma_sq_ci_low": inv_low, "inv_sigma_sq_ci_high": inv_high,
            "inv_sigma_sq_stderr": (inv_high - inv_low) / (2.0 * z)}


def folded_sigma_search(model: nn.Module, batches: Sequence[Batch], initial_model: nn.Module | None, *,
                        measure: str, m: int | None, fold_bn: bool, output_fn: OutputFn | None,
                        **search_settings: Any) -> tuple[FoldedPair, int, SearchResult]:
    """The first half of the PAC-Bayes and the magnitude-aware bounds: the model (BatchNorm
    folded) with w0, the training-set size m of the bound (default: the samples in ``batches``)
    and sigma's search (``search_settings``: those of
    :func:`~flatlab.sharpness.sigma_search.sigma_search`)."""
    batches = prepare_batches(batches, model_device(model), name="batches")
    # Refuse a model without accuracy before the BatchNorm fold: sigma is defined by an accuracy drop.
    num_classes_of(with_output_fn(model, output_fn), batches, measure)
    pair = FoldedPair(model, initial_model, fold_bn)
    n = check_batches(batches)
    search = sigma_search(pair.model, batches, output_fn=output_fn, measure=measure, **search_settings)
    return pair, int(m if m is not None else n), search


def pacbayes_bounds(model: nn.Module, batches: Sequence[Batch], initial_model: nn.Module | None = None, *,
                    m: int | None = None, target_drop: float = 0.1, tolerance: float = 0.01, mc_samples: int = 10,
                    depth: int = 15, sigma_max: float = 2.0, seed: int = 0, fold_bn: bool = True,
                    early_stop: bool = True, fixed_draws: bool = False, max_samples: int = 1000,
                    draw_examples: int = 128, output_fn: OutputFn | None = None) -> dict[str, Any]:
    """PAC-Bayes-orig, PAC-Bayes-init and 1/sigma^2 of a classifier on its training data.

    Args:
        model: the trained classifier (de-quantized if quantized); not modified.
        batches: the training set (or a subset of it): (x, y) pairs, a list or a DataLoader (read
            once), moved batch by batch to the model's device.
        initial_model: the same architecture holding w0; without it ``init`` is None.
        m: training-set size in the bound (default: the number of samples in ``batches``).
        target_drop, tolerance, mc_samples, depth, sigma_max, seed, early_stop, fixed_draws,
            max_samples, draw_examples: see :func:`~flatlab.sharpness.sigma_search.sigma_search`.
        fold_bn: fold BatchNorm first (docs/measures.md section 4).
        output_fn: maps the model's output (a dict, a tuple) to its logits; default: as is.

    Raises:
        FlatlabError: as ``sigma_search``; a model without accuracy (outputs other than (B, C)
            logits with integer targets, e.g. a regression model): sigma is defined by an
            accuracy drop.

    Returns:
        ``sigma`` (noise standard deviation) with ``sigma_ci_low`` / ``sigma_ci_high`` (95%),
        ``orig``, ``init`` (with their intervals), ``inv_sigma_sq`` with its interval and
        ``inv_sigma_sq_stderr``, the drop at sigma with its standard error and draws, and every
        input: ``m``, ``omega``, ``weight_norm_sq``, ``dist_init_sq``, the target drop, passes,
        converged, ... plus ``sigma_note`` saying that sigma is a standard deviation and
        ``note`` when the cap on draws or the depth stopped the search short.
    """
    pair, m, search = folded_sigma_search(
        model, batches, initial_model, measure="pacbayes", m=m, fold_bn=fold_bn, output_fn=output_fn,
        target_drop=target_drop, tolerance=tolerance, mc_samples=mc_samples, depth=depth, sigma_max=sigma_max,
        seed=seed, early_stop=early_stop, fixed_draws=fixed_draws, max_samples=max_samples,
        draw_examples=draw_examples)
    sigma, low, high = search.radius, search.radius_ci_low, search.radius_ci_high

    def bound(norm_sq: float | None) -> dict[str, float | None]:
        if norm_sq is None:
            return {"value": None, "low": None, "high": None}
        # Decreasing in sigma: the interval's ends come from sigma's ends, swapped.
        return {"value": pacbayes_bound(norm_sq, sigma, m),
                "low": pacbayes_bound(norm_sq, high, m) if math.isfinite(high) and high > 0 else None,
                "high": pacbayes_bound(norm_sq, low, m) if math.isfinite(low) and low > 0 else None}

    orig, init = bound(pair.weight_norm_sq), bound(pair.dist_init_sq)
    return {
        "sigma": sigma,
        "orig": orig["value"],
        "orig_ci_low": orig["low"],
        "orig_ci_high": orig["high"],
        "init": init["value"],
        "init_ci_low": init["low"],
        "init_ci_high": init["high"],
        **interval_of(sigma, low, high, search.ci_quantile),
        "m": m,
        **pair.inputs(),
        **search_inputs(search),
        "seed": seed,
        "sigma_note": SIGMA_IS_STD_NOTE,
    }


__all__ = ["FoldedPair", "folded_sigma_search", "interval_of", "pacbayes_bound", "pacbayes_bounds", "search_inputs"]
