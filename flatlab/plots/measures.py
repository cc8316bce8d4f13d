"""Figures of measures: spectral densities, local flatness, measure vs OOD accuracy, bit-width
sweeps, and the forest plot of a claims report.

Builders take plain data (arrays, report rows, summaries with their intervals) and return a
:class:`matplotlib.figure.Figure`; they compute nothing but what is drawn. Every mean is drawn
with its interval: a group mean over seeds with its bootstrap CI (computed by
:mod:`flatlab.report`), a single measurement with +-1.96 of its estimation standard error (the
normal 95% interval of a Monte Carlo or Hutch++ estimate). Accuracies are drawn in percent.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flatlab.errors import FlatlabError
from flatlab.plots.style import color, marker, new_figure, style


@dataclass
class DensityCurve:
    """One run's Hessian spectral density on its grid (stochastic Lanczos quadrature)."""

    label: str
    grid: np.ndarray
    density: np.ndarray
    quantized: bool
    group: str | None = None  # runs of one group (e.g. algorithm and bits) share a colour and a legend entry


@dataclass
class FlatnessSeries:
    """Local flatness F_gamma of one algorithm: radii and source/target values with error bars.

    ``*_err`` is the Monte Carlo standard error of a single run, or the standard error over runs
    when several runs were averaged (``runs`` > 1). ``*_ci`` (shape (2, len(radii)): lower and
    upper bounds) is the interval drawn: for several runs the bootstrap CI of the mean over seeds
    (resampled within test domains), for one run mean +- 1.96 Monte Carlo standard errors; when
    None, +-1.96 ``*_err`` is drawn.
    """

    label: str
    radii: np.ndarray
    source: np.ndarray
    source_err: np.ndarray
    target: np.ndarray
    target_err: np.ndarray
    runs: int = 1
    source_ci: np.ndarray | None = None
    target_ci: np.ndarray | None = None


def spectral_density(curves: Sequence[DensityCurve], title: str | None = None, floor: float = 1e-8) -> Any:
    """Hessian eigenvalue densities overlaid, log density axis; FP solid, quantized dashed.

    The y axis starts at ``floor`` x the highest peak, so Gaussian tails far below it do not
    squash the figure (the data drawn are the stored arrays, unclipped).
    """
    if not curves:
        raise FlatlabError("no spectral density to plot")
    with style():
        fig = new_figure(4.2, 3.0)
        ax = fig.subplots()
        peak = 0.0
        groups = list(dict.fromkeys(c.group or c.label for c in curves))
        counts = {g: sum(1 for c in curves if (c.group or c.label) == g) for g in groups}
        labelled: set[str] = set()
        for c in curves:
            g = c.group or c.label
            if g in labelled:
                label = "_nolegend_"
            else:
                labelled.add(g)
                label = f"{g} ({'quantized' if c.quantized else 'FP'})" + (f", {counts[g]} runs" if counts[g] > 1 else "")
            ax.plot(c.grid, c.density, color=color(groups.index(g)), linestyle="--" if c.quantized else "-",
                    label=label, alpha=1.0 if counts[g] == 1 else 0.7, linewidth=1.5 if counts[g] == 1 else 1.0)
            finite = np.asarray(c.density)[np.isfinite(c.density)]
            if finite.size:
                peak = max(peak, float(finite.max()))
        ax.set_yscale("log")
        if peak > 0:
            ax.set_ylim(bottom=peak * floor, top=peak * 3)
        ax.set_xlabel("Hessian eigenvalue λ")
        ax.set_ylabel("spectral density (per unit λ)")
        ax.legend(loc="upper right")
        ax.set_title(title or "Hessian spectral density (SLQ, Gaussian broadening)")
    return fig


def _yerr(y: np.ndarray, ci: np.ndarray | None, err: np.ndarray | None) -> np.ndarray | None:
    """Asymmetric error bars (2, n) from an interval, or +-1.96 err; 0 where undefined."""
    y = np.asarray(y, dtype=np.float64)
    if ci is not None:
        lo, hi = np.asarray(ci, dtype=np.float64)
        out = np.stack([y - lo, hi - y])
    elif err is not None:
        e = 1.96 * np.asarray(err, dtype=np.float64)
        out = np.stack([e, e])
    else:
        return None
    return np.where(np.isfinite(out), np.maximum(out, 0.0), 0.0)


