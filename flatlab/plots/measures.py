"""Figures of measures: spectral densities, local flatness, measure vs OOD accuracy, bit-width sweeps.

Builders take plain data (arrays, report rows) and return a :class:`matplotlib.figure.Figure`;
they compute nothing but what is drawn (a group mean and standard error for error bars).
Accuracies are drawn in percent.
"""

from __future__ import annotations

import math
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
    when several runs were averaged (``runs`` > 1).
    """

    label: str
    radii: np.ndarray
    source: np.ndarray
    source_err: np.ndarray
    target: np.ndarray
    target_err: np.ndarray
    runs: int = 1


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


def local_flatness(series: Sequence[FlatnessSeries], relative: bool, title: str | None = None) -> Any:
    """F_gamma vs gamma per algorithm, source and target panels (QT-DoG's figure).

    Lines with error bars (standard errors); ``relative``: the x axis is gamma / ||w||.
    """
    if not series:
        raise FlatlabError("no local flatness to plot")
    with style():
        fig = new_figure(7.0, 2.9)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, split in zip(axes, ("source", "target")):
            for i, s in enumerate(series):
                y = getattr(s, split)
                err = getattr(s, f"{split}_err")
                err = np.where(np.isfinite(err), err, 0.0) if err is not None else None
                ax.errorbar(s.radii, y, yerr=err, color=color(i), marker=marker(i), capsize=2,
                            label=s.label + (f" (mean of {s.runs} runs)" if s.runs > 1 else ""))
            ax.set_title(f"{split} ({'source domains' if split == 'source' else 'test domain'})")
            ax.set_xlabel("radius γ / ‖w‖" if relative else "radius γ (Euclidean norm of the perturbation)")
        axes[0].set_ylabel(r"local flatness $F_\gamma$ (nats)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)))
        fig.suptitle(title or r"local flatness $F_\gamma$ = E[L(w + Δ)] − L(w), ‖Δ‖ = γ (mean ± standard error)")
    return fig


def _fmt(v: float, digits: int = 2) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.{digits}f}"


def _pval(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "–"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.0e}"


def correlation_title(measure_label: str, corr: dict[str, Any], target: str = "OOD accuracy") -> str:
    """'<measure> vs <target>' and the pooled Kendall tau / Spearman rho with p-values and n."""
    return (f"{measure_label} vs {target}\nKendall τ = {_fmt(corr['kendall_tau'])} (p = {_pval(corr['kendall_p'])}), "
            f"Spearman ρ = {_fmt(corr['spearman_rho'])} (p = {_pval(corr['spearman_p'])}), n = {corr['n']}")


def measure_vs_ood(rows: Sequence[dict[str, Any]], measure: str, measure_label: str,
                   corr: dict[str, Any], log_x: bool | None = None, colors: dict[str, str] | None = None) -> Any:
    """Scatter of a measure against OOD accuracy: colour = algorithm, marker = bits.

    The title holds the pooled rank correlation ``corr`` (:func:`flatlab.report.rank_correlation`).
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
                sel = [(x, y) for r, x, y in pts if str(r["algorithm"]) == alg and r["bits_label"] == b]
                if not sel:
                    continue
                ax.scatter([x for x, _ in sel], [100.0 * y for _, y in sel],
                           color=(colors or {}).get(alg, color(ai)), marker=marker(bi),
                           label=f"{alg} {b}", edgecolors="white", linewidths=0.4, s=30, zorder=3)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(f"{measure_label}  [larger = sharper]")
        ax.set_ylabel("OOD accuracy (%)")
        ax.set_title(correlation_title(measure_label, corr), fontsize=8)
        ax.legend(loc="best")
    return fig


def _bits_x(label: str) -> float:
    return 32.0 if label == "fp" else float(label.rstrip("b"))


def bits_sweep(groups: Sequence[dict[str, Any]], columns: Sequence[str], labels: Sequence[str],
               title: str | None = None, colors: dict[str, str] | None = None) -> Any:
    """Bit width vs each column (one panel per column): mean +- standard error per algorithm.

    Args:
        groups: :func:`flatlab.report.grouped_means` output (per algorithm and bits).
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
                y = [scale * p[1]["mean"] for p in pts]
                err = [scale * p[1]["stderr"] if math.isfinite(p[1]["stderr"]) else 0.0 for p in pts]
                ax.errorbar(x, y, yerr=err, color=(colors or {}).get(alg, color(ai)), marker=marker(ai), capsize=2.5,
                            label=alg)
            ax.set_xticks(range(len(all_bits)))
            ax.set_xticklabels(["FP" if b >= 32 else f"{b:g}" for b in all_bits])
            ax.set_xlabel("weight bit width")
            ax.set_ylabel(ylabel)
        handles, labels_ = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels_, loc="outside lower center", ncol=min(5, len(handles)))
        fig.suptitle(title or "bit width: mean ± standard error over runs")
    return fig


__all__ = ["DensityCurve", "FlatnessSeries", "bits_sweep", "correlation_title", "local_flatness",
           "measure_vs_ood", "spectral_density"]
