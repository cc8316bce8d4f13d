"""3D loss surfaces: static (matplotlib), interactive (offline plotly HTML) and VTK .vtp for ParaView.

Usage: python figures/fig_surface_3d.py RESULTS... OUTDIR [--format pdf,png,html,vtp]
"""

from pathlib import Path

from flatlab.io import atomic_write_text
from flatlab.plots import save_figure, surface_3d, surface_html, write_vtp
from flatlab.plots.collect import figure_formats, script_main, surface_slug
from flatlab.report import Collection


def draw(collection: Collection, out: Path, formats: list[str]) -> list[Path]:
    files = []
    for s in collection.surfaces:
        if s.dims != 2:
            continue
        stem = out / f"fig_surface3d_{surface_slug(s, collection)}"
        files += save_figure(surface_3d(s, title=f"{s.label}: loss surface"), stem, figure_formats(formats))
        if "html" in formats:
            atomic_write_text(f"{stem}.html", surface_html(s))
            files.append(f"{stem}.html")
        if "vtp" in formats:
            files += [write_vtp(f"{stem}_{split}.vtp", s, split) for split in ("source", "target")]
    return files


if __name__ == "__main__":
    script_main(__doc__, draw)