def local_flatness(series: Sequence[FlatnessSeries], relative: bool, title: str | None = None) -> Any:
    """F_gamma vs gamma per algorithm, source and target panels (QT-DoG's figure).

    Lines with 95% error bars: the bootstrap CI of the mean over seeds for a group of runs, or
    +-1.96 Monte Carlo standard errors for one run; ``relative``: the x axis is gamma / ||w||.
    """
    if not series:
        raise FlatlabError("no local flatness to plot")
    with style():
        fig = new_figure(7.0, 2.9)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, split in zip(axes, ("source", "target")):
            for i, s in enumerate(series):
                y = getattr(s, split)
                err = _yerr(y, getattr(s, f"{split}_ci", None), getattr(s, f"{split}_err"))
                ax.errorbar(s.radii, y, yerr=err, color=color(i), marker=marker(i), capsize=2,
                            label=s.label + (f" (mean of {s.runs} runs)" if s.runs > 1 else ""))
            ax.set_title(f"{split} ({'source domains' if split == 'source' else 'test domain'})")
            ax.set_xlabel("radius γ / ‖w‖" if relative else "radius γ (Euclidean norm of the perturbation)")
        axes[0].set_ylabel(r"local flatness $F_\gamma$ (nats)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)))
        fig.suptitle(title or r"local flatness $F_\gamma$ = E[L(w + Δ)] − L(w), ‖Δ‖ = γ" "\n"
                     "bars: 95% CI (runs: bootstrap over seeds; one run: ±1.96 Monte Carlo s.e.)")
    return fig


def _fmt(v: float, digits: int = 2) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.{digits}f}"


def _pval(p: float) -> str:
    """'p = 0.012' for a title; 'p < 0.001' below (never '0e+00'); 'p –' when undefined."""
    if p is None or not math.isfinite(p):
        return "p –"
    return f"p = {p:.3f}" if p >= 1e-3 else "p < 0.001"


def _ci(ci: Sequence[float] | None) -> str:
    if ci is None or len(ci) != 2 or not all(v is not None and math.isfinite(v) for v in ci):
        return ""
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def correlation_title(measure_label: str, corr: dict[str, Any], target: str = "OOD accuracy") -> str:
    """'<measure> vs <target>' and the pooled Kendall tau / Spearman rho with their 95% CIs (when
    ``corr`` holds ``kendall_ci`` / ``spearman_ci``), p-values and n; "n too small" below 5 runs."""
    if corr["n"] < 5:
        return (f"{measure_label} vs {target}\nKendall τ = {_fmt(corr['kendall_tau'])}, Spearman ρ = "
                f"{_fmt(corr['spearman_rho'])}: n = {corr['n']}, n too small for a p-value or interval")
    return (f"{measure_label} vs {target}\nKendall τ = {_fmt(corr['kendall_tau'])}{_ci(corr.get('kendall_ci'))} "
            f"({_pval(corr['kendall_p'])}), Spearman ρ = {_fmt(corr['spearman_rho'])}"
            f"{_ci(corr.get('spearman_ci'))} ({_pval(corr['spearman_p'])}), n = {corr['n']}")


def measure_vs_ood(rows: Sequence[dict[str, Any]], measure: str, measure_label: str,
                   corr: dict[str, Any], log_x: bool | None = None, colors: dict[str, str] | None = None) -> Any:
    """Scatter of a measure against OOD accuracy: colour = algorithm, marker = bits.

    Each point carries a horizontal error bar of +-1.96 times its estimation standard error
    (``<measure>_stderr`` in the row, where the estimator has one): the 95% interval of that one
    measurement. The title holds the pooled rank correlation ``corr``
    (:func:`flatlab.report.rank_correlation`, with CIs when present).
    ``log_x`` None: logarithmic when every value is positive and they span more than 100x.
    ``colors``: algorithm -> colour, to keep colours the same across figures.
    """
    pts = [(r, float(r[measure]), float(r["ood_acc"])) for r in rows
           if r.get(measure) is not None and math.isfinite(r[measure]) and r.get("ood_acc") is not None
           and math.isfinite(r["ood_acc"])]
    if not pts:
        raise FlatlabError(f"no run has both {measure} and ood_acc")
    algorithms = sorted({str(r["algorithm"]) for r, _, _ in pts})
    bits = sorted({r["bits_label"] for r, _, _ in pts}, key=lambda b: 32.0 if b == "fp" else float(b.rstrip("b")))
    xs = np.asarray([x for _, x, _ in pts])
    if log_x is None:
        log_x = bool(np.all(xs > 0) and xs.max() > 100 * xs.min())
    with style():
        fig = new_figure(4.8, 3.4)
        ax = fig.subplots()
        for ai, alg in enumerate(algorithms):
            for bi, b in enumerate(bits):
                sel = [(r, x, y) for r, x, y in pts if str(r["algorithm"]) == alg and r["bits_label"] == b]
                if not sel:
                    continue
                c = (colors or {}).get(alg, color(ai))
                ax.scatter([x for _, x, _ in sel], [100.0 * y for _, _, y in sel], color=c, marker=marker(bi),
                           label=f"{alg} {b}", edgecolors="white", linewidths=0.4, s=30, zorder=3)
                se = np.asarray([_as_float(r.get(f"{measure}_stderr")) for r, _, _ in sel])
                if np.isfinite(se).any():
                    ax.errorbar([x for _, x, _ in sel], [100.0 * y for _, _, y in sel],
                                xerr=np.where(np.isfinite(se), 1.96 * se, 0.0), fmt="none", ecolor=c,
                                elinewidth=0.8, capsize=1.5, zorder=2, gid="stderr")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(f"{measure_label}  [larger = sharper]")
        ax.set_ylabel("OOD accuracy (%)")
        ax.set_title(correlation_title(measure_label, corr), fontsize=8)
        ax.legend(loc="best")
    return fig


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _bits_x(label: str) -> float:
    return 32.0 if label == "fp" else float(label.rstrip("b"))


