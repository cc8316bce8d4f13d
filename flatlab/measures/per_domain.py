r"""Per-domain curvature and the eigenspace overlap between domains, as a registered measure.

Each domain :math:`d` (a checkpoint's source domains one by one, on their in-splits or, with
``source_part = "out"``, their held-out splits, and the target domain(s); for a user's model its
named domains) gets its own Hessian :math:`H_d = \nabla^2 L_d(w)` of the mean loss over that
domain's samples (each a seeded subset of the family's ``max_samples``, default the shared one,
eval mode), and
:func:`flatlab.curvature.per_domain.per_domain_curvature` computes

* its top-:math:`k` eigenvalues :math:`\lambda^{(d)}_1 \ge \dots \ge \lambda^{(d)}_k` (early-stopping
  Lanczos, residuals :math:`\|H_d u_i - \lambda_i u_i\|` bound their errors);
* its trace :math:`\operatorname{tr} H_d` by Hutch++ (or Hutchinson) with a standard error;
* the overlap of every two domains' top-:math:`k` eigenspaces (Gur-Ari et al. 2018)

  .. math:: O_{ab} = \|U_a^\top U_b\|_F^2 / k = \tfrac1k \textstyle\sum_i \cos^2\theta_i \in [0, 1]

  (1: the same top directions; :math:`k/n`: what two random subspaces share).

Report columns (``T`` = target domains, ``S`` = source domains):

* ``per_domain_top_eigenvalue_target`` / ``_source``: :math:`\frac{1}{|T|}\sum_{t \in T}
  \lambda^{(t)}_1` / the same over :math:`S` (no sampling error: Lanczos is deterministic
  given the data; its residuals bound the numerical error);
* ``per_domain_trace_target`` / ``_source``: the mean trace, with standard error the mean of
  the domains' standard errors (exact for one domain; for several an upper bound, since every
  domain uses the same probe seed and their errors are correlated:
  :math:`\mathrm{sd}(\frac1D\sum X_d) \le \frac1D \sum \mathrm{sd}(X_d)`);
* ``per_domain_mean_overlap_target_source``: :math:`\frac{1}{|T||S|}\sum_{t,s} O_{ts}`, how much
  of the target's top curvature lies along the sources' (not a sharpness: larger = more shared
  directions), and ``per_domain_mean_overlap_source_source``: the mean over pairs of distinct
  source domains, the baseline to compare it with.

Results group ``/runs/<id>/per_domain``: ``domains`` (names), ``is_target``, ``eigenvalues``
and ``residuals`` (D x k), ``converged``, ``traces``, ``trace_stderrs``, ``overlap`` (D x D),
``eigen_products``, ``trace_products``, ``num_samples``; every setting and the notes as
attributes. ``flatlab figures`` draws the overlap heat map from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flatlab.curvature.lanczos import DEFAULT_RTOL
from flatlab.curvature.params import PARAM_CHOICES
from flatlab.curvature.trace import TRACE_METHODS
from flatlab.measures.base import Cost, Family, Measure, MeasureResult
from flatlab.measures.columns import Column, Estimate, group_node
from flatlab.measures.config import ConfigError, MeasureConfig, setting
from flatlab.measures.context import MeasureContext

FAMILY = Family("per_domain", "per-domain curvature and eigenspace overlap", request="section", nest=True,
                description="each domain's top-k Hessian eigenvalues and trace, and the overlap of their top-k "
                            "eigenspaces")
GROUP = "per_domain"


@dataclass(frozen=True, kw_only=True)
class PerDomainConfig(MeasureConfig):
    """Top-k eigenvalues and trace of every domain's Hessian, and their eigenspace overlaps."""

    measure = "per_domain"
    top_k: int = setting(5, "eigenpairs per domain: the overlap's subspace dimension k (default 5)",
                         flag="--per-domain-top-k", minimum=1)
    rtol: float | None = setting(None, f"Lanczos stops once every Ritz residual is below rtol x |l| (default "
                                       f"{DEFAULT_RTOL:g})", flag="--per-domain-rtol", minimum=0.0,
                                 exclusive_minimum=True)
    max_steps: int | None = setting(None, "most Lanczos products per domain (default: Lanczos's own cap)",
                                    flag="--per-domain-max-steps", minimum=1)
    trace_products: int = setting(99, "Hessian-vector products per domain for the trace; 0 skips it (default 99)",
                                  flag="--per-domain-trace-products", minimum=0)
    trace_method: str = setting("hutch++", "trace estimator", flag="--per-domain-trace-method", choices=TRACE_METHODS)
    params: str = setting("all", "parameters: all (default), weights, no-bn", flag="--per-domain-params",
                          choices=PARAM_CHOICES)
    wrt: str = setting("effective", "quantized models: the de-quantized weights (effective, default) or the latent "
                                    "weights through the straight-through estimator (latent)",
                       flag="--per-domain-wrt", choices=("effective", "latent"))
    source_part: str = setting("in", "source domains on their in-splits (the training data, default) or their "
                                     "held-out out-splits", flag="--per-domain-source-part", choices=("in", "out"))
    max_samples: int | None = setting(None, "a seeded subset of at most N samples per domain (default: the shared "
                                            "max_samples)", flag="--per-domain-max-samples", minimum=1)

    def validate(self) -> None:
        super().validate()
        if self.max_steps is not None and self.max_steps < self.top_k:
            raise ConfigError("max_steps", f"must be at least top_k ({self.top_k}), got {self.max_steps}")
        least = 3 if self.trace_method == "hutch++" else 1
        if 0 < self.trace_products < least:
            raise ConfigError("trace_products", f"= {self.trace_products} is too few for {self.trace_method} "
                                                f"(0 skips the trace, else at least {least})")

    def fingerprint_settings(self) -> dict[str, Any]:
        out = self.settings()
        out["rtol"] = self.resolved_rtol
        return out

    @property
    def resolved_rtol(self) -> float:
        return DEFAULT_RTOL if self.rtol is None else float(self.rtol)

    def library_config(self, seed: int) -> Any:
        from flatlab.curvature.per_domain import PerDomainCurvatureConfig

        return PerDomainCurvatureConfig(k=self.top_k, rtol=self.resolved_rtol, max_steps=self.max_steps,
                                        trace_products=self.trace_products, trace_method=self.trace_method,
                                        params=self.params, seed=seed)


