"""House style of flatlab's figures: Okabe-Ito colours, readable fonts, vector PDF.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot, no GUI backend), so
building them never opens a window and never touches global pyplot state; saving uses the Agg
canvas for raster formats and the PDF backend for PDF.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: Okabe & Ito (2008) colour-blind-safe palette, ordered for lines on white (yellow last).
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")

#: Perceptually uniform, colour-blind-safe map for surfaces and contours.
SEQUENTIAL_CMAP = "viridis"

#: Marker shapes to tell series apart without colour.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

RC: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 7.5,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.5,
    "lines.markersize": 4.5,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.5,
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays text (editable, searchable)
    "ps.fonttype": 42,
    # No bbox="tight": constrained layout already fits the figure, and "tight" costs a second draw.
    "savefig.pad_inches": 0.03,
    "figure.dpi": 100,
}

#: PNG resolution (PDF is vector).
PNG_DPI = 200


def color(i: int) -> str:
    """The i-th Okabe-Ito colour (cycling)."""
    return OKABE_ITO[i % len(OKABE_ITO)]


def marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Matplotlib settings of flatlab's figures, for the duration of the block."""
    import matplotlib

    with matplotlib.rc_context(RC):
        yield


def new_figure(width: float, height: float) -> Any:
    """A :class:`matplotlib.figure.Figure` of the given size in inches, with flatlab's style.

    Call inside :func:`style` so the settings also apply to the axes created on it.
    """
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def drop_titles(fig: Any) -> Any:
    """Remove every title of a matplotlib figure: the suptitle and each axes' left, centre and
    right titles (a paper's caption says what the figure and its panels are). Returns ``fig``."""
    if getattr(fig, "_suptitle", None) is not None:
        fig._suptitle.remove()  # set_text("") would keep the space constrained layout reserves
        fig._suptitle = None
    for ax in fig.axes:
        for loc in ("left", "center", "right"):
            ax.set_title("", loc=loc)
    return fig


def save_figure(fig: Any, stem: str | os.PathLike[str], formats: Sequence[str]) -> list[Path]:
    """Save ``fig`` as ``stem.<fmt>`` for each of ``formats`` ('pdf', 'png', 'svg'), atomically."""
    from flatlab.io import atomic_path

    written = []
    if len(formats) > 1 and fig.get_layout_engine() is not None:
        # Lay the figure out once, then freeze it: every further save would redo the layout.
        with style():
            fig.draw_without_rendering()
        fig.set_layout_engine("none")
    for fmt in formats:
        target = Path(f"{stem}.{fmt}")
        with style(), atomic_path(target, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=PNG_DPI if fmt == "png" else None,
                        metadata={"Creator": "flatlab"} if fmt in ("pdf", "png", "svg") else None)
        written.append(target)
    return written


__all__ = ["MARKERS", "OKABE_ITO", "PNG_DPI", "RC", "SEQUENTIAL_CMAP", "color", "drop_titles", "marker", "new_figure",
           "save_figure", "style"]
