r"""Heat map of the eigenspace overlap between domains.

Cell :math:`(a, b)` shows :math:`O_{ab} = \|U_a^\top U_b\|_F^2 / k` (the overlap of the top-:math:`k`
curvature eigenspaces of domains :math:`a` and :math:`b`, see
:mod:`flatlab.curvature.per_domain`) on a fixed :math:`[0, 1]` colour scale (viridis, the house's
colour-blind-safe sequential map), each cell annotated with its value. Data in, Figure out: no
file I/O (save with :func:`flatlab.plots.style.save_figure`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from flatlab.errors import FlatlabError
from flatlab.plots.style import SEQUENTIAL_CMAP, new_figure, style

#: Tolerance for values just outside [0, 1] (float32 eigenvectors' rounding).
_RANGE_TOLERANCE = 1e-6


def overlap_heatmap(overlap: np.ndarray | Sequence[Sequence[float]], domains: Sequence[str], *,
                    k: int | None = None, targets: Collection[str] = (), title: str | None = None,
                    decimals: int = 2) -> Any:
    """The ``(D, D)`` overlap matrix as an annotated heat map.

    Args:
        overlap: the matrix, values in [0, 1] (e.g. :attr:`PerDomainCurvature.overlap`).
        domains: the ``D`` domain names, in the matrix's order (both axes).
        k: the subspace dimension, shown in the colour bar's label.
        targets: names of target domains, marked "(target)" on the axes.
        title: figure title.
        decimals: digits of the cell annotations.

    Returns:
        A :class:`matplotlib.figure.Figure`.

    Raises:
        FlatlabError: a matrix that is not square, does not match ``domains``, or leaves [0, 1].
    """
    matrix = np.asarray(overlap, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise FlatlabError(f"the overlap must be a non-empty square matrix, got shape {matrix.shape}")
    if len(domains) != matrix.shape[0]:
        raise FlatlabError(f"{len(domains)} domain names for a {matrix.shape[0]} x {matrix.shape[0]} overlap matrix")
    finite = matrix[np.isfinite(matrix)]
    if finite.size and (finite.min() < -_RANGE_TOLERANCE or finite.max() > 1 + _RANGE_TOLERANCE):
        raise FlatlabError(f"overlaps lie in [0, 1]; this matrix spans [{finite.min():.3g}, {finite.max():.3g}]")
    unknown = [t for t in targets if t not in domains]
    if unknown:
        raise FlatlabError(f"target {unknown[0]!r} is not one of the domains ({', '.join(domains)})")
    labels = [f"{d} (target)" if d in targets else str(d) for d in domains]
    d = matrix.shape[0]
    with style():
        side = 1.2 + 0.55 * d
        fig = new_figure(side + 1.1, side)
        ax = fig.subplots()
        image = ax.imshow(np.clip(matrix, 0.0, 1.0), cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=1.0, origin="upper")
        for i in range(d):
            for j in range(d):
                value = matrix[i, j]
                # White on viridis's dark (low) half, black on its light half: readable either way.
                ax.text(j, i, "-" if not np.isfinite(value) else f"{value:.{decimals}f}", ha="center", va="center",
                        color="white" if not np.isfinite(value) or value < 0.6 else "black", fontsize=7.5,
                        gid=f"cell-{i}-{j}")
        ax.set_xticks(range(d), labels=labels, rotation=45 if d > 3 else 0, ha="right" if d > 3 else "center")
        ax.set_yticks(range(d), labels=labels)
        ax.set_xlabel("domain b")
        ax.set_ylabel("domain a")
        ax.grid(False)
        bar = fig.colorbar(image, ax=ax)
        what = "top-k" if k is None else f"top-{k}"
        bar.set_label(f"{what} eigenspace overlap " + r"$\|U_a^\top U_b\|_F^2/k$")
        if title:
            ax.set_title(title)
    return fig


__all__ = ["overlap_heatmap"]
