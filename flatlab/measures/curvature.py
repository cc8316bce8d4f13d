r"""Curvature measures of the loss: top-k eigenvalues, trace, spectral density, per-layer blocks.

All four act on one operator :math:`H v` (the Hessian of the mean loss over the chosen split,
batches weighted :math:`|B|/N`, eval mode; :mod:`flatlab.curvature`), shared through the
context cache, and write into one results group ``/runs/<id>/curvature``.

* ``top_eigenvalues``: the ``k`` largest algebraic eigenvalues :math:`\lambda_1 \ge \dots \ge
  \lambda_k` with residuals :math:`\|H u_i - \lambda_i u_i\|` (each bounds its eigenvalue's
  error); early-stopping Lanczos (``rtol``, default) or ARPACK (``tol``); ``solver = "dense"``
  builds the float64 Hessian (small models), ``"pyhessian"`` runs PyHessian's power iteration
  (largest in magnitude). Column ``top_eigenvalue`` = :math:`\lambda_{\max}`.
* ``trace``: :math:`\operatorname{tr}(H)` by Hutch++ (Meyer et al. 2021) or Hutchinson
  (:math:`\operatorname{tr}(H) \approx \frac1M \sum_j z_j^\top H z_j`, Rademacher :math:`z_j`)
  with a standard error. Column ``trace``.
* ``density``: the spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019):
  nodes = Ritz values of an ``m``-step Lanczos tridiagonal, weights = squared first components,
  Gaussian broadening; integrates to 1.
* ``per_layer``: the top eigenvalue and trace of every layer's diagonal Hessian block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flatlab.curvature.hvp import HVP_METHODS
from flatlab.curvature.lanczos import DEFAULT_RTOL
from flatlab.curvature.operator import CURVATURES, MODES
from flatlab.curvature.params import PARAM_CHOICES
from flatlab.errors import FlatlabError
from flatlab.measures.base import Cost, Family, Measure, MeasureResult
from flatlab.measures.columns import Column, Estimate, group_node, scalar
from flatlab.measures.config import ConfigError, MeasureConfig, setting
from flatlab.measures.context import SPLITS, MeasureContext

SOLVERS = ("lanczos", "pyhessian", "dense")
PYHESSIAN_NOTE = ("pyhessian runs power iteration with deflation: its eigenvalues are the largest in "
                  "magnitude (a large negative one can appear), in the order found, not sorted")

FAMILY = Family("curvature", "curvature of the loss (Hessian, GGN or empirical Fisher)", request="keys",
                nest=False, description="Hessian (or GGN / empirical Fisher) spectrum, trace, spectral density "
                                        "and per-layer curvature")
GROUP = "curvature"
#: The results group of each curvature (the Hessian keeps release 0.1's group name).
GROUPS = {"hessian": "curvature", "ggn": "ggn", "empirical-fisher": "empirical_fisher"}
#: Column prefix of each curvature (the Hessian's columns have none: top_eigenvalue, trace).
PREFIXES = {"hessian": "", "ggn": "ggn_", "empirical-fisher": "empirical_fisher_"}
NAMES = {"hessian": "Hessian", "ggn": "GGN (Fisher)", "empirical-fisher": "empirical Fisher"}


@dataclass(frozen=True, kw_only=True)
class CurvatureConfig(MeasureConfig):
    """Settings every curvature measure shares (one flag each on the command line)."""

    curvature: str = setting("hessian", "the matrix: hessian (default), ggn (generalized Gauss-Newton, the Fisher "
                                        "for cross-entropy) or empirical-fisher (mean of per-sample gradient "
                                        "outer products)", choices=CURVATURES, shared=True)
    mode: str = setting("eval", "eval (default: BatchNorm running statistics, no dropout) or train (a stochastic "
                                "curvature with dropout active: each product differs)", choices=MODES, shared=True)
    split: str = setting("source", "data to measure on: source (training set, default), source-out, target",
                         choices=SPLITS, shared=True)
    solver: str = setting("lanczos", "lanczos (default; early-stopping Lanczos, or ARPACK with tol), pyhessian "
                                     "(its power iteration, for comparison), dense (float64, small models only)",
                          choices=SOLVERS, shared=True)
    wrt: str = setting("effective", "quantized models: curvature w.r.t. the de-quantized (deployed) weights "
                                    "(effective, default) or the latent weights through the straight-through "
                                    "estimator (latent)", choices=("effective", "latent"), shared=True)
    params: str = setting("all", "parameters: all (default), weights (conv/linear kernels only), no-bn "
                                 "(all but normalization)", choices=PARAM_CHOICES, shared=True)
    hvp: str = setting("auto", "how Hessian-vector products are computed (auto: the faster one, see benchmarks)",
                       choices=HVP_METHODS, shared=True)

    def validate(self) -> None:
        super().validate()
        if self.hvp != "auto" and self.curvature != "hessian":
            raise ConfigError("hvp", f"= {self.hvp} picks a Hessian-vector product method: with curvature "
                                     f"{self.curvature} leave it at auto")
        if self.solver == "dense" and self.mode != "eval":
            raise ConfigError("solver", "dense builds the eval-mode matrix only: use solver lanczos with mode train")
        if self.solver == "pyhessian":
            if self.curvature != "hessian":
                raise ConfigError("solver", "pyhessian computes Hessian eigenvalues only: use solver lanczos "
                                            f"for curvature {self.curvature}")
            from flatlab.curvature.power_iteration import import_pyhessian

            import_pyhessian()


@dataclass(frozen=True, kw_only=True)
class _EigenSolverConfig(CurvatureConfig):
    rtol: float | None = setting(None, "Lanczos stops once every top-k eigenvalue's residual ||Hu - lu|| is below "
                                       f"rtol x |l| (default {DEFAULT_RTOL:g}; each eigenvalue's error is below "
                                       "its residual)", minimum=0.0, exclusive_minimum=True, shared=True)
    tol: float | None = setting(None, "use ARPACK (scipy eigsh) to relative accuracy tol instead of the "
                                      "early-stopping Lanczos: more products, tighter answers (e.g. 1e-6)",
                                minimum=0.0, shared=True)

    def validate(self) -> None:
        super().validate()
        if self.tol is not None and self.rtol is not None:
            raise ConfigError("tol", "(ARPACK) and rtol (early-stopping Lanczos) pick different solvers: give one")

    def fingerprint_settings(self) -> dict[str, Any]:
        settings = {k: v for k, v in self.settings().items() if k not in ("rtol", "tol")}
        return {**settings, **self.eigen_settings()}

    def eigen_settings(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~flatlab.curvature.lanczos.lanczos_top_eigenvalues`."""
        if self.tol is not None:
            return {"method": "arpack", "tol": self.tol}
        return {"method": "lanczos", "rtol": DEFAULT_RTOL if self.rtol is None else self.rtol}


