r"""SWAD's local flatness (Cha et al. 2021; QT-DoG's flatness evidence) as a registered measure.

.. math:: F_\gamma(w) = \mathbb{E}_{\|\Delta\| = \gamma}\, L(w + \Delta) - L(w)

with :math:`\Delta` uniform on the sphere of radius :math:`\gamma` over all parameters (no
filter normalization, no BatchNorm folding), on the ``source`` and the ``target`` split, each
value with its Monte Carlo standard error (:func:`flatlab.sharpness.local_flatness`). Radii
are absolute (``gammas``; QT-DoG: 0..60 for ResNet-50) or relative to :math:`\|w\|`
(``gammas_rel``, the default: 0, 0.02, ..., 0.1).

``antithetic`` names the splits whose directions come in pairs :math:`(\Delta, -\Delta)`
(default ``target``): with :math:`E, O` the even and odd parts of :math:`L(w + \Delta)`,
pairs give variance :math:`2\,\mathrm{Var}\,E / N` instead of :math:`(\mathrm{Var}\,E +
\mathrm{Var}\,O) / N`, a gain only where the odd (gradient) part dominates: on the target
domain, not at the training minimum (measured in ``benchmarks/bench_local_flatness.py``).

Columns: ``local_flatness_<source|target>@<radius>[rel]``, one per stored radius.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from flatlab.measures.base import Cost, Family, Measure, MeasureResult
from flatlab.measures.columns import Column, Estimate, group_node
from flatlab.measures.config import ConfigError, MeasureConfig, setting
from flatlab.measures.context import MeasureContext

FAMILY = Family("local_flatness", "local flatness (SWAD)", request="section", nest=True,
                description="SWAD's F_gamma on source and target with Monte Carlo standard errors")
GROUP = "local_flatness"

#: Column names: local_flatness_<split>@<radius>[rel].
NAME_PATTERN = re.compile(r"^local_flatness_(source|target)@([0-9.eE+-]+?)(rel)?$")


@dataclass(frozen=True, kw_only=True)
class LocalFlatnessConfig(MeasureConfig):
    """F_gamma on source and target at each radius."""

    measure = "local_flatness"
    gammas: tuple[float, ...] | None = setting(None, "absolute local-flatness radii, comma separated and increasing "
                                                     "(QT-DoG: 0,5,...,60 for ResNet-50)", minimum=0.0)
    gammas_rel: tuple[float, ...] | None = setting(None, "radii relative to ||w|| (default 0,0.02,0.04,0.06,0.08,0.1)",
                                                   minimum=0.0)
    samples: int = setting(100, "Monte Carlo samples per radius for local flatness (default 100, as SWAD)",
                           flag="--flatness-samples", minimum=2)
    antithetic: str = setting("target", "splits whose local-flatness directions come in antithetic pairs "
                                        "(+Delta, -Delta): target (default: the pairs cancel the large gradient term "
                                        "there), source, both or none (independent directions)",
                              choices=("target", "source", "both", "none"))

    def validate(self) -> None:
        super().validate()
        if self.gammas is not None and self.gammas_rel is not None:
            raise ConfigError("gammas", "and gammas_rel exclude each other: give one")
        for key in ("gammas", "gammas_rel"):
            values = getattr(self, key)
            if values is not None and any(b <= a for a, b in zip(values, values[1:])):
                raise ConfigError(key, f"must be strictly increasing, got {list(values)}")

    @property
    def radii(self) -> tuple[list[float], bool]:
        """(radii, relative)."""
        from flatlab.sharpness import DEFAULT_RELATIVE_RADII

        if self.gammas is not None:
            return list(self.gammas), False
        return list(self.gammas_rel if self.gammas_rel is not None else DEFAULT_RELATIVE_RADII), True


def compute_local_flatness(ctx: MeasureContext, config: LocalFlatnessConfig) -> MeasureResult:
    from flatlab.sharpness import local_flatness

    radii, relative = config.radii
    seed = ctx.settings.seed
    source, target = ctx.batches("source"), ctx.batches("target")
    out = local_flatness(ctx.model("effective"), {"source": source, "target": target}, radii, relative=relative,
                         samples=config.samples, seed=seed, loss_fn=ctx.loss_fn, antithetic=config.antithetic,
                         output_fn=ctx.output_fn)
    splits = out["splits"]
    values: dict[str, Any] = {
        "gammas": out["gammas"], "radii": out["radii"], "relative": out["relative"],
        "weight_norm": out["weight_norm"], "samples": out["samples"], "antithetic": config.antithetic,
        "source_antithetic": splits["source"]["antithetic"], "target_antithetic": splits["target"]["antithetic"],
        "source_evaluations": splits["source"]["evaluations"], "target_evaluations": splits["target"]["evaluations"],
        "num_parameters": out["num_parameters"], "seed": seed,
        "source": splits["source"]["flatness"], "source_stderr": splits["source"]["stderr"],
        "target": splits["target"]["flatness"], "target_stderr": splits["target"]["stderr"],
        "source_loss": splits["source"]["loss"], "target_loss": splits["target"]["loss"],
        "source_n": splits["source"]["n_eval"], "target_n": splits["target"]["n_eval"],
    }
    arrays = {key: np.asarray(values[key], dtype=np.float64)
              for key in ("gammas", "source", "source_stderr", "target", "target_stderr")}
    attrs = {k: v for k, v in values.items() if v is not None and isinstance(v, (int, float, str, bool))}
    attrs["radii"] = list(values["radii"])
    return MeasureResult("local_flatness", config, values, arrays, attrs, 0)


def radius_key(radius: float, relative: bool) -> str:
    return f"{float(radius):g}{'rel' if relative else ''}"


def read_local_flatness(run: Any) -> dict[str, Estimate]:
    """``{local_flatness_<split>@<radius>[rel]: F_gamma +- stderr}`` for every stored radius.

    The radius is the value the user gave (``radii`` attribute: relative to ||w|| when
    ``relative``; the absolute gammas of relative radii differ between models).
    """
    node = group_node(run, GROUP)
    if node is None:
        return {}
    attrs = node.get("attrs", {})
    gammas = np.asarray(node.get("gammas", []), dtype=np.float64).ravel()
    radii = attrs.get("radii")
    relative = bool(attrs.get("relative", False))
    radii_arr = np.asarray(radii, dtype=np.float64).ravel() if radii is not None else gammas
    if len(radii_arr) != len(gammas):
        radii_arr, relative = gammas, False
    out: dict[str, Estimate] = {}
    for split in ("source", "target"):
        if split not in node:
            continue
        values = np.asarray(node[split], dtype=np.float64).ravel()
        errors = np.asarray(node.get(f"{split}_stderr", np.full(len(values), np.nan)), dtype=np.float64).ravel()
        for r, v, se in zip(radii_arr, values, errors):
            out[f"local_flatness_{split}@{radius_key(r, relative)}"] = Estimate(
                float(v), None if not math.isfinite(se) else float(se))
    return out


def _describe(m: re.Match[str]) -> str:
    where = "source domains" if m.group(1) == "source" else "target domain"
    radius = f"gamma = {m.group(2)} x ||w||" if m.group(3) else f"gamma = {m.group(2)}"
    return f"local flatness F_gamma on the {where}, {radius}"


def _label(m: re.Match[str]) -> str:
    radius = f"γ = {m.group(2)}‖w‖" if m.group(3) else f"γ = {m.group(2)}"
    return rf"$F_\gamma$ on {m.group(1)}, {radius} (nats)"


def _cost(config: LocalFlatnessConfig) -> Cost:
    radii, _ = config.radii
    return Cost(forward=float(len(radii) * config.samples), splits=("source", "target"))


MEASURES = [
    Measure("local_flatness", FAMILY.name, "SWAD's local flatness F_gamma on source and target with Monte Carlo "
                                           "standard errors", LocalFlatnessConfig, compute_local_flatness, GROUP,
            (Column("local_flatness_<split>@<radius>", "F_gamma", "nats", "local flatness F_gamma",
                    pattern=NAME_PATTERN, describe_match=_describe, label_match=_label),),
            read_local_flatness, _cost, request_flag="--local-flatness", in_all=True),
]

__all__ = ["FAMILY", "GROUP", "MEASURES", "NAME_PATTERN", "LocalFlatnessConfig", "radius_key", "read_local_flatness"]
