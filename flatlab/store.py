"""Filing the Python API's results: one call stores any of them in a results file, one reads
results files into pandas.

:func:`write_result` takes what :func:`flatlab.measure_model`, the curvature functions and
:func:`flatlab.surface.surface_of_model` return and writes it in the groups the commands write
(through :func:`flatlab.results.update_run`: atomically, under the writers' lock), so that
``flatlab report``, ``flatlab figures`` and a later ``measure_model(..., results=...)`` read it.
:func:`to_dataframe` is ``flatlab report --csv`` as a :class:`pandas.DataFrame`.

Both are exported at the package root (``flatlab.write_result``, ``flatlab.to_dataframe``).
This module sits above :mod:`flatlab.results` (which stays free of measures and surfaces: the
lower layers import it) and below nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flatlab.errors import FlatlabError
from flatlab.results import (
    check_group_name,
    check_results_target,
    check_run_id,
    update_run,
    versions,
)


def write_result(path: str | os.PathLike[str], result: Any, *, run_id: str | None = None,
                 attrs: Mapping[str, Any] | None = None, name: str | None = None, config: Any = None,
                 settings: Any = None, merge: bool = True) -> str:
    """Store a result of the Python API in a results file, in the groups and layout the commands
    write, so that ``flatlab report`` and ``flatlab figures`` (and :func:`to_dataframe`) read it.

    Accepted results, alone or in a list:

    * a :class:`flatlab.pipeline.Measurement` (:func:`~flatlab.measure_model`,
      :func:`~flatlab.measure_checkpoint`): every measure's group (``curvature``,
      ``bounds/<name>``, ``local_flatness``, ...), with the resume records, so a later
      ``measure_model(..., results=path, run_id=run_id)`` with the same settings reuses them;
    * a :class:`flatlab.measures.MeasureResult` (one measure of a Measurement);
    * what a curvature function returned: an :class:`~flatlab.curvature.EigenResult`
      (``lanczos_top_eigenvalues``), a :class:`~flatlab.curvature.TraceEstimate`
      (``hutchpp_trace``, ...) or a :class:`~flatlab.curvature.SpectralDensity`
      (``slq_density``); ``config`` (e.g. ``TraceConfig(curvature="ggn")``) says which matrix it
      was (default the Hessian), see :func:`flatlab.measures.curvature.result_of`;
    * a :class:`flatlab.surface.Surface` (:func:`~flatlab.surface.surface_of_model`), under
      ``surfaces/<name>`` (default ``name``: its kind, e.g. ``random2d-filter``).

    Every group gets the environment its numbers depend on (flatlab and torch versions, torch
    threads, device, CPU: :func:`flatlab.environment.environment`) and a settings fingerprint
    computed here; the run gets ``versions`` and ``attrs``. The file changes atomically (copy,
    modify, rename) under the writers' lock.

    Args:
        path: the results file (created if absent; an existing one must be a results file).
        result: the result(s).
        run_id: the run's name (letters, digits, ``.``, ``-``, ``_``); default the Measurement's
            (a checkpoint's id); required otherwise.
        attrs: attributes of the run, as a checkpoint's would be, which the report's columns read
            (``algorithm``, ``bits``, ``seed``, ``dataset``, ``domains``, ``test_envs``,
            ``id_acc``, ``ood_acc``, ...); they update the run's stored attributes.
        name: the surface group's name (a single surface only).
        config: the measure config of a curvature function's result (see above).
        settings: the :class:`~flatlab.measures.MeasurementSettings` the results were computed
            with (their fingerprint; default ``MeasurementSettings()``) for results that are not
            a Measurement.
        merge: keep the other measures stored in a group this result writes to (a trace added
            next to stored eigenvalues); False replaces the group.

    Returns:
        The run id written.

    Raises:
        ConfigError: a bad ``run_id``, ``name`` or ``config`` (named).
        FlatlabError: an unsupported object, a file that is not a results file, a stored group
            with other shared settings (with ``merge``).
    """
    from flatlab.environment import environment
    from flatlab.errors import ConfigError
    from flatlab.io import settings_fingerprint
    from flatlab.measures import MeasureResult
    from flatlab.pipeline import Measurement, measurement_of, merge_group
    from flatlab.surface.compute import Surface
    from flatlab.surface.io import surface_payload

    items = list(result) if isinstance(result, (list, tuple)) else [result]
    if not items:
        raise ConfigError("result", "is empty: give a Measurement, MeasureResult, curvature result or Surface")
    measurements: list[Measurement] = []
    loose: list[MeasureResult] = []
    surfaces: list[Surface] = []
    for item in items:
        if isinstance(item, Measurement):
            measurements.append(item)
        elif isinstance(item, MeasureResult):
            loose.append(item)
        elif isinstance(item, Surface):
            surfaces.append(item)
        else:
            from flatlab.measures.curvature import result_of

            loose.append(result_of(item, config))  # FlatlabError for anything else, naming its type
    if loose:
        measurements.append(measurement_of(loose, settings))
    if run_id is None:
        found = sorted({m.run_id for m in measurements if m.run_id})
        if len(found) != 1:
            raise ConfigError("run_id", "must name the run, e.g. run_id='my-resnet'"
                              + (f" (the results belong to {len(found)} runs)" if found else ""))
        run_id = found[0]
    run_id = check_run_id(run_id)
    if name is not None and len(surfaces) != 1:
        raise ConfigError("name", f"names one surface's group; {len(surfaces)} surface(s) given")
    target = check_results_target(path)

    run_attrs: dict[str, Any] = {}
    for m in measurements:
        run_attrs.update(m.run_attrs)
    run_attrs.update(dict(attrs or {}))
    run_attrs["versions"] = versions()
    where = f"{target} /runs/{run_id}"

    builds: dict[str, Callable[[dict[str, Any] | None], tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    for m in measurements:
        for group, (arrays, group_attrs) in m.groups().items():
            if group in builds:
                raise FlatlabError(f"two results write {where}/{group}: combine them in one Measurement or "
                                   "write them one after the other")
            shared = {spec.name: getattr(r.config, spec.name) for r in m.results.values()
                      for spec in r.config.setting_specs() if spec.shared}
            if merge:
                builds[group] = lambda existing, a=arrays, g=group_attrs, sh=shared, gr=group: merge_group(
                    existing, a, g, sh, f"{where}/{gr}")
            else:
                builds[group] = lambda existing, a=arrays, g=group_attrs: (a, g)
    kinds = [str(s.settings.get("kind") or "surface") for s in surfaces]
    for surface, kind in zip(surfaces, kinds):
        surface_name = check_group_name(name or kind, "surface name")
        if kinds.count(kind) > 1 and name is None:
            raise FlatlabError(f"{kinds.count(kind)} surfaces of kind {kind!r}: write them one at a time with name=...")
        settings_of = {k: v for k, v in surface.settings.items() if v is not None}
        # No directions are kept (only the draws' hash): the fingerprint covers the settings and grid.
        fp = settings_fingerprint(settings_of, np.asarray(surface.xcoordinates, dtype=np.float64),
                                  np.asarray([] if surface.ycoordinates is None else surface.ycoordinates,
                                             dtype=np.float64))
        arrays, surface_attrs = surface_payload(surface, None, None, [], [], settings_of, fp)
        surface_attrs.update(environment(str(surface.settings.get("device") or "cpu")))
        if surface.label:
            surface_attrs["label"] = surface.label
        builds[f"surfaces/{surface_name}"] = lambda existing, a=arrays, g=surface_attrs: (a, g)
    update_run(target, run_id, run_attrs, builds)
    return run_id


def to_dataframe(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 measures: Sequence[str] | None = None, radii: Sequence[float] | None = None) -> Any:
    """The per-run table of results files as a :class:`pandas.DataFrame`: one row per run, the
    columns and values of ``flatlab report --csv`` (:func:`flatlab.report.csv_columns`), with a
    missing value as NaN (None in a text column).

    Args:
        paths: a results file (or run folder, standalone surface file: whatever
            :func:`flatlab.report.load_inputs` reads), or a list of them.
        measures, radii: the measure columns, as ``flatlab report --measures`` / ``--radii``.

    Raises:
        FlatlabError: pandas is not installed (``pip install pandas``), or bad inputs.
    """
    try:
        import pandas as pd
    except ImportError:
        raise FlatlabError("to_dataframe needs pandas, which is not installed: pip install pandas "
                           "(or pip install 'flatlab[pandas]')") from None
    from flatlab.report import csv_columns, per_run_table

    inputs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    table = per_run_table(inputs, measures, radii)
    columns = csv_columns(table)
    return pd.DataFrame([[row.get(c) for c in columns] for row in table["rows"]], columns=columns)


__all__ = ["to_dataframe", "write_result"]
