"""Magnitude-aware PAC-Bayes bounds (Jiang et al. 2019; docs/measures.md section 4, item 3).

Each parameter gets its own noise, u_i ~ N(0, sigma'^2 w_i^2 + eps^2) with eps = 1e-3, so the
search finds sigma' (a relative noise level, unchanged when a layer is rescaled). With r = w
(orig) or r = w - w0 (init), omega weights and m training samples:

    bound = 1/4 sum_i log( (eps^2 + (sigma'^2 + 1) ||r||^2 / omega) / (eps^2 + sigma'^2 (w_i - w0_i)^2) )
            + log(m / sigma') + 10
    inv_sigma_sq = 1 / sigma'^2

The sum runs over the weights (no biases); the denominator uses w - w0 for both bounds, as the
formula is given. BatchNorm is folded first.

sigma' comes with a 95% interval from the same adaptive search as sigma (``sigma_search``) and
1/sigma'^2 with the interval [1/sigma'_hi^2, 1/sigma'_lo^2] and a standard error. The search draws
its noise from its own stream (``magnitude-search``), independent of the plain search's, so the
Monte Carlo errors of sigma and sigma' do not move together. The bounds are reported without an
interval: they are not monotone in sigma' in general.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from flatlab.outputs import OutputFn
from flatlab.sharpness.pacbayes import folded_sigma_search, interval_of, search_inputs
from flatlab.sharpness.perturb import Batch
from flatlab.sharpness.sigma_search import SIGMA_IS_STD_NOTE

MAGNITUDE_EPS = 1e-3


def magnitude_bound(reference: Tensor, w: Tensor, w0: Tensor, sigma: float, m: int, eps: float = MAGNITUDE_EPS) -> float:
    """The magnitude-aware bound for reference vector ``reference`` (w or w - w0)."""
    omega = reference.numel()
    numerator = eps ** 2 + (sigma ** 2 + 1.0) * float(reference.pow(2).sum()) / omega
    denominator = eps ** 2 + sigma ** 2 * (w - w0).pow(2)
    return 0.25 * float((numerator / denominator).log().sum()) + math.log(m / sigma) + 10.0


def magnitude_bounds(model: nn.Module, batches: Sequence[Batch], initial_model: nn.Module | None = None, *,
                     m: int | None = None, eps: float = MAGNITUDE_EPS, target_drop: float = 0.1,
                     tolerance: float = 0.01, mc_samples: int = 10, depth: int = 15, sigma_max: float = 2.0,
                     seed: int = 0, fold_bn: bool = True, early_stop: bool = True, fixed_draws: bool = False,
                     max_samples: int = 1000, draw_examples: int = 128,
                     output_fn: OutputFn | None = None) -> dict[str, Any]:
    """sigma', the magnitude-aware orig/init bounds and 1/sigma'^2.

    Both bounds need w0 (their denominator holds w - w0): without ``initial_model`` they are None
    and only sigma' and 1/sigma'^2 are reported. ``batches``, ``output_fn`` and the refusal of a
    model without accuracy: as :func:`~flatlab.sharpness.pacbayes.pacbayes_bounds`.

    Returns:
        ``sigma`` (= sigma', relative noise standard deviation) with ``sigma_ci_low`` /
        ``sigma_ci_high``, ``orig``, ``init``, ``inv_sigma_sq`` with its interval and standard
        error, ``epsilon`` and every input (m, omega, norms, target, passes, draws, ...).
    """
    pair, m, search = folded_sigma_search(
        model, batches, initial_model, measure="magnitude", m=m, fold_bn=fold_bn, output_fn=output_fn,
        target_drop=target_drop, tolerance=tolerance, mc_samples=mc_samples, depth=depth, sigma_max=sigma_max,
        seed=seed, magnitude_eps=eps, early_stop=early_stop, fixed_draws=fixed_draws, max_samples=max_samples,
        draw_examples=draw_examples)
    sigma = search.radius
    orig = init = None
    if pair.w0 is not None:
        orig = magnitude_bound(pair.w, pair.w, pair.w0, sigma, m, eps)
        init = magnitude_bound(pair.w - pair.w0, pair.w, pair.w0, sigma, m, eps)
    return {
        "sigma": sigma,
        "orig": orig,
        "init": init,
        **interval_of(sigma, search.radius_ci_low, search.radius_ci_high, search.ci_quantile),
        "epsilon": eps,
        "m": m,
        **pair.inputs(),
        **search_inputs(search),
        "seed": seed,
        "sigma_note": SIGMA_IS_STD_NOTE + "; magnitude-aware noise: u_i ~ N(0, sigma^2 w_i^2 + epsilon^2)",
    }


__all__ = ["MAGNITUDE_EPS", "magnitude_bound", "magnitude_bounds"]
