r"""Jiang et al.'s (2019) sharpness measures and bounds: PAC-Bayes, magnitude-aware, worst case.

All three use the training set (``source``, size :math:`m`), the BatchNorm-folded, de-quantized
model, norms over weights only (no biases) and accuracies on the training set
(:mod:`flatlab.sharpness`; REFERENCE section 4 restated in ``docs/measures.md``).

* ``pacbayes``: :math:`\sigma` = the largest Gaussian noise standard deviation whose mean
  training-accuracy drop is the target drop, found by the adaptive search of
  :func:`flatlab.sharpness.sigma_search` (noise draws are added near the answer until the drop's
  standard error is at most ``drop_tolerance / 2``, at most ``max_mc_samples`` draws per probe,
  each draw on ``draw_examples`` training examples), with a 95% interval
  ``[sigma_ci_low, sigma_ci_high]`` (the drop's interval inverted through the drop curve's
  local slope: the delta method); PAC-Bayes-orig :math:`\|w\|^2/(4\sigma^2) + \log(m/\sigma) +
  10`, -init with :math:`\|w - w_0\|^2`, and :math:`1/\sigma^2` (Jiang et al.'s "flatness";
  column ``pacbayes_inv_sigma_sq``, read with its standard error ``inv_sigma_sq_stderr`` = the
  width of its interval :math:`[1/\sigma_{hi}^2, 1/\sigma_{lo}^2]` over :math:`2 \times 1.96`).
* ``magnitude``: the same search with per-weight noise variance :math:`\sigma'^2 w_i^2 +
  \epsilon^2`, on its own noise stream (independent of ``pacbayes``'s); its orig/init bounds and
  :math:`1/\sigma'^2` with interval and standard error (column ``magnitude_inv_sigma_sq``).
* ``worst_case``: :math:`\alpha'` = the largest box half-width whose worst-case (projected
  gradient ascent) training-accuracy drop stays at the target, plain and magnitude-aware, its
  bound :math:`\|w\|^2\log(2\omega)/(4\alpha'^2) + \log(m/\alpha') + 10`, :math:`1/\alpha'^2`,
  and Keskar's :math:`\epsilon`-sharpness :math:`\max_{|\delta| \le \epsilon(|w|+1)}
  (L(w+\delta) - L(w))/(1 + L(w)) \times 100`. No Monte Carlo enters: the ascent starts at
  :math:`u = 0` and every drop is evaluated over all the data, so :math:`\alpha'` is a
  deterministic function of model, data and settings and is read without a standard error
  (its uncertainty is the bisection's resolution and the ascent's shortfall from the true
  maximum, neither of them statistical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flatlab.measures.base import Cost, Family, Measure, MeasureResult
from flatlab.measures.columns import Column, attr_estimates, group_node
from flatlab.measures.config import ConfigError, MeasureConfig, setting
from flatlab.measures.context import MeasureContext

FAMILY = Family("bounds", "sharpness bounds (Jiang et al. 2019)", request="list", nest=True,
                description="PAC-Bayes, magnitude-aware and worst-case sharpness with their bounds")


@dataclass(frozen=True, kw_only=True)
class _SearchConfig(MeasureConfig):
    """The bisection every bound shares."""

    target_drop: float = setting(0.1, "training-accuracy drop that defines sigma and alpha' (default 0.1)",
                                 shared=True)
    drop_tolerance: float = setting(0.01, "the band |drop - target| < this around the target; the noise searches "
                                          "also add draws until the drop's standard error is at most this / 2 "
                                          "(default 0.01)", shared=True)
    bisection_depth: int = setting(15, "maximum bisection steps (default 15)", minimum=1, shared=True)
    sigma_max: float = setting(2.0, "initial bracket [0, sigma_max] for sigma and alpha' (default 2)",
                               minimum=0.0, exclusive_minimum=True, shared=True)

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.target_drop < 1.0:
            raise ConfigError("target_drop", f"must lie in (0, 1), got {self.target_drop:g}")
        if not 0.0 < self.drop_tolerance < self.target_drop:
            raise ConfigError("drop_tolerance", f"must lie in (0, target_drop = {self.target_drop:g}), "
                                                f"got {self.drop_tolerance:g}")

    def search(self) -> dict[str, Any]:
        return {"target_drop": self.target_drop, "tolerance": self.drop_tolerance, "depth": self.bisection_depth}


@dataclass(frozen=True, kw_only=True)
class PacBayesConfig(_SearchConfig):
    """PAC-Bayes orig/init bounds and 1/sigma^2 from the noise search."""

    measure = "pacbayes"
    mc_samples: int = setting(10, "noise draws a sigma probe takes before its first decision (default 10, at least "
                                  "10 unless --fixed-draws; with --fixed-draws the draws of every probe)",
                              minimum=1, shared=True)
    max_mc_samples: int = setting(1000, "cap on the noise draws of one sigma probe: the search adds draws near the "
                                        "answer until the drop's standard error is at most drop_tolerance / 2 "
                                        "(default 1000; a note says when the cap stops it)", minimum=1, shared=True)
    draw_examples: int = setting(128, "training examples each noise draw is evaluated on, a seeded slice of the "
                                      "data (default 128; 0: all of them, one full pass per draw)", minimum=0,
                                 shared=True)
    fixed_draws: bool = setting(False, "the non-adaptive search of flatlab 0.2: mc_samples draws per probe, each "
                                       "over all the data; its drop's standard error is not controlled",
                                shared=True)

    def validate(self) -> None:
        super().validate()
        least = max(self.mc_samples, 10)
        if not self.fixed_draws and self.max_mc_samples < least:
            raise ConfigError("max_mc_samples", f"must be at least max(mc_samples, 10) = {least}, "
                                                f"got {self.max_mc_samples}")

    def noise(self) -> dict[str, Any]:
        """The noise search's own keyword arguments."""
        return {"mc_samples": self.mc_samples, "max_samples": self.max_mc_samples,
                "draw_examples": self.draw_examples, "fixed_draws": self.fixed_draws}


