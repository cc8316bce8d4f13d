"""Sharpness measures: PAC-Bayes and magnitude-aware bounds, worst-case sharpness, local flatness,
adaptive/standard sharpness at a fixed radius, relative flatness.

Section-4 measures (Jiang et al. 2019) fold BatchNorm first and report every input; local
flatness (SWAD) and fixed-radius sharpness (Andriushchenko et al. 2023) perturb the model as it
is; relative flatness (Petzka et al. 2021) reweights one layer's Hessian by its weights. Every
measure is oriented larger = sharper.
"""

from flatlab.sharpness.adaptive import (
    AdaptiveSharpnessConfig,
    AdaptiveSharpnessResult,
    adaptive_sharpness,
)
from flatlab.sharpness.bn_fold import FoldReport, fold_batchnorm
from flatlab.sharpness.local_flatness import DEFAULT_RELATIVE_RADII, check_radii, local_flatness
from flatlab.sharpness.magnitude import magnitude_bound, magnitude_bounds
from flatlab.sharpness.pacbayes import pacbayes_bound, pacbayes_bounds
from flatlab.sharpness.relative_flatness import (
    RelativeFlatnessConfig,
    RelativeFlatnessResult,
    relative_flatness,
)
from flatlab.sharpness.sigma_search import SIGMA_IS_STD_NOTE, SearchResult, sigma_search
from flatlab.sharpness.worst_case import (
    keskar_sharpness,
    worst_case_alpha,
    worst_case_bound,
    worst_case_sharpness,
)

__all__ = [
    "DEFAULT_RELATIVE_RADII",
    "AdaptiveSharpnessConfig",
    "AdaptiveSharpnessResult",
    "RelativeFlatnessConfig",
    "RelativeFlatnessResult",
    "adaptive_sharpness",
    "relative_flatness",
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