@dataclass(frozen=True, kw_only=True)
class TopEigenvaluesConfig(_EigenSolverConfig):
    """The ``top_k`` largest Hessian eigenvalues with residuals."""

    measure = "top_eigenvalues"
    top_k: int = setting(5, "number of largest Hessian eigenvalues", minimum=1)


@dataclass(frozen=True, kw_only=True)
class TraceConfig(CurvatureConfig):
    """The Hessian trace with its standard error."""

    measure = "trace"
    trace_products: int = setting(99, "Hessian-vector products for the trace (default 99)", minimum=1, shared=True)
    trace_method: str = setting("hutch++", "trace estimator", choices=("hutch++", "hutchinson"))

    def validate(self) -> None:
        super().validate()
        if self.trace_method == "hutch++" and self.trace_products < 3:
            raise ConfigError("trace_products", f"= {self.trace_products} is too few for hutch++ (it needs at least 3)")


@dataclass(frozen=True, kw_only=True)
class DensityConfig(CurvatureConfig):
    """The spectral density by stochastic Lanczos quadrature."""

    measure = "density"
    density_steps: int = setting(80, "Lanczos steps per SLQ run", minimum=1)
    density_runs: int = setting(1, "SLQ runs (random start vectors)", minimum=1)

    def validate(self) -> None:
        super().validate()
        if self.solver == "pyhessian":
            from flatlab.curvature.power_iteration import PYHESSIAN_DENSITY_REFUSAL

            raise FlatlabError(PYHESSIAN_DENSITY_REFUSAL)


@dataclass(frozen=True, kw_only=True)
class PerLayerConfig(_EigenSolverConfig):
    """Top eigenvalue and trace of every layer's Hessian block (trace with at most 30 products)."""

    measure = "per_layer"
    trace_products: int = setting(99, "Hessian-vector products for the trace (default 99)", minimum=1, shared=True)

    def validate(self) -> None:
        super().validate()
        if self.solver == "pyhessian":
            raise ConfigError("solver", "pyhessian does not do per-layer blocks (per_layer uses flatlab's Lanczos): "
                                        "use solver lanczos")


