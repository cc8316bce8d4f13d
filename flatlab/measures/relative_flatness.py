r"""Relative flatness (Petzka et al., NeurIPS 2021) of one linear layer, as a registered measure.

For the weight :math:`W \in \mathbb R^{d \times n}` of one ``nn.Linear`` layer (rows
:math:`w_s`) and the loss :math:`L` on the measured split (the training set by default):

.. math::

    \kappa_{\mathrm{Tr}}(W) = \sum_{s,s'=1}^d \langle w_s, w_{s'} \rangle
        \operatorname{Tr}(H_{s,s'}) = \operatorname{Tr}\big((R \otimes I_n) H_W (R \otimes I_n)\big),
    \qquad R = (W W^\top)^{1/2},

computed by :func:`flatlab.sharpness.relative_flatness`: exactly from the layer's dense float64
Hessian (:math:`dn` Hessian-vector products, standard error 0) or by Hutchinson / Hutch++ on
:math:`M = (R \otimes I) H_W (R \otimes I)` (unbiased, with its standard error); ``auto`` is
exact up to ``exact_max_size`` weights. The layer defaults to the model's last ``nn.Linear``
(the classifier acting on the features, Petzka et al.'s choice); an unknown name is refused
before anything is computed, with the model's Linear layers listed. The measure is invariant to
rescaling the feature layer by :math:`a` and the layer before by :math:`1/a` (Tr :math:`H_W`
alone is not). Larger = sharper.

Quantized checkpoints are measured on their effective (de-quantized, deployed) model, whose
layers are plain ``nn.Linear`` (the classifier stays full precision under QT-DoG's default).

Results group ``/runs/<id>/relative_flatness``: attributes ``kappa``, ``stderr``, ``method``
(what ran), ``layer``, ``layer_shape``, ``products``, ``gram_trace``, ``layer_hessian_trace``
(exact only), ``num_samples``, ``split``, ``seed``. Column ``relative_flatness``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flatlab.errors import FlatlabError
from flatlab.measures.base import Cost, Family, Measure, MeasureResult
from flatlab.measures.columns import Column, Estimate, attr_estimates, group_node
from flatlab.measures.config import ConfigError, MeasureConfig, setting
from flatlab.measures.context import SPLITS, MeasureContext
from flatlab.sharpness.relative_flatness import DEFAULT_EXACT_MAX_SIZE, RELATIVE_FLATNESS_METHODS

FAMILY = Family("relative_flatness", "relative flatness (Petzka et al. 2021)", request="section", nest=True,
                description="kappa_Tr of one linear layer: its Hessian blocks weighted by the Gram matrix of its rows")
GROUP = "relative_flatness"


@dataclass(frozen=True, kw_only=True)
class RelativeFlatnessMeasureConfig(MeasureConfig):
    """kappa_Tr of one ``nn.Linear`` layer."""

    measure = "relative_flatness"
    layer: str | None = setting(None, "module name of the nn.Linear layer (default: the model's last one, the "
                                      "classifier)", flag="--relative-flatness-layer")
    method: str = setting("auto", "auto (exact up to exact_max_size weights, else hutch++), exact, hutchinson, "
                                  "hutch++", flag="--relative-flatness-method", choices=RELATIVE_FLATNESS_METHODS)
    products: int = setting(99, "Hessian-vector products of a stochastic estimate (default 99)",
                            flag="--relative-flatness-products", minimum=2)
    exact_max_size: int = setting(DEFAULT_EXACT_MAX_SIZE, "largest d x n layer computed exactly (default 2048)",
                                  flag="--relative-flatness-exact-max", minimum=1)
    split: str = setting("source", "data: source (training set, default), source-out, target",
                         flag="--relative-flatness-split", choices=SPLITS)

    def validate(self) -> None:
        super().validate()
        if self.layer is not None and not self.layer.strip():
            raise ConfigError("layer", "must name a module (or be left out for the last nn.Linear)")
        if self.method == "hutch++" and self.products < 3:
            raise ConfigError("products", f"= {self.products} is too few for hutch++ (it needs at least 3)")

    def library_config(self, seed: int) -> Any:
        from flatlab.sharpness import RelativeFlatnessConfig

        return RelativeFlatnessConfig(layer=self.layer, method=self.method, exact_max_size=self.exact_max_size,
                                      num_products=self.products, seed=seed)


def check_relative_flatness(ctx: MeasureContext, config: RelativeFlatnessMeasureConfig) -> None:
    """The layer exists and is an ``nn.Linear``; ``exact`` fits under ``exact_max_size``."""
    from torch import nn

    from flatlab.sharpness.relative_flatness import find_linear_layer

    model = ctx.model("effective")
    if config.layer is not None and config.layer not in dict(model.named_modules()):
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ConfigError("layer", f"= {config.layer!r} is not a layer of the model (its nn.Linear layers: "
                                   f"{', '.join(repr(n) for n in linears) or 'none'})")
    try:
        name, module = find_linear_layer(model, config.layer)
    except FlatlabError as exc:  # a layer that is not nn.Linear (or a model without one)
        if config.layer is None:
            raise
        raise ConfigError("layer", f"= {config.layer!r}: {exc}") from None
    size = int(module.weight.numel())
    if config.method == "exact" and size > config.exact_max_size:
        raise ConfigError("method", f"exact is limited to exact_max_size = {config.exact_max_size} weights and layer "
                                    f"{name!r} has {size}: use hutch++ or raise exact_max_size")


def compute_relative_flatness(ctx: MeasureContext, config: RelativeFlatnessMeasureConfig) -> MeasureResult:
    from flatlab.sharpness import relative_flatness

    seed = ctx.settings.seed
    result = relative_flatness(ctx.model("effective"), ctx.batches(config.split), config.library_config(seed),
                               loss_fn=ctx.loss_fn, output_fn=ctx.output_fn)
    payload = result.to_dict()
    payload.update(relative_flatness=result.kappa, relative_flatness_stderr=result.stderr, split=config.split,
                   seed=seed, requested_method=config.method)
    attrs: dict[str, Any] = {
        "kappa": result.kappa, "stderr": result.stderr, "method": result.method, "requested_method": config.method,
        "layer": result.layer, "weight_name": result.weight_name, "layer_shape": list(result.layer_shape),
        "products": result.products, "gram_trace": result.gram_trace, "num_samples": result.num_samples,
        "split": config.split, "seed": seed, "quantized": bool(ctx.quantized),
    }
    if result.layer_hessian_trace is not None:
        attrs["layer_hessian_trace"] = result.layer_hessian_trace
    return MeasureResult("relative_flatness", config, payload, {}, attrs, int(result.products))


def read_relative_flatness(run: Any) -> dict[str, Estimate]:
    return attr_estimates(group_node(run, GROUP), [("relative_flatness", "kappa", "stderr")])


def relative_flatness_table(payload: dict[str, Any]) -> list[list[Any]]:
    kappa, se = payload["kappa"], payload["stderr"]
    d, n = payload["layer_shape"]
    return [["kappa_Tr", f"{kappa:.4g} +- {se:.2g}" + (" (exact)" if payload["method"] == "exact" else "")],
            ["layer", f"{payload['layer']} ({d} x {n}), {payload['method']}, {payload['products']} products, "
                      f"{payload['num_samples']} samples of {payload['split']}"]]


def _cost(config: RelativeFlatnessMeasureConfig) -> Cost:
    # A restricted Hessian-vector product still back-propagates through the whole network (two
    # gradient passes); exact needs d x n of them, at most exact_max_size.
    products = config.exact_max_size if config.method == "exact" else config.products
    return Cost(gradient=2.0 * products, splits=(config.split,))


MEASURES = [
    Measure("relative_flatness", FAMILY.name, "relative flatness kappa_Tr of one linear layer (Petzka et al. 2021)",
            RelativeFlatnessMeasureConfig, compute_relative_flatness, GROUP,
            (Column("relative_flatness", r"relative flatness $\kappa_{Tr}$", "",
                    "relative flatness kappa_Tr of the feature layer (Petzka et al.): sum <w_s, w_s'> Tr H_ss'"),),
            read_relative_flatness, _cost, request_flag="--relative-flatness", table=relative_flatness_table,
            check=check_relative_flatness),
]

__all__ = ["FAMILY", "GROUP", "MEASURES", "RelativeFlatnessMeasureConfig", "compute_relative_flatness",
           "read_relative_flatness"]
