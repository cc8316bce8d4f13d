"""flatlab: flat minima, quantization-aware training and out-of-domain generalization.

The package follows one flow: data -> training -> checkpoint -> measurements -> results (HDF5)
-> reports and figures. Each stage reads only what the stage before it wrote.

The stable entry points are importable from here (``__all__``)::

    import flatlab
    run = flatlab.train(flatlab.TrainConfig(algorithm="qat", hparam_flags={"bits": 4}, out="runs/q4"))
    out = flatlab.measure_checkpoint("runs/q4/model.pt", [flatlab.TopEigenvaluesConfig(top_k=5),
                                                          flatlab.TraceConfig()], results="r.h5")
    report = flatlab.build_report(["r.h5"])
    flatlab.write_result("r.h5", flatlab.measure_model(model, batches, configs), run_id="my-model")
    table = flatlab.to_dataframe("r.h5")   # pandas: the rows of `flatlab report --csv`

and so are a few documented subpackages: :mod:`flatlab.measures` (every measure's config),
:mod:`flatlab.curvature`, :mod:`flatlab.sharpness` and :mod:`flatlab.surface` (the measurements
as functions of any model and batches), :mod:`flatlab.stats` (intervals, tests, power,
verdicts) and :mod:`flatlab.plots` (figure builders). Names not listed in ``__all__`` (here or
in those subpackages) are internals: importable, but they may change between releases.

Attributes load on first use (PEP 562), so ``import flatlab`` stays cheap and no flatlab module
imports the package root's API back (no import cycles).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

from flatlab.errors import FlatlabError

#: Public name -> the module that defines it.
_API: dict[str, str] = {
    # measuring
    "measure_checkpoint": "flatlab.pipeline",
    "measure_model": "flatlab.pipeline",
    "measure_source": "flatlab.pipeline",
    "ModelSource": "flatlab.sources",
    "DataSource": "flatlab.sources",
    "load_source": "flatlab.sources",
    "Measurement": "flatlab.pipeline",
    "MeasurementSettings": "flatlab.measures",
    "MeasureResult": "flatlab.measures",
    "Estimate": "flatlab.measures",
    "ConfigError": "flatlab.errors",
    "MEASURES": "flatlab.measures",
    "TopEigenvaluesConfig": "flatlab.measures",
    "TraceConfig": "flatlab.measures",
    "DensityConfig": "flatlab.measures",
    "PerLayerConfig": "flatlab.measures",
    "PacBayesConfig": "flatlab.measures",
    "MagnitudeConfig": "flatlab.measures",
    "WorstCaseConfig": "flatlab.measures",
    "LocalFlatnessConfig": "flatlab.measures",
    "SharpnessConfig": "flatlab.measures",
    "RelativeFlatnessMeasureConfig": "flatlab.measures.relative_flatness",
    "PerDomainConfig": "flatlab.measures",
    # training and checkpoints
    "train": "flatlab.train",
    "TrainConfig": "flatlab.train",
    "TrainResult": "flatlab.train",
    "load_checkpoint": "flatlab.checkpoint",
    "Checkpoint": "flatlab.checkpoint",
    "evaluate_models": "flatlab.evaluate",
    # surfaces
    "run_surface": "flatlab.surface.runner",
    "SurfaceRequest": "flatlab.surface.runner",
    # results, reports, studies
    "read_results": "flatlab.results",
    "write_result": "flatlab.store",
    "to_dataframe": "flatlab.store",
    "build_report": "flatlab.report",
    "report_text": "flatlab.report",
    "load_claims": "flatlab.claims",
    "evaluate_claims": "flatlab.claims",
    "run_barrier": "flatlab.surface.barrier_runner",
    "BarrierRequest": "flatlab.surface.barrier_runner",
    "load_study": "flatlab.sweep",
    "run_sweep": "flatlab.sweep",
}

__all__ = ["FlatlabError", "__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'flatlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from flatlab.checkpoint import Checkpoint, load_checkpoint  # noqa: F401
    from flatlab.evaluate import evaluate_models  # noqa: F401
    from flatlab.measures import (  # noqa: F401
        MEASURES,
        ConfigError,
        DensityConfig,
        Estimate,
        LocalFlatnessConfig,
        MagnitudeConfig,
        MeasurementSettings,
        MeasureResult,
        PacBayesConfig,
        PerLayerConfig,
        TopEigenvaluesConfig,
        TraceConfig,
        WorstCaseConfig,
    )
    from flatlab.pipeline import Measurement, measure_checkpoint, measure_model, measure_source  # noqa: F401
    from flatlab.report import build_report, report_text  # noqa: F401
    from flatlab.results import read_results  # noqa: F401
    from flatlab.sources import DataSource, ModelSource, load_source  # noqa: F401
    from flatlab.store import to_dataframe, write_result  # noqa: F401
    from flatlab.surface.runner import SurfaceRequest, run_surface  # noqa: F401
    from flatlab.sweep import load_study, run_sweep  # noqa: F401
    from flatlab.train import TrainConfig, TrainResult, train  # noqa: F401
