"""Local flatness F_gamma vs gamma per algorithm, source and target domains (QT-DoG's figure).

Usage: python figures/fig_local_flatness.py RESULTS... OUTDIR [--format pdf,png]
"""

from pathlib import Path

from flatlab.plots import local_flatness, save_figure
from flatlab.plots.collect import figure_formats, flatness_series, script_main
from flatlab.report import Collection


def draw(collection: Collection, out: Path, formats: list[str]) -> list[Path]:
    series, relative = flatness_series(collection)
    if not series:
        return []
    fig = local_flatness(series, relative)
    return save_figure(fig, out / "fig_local_flatness", figure_formats(formats))


if __name__ == "__main__":
    script_main(__doc__, draw)