# --- the shared operator ---------------------------------------------------------------------

def operator(ctx: MeasureContext, config: CurvatureConfig) -> Any:
    """The curvature operator for these settings, built once per context (its caches too)."""
    from flatlab.curvature import curvature_operator

    key = (config.curvature, config.mode, config.split, config.wrt, config.params, config.hvp)
    if key not in ctx.cache:
        model = ctx.model(config.wrt)
        ctx.cache[key] = curvature_operator(config.curvature, model, ctx.batches(config.split), ctx.loss_fn,
                                            params=config.params, method=config.hvp, mode=config.mode,
                                            output_fn=ctx.output_fn,
                                            progress=lambda: ctx.progress() if ctx.progress else None)
    return ctx.cache[key]


def _dense(ctx: MeasureContext, config: CurvatureConfig) -> tuple[Any, int]:
    """The dense float64 spectrum (solver dense), computed once; (spectrum, products spent now)."""
    from flatlab.curvature import MAX_DENSE_PARAMS
    from flatlab.curvature.dense import dense_hessian, dense_spectrum

    op = operator(ctx, config)
    key = ("dense", config.curvature, config.mode, config.split, config.wrt, config.params)
    if key in ctx.cache:
        return ctx.cache[key], 0
    if op.dim > MAX_DENSE_PARAMS:
        raise FlatlabError(f"solver dense is limited to {MAX_DENSE_PARAMS} parameters and this model has {op.dim} "
                           "selected: use solver lanczos (dense is the float64 validation mode for small models)")
    if config.curvature == "hessian" and config.mode == "eval":
        matrix = dense_hessian(ctx.model(config.wrt), ctx.batches(config.split), ctx.loss_fn, params=config.params,
                               output_fn=ctx.output_fn)
    else:
        from flatlab.curvature.dense import dense_curvature

        matrix = dense_curvature(config.curvature, ctx.model(config.wrt), ctx.batches(config.split), ctx.loss_fn,
                                 params=config.params, output_fn=ctx.output_fn)
    ctx.cache[key] = dense_spectrum(matrix)
    return ctx.cache[key], op.dim  # one column per parameter


def _operator_and_spectrum(ctx: MeasureContext, config: CurvatureConfig) -> tuple[Any, Any, int]:
    """The measure's operator; with solver dense also the dense spectrum and the products spent
    on it now (else None and 0)."""
    op = operator(ctx, config)
    if config.solver != "dense":
        return op, None, 0
    spectrum, products = _dense(ctx, config)
    return op, spectrum, products


def common_attrs(ctx: MeasureContext, config: CurvatureConfig) -> dict[str, Any]:
    """Attributes of the curvature group every curvature measure shares."""
    op = operator(ctx, config)
    return {"curvature": config.curvature, "mode": config.mode,
            "solver": config.solver, "wrt": config.wrt if ctx.quantized else "fp", "params": config.params,
            "split": config.split, "n_samples": op.num_samples, "seed": ctx.settings.seed,
            "num_params": op.dim, "hvp_method": op.method}


# --- compute functions -----------------------------------------------------------------------

def compute_top_eigenvalues(ctx: MeasureContext, config: TopEigenvaluesConfig) -> MeasureResult:
    from flatlab.curvature.lanczos import lanczos_top_eigenvalues

    op = operator(ctx, config)
    k = config.top_k
    if k > op.dim:
        raise ConfigError("top_k", f"= {k} exceeds the number of selected parameters ({op.dim}): use at most {op.dim}")
    payload: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    _, spectrum, products = _operator_and_spectrum(ctx, config)
    if spectrum is not None:
        values = spectrum.eigenvalues[:k]
        vectors = spectrum.eigenvectors[:, :k]
        residuals = np.linalg.norm(spectrum.hessian @ vectors - vectors * values, axis=0)
        eig_products = 0
    elif config.solver == "pyhessian":
        from flatlab.curvature.power_iteration import pyhessian_top_eigenvalues

        result = pyhessian_top_eigenvalues(op, k, seed=ctx.settings.seed)
        values, residuals, eig_products = result.eigenvalues, result.residuals, result.products
        payload["note"] = PYHESSIAN_NOTE
        attrs["note"] = PYHESSIAN_NOTE
    else:
        solver = config.eigen_settings()
        result = lanczos_top_eigenvalues(op, k, seed=ctx.settings.seed, **solver)
        values, residuals, eig_products = result.eigenvalues, result.residuals, result.products
        payload["converged"] = result.converged
        if result.note:
            payload["eigen_note"] = result.note
        # "method" alone would be ambiguous next to hvp_method
        recorded = {("eigen_method" if key == "method" else key): value for key, value in solver.items()}
        payload.update(recorded)
        attrs.update(recorded)
    products += eig_products
    payload.update(top_eigenvalues=[float(v) for v in values], residuals=[float(r) for r in residuals],
                   eigen_hvps=int(eig_products))
    arrays = {"top_eigenvalues": np.asarray(values, dtype=np.float64),
              "residuals": np.asarray(residuals, dtype=np.float64)}
    attrs["eigen_hvps"] = int(eig_products)
    return MeasureResult("top_eigenvalues", config, payload, arrays, attrs, products)