def check_per_domain(ctx: MeasureContext, config: PerDomainConfig) -> None:
    """``top_k`` fits in the selected parameters; there are domains to measure."""
    from flatlab.curvature.params import select_parameters

    n = sum(p.numel() for _, p in select_parameters(ctx.model(config.wrt), config.params))
    if config.top_k > n:
        raise ConfigError("top_k", f"= {config.top_k} exceeds the number of selected parameters ({n})")
    ctx.domain_batches(config.source_part, config.max_samples)


def compute_per_domain(ctx: MeasureContext, config: PerDomainConfig) -> MeasureResult:
    from flatlab.curvature import HessianOperator
    from flatlab.curvature.per_domain import per_domain_curvature

    model = ctx.model(config.wrt)
    domains = ctx.domain_batches(config.source_part, config.max_samples)
    targets = set(ctx.target_domains())
    progress = ctx.progress

    def operator(m: Any, batches: Any) -> Any:
        return HessianOperator(m, list(batches), ctx.loss_fn, params=config.params, progress=progress,
                               output_fn=ctx.output_fn)

    seed = ctx.settings.seed
    res = per_domain_curvature(model, domains, loss_fn=ctx.loss_fn, config=config.library_config(seed),
                               operator_fn=operator)
    is_target = np.asarray([d in targets for d in res.domains], dtype=bool)
    arrays = {
        "domains": np.asarray(res.domains, dtype=object), "is_target": is_target,
        "eigenvalues": np.asarray(res.eigenvalues, dtype=np.float64),
        "residuals": np.asarray(res.residuals, dtype=np.float64),
        "converged": np.asarray(res.converged, dtype=bool), "traces": np.asarray(res.traces, dtype=np.float64),
        "trace_stderrs": np.asarray(res.trace_stderrs, dtype=np.float64),
        "overlap": np.asarray(res.overlap, dtype=np.float64),
        "eigen_products": np.asarray(res.eigen_products, dtype=np.int64),
        "trace_products": np.asarray(res.trace_products, dtype=np.int64),
        "num_samples": np.asarray(res.num_samples, dtype=np.int64),
    }
    products = int(arrays["eigen_products"].sum() + arrays["trace_products"].sum())
    attrs: dict[str, Any] = {
        "top_k": config.top_k, "rtol": config.resolved_rtol, "trace_method": config.trace_method,
        "trace_products_per_domain": config.trace_products, "params": config.params,
        "wrt": config.wrt if ctx.quantized else "fp", "source_part": config.source_part, "seed": seed,
        "max_samples_per_domain": config.max_samples if config.max_samples is not None else ctx.settings.max_samples,
        "num_params": int(res.num_params), "targets": [d for d in res.domains if d in targets],
        "notes": list(res.notes), "hvps": products,
    }
    if config.max_steps is not None:
        attrs["max_steps"] = config.max_steps
    summary = summarize(arrays)
    payload: dict[str, Any] = {
        "domains": list(res.domains), "targets": attrs["targets"], "k": res.k,
        "eigenvalues": arrays["eigenvalues"].tolist(), "residuals": arrays["residuals"].tolist(),
        "converged": list(res.converged), "traces": arrays["traces"].tolist(),
        "trace_stderrs": arrays["trace_stderrs"].tolist(), "overlap": arrays["overlap"].tolist(),
        "eigen_products": arrays["eigen_products"].tolist(), "trace_products": arrays["trace_products"].tolist(),
        "num_samples": arrays["num_samples"].tolist(), "num_params": int(res.num_params), "notes": list(res.notes),
        **{k: v for k, v in attrs.items() if k not in ("targets", "notes", "num_params")},
    }
    for name, est in summary.items():
        payload[name] = est.value
        payload[f"{name}_stderr"] = est.stderr
    return MeasureResult("per_domain", config, payload, arrays, attrs, products)


