r"""Adaptive and standard sharpness at a fixed radius (Andriushchenko et al. 2023) as a measure.

One config computes the variants a reviewer compares side by side: every requested scaling
(``adaptive``: :math:`c = |w|`; ``standard``: :math:`c = 1`) times every requested kind, on one
split (the training set by default), with the library function
:func:`flatlab.sharpness.adaptive_sharpness` (its docstring and ``docs/measures_reviewer.md``
hold the estimator, the Auto-PGD ascent and the standard errors):

.. math::

    S_{\max} = \frac{1}{|\mathcal S|} \sum_S \Big[\max_{\|\delta / c\|_p \le \rho}
        L_S(w + \delta)\Big] - L_S(w), \qquad
    S_{\mathrm{avg}} = \frac{1}{|\mathcal S|} \sum_S \mathbb E_z\, L_S(w + \rho\, c \odot z) - L_S(w),

with :math:`z \sim \mathcal U[-1, 1]^n` for :math:`p = \infty` (the default here) and
:math:`z \sim \mathcal N(0, I)` for :math:`p = 2`; :math:`S` are consecutive subsets of ``m``
samples (``m`` unset: one subset, the whole measured split). Larger = sharper.

Radii. ``rho`` is the adaptive radius (a relative size: :math:`|\delta_i| \le \rho |w_i|` in
the :math:`L_\infty` box). A standard radius in the same units would be meaningless (it is
absolute), so unless ``rho_standard`` is given it is **matched** to the adaptive one:

.. math:: \rho_{\mathrm{std}} = \rho \cdot \mathrm{rms}(w), \qquad
          \mathrm{rms}(w) = \sqrt{\tfrac1n \textstyle\sum_i w_i^2}

over the perturbed parameters, which gives both sets the same mean squared perturbation: for
the average case :math:`\mathbb E\|\rho\, c \odot z\|^2 = \rho^2 \kappa \sum_i c_i^2` with
:math:`\kappa = 1/3` (uniform) or 1 (Gaussian), equal for :math:`c = |w|` at radius
:math:`\rho` and :math:`c = 1` at radius :math:`\rho_{\mathrm{std}}`. The resolved radius is
stored with the result.

Why :math:`p = \infty` by default: the worst and the average case then share one set (the max
and the mean over the same box); with :math:`p = 2` the worst case lives on the ball
:math:`\|u\|_2 \le \rho` while the Gaussian average has :math:`\|u\| \approx \rho\sqrt n`, so the
two kinds at one :math:`\rho` are not comparable. The default :math:`\rho = 0.002` is inside the
authors' adaptive :math:`L_\infty` grid (0.001-0.008 for ResNet-18). Compare models measured
with the same settings; absolute values depend on them.

Quantized checkpoints: ``wrt = "effective"`` (default) perturbs the de-quantized, deployed
weights; ``wrt = "latent"`` perturbs the latent weights and evaluates the quantized model
:math:`L(Q(w + \delta))`, the loss the QAT optimizer sees. That loss is piecewise constant in
:math:`w`, so the worst-case ascent follows the straight-through gradient and a value counts how
much the loss changes when weights cross rounding boundaries within the set (radii smaller than
half a quantization step may give 0). LSQ scales are never perturbed.

Standard errors: average case over the noise draws (one subset) or over the subsets; worst case
over the subsets only (with ``m`` unset the ascent is deterministic given the seed and there is
no sampling error: the stderr is missing, not 0).

Results group ``/runs/<id>/sharpness``: per variant ``<scaling>_<kind>`` the value, its stderr,
the radius, base loss and costs as attributes (``adaptive_worst``, ``adaptive_worst_stderr``,
...) and the per-subset values as a sub-group; every setting of every variant as JSON
(``<variant>_config``). Columns ``sharpness_<scaling>_<kind>``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flatlab.measures.base import Cost, Family, Measure, MeasureResult
from flatlab.measures.columns import Column, Estimate, group_node, scalar
from flatlab.measures.config import ConfigError, MeasureConfig, setting
from flatlab.measures.context import SPLITS, MeasureContext
from flatlab.sharpness.adaptive import PERTURBED_PARAMS, SCALINGS, SHARPNESS_KINDS

FAMILY = Family("sharpness", "sharpness at a fixed radius (Andriushchenko et al. 2023)", request="section",
                nest=True, description="adaptive and standard, worst- and average-case sharpness at radius rho")
GROUP = "sharpness"
#: Default adaptive radius (inside the authors' adaptive L-inf grid 0.001-0.008).
DEFAULT_RHO = 0.002
NORMS = (2.0, math.inf)


def _norm_value(value: Any) -> Any:
    """2 / inf from the ways a user writes them (2, 2.0, "2", inf, "inf", "linf"); else unchanged."""
    if isinstance(value, str):
        text = value.strip().lower()
        return {"2": 2.0, "2.0": 2.0, "l2": 2.0, "inf": math.inf, "infinity": math.inf, "linf": math.inf}.get(text, value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) in NORMS:
        return float(value)
    return value


def norm_text(p: float) -> str:
    """``"inf"`` or ``"2"``."""
    return "inf" if math.isinf(p) else "2"


@dataclass(frozen=True, kw_only=True)
class SharpnessConfig(MeasureConfig):
    """Fixed-radius sharpness: every requested scaling x kind, at radius ``rho``."""

    measure = "sharpness"
    rho: float = setting(DEFAULT_RHO, "adaptive radius rho: |delta_i| <= rho |w_i| in the L-inf box (default 0.002)",
                         flag="--sharpness-rho")
    rho_standard: float | None = setting(None, "standard radius (absolute); default rho x rms(w), the same mean "
                                               "squared perturbation as the adaptive set", flag="--sharpness-rho-standard")
    scalings: tuple[str, ...] = setting(SCALINGS, "scalings: adaptive (c = |w|), standard (c = 1)",
                                        flag="--sharpness-scalings", choices=SCALINGS)
    kinds: tuple[str, ...] = setting(SHARPNESS_KINDS, "kinds: worst (Auto-PGD maximum), average (mean over noise)",
                                     flag="--sharpness-kinds", choices=SHARPNESS_KINDS)
    p: float = setting(math.inf, "norm of the set: inf (box, default) or 2 (ball; the average case is then Gaussian)",
                       flag="--sharpness-p", choices=NORMS)
    m: int | None = setting(None, "m-sharpness: samples per subset (default: the whole measured split)",
                            flag="--sharpness-m", minimum=1)
    steps: int = setting(20, "Auto-PGD steps per run of the worst case (default 20)", flag="--sharpness-steps",
                         minimum=1)
    restarts: int = setting(0, "extra worst-case runs from fresh random starts (default 0)",
                            flag="--sharpness-restarts", minimum=0)
    samples: int = setting(20, "noise draws per subset for the average case (antithetic pairs; at least 4; "
                               "default 20)", flag="--sharpness-samples", minimum=4)
    params: str = setting("all", "perturbed parameters: all (default) or no-bn (all but normalization layers)",
                          flag="--sharpness-params", choices=PERTURBED_PARAMS)
    wrt: str = setting("effective", "quantized models: perturb the de-quantized weights (effective, default) or the "
                                    "latent weights through the quantizer (latent)", flag="--sharpness-wrt",
                       choices=("effective", "latent"))
    split: str = setting("source", "data: source (training set, default), source-out, target",
                         flag="--sharpness-split", choices=SPLITS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", _norm_value(self.p))
        if not (isinstance(self.p, float) and self.p in NORMS):
            shown = f"{self.p:g}" if isinstance(self.p, float) else repr(self.p)
            raise ConfigError("p", f"must be 2 or inf, got {shown}", self.measure)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        for key in ("rho", "rho_standard"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(key, f"must be positive, got {value:g}")

    def settings(self) -> dict[str, Any]:
        """JSON-safe settings: ``p`` as ``"inf"`` or ``2``."""
        out = super().settings()
        out["p"] = "inf" if math.isinf(self.p) else 2
        return out

    @property
    def variants(self) -> list[tuple[str, str]]:
        """(scaling, kind) pairs in the order computed."""
        return [(s, k) for s in self.scalings for k in self.kinds]


def variant_name(scaling: str, kind: str) -> str:
    return f"{scaling}_{kind}"


def _library_config(config: SharpnessConfig, scaling: str, kind: str, rho: float, seed: int) -> Any:
    from flatlab.sharpness import AdaptiveSharpnessConfig

    return AdaptiveSharpnessConfig(rho=rho, kind=kind, scaling=scaling, p=config.p, m=config.m, steps=config.steps,
                                   restarts=config.restarts, random_start=True, samples=config.samples,
                                   antithetic=True, params=config.params, seed=seed)


def check_sharpness(ctx: MeasureContext, config: SharpnessConfig) -> None:
    """``m`` must fit in the measured split."""
    if config.m is None:
        return
    n = sum(len(y) for _, y in ctx.batches(config.split))
    if config.m > n:
        raise ConfigError("m", f"must be at most the number of measured samples ({n} in {config.split}), got {config.m}")


def weight_rms(model: Any, params: str) -> tuple[float, int]:
    """(root mean square of the perturbed parameters, their count)."""
    from flatlab.curvature.params import select_parameters

    chosen = [p for _, p in select_parameters(model, params)]
    n = sum(p.numel() for p in chosen)
    total = sum(float(p.detach().double().pow(2).sum()) for p in chosen)
    return math.sqrt(total / n) if n else 0.0, n


def compute_sharpness(ctx: MeasureContext, config: SharpnessConfig) -> MeasureResult:
    from flatlab.sharpness import adaptive_sharpness

    model = ctx.model(config.wrt)
    batches = ctx.batches(config.split)
    seed = ctx.settings.seed
    rms, n_params = weight_rms(model, config.params)
    matched = config.rho_standard is None
    rho_standard = config.rho * rms if matched else float(config.rho_standard)  # type: ignore[arg-type]
    if "standard" in config.scalings and not rho_standard > 0:
        raise ConfigError("rho_standard", "resolves to 0 (every perturbed weight is 0): give it explicitly")
    payload: dict[str, Any] = {
        "rho": config.rho, "rho_standard": rho_standard,
        "rho_standard_rule": "rho x rms(w)" if matched else "given", "weight_rms": rms, "p": norm_text(config.p),
        "m": config.m, "split": config.split, "wrt": config.wrt if ctx.quantized else "fp", "params": config.params,
        "seed": seed, "num_parameters": n_params,
    }
    attrs: dict[str, Any] = {k: v for k, v in payload.items() if v is not None}
    attrs["scalings"] = list(config.scalings)
    attrs["kinds"] = list(config.kinds)
    arrays: dict[str, Any] = {}
    variants: dict[str, Any] = {}
    passes = 0.0
    for scaling, kind in config.variants:
        name = variant_name(scaling, kind)
        rho = config.rho if scaling == "adaptive" else rho_standard
        result = adaptive_sharpness(model, batches, _library_config(config, scaling, kind, rho, seed),
                                    loss_fn=ctx.loss_fn, output_fn=ctx.output_fn)
        record = result.to_dict()
        variants[name] = record
        stderr = result.stderr if math.isfinite(result.stderr) else None
        payload[name] = result.value
        payload[f"{name}_stderr"] = stderr
        attrs.update({name: result.value, f"{name}_stderr": result.stderr, f"{name}_stderr_over": result.stderr_over,
                      f"{name}_rho": rho, f"{name}_base_loss": result.base_loss,
                      f"{name}_perturbed_loss": result.perturbed_loss, f"{name}_subsets": result.num_batches,
                      f"{name}_samples_left_out": result.samples_left_out,
                      f"{name}_restart_spread": result.restart_spread, f"{name}_step_halvings": result.step_halvings,
                      f"{name}_forward_passes": result.forward_passes,
                      f"{name}_backward_passes": result.backward_passes,
                      f"{name}_config": json.dumps(record["config"], sort_keys=True)})
        arrays[name] = {
            "per_batch": np.asarray(result.per_batch, dtype=np.float64),
            "per_batch_stderr": np.asarray(result.per_batch_stderr, dtype=np.float64),
            "per_batch_base_loss": np.asarray(result.per_batch_base_loss, dtype=np.float64),
            # (subsets, runs) for the worst case; (0, 0) for the average case, which has no runs
            "run_values": np.asarray(result.run_values, dtype=np.float64).reshape(
                len(result.run_values), len(result.run_values[0]) if result.run_values else 0),
        }
        passes += result.forward_passes + result.backward_passes
        attrs["num_samples"] = result.num_samples
        payload["num_samples"] = result.num_samples
    payload["variants"] = variants
    return MeasureResult("sharpness", config, payload, arrays, attrs, int(round(passes)))


def read_sharpness(run: Any) -> dict[str, Estimate]:
    """``{sharpness_<scaling>_<kind>: value +- stderr}`` for every stored variant."""
    node = group_node(run, GROUP)
    if node is None:
        return {}
    attrs = node.get("attrs", {})
    out: dict[str, Estimate] = {}
    for scaling in SCALINGS:
        for kind in SHARPNESS_KINDS:
            name = variant_name(scaling, kind)
            value = scalar(attrs.get(name))
            if math.isnan(value):
                continue
            se = scalar(attrs.get(f"{name}_stderr"))
            out[f"sharpness_{name}"] = Estimate(value, se if math.isfinite(se) else None)
    return out


def sharpness_table(payload: dict[str, Any]) -> list[list[Any]]:
    """Rows (quantity, value) for the human table: one per variant, then the radii."""
    rows = []
    for name, record in payload["variants"].items():
        se = payload.get(f"{name}_stderr")
        value = f"{fmt(record['value'])}" + (f" +- {fmt(se, 2)}" if se is not None else " (no sampling error)")
        rows.append([name.replace("_", " "), f"{value}  (rho {fmt(record['config']['rho'])}, L{payload['p']}, "
                                             f"base loss {fmt(record['base_loss'])})"])
    rows.append(["radii", f"adaptive {fmt(payload['rho'])}, standard {fmt(payload['rho_standard'])} "
                          f"({payload['rho_standard_rule']}), m {payload['m'] or 'whole split'}"])
    return rows


def fmt(value: Any, digits: int = 4) -> str:
    """A number to ``digits`` significant digits ('-' for None)."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _cost(config: SharpnessConfig) -> Cost:
    forward = gradient = 0.0
    runs = 1 + config.restarts
    draws = 2 * ((config.samples + 1) // 2)
    for _scaling, kind in config.variants:
        if kind == "worst":
            forward += 1 + runs
            gradient += runs * config.steps
        else:
            forward += 1 + draws
    return Cost(forward=forward, gradient=gradient, splits=(config.split,))


def _describe(scaling: str, kind: str) -> str:
    what = "max over the set (Auto-PGD)" if kind == "worst" else "mean over noise in the set"
    scale = "c = |w|, relative radius rho" if scaling == "adaptive" else "c = 1, absolute radius rho_standard"
    return f"{scaling} {kind}-case sharpness at a fixed radius ({scale}; {what}; L(w + delta) - L(w))"


COLUMNS = tuple(
    Column(f"sharpness_{variant_name(s, k)}", f"{s} {k}-case sharpness", "nats", _describe(s, k))
    for s in SCALINGS for k in SHARPNESS_KINDS)

MEASURES = [
    Measure("sharpness", FAMILY.name, "adaptive and standard, worst- and average-case sharpness at a fixed radius "
                                      "(Andriushchenko et al. 2023)", SharpnessConfig, compute_sharpness, GROUP,
            COLUMNS, read_sharpness, _cost, request_flag="--adaptive-sharpness", table=sharpness_table,
            check=check_sharpness),
]

__all__ = ["COLUMNS", "DEFAULT_RHO", "FAMILY", "GROUP", "MEASURES", "SharpnessConfig", "compute_sharpness",
           "norm_text", "read_sharpness", "variant_name", "weight_rms"]
