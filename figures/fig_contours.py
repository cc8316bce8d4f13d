"""2D loss contours with log-spaced levels, source and target side by side, one figure per surface,
plus one figure per group of surfaces on shared directions (e.g. full precision vs 4-bit), drawn
with one colour scale so their contours compare directly.

Usage: python figures/fig_contours.py RESULTS... OUTDIR [--format pdf,png]
"""

from pathlib import Path

from flatlab.plots import contour_2d, contour_2d_shared, save_figure
from flatlab.plots.collect import (
    figure_formats,
    script_main,
    shared_direction_groups,
    shared_group_slug,
    surface_slug,
)
from flatlab.report import Collection


def draw(collection: Collection, out: Path, formats: list[str]) -> list[Path]:
    files = []
    for s in collection.surfaces:
        if s.dims == 2:
            fig = contour_2d(s, title=f"{s.label}: loss contours")
            files += save_figure(fig, out / f"fig_contour_{surface_slug(s, collection)}", figure_formats(formats))
    for members in shared_direction_groups(collection):
        names = " vs ".join(m.run_label or m.label for m in members)
        fig = contour_2d_shared(members, title=f"{names}: shared directions")
        stem = shared_group_slug(members, collection)
        files += save_figure(fig, out / f"fig_contour_shared_{stem}", figure_formats(formats))
    return files


if __name__ == "__main__":
    script_main(__doc__, draw)
