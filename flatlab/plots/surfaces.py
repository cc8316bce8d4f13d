"""Loss-surface figures (Li et al. 2018): 1D curves, 2D contours, 3D surfaces, ParaView files.

Every builder takes a surface as a results file stores it (a
:class:`flatlab.report.SurfaceRecord`, what :func:`flatlab.report.load_inputs` reads) or as the
Python API computes it (a :class:`flatlab.surface.Surface` from
:func:`~flatlab.surface.surface_of_model`), converted by :func:`as_surface_record`. Arrays are
used as stored: 1D ``(len(x),)``; 2D ``(len(y), len(x))`` with ``Z[j, i] = f(x[i], y[j])``;
nothing is recomputed. "source" is the ``train_*`` arrays (the source domains' training set),
"target" the ``test_*`` arrays (the test domain). Accuracies are drawn in percent.

``titles=False`` draws a figure without any title (for a paper, whose caption says what the
panels are); a panel's split then goes into its colour-bar or axis label so the panels still
read apart. The 3D views take ``z_scale``: ``linear``, ``log`` (base-10 logarithm of the loss)
or ``clip`` (the loss clipped at its ``clip_quantile`` quantile, 95th percentile by default, so
that a few huge values at the grid's edge do not flatten the basin); the colour bar says which.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from flatlab.errors import ConfigError, FlatlabError
from flatlab.plots.style import SEQUENTIAL_CMAP, color, new_figure, style

SPLITS = (("source", "train"), ("target", "test"))
LOSS_LABEL = "loss (cross-entropy, nats)"
#: The z scales of the 3D views.
Z_SCALES = ("linear", "log", "clip")
_SPLIT_TEXT = {"source": "source domains", "target": "test domain"}


def as_surface_record(surface: Any, label: str | None = None) -> Any:
    """The builders' input: a :class:`~flatlab.report.SurfaceRecord` as it is, or a
    :class:`~flatlab.surface.Surface` from the Python API converted to one.

    Args:
        surface: a ``SurfaceRecord`` (read from a file) or a ``Surface`` (computed).
        label: the name shown in titles and legends; default the record's label, or the
            surface's own (:attr:`Surface.display_label <flatlab.surface.Surface.display_label>`:
            its ``label``, else its settings in words).

    Raises:
        FlatlabError: ``surface`` is neither (naming what it is).
    """
    from flatlab.report import SurfaceRecord

    if isinstance(surface, SurfaceRecord):
        return surface if label is None else replace(surface, label=label, run_label=label)
    from flatlab.surface.compute import Surface

    if not isinstance(surface, Surface):
        raise FlatlabError(f"surface must be a flatlab.surface.Surface (from surface_of_model) or a SurfaceRecord "
                           f"(from flatlab.report.load_inputs), got {type(surface).__name__}")
    name = label or surface.display_label
    values = {k: np.asarray(v, dtype=np.float64) for k, v in surface.values.items()
              if k in ("train_loss", "train_acc", "test_loss", "test_acc") and v is not None}
    # A surface computed without target batches holds NaN test arrays: nothing to draw there.
    values = {k: v for k, v in values.items() if np.isfinite(v).any()}
    return SurfaceRecord(name=str(surface.settings.get("kind") or "surface"), label=name,
                         xcoordinates=np.asarray(surface.xcoordinates, dtype=np.float64),
                         ycoordinates=None if surface.ycoordinates is None else
                         np.asarray(surface.ycoordinates, dtype=np.float64),
                         values=values, attrs=dict(surface.settings), source="python", run_id=None,
                         quantized=None, run_label=name)


def check_z_scale(z_scale: str, clip_quantile: float = 0.95) -> None:
    """``z_scale`` is one of :data:`Z_SCALES` and ``clip_quantile`` lies in (0, 1].

    Raises:
        ConfigError: naming the parameter.
    """
    if z_scale not in Z_SCALES:
        raise ConfigError("z_scale", f"must be one of {', '.join(Z_SCALES)}, got {z_scale!r}")
    if isinstance(clip_quantile, bool) or not isinstance(clip_quantile, (int, float)) \
            or not 0.0 < float(clip_quantile) <= 1.0:
        raise ConfigError("clip_quantile", f"must be a number in (0, 1], e.g. 0.95, got {clip_quantile!r}")


def _ordinal(n: float) -> str:
    if not float(n).is_integer():
        return f"{n:g}th"
    k = int(n)
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def scaled_z(z: np.ndarray, z_scale: str = "linear", clip_quantile: float = 0.95) -> tuple[np.ndarray, str]:
    """The loss as a 3D view draws it, and the label of its axis and colour bar.

    * ``linear``: :math:`z`, "loss (nats)";
    * ``log``: :math:`\\log_{10} z` (points with :math:`z \\le 0` are left out: NaN);
    * ``clip``: :math:`\\min(z, q)` with :math:`q` the ``clip_quantile`` quantile of the finite
      values (linear interpolation between order statistics, ``numpy.nanquantile``), and the
      label says the quantile and :math:`q`.

    Raises:
        ConfigError: a bad ``z_scale`` or ``clip_quantile``.
        FlatlabError: ``log`` of a surface without a positive finite loss.
    """
    check_z_scale(z_scale, clip_quantile)
    z = np.asarray(z, dtype=np.float64)
    if z_scale == "log":
        positive = np.isfinite(z) & (z > 0)
        if not positive.any():
            raise FlatlabError("z_scale log needs a positive finite loss; this surface has none: use z_scale linear")
        return np.where(positive, np.log10(np.where(positive, z, 1.0)), np.nan), "log₁₀ loss (nats)"
    if z_scale == "clip":
        finite = z[np.isfinite(z)]
        if finite.size == 0:
            return z, "loss (nats)"
        q = float(np.quantile(finite, float(clip_quantile)))
        return (np.where(np.isfinite(z), np.minimum(z, q), np.nan),
                f"loss (nats), clipped at the {_ordinal(100 * float(clip_quantile))} percentile ({q:.3g})")
    return z, "loss (nats)"


def axis_labels(surface: Any) -> tuple[str, str]:
    """Axis labels that say what a step along each axis means."""
    surface = as_surface_record(surface)
    kind = str(surface.attrs.get("kind", surface.name))
    if kind in ("line", "plane"):
        return ("α (0 = model 1, 1 = model 2)", "β (0 = model 1, 1 = model 3)")
    if kind.startswith("hessian"):
        return ("α (Hessian eigenvector 1, unit norm)", "β (Hessian eigenvector 2)")
    norm = str(surface.attrs.get("norm", "filter"))
    scale = {"filter": "filter-normalized", "layer": "layer-normalized", "weight": "weight-scaled"}.get(norm, "raw")
    return (f"α (steps of {scale} direction d₁)", "β (steps of direction d₂)")


def _quantized_tag(q: bool | None) -> str:
    return "" if q is None else (" (quantized)" if q else " (FP)")


def _short(c: Any) -> str:
    return str(getattr(c, "run_label", None) or c.label)


def loss_curves_1d(curves: Sequence[Any], title: str | None = None,
                   marks: Sequence[tuple[float, str]] = (), *, labels: Sequence[str] | None = None,
                   titles: bool = True) -> Any:
    """1D loss curves, source and target side by side, every curve on the same axes.

    Loss (solid, left axis) and accuracy (dashed, right twin axis, %) share a curve's colour, so FP
    and quantized models sit on one axis and read apart by colour and legend.

    Args:
        curves: 1D surfaces (``ycoordinates`` None): :class:`~flatlab.report.SurfaceRecord` or
            :class:`~flatlab.surface.Surface` objects (see :func:`as_surface_record`).
        title: figure title.
        marks: ``(x, text)`` vertical markers, e.g. the two models of an interpolation at 0 and 1.
        labels: one legend label per curve (default: each surface's own label).
        titles: False draws no title (the split goes into each panel's x label).
    """
    if not curves:
        raise FlatlabError("no 1D surface to plot")
    if labels is not None and len(labels) != len(curves):
        raise ConfigError("labels", f"must give one label per curve ({len(curves)}), got {len(labels)}")
    curves = [as_surface_record(c, None if labels is None else labels[i]) for i, c in enumerate(curves)]
    flat = [c.label for c in curves if c.ycoordinates is not None]
    if flat:
        raise FlatlabError(f"surface {flat[0]!r} is 2D: 1D loss curves need 1D surfaces (y=None)")
    with style():
        fig = new_figure(7.0, 2.8)
        axes = fig.subplots(1, 2, sharey=True)
        twins = []
        for ax, (split, prefix) in zip(axes, SPLITS):
            twin = ax.twinx()
            twin.grid(False)
            twin.spines["right"].set_visible(True)
            twins.append(twin)
            for i, c in enumerate(curves):
                label = f"{_short(c)}{_quantized_tag(c.quantized)}"
                loss = c.values.get(f"{prefix}_loss")
                acc = c.values.get(f"{prefix}_acc")
                if loss is not None:
                    ax.plot(c.xcoordinates, loss, color=color(i), linestyle="-", label=f"{label} loss", gid="loss")
                if acc is not None:
                    twin.plot(c.xcoordinates, 100.0 * acc, color=color(i), linestyle="--", label=f"{label} accuracy",
                              gid="accuracy")
            for x_mark, text in marks:
                ax.axvline(x_mark, color="0.5", linestyle=":", linewidth=1.0, zorder=0)
                ax.annotate(text, (x_mark, 0.03), xycoords=("data", "axes fraction"), xytext=(-2, 0),
                            textcoords="offset points", ha="right", va="bottom", rotation=90, fontsize=7,
                            color="0.3", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5})
            xlabel = axis_labels(curves[0])[0]
            if titles:
                ax.set_title(f"{split} ({_SPLIT_TEXT[split]})")
            else:
                xlabel = f"{split}: {xlabel}"
            ax.set_xlabel(xlabel)
            twin.set_ylim(0, 100)
            twin.set_ylabel("accuracy (%, dashed)")
        axes[0].set_ylabel(f"{LOSS_LABEL}, solid")
        # Legend: one colour per model, plus a key for the line styles (solid loss, dashed accuracy).
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=color(i), label=f"{_short(c)}{_quantized_tag(c.quantized)}")
                   for i, c in enumerate(curves)]
        handles += [Line2D([], [], color="0.3", linestyle="-", label="loss"),
                     Line2D([], [], color="0.3", linestyle="--", label="accuracy")]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)))
        if title and titles:
            fig.suptitle(title)
    return fig


def _log_levels(z: np.ndarray, count: int = 25) -> np.ndarray:
    finite = z[np.isfinite(z)]
    positive = finite[finite > 0]
    if positive.size == 0:
        raise FlatlabError("the surface holds no positive finite loss: log-spaced contour levels need one")
    lo, hi = float(positive.min()), float(positive.max())
    if hi <= lo * (1 + 1e-12):
        hi = lo * 1.01 + 1e-12
    levels = np.geomspace(lo, hi, count)
    # geomspace's ends can miss the data's extremes by rounding: widen by a hair so every point is filled.
    levels[0], levels[-1] = lo * (1 - 1e-9), hi * (1 + 1e-9)
    return levels


def _nice_log_ticks(lo: float, hi: float) -> list[float]:
    """Round values m x 10^k within [lo, hi]: mantissas 1, 2, 5, finer when the range is narrow."""
    mantissa_sets = ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9), tuple(np.round(np.arange(1, 10, 0.1), 1)))
    ticks: list[float] = []
    for mantissas in mantissa_sets:
        ticks = [float(f"{m * 10.0 ** k:.6g}") for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo <= m * 10.0 ** k <= hi]
        if len(ticks) >= 3:
            break
    return ticks[:: max(1, len(ticks) // 8)]


def _contour_panel(ax: Any, surface: Any, z: np.ndarray, levels: np.ndarray, xlabel: str, ylabel: str) -> Any:
    """Filled log-level contours of ``z`` on ``surface``'s grid, white lines every third level,
    and a star at the origin (the trained model) for direction surfaces. Returns the filled set."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    x0, y0 = surface.xcoordinates, surface.ycoordinates
    masked = np.ma.masked_invalid(z)
    filled = ax.contourf(x0, y0, masked, levels=levels, norm=LogNorm(vmin=levels[0], vmax=levels[-1]),
                         cmap=SEQUENTIAL_CMAP)
    ax.contour(x0, y0, masked, levels=levels[::3], colors="white", linewidths=0.4, alpha=0.6)
    if str(surface.attrs.get("kind", "")) not in ("line", "plane") and x0.min() <= 0 <= x0.max() \
            and y0.min() <= 0 <= y0.max():
        ax.plot([0], [0], marker="*", color="#D55E00", markersize=9, markeredgecolor="white",
                markeredgewidth=0.5, linestyle="none", gid="origin")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.grid(False)
    return filled


def _log_colorbar(fig: Any, filled: Any, axes: Any, levels: np.ndarray, label: str) -> None:
    bar = fig.colorbar(filled, ax=axes)
    ticks = _nice_log_ticks(levels[0], levels[-1])
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    bar.ax.minorticks_off()
    bar.set_label(label)


def contour_2d(surface: Any, title: str | None = None, levels: int = 25, *, label: str | None = None,
               titles: bool = True) -> Any:
    """Source and target loss contours side by side, with log-spaced levels.

    ``contourf(x, y, Z)`` with ``Z`` of shape ``(len(y), len(x))``: row j is y[j], column i is x[i],
    exactly the stored orientation (no transpose). The origin (the trained model, for direction
    surfaces) is marked with a star.

    Args:
        surface: a 2D :class:`~flatlab.report.SurfaceRecord` or :class:`~flatlab.surface.Surface`.
        title: figure title (none by default).
        levels: number of log-spaced contour levels.
        label: the surface's name (:func:`as_surface_record`).
        titles: False draws no title (each colour bar then names its split).
    """
    surface = as_surface_record(surface, label)
    if surface.ycoordinates is None:
        raise FlatlabError(f"surface {surface.name!r} is 1D: contours need a 2D surface")
    xlab, ylab = axis_labels(surface)
    with style():
        fig = new_figure(7.0, 3.0)
        axes = fig.subplots(1, 2)
        for ax, (split, prefix) in zip(axes, SPLITS):
            z = surface.values.get(f"{prefix}_loss")
            if z is None:
                ax.set_axis_off()
                ax.set_title(f"{split}: not stored")
                continue
            zl = _log_levels(z, levels)
            filled = _contour_panel(ax, surface, z, zl, xlab, ylab)
            _log_colorbar(fig, filled, ax, zl, LOSS_LABEL if titles else f"{split} {LOSS_LABEL}")
            if titles:
                ax.set_title(f"{split} ({_SPLIT_TEXT[split]})")
        if title and titles:
            fig.suptitle(title)
    return fig


def contour_2d_shared(surfaces: Sequence[Any], title: str | None = None, levels: int = 25, *,
                      labels: Sequence[str] | None = None, titles: bool = True) -> Any:
    """Several models' 2D surfaces on the same directions and grid, one row per model, source and
    target in columns, with one set of log-spaced levels and one colour bar per column.

    With shared random directions (``flatlab surface --directions``, or
    :func:`~flatlab.surface.surface_of_model` with one seed on models of one architecture) and a
    shared colour scale, the area inside a contour is directly comparable between models (e.g.
    full precision vs 4-bit), which separate figures with their own scales are not.

    Args:
        surfaces: 2D :class:`~flatlab.report.SurfaceRecord` or :class:`~flatlab.surface.Surface`
            objects on one grid.
        title: figure title.
        levels: number of log-spaced contour levels.
        labels: one row label per surface (default: each surface's own label).
        titles: False draws no title (each row's model then goes into its y label).
    """
    if labels is not None and len(labels) != len(surfaces):
        raise ConfigError("labels", f"must give one label per surface ({len(surfaces)}), got {len(labels)}")
    surfaces = [as_surface_record(s, None if labels is None else labels[i]) for i, s in enumerate(surfaces)]
    if len(surfaces) < 2:
        raise FlatlabError("a shared-direction comparison needs at least two surfaces")
    first = surfaces[0]
    if any(s.ycoordinates is None for s in surfaces):
        raise FlatlabError("a shared-direction comparison needs 2D surfaces")
    for s in surfaces[1:]:
        if not (np.array_equal(s.xcoordinates, first.xcoordinates) and np.array_equal(s.ycoordinates, first.ycoordinates)):
            raise FlatlabError(f"surfaces {first.name!r} and {s.name!r} lie on different grids: compare them on one grid")
    xlab, ylab = axis_labels(first)
    with style():
        fig = new_figure(7.0, 2.6 * len(surfaces) + 0.4)
        axes = np.asarray(fig.subplots(len(surfaces), 2, squeeze=False))
        for col, (split, prefix) in enumerate(SPLITS):
            stored = [s.values.get(f"{prefix}_loss") for s in surfaces]
            present = [z for z in stored if z is not None]
            zl = _log_levels(np.concatenate([z.ravel() for z in present]), levels) if present else None
            filled = None
            for row, (s, z) in enumerate(zip(surfaces, stored)):
                ax = axes[row, col]
                name = s.run_label or s.label
                if z is None or zl is None:
                    ax.set_axis_off()
                    if titles:
                        ax.set_title(f"{name}, {split}: not stored")
                    continue
                # same grid for every row: the x label only under the bottom row
                filled = _contour_panel(ax, s, z, zl, xlab if row == len(surfaces) - 1 else "",
                                        ylab if titles else f"{name}\n{ylab}")
                if titles:
                    ax.set_title(f"{name}: {split}", fontsize=8)
            if filled is not None and zl is not None:
                _log_colorbar(fig, filled, list(axes[:, col]), zl, f"{LOSS_LABEL}, {split}")
        if title and titles:
            fig.suptitle(title)
    return fig


def surface_3d(surface: Any, title: str | None = None, *, label: str | None = None, titles: bool = True,
               z_scale: str = "linear", clip_quantile: float = 0.95) -> Any:
    """Static 3D view of the source and target loss over the 2D grid (matplotlib), each panel
    with its colour bar.

    Args:
        surface: a 2D :class:`~flatlab.report.SurfaceRecord` or :class:`~flatlab.surface.Surface`.
        title: figure title.
        label: the surface's name (:func:`as_surface_record`).
        titles: False draws no title (each colour bar then names its split).
        z_scale: ``linear``, ``log`` or ``clip`` (:func:`scaled_z`); the z axis and the colour
            bar say which.
        clip_quantile: the quantile ``clip`` clips at (default 0.95).

    Raises:
        ConfigError: a bad ``z_scale`` or ``clip_quantile``.
        FlatlabError: a 1D surface.
    """
    import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3d projection)
    from matplotlib.ticker import MaxNLocator

    check_z_scale(z_scale, clip_quantile)
    surface = as_surface_record(surface, label)
    if surface.ycoordinates is None:
        raise FlatlabError(f"surface {surface.name!r} is 1D: a 3D view needs a 2D surface")
    xx, yy = np.meshgrid(surface.xcoordinates, surface.ycoordinates)  # (len(y), len(x)), like Z
    xlab, ylab = axis_labels(surface)
    with style():
        fig = new_figure(7.6, 3.4)
        for k, (split, prefix) in enumerate(SPLITS):
            ax = fig.add_subplot(1, 2, k + 1, projection="3d")
            z = surface.values.get(f"{prefix}_loss")
            if z is None:
                if titles:
                    ax.set_title(f"{split}: not stored")
                continue
            drawn, zlabel = scaled_z(z, z_scale, clip_quantile)
            finite = drawn[np.isfinite(drawn)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            mesh = ax.plot_surface(xx, yy, np.ma.masked_invalid(drawn), cmap=SEQUENTIAL_CMAP, rstride=1, cstride=1,
                                   linewidth=0, antialiased=False, gid=f"{split}_surface",
                                   vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
            ax.set_xlabel(xlab.split(" (")[0], labelpad=1)
            ax.set_ylabel(ylab.split(" (")[0], labelpad=1)
            # The long clip label lives on the colour bar; the z axis keeps the short one.
            ax.set_zlabel(zlabel.split(",")[0], labelpad=1)
            bar = fig.colorbar(mesh, ax=ax, shrink=0.6, pad=0.12)
            bar.set_label(zlabel if titles else f"{split} {zlabel}", fontsize=7)
            bar.ax.tick_params(labelsize=7)
            if titles:
                ax.set_title(f"{split} ({_SPLIT_TEXT[split]})")
            ax.tick_params(labelsize=7, pad=0)
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.yaxis.set_major_locator(MaxNLocator(4))
            ax.zaxis.set_major_locator(MaxNLocator(5))
            ax.set_box_aspect((1, 1, 0.8), zoom=0.85)  # room for the z label inside the figure
        if title and titles:
            fig.suptitle(title)
    return fig


def _nested(z: np.ndarray) -> list:
    # Plain JSON numbers (not plotly's base64 arrays) so the page holds readable values; NaN -> null.
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in np.asarray(z, dtype=np.float64)]


def surface_html(surface: Any, title: str | None = None, *, label: str | None = None, titles: bool = True,
                 z_scale: str = "linear", clip_quantile: float = 0.95) -> str:
    """Interactive 3D surfaces (source and target) as one self-contained HTML page.

    plotly.js is embedded in the page (works offline); the data are plain JSON numbers, with
    ``z[j][i] = f(x[i], y[j])`` as plotly's surface expects. Each surface has its colour bar
    (source on the left of the target's); ``z_scale`` and ``clip_quantile`` as in
    :func:`surface_3d` (the hover text shows the drawn value and, scaled, the loss itself).

    Args:
        title: the page's title (default the surface's label); ``titles=False`` shows none
            (nor the panels' titles).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    check_z_scale(z_scale, clip_quantile)
    surface = as_surface_record(surface, label)
    if surface.ycoordinates is None:
        raise FlatlabError(f"surface {surface.name!r} is 1D: a 3D view needs a 2D surface")
    xlab, ylab = (text.split(" (")[0] for text in axis_labels(surface))
    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "surface"}, {"type": "surface"}]],
                        subplot_titles=[f"{split} ({_SPLIT_TEXT[split]})" for split, _ in SPLITS] if titles else None)
    x = [float(v) for v in surface.xcoordinates]
    y = [float(v) for v in surface.ycoordinates]
    zlabels = {}
    for k, (split, prefix) in enumerate(SPLITS):
        z = surface.values.get(f"{prefix}_loss")
        if z is None:
            continue
        drawn, zlabel = scaled_z(z, z_scale, clip_quantile)
        zlabels[k] = zlabel
        loss = "" if z_scale == "linear" else "<br>loss=%{customdata}"
        fig.add_trace(go.Surface(x=x, y=y, z=_nested(drawn), name=f"{split} loss", colorscale="Viridis",
                                 customdata=None if z_scale == "linear" else _nested(z),
                                 colorbar={"title": {"text": f"{split}<br>{zlabel}".replace(", ", ",<br>"),
                                                     "side": "right"},
                                           "x": 0.45 if k == 0 else 1.0, "len": 0.75},
                                 hovertemplate=f"{xlab}=%{{x}}<br>{ylab}=%{{y}}<br>z=%{{z}}{loss}"
                                               f"<extra>{split}</extra>"),
                      row=1, col=k + 1)
    scenes = {}
    for k in range(2):
        scenes["scene" if k == 0 else "scene2"] = {
            "xaxis": {"title": {"text": xlab}}, "yaxis": {"title": {"text": ylab}},
            "zaxis": {"title": {"text": zlabels.get(k, "loss (nats)").split(",")[0]}}}
    fig.update_layout(title={"text": (title or surface.label) if titles else ""}, **scenes,
                      width=1150, height=550, margin={"l": 10, "r": 10, "t": 60 if titles else 10, "b": 10},
                      font={"family": "Arial, sans-serif", "size": 13})
    return fig.to_html(include_plotlyjs=True, full_html=True)


def vtp_text(surface: Any, split: str = "source", zscale: float = 1.0) -> str:
    """The surface as VTK XML PolyData (ASCII), for ParaView.

    Points are ``(x[i], y[j], zscale * loss[j, i])`` in row-major order ``p = j * len(x) + i``;
    polygons are the grid's quads whose four corners are computed (NaN corners drop the quad and
    are written with z = 0 and ``computed = 0``). Point data: the split's loss and accuracy and
    ``computed``. ``surface``: a 2D :class:`~flatlab.report.SurfaceRecord` or
    :class:`~flatlab.surface.Surface`.
    """
    surface = as_surface_record(surface)
    if surface.ycoordinates is None:
        raise FlatlabError(f"surface {surface.name!r} is 1D: VTK PolyData needs a 2D surface")
    prefix = dict(SPLITS)[split]
    z = surface.values.get(f"{prefix}_loss")
    if z is None:
        raise FlatlabError(f"surface {surface.name!r} has no {prefix}_loss")
    x, y = surface.xcoordinates, surface.ycoordinates
    nx, ny = len(x), len(y)
    ok = np.isfinite(z)
    xx, yy = np.meshgrid(x, y)
    pts = np.stack([xx.ravel(), yy.ravel(), np.where(ok, z * zscale, 0.0).ravel()], axis=1)
    quads = []
    for j in range(ny - 1):
        for i in range(nx - 1):
            if ok[j, i] and ok[j, i + 1] and ok[j + 1, i + 1] and ok[j + 1, i]:
                p = j * nx + i
                quads.append((p, p + 1, p + 1 + nx, p + nx))
    conn = np.asarray(quads, dtype=np.int64).reshape(-1, 4)
    offsets = 4 * np.arange(1, len(conn) + 1, dtype=np.int64)

    def arr(name: str, values: np.ndarray, vtype: str, comps: int = 1) -> str:
        flat = np.asarray(values).ravel()
        body = " ".join(repr(float(v)) if vtype.startswith("Float") else str(int(v)) for v in flat)
        return (f'<DataArray type="{vtype}" Name={quoteattr(name)} NumberOfComponents="{comps}" format="ascii">'
                f"{body}</DataArray>")

    point_data = [arr(f"{split}_loss", np.where(ok, z, 0.0), "Float64")]
    acc = surface.values.get(f"{prefix}_acc")
    if acc is not None:
        point_data.append(arr(f"{split}_acc", np.where(np.isfinite(acc), acc, 0.0), "Float64"))
    point_data.append(arr("computed", ok.astype(np.uint8), "UInt8"))
    lines = [
        '<?xml version="1.0"?>',
        '<VTKFile type="PolyData" version="0.1" byte_order="LittleEndian" header_type="UInt64">',
        "<PolyData>",
        f'<Piece NumberOfPoints="{nx * ny}" NumberOfVerts="0" NumberOfLines="0" NumberOfStrips="0" '
        f'NumberOfPolys="{len(conn)}">',
        f'<PointData Scalars="{split}_loss">', *point_data, "</PointData>",
        "<Points>", arr("Points", pts, "Float64", 3), "</Points>",
        "<Polys>", arr("connectivity", conn, "Int64"), arr("offsets", offsets, "Int64"), "</Polys>",
        "</Piece>", "</PolyData>", "</VTKFile>", "",
    ]
    return "\n".join(lines)


def write_vtp(path: str | os.PathLike[str], surface: Any, split: str = "source", zscale: float = 1.0) -> Path:
    """Write :func:`vtp_text` to ``path`` atomically."""
    from flatlab.io import atomic_write_text

    atomic_write_text(path, vtp_text(surface, split, zscale))
    return Path(path)


__all__ = ["Z_SCALES", "as_surface_record", "axis_labels", "check_z_scale", "contour_2d", "contour_2d_shared",
           "loss_curves_1d", "scaled_z", "surface_3d", "surface_html", "vtp_text", "write_vtp"]