def _names(node: Any) -> list[str]:
    raw = node.get("domains")
    if raw is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(raw, dtype=object).ravel()]


def _mean_estimate(values: np.ndarray, errors: np.ndarray | None) -> Estimate | None:
    finite = np.isfinite(values)
    if not finite.any():
        return None
    value = float(values[finite].mean())
    if errors is None:
        return Estimate(value, None)
    se = errors[finite]
    return Estimate(value, float(se.mean()) if np.isfinite(se).all() else None)


def summarize(node: Any) -> dict[str, Estimate]:
    """The report columns from a stored ``per_domain`` group (see the module docstring)."""
    names = _names(node)
    if not names or "eigenvalues" not in node:
        return {}
    d = len(names)
    target = np.asarray(node.get("is_target", np.zeros(d, dtype=bool)), dtype=bool).ravel()
    if target.shape != (d,):
        return {}
    top = np.asarray(node["eigenvalues"], dtype=np.float64).reshape(d, -1).max(axis=1)
    traces = np.asarray(node.get("traces", np.full(d, np.nan)), dtype=np.float64).ravel()
    errors = np.asarray(node.get("trace_stderrs", np.full(d, np.nan)), dtype=np.float64).ravel()
    overlap = np.asarray(node.get("overlap", np.full((d, d), np.nan)), dtype=np.float64).reshape(d, d)
    source = ~target
    out: dict[str, Estimate] = {}
    for where, mask in (("target", target), ("source", source)):
        if not mask.any():
            continue
        for name, est in ((f"per_domain_top_eigenvalue_{where}", _mean_estimate(top[mask], None)),
                          (f"per_domain_trace_{where}", _mean_estimate(traces[mask], errors[mask]))):
            if est is not None:
                out[name] = est
    if target.any() and source.any():
        est = _mean_estimate(overlap[np.ix_(target, source)].ravel(), None)
        if est is not None:
            out["per_domain_mean_overlap_target_source"] = est
    if source.sum() >= 2:
        block = overlap[np.ix_(source, source)]
        est = _mean_estimate(block[~np.eye(int(source.sum()), dtype=bool)], None)
        if est is not None:
            out["per_domain_mean_overlap_source_source"] = est
    return out


