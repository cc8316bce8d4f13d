"""Each sharpness measure vs OOD accuracy, with the pooled Kendall tau and Spearman rho in the title.

Usage: python figures/fig_measures_vs_ood.py RESULTS... OUTDIR [--format pdf,png]
"""

import math
from pathlib import Path

from flatlab.plots import measure_vs_ood, save_figure
from flatlab.plots.collect import figure_formats, measure_axis_label, script_main, slug
from flatlab.report import Collection, build_rows, rank_correlation


def draw(collection: Collection, out: Path, formats: list[str]) -> list[Path]:
    rows, names = build_rows(collection)
    files = []
    for name in names:
        pts = [r for r in rows if math.isfinite(r[name]) and math.isfinite(r["ood_acc"])]
        if len(pts) < 2:
            continue
        corr = rank_correlation([r[name] for r in pts], [r["ood_acc"] for r in pts])
        fig = measure_vs_ood(rows, name, measure_axis_label(name), corr)
        files += save_figure(fig, out / f"fig_{slug(name)}_vs_ood", figure_formats(formats))
    return files


if __name__ == "__main__":
    script_main(__doc__, draw)
