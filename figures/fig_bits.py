"""Bit width vs OOD accuracy and vs sharpness: mean ± standard error per algorithm.

Usage: python figures/fig_bits.py RESULTS... OUTDIR [--format pdf,png]
"""

from pathlib import Path

from flatlab.plots import bits_sweep, save_figure
from flatlab.plots.collect import figure_formats, measure_axis_label, script_main
from flatlab.report import Collection, build_rows, grouped_means


def draw(collection: Collection, out: Path, formats: list[str]) -> list[Path]:
    rows, names = build_rows(collection)
    groups = grouped_means(rows, ["ood_acc", *names])
    if len({g["bits_label"] for g in groups}) < 2:
        return []
    files = save_figure(bits_sweep(groups, ["ood_acc"], ["OOD accuracy (%)"], "bit width vs OOD accuracy"),
                        out / "fig_bits_vs_ood_acc", figure_formats(formats))
    sharp = [n for n in names if sum(g["stats"][n]["n"] for g in groups)][:4]
    if sharp:
        fig = bits_sweep(groups, sharp, [measure_axis_label(n) for n in sharp], "bit width vs sharpness")
        files += save_figure(fig, out / "fig_bits_vs_sharpness", figure_formats(formats))
    return files


if __name__ == "__main__":
    script_main(__doc__, draw)