def compute_trace(ctx: MeasureContext, config: TraceConfig) -> MeasureResult:
    from flatlab.curvature.trace import estimate_trace

    op, spectrum, products = _operator_and_spectrum(ctx, config)
    if spectrum is not None:
        trace, stderr, used, method = float(np.trace(spectrum.hessian)), 0.0, 0, "exact"
    elif config.solver == "pyhessian":
        from flatlab.curvature.power_iteration import pyhessian_trace

        est = pyhessian_trace(op, seed=ctx.settings.seed)
        trace, stderr, used, method = est.trace, est.stderr, est.products, est.method
    else:
        est = estimate_trace(op, config.trace_products, config.trace_method, ctx.settings.seed)
        trace, stderr, used, method = est.trace, est.stderr, est.products, est.method
    products += used
    payload = {"trace": trace, "trace_stderr": stderr, "trace_method": method, "trace_hvps": int(used)}
    arrays = {"trace": np.float64(trace), "trace_stderr": np.float64(stderr)}
    attrs = {"trace_method": method, "trace_hvps": int(used)}
    return MeasureResult("trace", config, payload, arrays, attrs, products)


def compute_density(ctx: MeasureContext, config: DensityConfig) -> MeasureResult:
    from flatlab.curvature.density import gaussian_broadening, slq_density

    op, spectrum, products = _operator_and_spectrum(ctx, config)
    if spectrum is not None:
        n = len(spectrum.eigenvalues)
        nodes, weights = [spectrum.eigenvalues[::-1].copy()], [np.full(n, 1.0 / n)]
        grid, density, sigma = gaussian_broadening(nodes, weights)
        used = 0
    else:
        slq = slq_density(op, config.density_steps, config.density_runs, ctx.settings.seed)
        nodes, weights, grid, density, sigma, used = slq.nodes, slq.weights, slq.grid, slq.density, slq.sigma, slq.products
    products += used
    payload = {"density_grid": grid.tolist(), "density": density.tolist(), "density_sigma": sigma,
               "density_hvps": int(used)}
    arrays = {"density_grid": grid, "density": density, "density_nodes": np.stack(nodes),
              "density_weights": np.stack(weights)}
    attrs = {"density_sigma": sigma, "density_steps": int(len(nodes[0])), "density_runs": len(nodes),
             "density_hvps": int(used)}
    return MeasureResult("density", config, payload, arrays, attrs, products)


def compute_per_layer(ctx: MeasureContext, config: PerLayerConfig) -> MeasureResult:
    from flatlab.curvature.per_layer import per_layer_curvature

    # With solver dense the spectrum is still computed, for the product count; blocks use Lanczos.
    op, _, products = _operator_and_spectrum(ctx, config)
    layers = per_layer_curvature(op, trace_products=min(config.trace_products, 30), seed=ctx.settings.seed,
                                 **config.eigen_settings())
    products += sum(layer.products for layer in layers)
    payload = {"per_layer": [{"layer": L.layer, "num_params": L.num_params, "top_eigenvalue": L.top_eigenvalue,
                              "residual": L.residual, "trace": L.trace, "trace_stderr": L.trace_stderr,
                              "hvps": L.products} for L in layers]}
    arrays = {"per_layer": {L.layer: {"num_params": np.int64(L.num_params), "top_eigenvalue": np.float64(L.top_eigenvalue),
                                      "residual": np.float64(L.residual), "trace": np.float64(L.trace),
                                      "trace_stderr": np.float64(L.trace_stderr)} for L in layers}}
    return MeasureResult("per_layer", config, payload, arrays, {}, products)


