r"""Figures of loss barriers: the loss along the line between two models, and the pairwise matrix.

* :func:`barrier_line`: :math:`L(w(\alpha))`, :math:`w(\alpha) = (1-\alpha) w_1 + \alpha w_2`, on
  each split (solid), with the chord :math:`(1-\alpha) L(w_1) + \alpha L(w_2)` (dotted), both
  endpoints marked and named, and the barrier :math:`B` drawn as a vertical segment from the
  chord to the curve at :math:`\alpha^*`, labelled :math:`B \pm` its standard error.
* :func:`barrier_matrix`: the members' pairwise barriers, one annotated heat map per split on
  one colour scale (0 to the largest barrier), cells :math:`B_{ij} \pm \mathrm{se}`.

Data in, Figure out (no file I/O; save with :func:`flatlab.plots.style.save_figure`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flatlab.errors import FlatlabError
from flatlab.plots.style import SEQUENTIAL_CMAP, color, new_figure, style

LOSS_LABEL = "loss (cross-entropy, nats)"


def barrier_line(alphas: Sequence[float], losses: Mapping[str, Sequence[float]],
                 barriers: Mapping[str, tuple[float, float, float]], labels: tuple[str, str] = ("model 1", "model 2"),
                 title: str | None = None) -> Any:
    """Loss along the line, one curve per split, endpoints and barrier marked.

    Args:
        alphas: the grid, 0 (model 1) to 1 (model 2).
        losses: split name -> loss at each grid point.
        barriers: split name -> (barrier, its standard error, alpha where attained).
        labels: names of model 1 and model 2 (marked at alpha = 0 and 1).
        title: figure title.

    Raises:
        FlatlabError: no split, or arrays whose length differs from the grid.
    """
    a = np.asarray(alphas, dtype=np.float64)
    if not losses:
        raise FlatlabError("no split to plot on the barrier line")
    for split, values in losses.items():
        if len(values) != len(a):
            raise FlatlabError(f"split {split!r} has {len(values)} losses for {len(a)} grid points")
    with style():
        fig = new_figure(4.8, 3.6)
        ax = fig.subplots()
        for i, (split, values) in enumerate(losses.items()):
            y = np.asarray(values, dtype=np.float64)
            chord = (1 - a) * y[0] + a * y[-1]
            ax.plot(a, y, color=color(i), marker="o", markersize=3, label=f"{split}", gid=f"loss-{split}")
            ax.plot(a, chord, color=color(i), linestyle=":", linewidth=1.0, gid=f"chord-{split}")
            ax.plot([a[0], a[-1]], [y[0], y[-1]], linestyle="none", marker="s", markersize=6, color=color(i),
                    markeredgecolor="black", gid=f"endpoints-{split}")
            if split in barriers:
                b, se, at = barriers[split]
                j = int(np.argmin(np.abs(a - at)))
                ax.vlines(a[j], chord[j], y[j], color=color(i), linewidth=2.5, alpha=0.6, gid=f"barrier-{split}")
                text = f"B = {b:.3g}" + (f" ± {se:.2g}" if np.isfinite(se) else "")
                ax.annotate(text, (a[j], y[j]), xytext=(4, 4), textcoords="offset points", fontsize=7,
                            color=color(i))
        for x, name, ha in ((a[0], labels[0], "left"), (a[-1], labels[1], "right")):
            ax.annotate(name, (x, 0.0), xycoords=("data", "axes fraction"), xytext=(0, 3), textcoords="offset points",
                        ha=ha, va="bottom", fontsize=7, color="0.25")
        ax.set_xlabel("α (0 = model 1, 1 = model 2)")
        ax.set_ylabel(LOSS_LABEL)
        ax.set_xlim(a[0] - 0.03, a[-1] + 0.03)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=color(i), marker="o", markersize=3, label=split)
                   for i, split in enumerate(losses)]
        handles += [Line2D([], [], color="0.3", linestyle=":", label="chord (1-α) L(w₁) + α L(w₂)"),
                    Line2D([], [], color="0.3", linestyle="none", marker="s", markeredgecolor="black",
                           label="the two models")]
        fig.legend(handles=handles, loc="outside lower center", ncol=2)
        if title:
            ax.set_title(title)
    return fig


def barrier_matrix(matrices: Mapping[str, np.ndarray], labels: Sequence[str],
                   stderrs: Mapping[str, np.ndarray] | None = None, title: str | None = None,
                   quantity: str = "loss") -> Any:
    """Pairwise barriers as annotated heat maps, one per split, on one colour scale.

    Args:
        matrices: split name -> ``(m, m)`` symmetric matrix with zero diagonal.
        labels: the ``m`` model names (both axes).
        stderrs: split name -> ``(m, m)`` standard errors (annotated as ``± se``).
        title: figure title.
        quantity: ``loss`` or ``error`` (the colour bar's label).

    Raises:
        FlatlabError: no split, or a matrix that is not ``(m, m)`` for the labels given.
    """
    if not matrices:
        raise FlatlabError("no pairwise barrier matrix to plot")
    m = len(labels)
    for split, mat in matrices.items():
        if np.asarray(mat).shape != (m, m):
            raise FlatlabError(f"split {split!r}: a {np.asarray(mat).shape} matrix for {m} labels")
    top = max(float(np.nanmax(np.asarray(mat, dtype=np.float64))) for mat in matrices.values())
    vmax = top if top > 0 else 1.0
    with style():
        side = 1.0 + 0.6 * m
        fig = new_figure(side * len(matrices) + 1.2, side + 0.4)
        axes = np.atleast_1d(fig.subplots(1, len(matrices)))
        image = None
        for ax, (split, mat) in zip(axes, matrices.items()):
            values = np.asarray(mat, dtype=np.float64)
            image = ax.imshow(values, cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=vmax, origin="upper")
            errors = None if stderrs is None or split not in stderrs else np.asarray(stderrs[split])
            for i in range(m):
                for j in range(m):
                    text = "-" if i == j else f"{values[i, j]:.2g}"
                    if i != j and errors is not None and np.isfinite(errors[i, j]):
                        text += f"\n±{errors[i, j]:.1g}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if values[i, j] < 0.6 * vmax else "black", gid=f"cell-{split}-{i}-{j}")
            ax.set_xticks(range(m), labels=list(labels), rotation=45 if m > 2 else 0, ha="right" if m > 2 else "center")
            ax.set_yticks(range(m), labels=list(labels))
            ax.set_title(split)
            ax.grid(False)
        bar = fig.colorbar(image, ax=list(axes))
        bar.set_label(f"{quantity} barrier" + (" (nats)" if quantity == "loss" else ""))
        if title:
            fig.suptitle(title)
    return fig


__all__ = ["barrier_line", "barrier_matrix"]