def read_per_domain(run: Any) -> dict[str, Estimate]:
    node = group_node(run, GROUP)
    return {} if node is None else summarize(node)


def per_domain_table(payload: dict[str, Any]) -> list[list[Any]]:
    rows = []
    targets = set(payload["targets"])
    for i, name in enumerate(payload["domains"]):
        se = payload["trace_stderrs"][i]
        trace = payload["traces"][i]
        shown = "-" if not math.isfinite(trace) else f"{trace:.4g} +- {se:.2g}"
        rows.append([f"{name}{' (target)' if name in targets else ''}",
                     f"top eigenvalue {payload['eigenvalues'][i][0]:.4g}, trace {shown}, "
                     f"{payload['num_samples'][i]} samples"])
    for key in ("per_domain_mean_overlap_target_source", "per_domain_mean_overlap_source_source"):
        if key in payload:
            rows.append([key.removeprefix("per_domain_").replace("_", " "), f"{payload[key]:.3f} (k = {payload['k']})"])
    return rows


def _cost(config: PerDomainConfig) -> Cost:
    lanczos = max(3 * config.top_k, 20) + 10 if config.max_steps is None else config.max_steps
    return Cost(gradient=2.0 * (lanczos + config.trace_products), splits=("domains",),
                max_samples=config.max_samples)


MEASURES = [
    Measure("per_domain", FAMILY.name, "per-domain top-k Hessian eigenvalues, trace and the eigenspace overlap "
                                       "between domains", PerDomainConfig, compute_per_domain, GROUP,
            (Column("per_domain_top_eigenvalue_target", r"target-domain $\lambda_{\max}$", "",
                    "largest Hessian eigenvalue of the target domain's own loss (mean over target domains)"),
             Column("per_domain_top_eigenvalue_source", r"source-domain $\lambda_{\max}$ (mean)", "",
                    "largest Hessian eigenvalue of each source domain's own loss, mean over source domains"),
             Column("per_domain_trace_target", "target-domain Hessian trace", "",
                    "Hessian trace of the target domain's own loss (Hutch++), mean over target domains"),
             Column("per_domain_trace_source", "source-domain Hessian trace (mean)", "",
                    "Hessian trace of each source domain's own loss (Hutch++), mean over source domains"),
             Column("per_domain_mean_overlap_target_source", "target-source top-k eigenspace overlap", "",
                    "mean overlap ||U_t^T U_s||_F^2/k of the target's and each source's top-k Hessian eigenspace "
                    "(not a sharpness: larger = more shared curvature directions)", larger_is_sharper=False),
             Column("per_domain_mean_overlap_source_source", "source-source top-k eigenspace overlap", "",
                    "mean overlap ||U_a^T U_b||_F^2/k over pairs of distinct source domains (the baseline for "
                    "the target-source overlap; not a sharpness)", larger_is_sharper=False)),
            read_per_domain, _cost, request_flag="--per-domain", table=per_domain_table, check=check_per_domain),
]

__all__ = ["FAMILY", "GROUP", "MEASURES", "PerDomainConfig", "compute_per_domain", "read_per_domain", "summarize"]