def bits_sweep(groups: Sequence[dict[str, Any]], columns: Sequence[str], labels: Sequence[str],
               title: str | None = None, colors: dict[str, str] | None = None) -> Any:
    """Bit width vs each column (one panel per column): the mean over seeds per algorithm with its
    95% bootstrap CI (resampled within test domains, :func:`flatlab.report.grouped_means`); a group
    with one run is a point without bars.

    Args:
        groups: :func:`flatlab.report.grouped_means` output (per algorithm and bits, with CIs).
        columns: the columns to draw (``ood_acc`` drawn in percent).
        labels: y-axis labels of the columns.
        title: figure title.
        colors: algorithm -> colour, to keep colours the same across figures.

    The x axis is categorical: the bit widths present, in order, full precision last ("FP").
    """
    if not groups or not columns:
        raise FlatlabError("nothing to plot against bit width")
    n = len(columns)
    with style():
        fig = new_figure(min(3.4 * n, 10.5), 3.0)
        axes = np.atleast_1d(fig.subplots(1, n))
        algorithms = sorted({str(g["algorithm"]) for g in groups})
        all_bits = sorted({_bits_x(g["bits_label"]) for g in groups})
        for ax, col, ylabel in zip(axes, columns, labels):
            scale = 100.0 if col in ("ood_acc", "id_acc") else 1.0
            for ai, alg in enumerate(algorithms):
                pts = sorted((_bits_x(g["bits_label"]), g["stats"][col]) for g in groups
                             if str(g["algorithm"]) == alg and g["stats"][col]["n"] > 0)
                if not pts:
                    continue
                x = [all_bits.index(p[0]) for p in pts]
                y = np.asarray([scale * p[1]["mean"] for p in pts])
                lo = np.asarray([scale * p[1].get("ci_low", math.nan) for p in pts])
                hi = np.asarray([scale * p[1].get("ci_high", math.nan) for p in pts])
                ax.errorbar(x, y, yerr=_yerr(y, np.stack([lo, hi]), None), color=(colors or {}).get(alg, color(ai)),
                            marker=marker(ai), capsize=2.5, label=alg)
            ax.set_xticks(range(len(all_bits)))
            ax.set_xticklabels(["FP" if b >= 32 else f"{b:g}" for b in all_bits])
            ax.set_xlabel("weight bit width")
            # Long measure labels would run into the next panel at this width: two lines instead.
            ax.set_ylabel("\n".join(textwrap.wrap(ylabel, 28)) if n > 1 else ylabel)
        handles, labels_ = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels_, loc="outside lower center", ncol=min(5, len(handles)))
        text = title or "bit width: mean over seeds, 95% bootstrap CI"
        if n == 1 and len(text) > 40:  # one narrow panel: wrap the title instead of clipping it
            text = "\n".join(textwrap.wrap(text, 40))
        fig.suptitle(text)
    return fig


#: Verdict colours of the forest plot (Okabe-Ito): supported bluish green, contradicted
#: vermillion, inconclusive black (hollow marker).
VERDICT_COLORS = {"supported": "#009E73", "contradicted": "#D55E00", "inconclusive": "#000000"}

_CORRELATION_KINDS = ("correlation", "correlation_difference")


