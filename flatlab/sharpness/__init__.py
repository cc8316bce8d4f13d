"""Sharpness measures: PAC-Bayes and magnitude-aware bounds, worst-case sharpness, local flatness.

Section-4 measures (Jiang et al. 2019) fold BatchNorm first and report every input; local
flatness (SWAD) perturbs the model as it is. Every measure is oriented larger = sharper.
"""

from flatlab.sharpness.bn_fold import FoldReport, fold_batchnorm
from flatlab.sharpness.local_flatness import DEFAULT_RELATIVE_RADII, check_radii, local_flatness
from flatlab.sharpness.magnitude import magnitude_bound, magnitude_bounds
from flatlab.sharpness.pacbayes import pacbayes_bound, pacbayes_bounds
from flatlab.sharpness.sigma_search import SIGMA_IS_STD_NOTE, SearchResult, sigma_search
from flatlab.sharpness.worst_case import (
    keskar_sharpness,
    worst_case_alpha,
    worst_case_bound,
    worst_case_sharpness,
)

__all__ = [
    "DEFAULT_RELATIVE_RADII",
    "SIGMA_IS_STD_NOTE",
    "FoldReport",
    "SearchResult",
    "check_radii",
    "fold_batchnorm",
    "keskar_sharpness",
    "local_flatness",
    "magnitude_bound",
    "magnitude_bounds",
    "pacbayes_bound",
    "pacbayes_bounds",
    "sigma_search",
    "worst_case_alpha",
    "worst_case_bound",
    "worst_case_sharpness",
]