# --- results of the curvature functions ------------------------------------------------------

def result_of(found: Any, config: CurvatureConfig | None = None) -> MeasureResult:
    """A :class:`MeasureResult` of what a curvature function returned, laid out as the measure's
    compute function lays it out (same payload keys, arrays and attributes), so it can be stored
    with :func:`flatlab.store.write_result` and read back by the report.

    Args:
        found: an :class:`~flatlab.curvature.lanczos.EigenResult`
            (:func:`~flatlab.curvature.lanczos_top_eigenvalues`), a
            :class:`~flatlab.curvature.trace.TraceEstimate` (:func:`~flatlab.curvature.hutchpp_trace`,
            :func:`~flatlab.curvature.hutchinson_trace`, :func:`~flatlab.curvature.estimate_trace`)
            or a :class:`~flatlab.curvature.density.SpectralDensity`
            (:func:`~flatlab.curvature.slq_density`).
        config: the measure's config, saying which matrix and data the operator was built on
            (e.g. ``TraceConfig(curvature="ggn", split="target")``: the result goes to that
            curvature's group); default the measure's defaults (the Hessian on the source split).
            ``top_k`` is taken from the eigenvalues found.

    Raises:
        FlatlabError: ``found`` is none of these, or ``config`` belongs to another measure.
    """
    from flatlab.curvature.density import SpectralDensity
    from flatlab.curvature.lanczos import EigenResult
    from flatlab.curvature.trace import TraceEstimate

    kinds = {EigenResult: TopEigenvaluesConfig, TraceEstimate: TraceConfig, SpectralDensity: DensityConfig}
    wanted = next((c for t, c in kinds.items() if isinstance(found, t)), None)
    if wanted is None:
        raise FlatlabError(f"cannot store a {type(found).__name__} as a curvature result: give an EigenResult, "
                           "TraceEstimate or SpectralDensity (or a MeasureResult / Measurement)")
    if config is not None and not isinstance(config, wanted):
        raise ConfigError("config", f"is a {type(config).__name__}, but a {type(found).__name__} is a "
                                    f"{wanted.measure} result: pass a {wanted.__name__}")
    if isinstance(found, EigenResult):
        values = np.asarray(found.eigenvalues, dtype=np.float64).ravel()
        config = TopEigenvaluesConfig(**{**(config.settings() if config else {}), "top_k": max(1, len(values))})
        residuals = np.asarray(found.residuals, dtype=np.float64).ravel()
        payload: dict[str, Any] = {"top_eigenvalues": values.tolist(), "residuals": residuals.tolist(),
                                   "eigen_hvps": int(found.products), "converged": bool(found.converged)}
        if found.note:
            payload["eigen_note"] = found.note
        return MeasureResult("top_eigenvalues", config, payload, {"top_eigenvalues": values, "residuals": residuals},
                             {"eigen_hvps": int(found.products)}, int(found.products))
    if isinstance(found, TraceEstimate):
        config = config or TraceConfig()
        payload = {"trace": float(found.trace), "trace_stderr": float(found.stderr), "trace_method": found.method,
                   "trace_hvps": int(found.products)}
        return MeasureResult("trace", config, payload,
                             {"trace": np.float64(found.trace), "trace_stderr": np.float64(found.stderr)},
                             {"trace_method": found.method, "trace_hvps": int(found.products)}, int(found.products))
    config = config or DensityConfig()
    payload = {"density_grid": np.asarray(found.grid).tolist(), "density": np.asarray(found.density).tolist(),
               "density_sigma": float(found.sigma), "density_hvps": int(found.products)}
    arrays = {"density_grid": np.asarray(found.grid), "density": np.asarray(found.density)}
    if found.nodes and len({len(n) for n in found.nodes}) == 1:  # runs cut short differ in length
        arrays.update(density_nodes=np.stack(found.nodes), density_weights=np.stack(found.weights))
    attrs = {"density_sigma": float(found.sigma), "density_steps": int(len(found.nodes[0])) if found.nodes else 0,
             "density_runs": len(found.nodes), "density_hvps": int(found.products)}
    return MeasureResult("density", config, payload, arrays, attrs, int(found.products))