def _forest_rows(results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(differences, correlations): the testable results with a finite effect, scaled for drawing.

    Differences are standardized by their sd (sd of the paired differences, or the pooled sd):
    x = E / sd, its CI and margin likewise (an effect size, comparable across columns of any
    unit); correlations are drawn as they are.
    """
    diffs, corrs = [], []
    for r in results:
        if r.get("verdict") == "not testable" or r.get("effect") is None or not math.isfinite(r["effect"]):
            continue
        lo, hi = _as_float(r.get("ci_low")), _as_float(r.get("ci_high"))
        margin = r.get("margin")
        if r.get("kind") in _CORRELATION_KINDS:
            corrs.append({**r, "x": r["effect"], "lo": lo, "hi": hi, "m": margin})
            continue
        sd = _as_float(r.get("sd"))
        if not math.isfinite(sd) or sd <= 0:
            diffs.append({**r, "x": math.nan, "lo": math.nan, "hi": math.nan, "m": None})
            continue
        diffs.append({**r, "x": r["effect"] / sd, "lo": lo / sd, "hi": hi / sd,
                      "m": None if margin is None else margin / sd})
    return diffs, corrs


def claims_forest(results: Sequence[dict[str, Any]], title: str | None = None) -> Any:
    """Forest plot of a claims report: one row per test, its effect and CI, coloured by verdict.

    Args:
        results: the ``results`` of :func:`flatlab.claims.evaluate_claims` (several files' results
            may be concatenated).
        title: figure title.

    Two panels when both kinds are present: differences (comparison, value and accuracy claims),
    drawn as E / sd with the CI scaled alike (sd = the sd of the paired differences or the
    pooled sd, so columns of any unit share one axis); and correlations (tau, rho, granulated
    tau, differences of |tau|) as they are. A dashed line marks 0, short grey ticks a margin
    claim's +-margin. Each row is labelled with the test id on the left and the raw effect,
    interval and verdict on the right; tests that are not testable are listed under the plot.
    """
    results = list(results)
    if not results:
        raise FlatlabError("no claim to plot")
    diffs, corrs = _forest_rows(results)
    panels = [(rows, label) for rows, label in ((diffs, "standardized effect E / sd (A − B)"),
                                                  (corrs, "correlation (τ, ρ, Ψ) or difference of |τ|")) if rows]
    untestable = [r for r in results if r.get("verdict") == "not testable"]
    n_rows = sum(len(rows) for rows, _ in panels)
    with style():
        fig = new_figure(7.2, 0.9 + 0.24 * max(n_rows, 1) + 0.5 * len(panels) + 0.13 * min(len(untestable), 12))
        if not panels:
            ax = fig.subplots()
            ax.set_axis_off()
            axes = []
        else:
            axes = list(np.atleast_1d(fig.subplots(len(panels), 1, height_ratios=[max(len(r), 1) + 1.5
                                                                                    for r, _ in panels])))
        for ax, (rows, xlabel) in zip(axes, panels):
            ys = np.arange(len(rows))[::-1]
            for y, r in zip(ys, rows):
                c = VERDICT_COLORS.get(r["verdict"], "#000000")
                if math.isfinite(r["lo"]) and math.isfinite(r["hi"]):
                    ax.plot([r["lo"], r["hi"]], [y, y], color=c, linewidth=1.6, solid_capstyle="butt", gid="ci")
                if math.isfinite(r["x"]):
                    ax.plot([r["x"]], [y], marker="o", markersize=5, color=c, gid="effect",
                            markerfacecolor="white" if r["verdict"] == "inconclusive" else c)
                if r.get("m"):
                    for m in (-r["m"], r["m"]) if r["expect"] == "equivalent" else \
                            ((-r["m"],) if r["expect"] == "at_least" else (r["m"],)):
                        ax.plot([m], [y], marker="|", markersize=9, color="#777777", gid="margin")
                raw = f"{r['effect']:.3g}"
                if math.isfinite(_as_float(r.get("ci_low"))):
                    raw += f" [{r['ci_low']:.3g}, {r['ci_high']:.3g}]"
                ax.annotate(f"{raw}  {r['verdict']}", (1.01, y), xycoords=("axes fraction", "data"),
                            va="center", ha="left", fontsize=7, color=c, annotation_clip=False)
            ax.axvline(0.0, color="#555555", linestyle="--", linewidth=0.8)
            ax.set_yticks(ys)
            ax.set_yticklabels([r["id"] for r in rows], fontsize=7)
            ax.set_ylim(-0.8, len(rows) - 0.2)
            ax.set_xlabel(xlabel)
            ax.grid(axis="y", visible=False)
        if untestable:
            lines = [f"not testable: {r['id']} ({r['reason'].removeprefix('not testable: ')})" for r in untestable]
            if len(lines) > 12:
                lines = lines[:11] + [f"... and {len(lines) - 11} more"]
            # a figure-level x label: constrained layout keeps room for it under the panels
            fig.supxlabel("\n".join(lines), fontsize=6.5, ha="left", x=0.01, color="#444444")
        fig.suptitle((title or "claims: effect and interval per test") + "\n95% CI (margin claims 90%); "
                     "bluish green: supported, vermillion: contradicted, black (hollow): inconclusive",
                     x=0.02, ha="left", fontsize=8.5)
    return fig


__all__ = ["VERDICT_COLORS", "DensityCurve", "FlatnessSeries", "bits_sweep", "claims_forest", "correlation_title",
           "local_flatness", "measure_vs_ood", "spectral_density"]
