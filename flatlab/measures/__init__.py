"""The measures flatlab computes, each declared once (config, compute, result group, columns).

Importing this package registers the built-in measures, in the order they run and the report
shows them::

    curvature          top_eigenvalues, trace, density, per_layer
    bounds             pacbayes, magnitude, worst_case
    local_flatness     local_flatness
    sharpness          sharpness (adaptive/standard, worst/average case at a fixed radius)
    relative_flatness  relative_flatness
    per_domain         per_domain (per-domain curvature and eigenspace overlap)

and the columns of results that no one-checkpoint measure computes (a
:class:`~flatlab.measures.base.ColumnSource`): ``barriers`` (loss barriers between two
checkpoints, :mod:`flatlab.measures.barriers`).

A measure is asked for by its config (a frozen, validated dataclass) and computed by
:func:`flatlab.pipeline.measure_checkpoint` or :func:`flatlab.pipeline.measure_model`::

    from flatlab.measures import TopEigenvaluesConfig, TraceConfig, PacBayesConfig
    from flatlab.pipeline import measure_checkpoint
    out = measure_checkpoint("runs/erm/model.pt", [TopEigenvaluesConfig(top_k=5), TraceConfig(),
                                                    PacBayesConfig()], results="results.h5")
    out["trace"].payload["trace"], out["trace"].payload["trace_stderr"]

Adding a measure: write a module with its config, compute function, columns and reader (see
:mod:`flatlab.measures.base`), register it below, test it, document it; nothing else changes.
"""

from flatlab.measures import (
    barriers,
    bounds,
    curvature,
    fixed_radius,
    local_flatness,
    per_domain,
    relative_flatness,
)
from flatlab.measures.base import Cost, Family, Measure, MeasureResult
from flatlab.measures.bounds import MagnitudeConfig, PacBayesConfig, WorstCaseConfig
from flatlab.measures.columns import Column, ColumnSource, Estimate
from flatlab.measures.config import ConfigError, MeasureConfig, setting
from flatlab.measures.context import (
    SPLITS,
    CheckpointContext,
    MeasureContext,
    MeasurementSettings,
    ModelContext,
)
from flatlab.measures.curvature import (
    DensityConfig,
    PerLayerConfig,
    TopEigenvaluesConfig,
    TraceConfig,
)
from flatlab.measures.fixed_radius import SharpnessConfig
from flatlab.measures.local_flatness import LocalFlatnessConfig
from flatlab.measures.per_domain import PerDomainConfig
from flatlab.measures.registry import (
    COLUMN_SOURCES,
    FAMILIES,
    MEASURES,
    check_registry,
    get_measure,
    register_columns,
    register_family,
    register_measure,
)
from flatlab.measures.relative_flatness import RelativeFlatnessMeasureConfig

for _module in (curvature, bounds, local_flatness, fixed_radius, relative_flatness, per_domain):
    register_family(_module.FAMILY)
    for _measure in _module.MEASURES:
        register_measure(_measure)
register_columns(barriers.COLUMNS)
check_registry()

__all__ = [
    "COLUMN_SOURCES",
    "FAMILIES",
    "MEASURES",
    "SPLITS",
    "CheckpointContext",
    "Column",
    "ColumnSource",
    "ConfigError",
    "Cost",
    "DensityConfig",
    "Estimate",
    "Family",
    "LocalFlatnessConfig",
    "MagnitudeConfig",
    "Measure",
    "MeasureConfig",
    "MeasureContext",
    "MeasureResult",
    "MeasurementSettings",
    "ModelContext",
    "PacBayesConfig",
    "PerDomainConfig",
    "PerLayerConfig",
    "RelativeFlatnessMeasureConfig",
    "SharpnessConfig",
    "TopEigenvaluesConfig",
    "TraceConfig",
    "WorstCaseConfig",
    "check_registry",
    "get_measure",
    "register_columns",
    "register_family",
    "register_measure",
    "setting",
]
