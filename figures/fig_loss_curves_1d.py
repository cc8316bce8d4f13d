"""1D loss curves, source and target; FP and quantized models on one axis, accuracy on a twin axis.

Usage: python figures/fig_loss_curves_1d.py RESULTS... OUTDIR [--format pdf,png]
"""

from pathlib import Path

from flatlab.plots import loss_curves_1d, save_figure
from flatlab.plots.collect import figure_formats, script_main, slug
from flatlab.report import Collection


def draw(collection: Collection, out: Path, formats: list[str]) -> list[Path]:
    by_name = {}
    for s in collection.surfaces:
        if s.dims == 1:
            by_name.setdefault(s.name, []).append(s)
    files = []
    for name, curves in by_name.items():
        curves.sort(key=lambda c: (bool(c.quantized), c.label))
        fig = loss_curves_1d(curves, title=f"1D loss: {name}")
        files += save_figure(fig, out / f"fig_loss_1d_{slug(name)}", figure_formats(formats))
    return files


if __name__ == "__main__":
    script_main(__doc__, draw)