@dataclass(frozen=True, kw_only=True)
class MagnitudeConfig(PacBayesConfig):
    """Magnitude-aware sigma', its orig/init bounds and 1/sigma'^2."""

    measure = "magnitude"


@dataclass(frozen=True, kw_only=True)
class WorstCaseConfig(_SearchConfig):
    """Worst-case alpha' (plain and magnitude-aware), bounds, 1/alpha'^2, Keskar's sharpness."""

    measure = "worst_case"
    ascent_steps: int = setting(20, "projected gradient-ascent steps inside the worst-case searches and for "
                                    "Keskar (default 20)", minimum=1)
    keskar_eps: float = setting(1e-3, "Keskar's box size epsilon (default 1e-3)", minimum=0.0, exclusive_minimum=True)


def _inputs(ctx: MeasureContext) -> tuple[Any, Any, int, list[Any]]:
    return ctx.model("effective"), ctx.initial_model(), ctx.split_size("source"), ctx.batches("source")


def _result(name: str, config: MeasureConfig, values: dict[str, Any], ctx: MeasureContext) -> MeasureResult:
    values["quantized"] = bool(ctx.quantized)
    attrs = {k: v for k, v in values.items() if v is not None and isinstance(v, (int, float, str, bool))}
    return MeasureResult(name, config, values, {}, attrs, int(values.get("passes", 0) or 0))


def compute_pacbayes(ctx: MeasureContext, config: PacBayesConfig) -> MeasureResult:
    from flatlab.sharpness import pacbayes_bounds

    model, initial, m, source = _inputs(ctx)
    values = pacbayes_bounds(model, source, initial, m=m, sigma_max=config.sigma_max, seed=ctx.settings.seed,
                             output_fn=ctx.output_fn, **config.noise(), **config.search())
    return _result("pacbayes", config, values, ctx)


def compute_magnitude(ctx: MeasureContext, config: MagnitudeConfig) -> MeasureResult:
    from flatlab.sharpness import magnitude_bounds

    model, initial, m, source = _inputs(ctx)
    values = magnitude_bounds(model, source, initial, m=m, sigma_max=config.sigma_max, seed=ctx.settings.seed,
                              output_fn=ctx.output_fn, **config.noise(), **config.search())
    return _result("magnitude", config, values, ctx)


def compute_worst_case(ctx: MeasureContext, config: WorstCaseConfig) -> MeasureResult:
    from flatlab.sharpness import worst_case_sharpness

    model, initial, m, source = _inputs(ctx)
    # The context's loss (a custom loss_fn) drives the ascent and Keskar's sharpness.
    values = worst_case_sharpness(model, source, initial, m=m, alpha_max=config.sigma_max, loss_fn=ctx.loss_fn,
                                  output_fn=ctx.output_fn, ascent_steps=config.ascent_steps,
                                  keskar_eps=config.keskar_eps, **config.search())
    return _result("worst_case", config, values, ctx)


