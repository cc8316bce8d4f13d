"""2D loss contours with log-spaced levels, source and target side by side, one figure per surface.

Usage: python figures/fig_contours.py RESULTS... OUTDIR [--format pdf,png]
"""

from pathlib import Path

from flatlab.plots import contour_2d, save_figure
from flatlab.plots.collect import figure_formats, script_main, surface_slug
from flatlab.report import Collection


def draw(collection: Collection, out: Path, formats: list[str]) -> list[Path]:
    files = []
    for s in collection.surfaces:
        if s.dims == 2:
            fig = contour_2d(s, title=f"{s.label}: loss contours")
            files += save_figure(fig, out / f"fig_contour_{surface_slug(s, collection)}", figure_formats(formats))
    return files


if __name__ == "__main__":
    script_main(__doc__, draw)