def config_attrs(config: CurvatureConfig) -> dict[str, Any]:
    """The group attributes a curvature result records about its settings when no measurement
    context is at hand (:func:`common_attrs` adds what the operator knows: samples, parameters)."""
    return {"curvature": config.curvature, "mode": config.mode, "solver": config.solver, "wrt": config.wrt,
            "params": config.params, "split": config.split}


# --- reading columns back ----------------------------------------------------------------------

def _read_top_eigenvalue(run: Any, kind: str) -> dict[str, Estimate]:
    node = group_node(run, GROUPS[kind])
    if node is None or "top_eigenvalues" not in node:
        return {}
    values = np.asarray(node["top_eigenvalues"], dtype=np.float64).ravel()
    if not values.size or not np.isfinite(values).any():
        return {}
    i = int(np.nanargmax(values))
    # Lanczos is deterministic given its start vector: it has no standard error. Its residual
    # bounds the distance to the spectrum (stored as ``residuals``), which is a different kind of
    # uncertainty, so it is not reported as one: the column's stderr stays missing (not 0).
    return {f"{PREFIXES[kind]}top_eigenvalue": Estimate(float(values[i]), None)}


def _read_trace(run: Any, kind: str) -> dict[str, Estimate]:
    node = group_node(run, GROUPS[kind])
    if node is None or "trace" not in node:
        return {}
    value = scalar(node["trace"])
    if np.isnan(value):
        return {}
    se = scalar(node.get("trace_stderr"))
    return {f"{PREFIXES[kind]}trace": Estimate(value, None if np.isnan(se) else se)}


def read_top_eigenvalue(run: Any) -> dict[str, Estimate]:
    """The largest eigenvalue of every curvature a run holds, with its Lanczos residual."""
    out: dict[str, Estimate] = {}
    for kind in CURVATURES:
        out.update(_read_top_eigenvalue(run, kind))
    return out


def read_trace(run: Any) -> dict[str, Estimate]:
    """The trace of every curvature a run holds, with its standard error."""
    out: dict[str, Estimate] = {}
    for kind in CURVATURES:
        out.update(_read_trace(run, kind))
    return out


def _group_of(config: CurvatureConfig) -> str:
    return GROUPS[config.curvature]


def _eigen_cost(config: TopEigenvaluesConfig) -> Cost:
    return Cost(gradient=2.0 * (max(3 * config.top_k, 20) + 10))


MEASURES = [
    Measure("top_eigenvalues", FAMILY.name, "largest Hessian eigenvalues with residuals", TopEigenvaluesConfig,
            compute_top_eigenvalues, GROUP,
            tuple(Column(f"{PREFIXES[k]}top_eigenvalue", rf"top {NAMES[k]} eigenvalue $\lambda_{{\max}}$", "",
                         f"largest {NAMES[k]} eigenvalue lambda_max (Lanczos: no standard error; residual in the file)")
                  for k in CURVATURES),
            read_top_eigenvalue, _eigen_cost, request_flag="--top-k", request_key="top_k", group_of=_group_of),
    Measure("trace", FAMILY.name, "trace with standard error", TraceConfig, compute_trace, GROUP,
            tuple(Column(f"{PREFIXES[k]}trace", f"{NAMES[k]} trace", "",
                         f"{NAMES[k]} trace (Hutchinson / Hutch++ / exact) with standard error")
                  for k in CURVATURES),
            read_trace, lambda c: Cost(gradient=2.0 * c.trace_products), request_flag="--trace", request_key="trace",
            group_of=_group_of),
    Measure("density", FAMILY.name, "spectral density by stochastic Lanczos quadrature", DensityConfig,
            compute_density, GROUP, (), lambda run: {},
            lambda c: Cost(gradient=2.0 * c.density_steps * c.density_runs),
            request_flag="--density", request_key="density", group_of=_group_of),
    Measure("per_layer", FAMILY.name, "top eigenvalue and trace of every layer's Hessian block", PerLayerConfig,
            compute_per_layer, GROUP, (), lambda run: {},
            lambda c: Cost(gradient=2.0 * 10 * (20 + min(c.trace_products, 30))),
            request_flag="--per-layer", request_key="per_layer", group_of=_group_of),
]

__all__ = ["FAMILY", "GROUP", "GROUPS", "MEASURES", "PYHESSIAN_NOTE", "SOLVERS", "CurvatureConfig", "DensityConfig",
           "PerLayerConfig", "TopEigenvaluesConfig", "TraceConfig", "common_attrs", "config_attrs", "operator",
           "result_of"]