def check_classifier(ctx: MeasureContext, config: MeasureConfig) -> None:
    """Every bound is defined by a training-accuracy drop: refuse a model without accuracy (a
    regressor) before any measure is computed."""
    from flatlab.outputs import require_classifier, with_output_fn

    require_classifier(with_output_fn(ctx.model("effective"), ctx.output_fn), ctx.batches("source"), config.measure)


def _reader(group: str, keys: list[tuple[str, str, str | None]]) -> Any:
    return lambda run: attr_estimates(group_node(run, group), keys)


def _noise_cost(config: PacBayesConfig) -> Cost:
    """A rough forward count of one sigma search.

    Fixed draws: at most depth x K passes (early decisions take fewer). Adaptive: about four
    probes decided with mc_samples draws and two near the answer (the answer and its slope
    partner) with U = min(max_mc_samples, (0.08 / (tol / 2))^2) draws each, 0.08 being a
    typical standard deviation of one draw's drop on 128 examples; every draw costs
    draw_examples examples (or a pass, for draw_examples = 0).
    """
    if config.fixed_draws:
        return Cost(forward=float(config.bisection_depth * config.mc_samples))
    near = min(config.max_mc_samples, math.ceil((0.08 / (config.drop_tolerance / 2.0)) ** 2))
    draws = 4 * max(config.mc_samples, 10) + 2 * max(near, config.mc_samples, 10)
    if config.draw_examples == 0:
        return Cost(forward=float(draws))
    return Cost(examples=float(draws * config.draw_examples))


MEASURES = [
    Measure("pacbayes", FAMILY.name, "PAC-Bayes orig/init bounds and inv_sigma_sq from the noise search "
                                     "(sigma = noise std)", PacBayesConfig, compute_pacbayes, "bounds/pacbayes",
            (Column("pacbayes_inv_sigma_sq", "PAC-Bayes 1/σ²", "", "PAC-Bayes flatness 1/sigma^2"),),
            _reader("bounds/pacbayes", [("pacbayes_inv_sigma_sq", "inv_sigma_sq", "inv_sigma_sq_stderr")]), _noise_cost,
            request_flag="--pacbayes", in_all=True, check=check_classifier),
    Measure("magnitude", FAMILY.name, "magnitude-aware sigma', its orig/init bounds and inv_sigma_sq",
            MagnitudeConfig, compute_magnitude, "bounds/magnitude",
            (Column("magnitude_inv_sigma_sq", "magnitude-aware 1/σ'²", "",
                    "magnitude-aware PAC-Bayes flatness 1/sigma'^2"),),
            _reader("bounds/magnitude", [("magnitude_inv_sigma_sq", "inv_sigma_sq", "inv_sigma_sq_stderr")]),
            _noise_cost,
            request_flag="--magnitude", in_all=True, check=check_classifier),
    Measure("worst_case", FAMILY.name, "worst-case alpha' (plain and magnitude-aware), bounds, inv_alpha_sq, "
                                       "Keskar's sharpness", WorstCaseConfig, compute_worst_case, "bounds/worst_case",
            (Column("worst_case_inv_alpha_sq", "worst-case 1/α'²", "", "worst-case sharpness 1/alpha'^2"),
             Column("worst_case_magnitude_inv_alpha_sq", "magnitude-aware worst-case 1/α'²", "",
                    "magnitude-aware worst-case sharpness 1/alpha'^2"),
             Column("keskar", "Keskar ε-sharpness", "%", "Keskar epsilon-sharpness (%)")),
            _reader("bounds/worst_case", [("worst_case_inv_alpha_sq", "inv_alpha_sq", None),
                                          ("worst_case_magnitude_inv_alpha_sq", "magnitude_inv_alpha_sq", None),
                                          ("keskar", "keskar", None)]),
            lambda c: Cost(gradient=float((2 * c.bisection_depth + 1) * c.ascent_steps)),
            request_flag="--worst-case", in_all=True, check=check_classifier),
]

__all__ = ["FAMILY", "MEASURES", "MagnitudeConfig", "PacBayesConfig", "WorstCaseConfig"]
