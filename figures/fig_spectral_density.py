"""Hessian spectral density (log scale), FP solid and quantized dashed, overlaid.

Usage: python figures/fig_spectral_density.py RESULTS... OUTDIR [--format pdf,png]
"""

from pathlib import Path

from flatlab.plots import save_figure, spectral_density
from flatlab.plots.collect import density_curves, figure_formats, script_main
from flatlab.report import Collection


def draw(collection: Collection, out: Path, formats: list[str]) -> list[Path]:
    curves = density_curves(collection)
    if not curves:
        return []
    return save_figure(spectral_density(curves), out / "fig_spectral_density", figure_formats(formats))


if __name__ == "__main__":
    script_main(__doc__, draw)
