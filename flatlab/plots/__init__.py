"""Figure builders: data in, matplotlib (or plotly) figure out.

* :mod:`flatlab.plots.surfaces`: 1D loss curves, 2D contours (log-spaced levels), static and
  interactive 3D surfaces (colour bars; linear, log or clipped z), VTK PolyData for ParaView;
  each takes a surface read from a file or a :class:`flatlab.surface.Surface` from the API;
* :mod:`flatlab.plots.measures`: Hessian spectral densities, local flatness F_gamma, a measure vs
  OOD accuracy with its rank correlation, bit-width sweeps with bootstrap CIs, the forest plot
  of a claims report;
* :mod:`flatlab.plots.collect`: which figures a results file supports, and writing them;
* :mod:`flatlab.plots.style`: Okabe-Ito palette, fonts, vector PDF.

Builders never use pyplot: they return :class:`matplotlib.figure.Figure` objects (Agg for raster
output), so nothing here opens a window or depends on the interactive backend.
"""

from __future__ import annotations

from flatlab.plots.measures import (
    DensityCurve,
    FlatnessSeries,
    bits_sweep,
    claims_forest,
    local_flatness,
    measure_vs_ood,
    spectral_density,
)
from flatlab.plots.style import OKABE_ITO, save_figure
from flatlab.plots.surfaces import (
    Z_SCALES,
    as_surface_record,
    contour_2d,
    contour_2d_shared,
    loss_curves_1d,
    surface_3d,
    surface_html,
    vtp_text,
    write_vtp,
)

__all__ = [
    "OKABE_ITO",
    "Z_SCALES",
    "as_surface_record",
    "DensityCurve",
    "FlatnessSeries",
    "bits_sweep",
    "claims_forest",
    "contour_2d",
    "contour_2d_shared",
    "local_flatness",
    "loss_curves_1d",
    "measure_vs_ood",
    "save_figure",
    "spectral_density",
    "surface_3d",
    "surface_html",
    "vtp_text",
    "write_vtp",
]
