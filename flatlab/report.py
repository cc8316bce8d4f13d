"""Flatness vs out-of-domain accuracy: one row per run, rank correlations, grouped means.

Inputs are results files (DESIGN.md schema, read through :mod:`flatlab.results`), stand-alone
surface files (Li et al.'s names at the root) and run folders (``flatlab train --out DIR``:
only their provenance and accuracies, since nothing has been measured there).

Per run (ensembles included) a row holds

* algorithm, bits (``None`` = full precision), seed, test domain, id_acc, ood_acc;
* ``generalization_gap`` = mean over the source domains of the in-split accuracy minus the mean
  of their out-split accuracy (unweighted means over domains, as DomainBed's ``val_acc``), from
  the run's per-domain accuracies;
* ``domain_gap`` = id_acc - ood_acc;
* every measure column present (declared by the registered measures, :mod:`flatlab.measures`);
  a measure a run lacks is ``NaN`` (printed "-"),
  never zero. Every measure is oriented "larger = sharper".

Per measure and target (ood_acc and both gaps), Kendall's tau-b and Spearman's rho with their
two-sided p-values (:func:`scipy.stats.kendalltau`, :func:`scipy.stats.spearmanr`) over the runs
where both are finite, per test domain and pooled over test domains.

Jiang et al.'s granulated tau (Fantastic generalization measures, 2019): for each hyperparameter
axis i that varies (algorithm, bits, seed; the test domain is never an axis, it is always held
fixed),

    psi_i = mean over the cells theta_{-i} (fixed values of every other axis and of the test
            domain) of tau(measure, target) over the runs of that cell,
    Psi   = mean of psi_i over the axes with at least one defined cell.

A cell needs two runs with distinct values of axis i; a cell whose tau is undefined (a constant
vector) is left out. Each cell's tau is scipy's tau-b, equal to Jiang et al.'s sign-agreement
tau when there are no ties.

Grouped means: per (algorithm, bits), mean and standard error (sample std / sqrt(n)) of every
column over the runs where it is finite.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flatlab.errors import FlatlabError
from flatlab.io import array_sha256
from flatlab.measures.local_flatness import NAME_PATTERN as LF_NAME_PATTERN
from flatlab.measures.local_flatness import radius_key as _radius_key
from flatlab.measures.local_flatness import read_local_flatness
from flatlab.measures.registry import (
    all_columns,
    column_order,
    describe_column,
    find_column,
    read_columns,
)

#: Correlation targets: what a measure is compared with.
TARGETS = ("ood_acc", "generalization_gap", "domain_gap")

#: Axes of Jiang et al.'s granulated tau (the test domain is never one of them).
GRANULATED_AXES = ("algorithm", "bits", "seed")

#: Local-flatness column names: local_flatness_<split>@<radius>[rel] (declared by the measure).
_LF_NAME = LF_NAME_PATTERN

#: Columns that are not measures, in table order.
BASE_COLUMNS = ("run_id", "algorithm", "bits", "seed", "test_domain", "id_acc", "ood_acc",
                "generalization_gap", "domain_gap")


# --- loading -----------------------------------------------------------------------------------

@dataclass
class RunRecord:
    """One run as the inputs describe it: provenance attributes and measured groups."""

    run_id: str
    attrs: dict[str, Any]
    groups: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        bits = self.attrs.get("bits")
        return bits is not None and _as_float(bits) < 32

    @property
    def label(self) -> str:
        """A short human label: algorithm, bits, seed and test domain."""
        parts = [str(self.attrs.get("algorithm", "?")), bits_label(self.attrs.get("bits"))]
        if self.attrs.get("seed") is not None:
            parts.append(f"s{self.attrs['seed']}")
        if self.attrs.get("members"):
            parts.append(f"{len(self.attrs['members'])} members")
        domain = test_domain(self.attrs)
        if domain:
            parts.append(f"test {domain}")
        return " ".join(parts)


@dataclass
class SurfaceRecord:
    """One loss surface (1D curve or 2D grid) with the arrays Li et al.'s names give it.

    ``values`` maps train_loss / train_acc / test_loss / test_acc to arrays of shape
    ``(len(x),)`` (1D) or ``(len(y), len(x))`` with ``Z[j, i] = f(x[i], y[j])`` (2D).
    """

    name: str
    label: str
    xcoordinates: np.ndarray
    ycoordinates: np.ndarray | None
    values: dict[str, np.ndarray]
    attrs: dict[str, Any]
    source: str
    run_id: str | None = None
    quantized: bool | None = None
    run_label: str | None = None  # the model's label without the surface name

    @property
    def dims(self) -> int:
        return 1 if self.ycoordinates is None else 2


@dataclass
class Collection:
    """Everything the inputs hold: runs by id, and surfaces (from runs and stand-alone files)."""

    runs: dict[str, RunRecord] = field(default_factory=dict)
    surfaces: list[SurfaceRecord] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


def bits_label(bits: Any) -> str:
    """'4b' for 4 bits; 'fp' for full precision (bits absent, or 32)."""
    if bits is None or _as_float(bits) >= 32:
        return "fp"
    return f"{int(bits)}b" if float(bits).is_integer() else f"{bits}b"


def test_domain(attrs: dict[str, Any]) -> str | None:
    """The test domain(s) of a run by name ('+'-joined), from ``domains`` and ``test_envs``."""
    envs = attrs.get("test_envs")
    if envs is None:
        return None
    if isinstance(envs, (int, np.integer)):
        envs = [int(envs)]
    domains = attrs.get("domains") or []
    names = [str(domains[e]) if isinstance(e, int) and 0 <= e < len(domains) else f"env{e}" for e in envs]
    return "+".join(names) if names else None


def _as_float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _plain_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out


_SURFACE_ARRAYS = ("train_loss", "train_acc", "test_loss", "test_acc")


def _surface_from_node(node: dict[str, Any], name: str, label: str, source: str,
                       run_id: str | None, quantized: bool | None, run_label: str | None = None) -> SurfaceRecord:
    attrs = _plain_attrs(node.get("attrs", {}))
    if "xcoordinates" not in node or "train_loss" not in node:
        raise FlatlabError(f"{source}: surface {name!r} has no xcoordinates/train_loss arrays: not a loss surface")
    x = np.asarray(node["xcoordinates"], dtype=np.float64).ravel()
    y = np.asarray(node["ycoordinates"], dtype=np.float64).ravel() if "ycoordinates" in node else None
    values = {}
    for key in _SURFACE_ARRAYS:
        if key in node:
            arr = np.asarray(node[key], dtype=np.float64)
            expected = (len(x),) if y is None else (len(y), len(x))
            if arr.shape != expected:
                # Li et al.'s own files allocate (len(x), len(y)) but fill the flat buffer in
                # meshgrid(x, y) order, k = j * len(x) + i (REFERENCE.md 6): the same buffer read as
                # (len(y), len(x)) is Z[j, i] = f(x[i], y[j]).
                if y is not None and arr.shape == (len(x), len(y)):
                    arr = arr.reshape(len(y), len(x))
                else:
                    raise FlatlabError(f"{source}: surface {name!r} array {key} has shape {arr.shape}, "
                                       f"expected {expected} (len(y), len(x))")
            values[key] = arr
    if "raw_directions" in node:
        # The same hash `flatlab surface --directions` records as directions_sha256 when it reuses
        # these draws: surfaces on shared directions are found by it (plots.collect).
        attrs["raw_directions_sha256"] = array_sha256(np.asarray(node["raw_directions"])[: 1 if y is None else 2])
    return SurfaceRecord(name=name, label=label, xcoordinates=x, ycoordinates=y, values=values, attrs=attrs,
                         source=source, run_id=run_id, quantized=quantized, run_label=run_label or label)


def _standalone_quantized(attrs: dict[str, Any]) -> bool | None:
    weights = str(attrs.get("weights", ""))
    if not weights:
        return None
    return "quantized" in weights


def _is_surface_hdf5(path: Path) -> bool:
    import h5py

    try:
        if not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as handle:
            return "xcoordinates" in handle and "train_loss" in handle
    except OSError:
        return False


def _merge_run(collection: Collection, run_id: str, attrs: dict[str, Any], groups: dict[str, Any],
               source: str) -> None:
    found = collection.runs.get(run_id)
    if found is None:
        collection.runs[run_id] = RunRecord(run_id, dict(attrs), dict(groups), [source])
        return
    # The same checkpoint measured into several files: one row, groups merged (later wins).
    for key, value in attrs.items():
        found.attrs.setdefault(key, value)
    _deep_merge(found.groups, groups)
    found.sources.append(source)


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "attrs":
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _load_run_folder(path: Path, collection: Collection) -> None:
    from flatlab.checkpoint import load_checkpoint
    from flatlab.results import run_attrs_from_checkpoint, run_id_for

    ckpt = load_checkpoint(path)
    attrs = run_attrs_from_checkpoint(ckpt)
    attrs.pop("command_line", None)
    _merge_run(collection, run_id_for(ckpt.path), attrs, {}, str(path))


def load_inputs(paths: Iterable[str | os.PathLike[str]]) -> Collection:
    """Read results files, stand-alone surface files and run folders into one :class:`Collection`.

    Raises:
        FlatlabError: a path that does not exist, is none of those kinds, or a results file with
            no runs and no surface.
    """
    from flatlab.results import is_results_file, read_results

    collection = Collection()
    for raw in paths:
        path = Path(raw)
        collection.inputs.append(str(path))
        if not path.exists():
            raise FlatlabError(f"no such file or folder: {path}")
        if path.is_dir():
            if not (path / "model.pt").is_file():
                raise FlatlabError(f"{path} is a folder without model.pt: pass a results file (.h5) or a run "
                                   "folder written by `flatlab train --out DIR`")
            _load_run_folder(path, collection)
            continue
        if is_results_file(path):
            view = read_results(path)
            runs = view.get("runs", {})
            for run_id, run in runs.items():
                attrs = _plain_attrs(run.get("attrs", {}))
                groups = {k: v for k, v in run.items() if k != "attrs"}
                _merge_run(collection, run_id, attrs, groups, str(path))
                record = collection.runs[run_id]
                for name, node in groups.get("surfaces", {}).items():
                    if name == "attrs" or not isinstance(node, dict):
                        continue
                    collection.surfaces.append(_surface_from_node(
                        node, name, f"{record.label} {name}", str(path), run_id, record.quantized, record.label))
            has_root_surface = "xcoordinates" in view and "train_loss" in view
            if has_root_surface:
                attrs = _plain_attrs(view.get("attrs", {}))
                name = str(attrs.get("kind") or path.stem)
                collection.surfaces.append(_surface_from_node(view, name, path.stem, str(path), None,
                                                              _standalone_quantized(attrs)))
            if not runs and not has_root_surface:
                raise FlatlabError(f"{path} is a flatlab results file with no runs: measure a checkpoint into it "
                                   "first (e.g. flatlab sharpness CKPT --out FILE)")
            continue
        if _is_surface_hdf5(path):  # Li et al.'s loss-landscape file (no flatlab schema attribute)
            from flatlab.surface.io import read_surface_file

            content = read_surface_file(path)
            node = {**content["arrays"], "attrs": content["attrs"]}
            attrs = _plain_attrs(content["attrs"])
            collection.surfaces.append(_surface_from_node(node, str(attrs.get("kind") or path.stem), path.stem,
                                                          str(path), None, _standalone_quantized(attrs)))
            continue
        if path.suffix == ".pt":
            _load_run_folder(path, collection)
            continue
        raise FlatlabError(f"{path} is not a flatlab results file, surface file or run folder "
                           "(expected an HDF5 file written by flatlab --out, or a folder with model.pt)")
    return collection


# --- measures ----------------------------------------------------------------------------------

def static_columns() -> list[str]:
    """Every single-name column the registered measures (and column sources) declare, in
    registry order (larger = sharper, unless a column says otherwise)."""
    return [c.name for _, c in all_columns() if c.pattern is None]


def pattern_columns(present: Iterable[str]) -> list[str]:
    """The columns among ``present`` declared by a name pattern other than local flatness's (e.g.
    ``barrier_loss_target@fp-qat4``, one per stored barrier), in declaration order, then by name.
    Local flatness has its own default (one radius, :func:`default_local_flatness_measures`)."""
    found = []
    for name in present:
        if _LF_NAME.match(name):
            continue
        owner = find_column(name)
        if owner is not None and owner[1].pattern is not None:
            found.append(name)
    return sorted(found, key=lambda n: (column_order(n), find_column(n)[1].order(n)))  # type: ignore[index]


def local_flatness_values(run: RunRecord) -> dict[str, float]:
    """``{local_flatness_<split>@<radius>[rel]: F_gamma}`` for every stored radius of a run."""
    return {k: e.value for k, e in read_local_flatness(run.groups).items()}


def run_estimates(run: RunRecord) -> dict[str, Any]:
    """Every column a run holds as :class:`~flatlab.measures.base.Estimate` (value and, where
    the estimator has one, its standard error), read through the measure registry."""
    return {k: e for k, e in read_columns(run.groups).items() if not math.isnan(e.value)}


def run_measures(run: RunRecord) -> dict[str, float]:
    """Every scalar measure a run holds (the registered measures' columns, local flatness per radius)."""
    return {k: e.value for k, e in run_estimates(run).items()}


def check_measure_names(names: Sequence[str]) -> list[str]:
    """Validate measure names given by a user.

    Raises:
        FlatlabError: a name that no registered measure declares as a column (local flatness:
            ``local_flatness_<source|target>@<radius>[rel]``).
    """
    for name in names:
        if find_column(name) is None:
            known = ", ".join(static_columns())
            raise FlatlabError(f"unknown measure {name!r}: use one of {known}, or local_flatness_source@R / "
                               "local_flatness_target@R (R a radius; append 'rel' for radii relative to ||w||)")
    return list(names)


def _lf_sort_key(name: str) -> tuple[int, str, float]:
    m = _LF_NAME.match(name)
    assert m is not None
    return (0 if m.group(1) == "source" else 1, m.group(3) or "", float(m.group(2)))


def default_local_flatness_measures(runs: Sequence[RunRecord]) -> list[str]:
    """The local-flatness columns shown by default: at the largest radius every measured run shares.

    Radius 0 is never chosen (F_0 = 0 by definition).
    """
    per_run = [set(local_flatness_values(r)) for r in runs]
    per_run = [s for s in per_run if s]
    if not per_run:
        return []
    common = set.intersection(*per_run)
    chosen: list[str] = []
    for split in ("source", "target"):
        keys = [k for k in common if k.startswith(f"local_flatness_{split}@") and float(_LF_NAME.match(k).group(2)) > 0]
        if keys:
            chosen.append(max(keys, key=lambda k: float(_LF_NAME.match(k).group(2))))
    if not chosen:  # no radius shared by all: the largest of each run's own, as separate columns
        for split in ("source", "target"):
            keys = {k for s in per_run for k in s if k.startswith(f"local_flatness_{split}@")
                    and float(_LF_NAME.match(k).group(2)) > 0}
            chosen.extend(sorted(keys, key=_lf_sort_key)[-1:])
    return chosen


def local_flatness_at(radii: Sequence[float], relative: bool | None = None) -> list[str]:
    """Measure names for local flatness at the given radii, source and target.

    ``relative`` None: both spellings are matched later (a run answers for the kind it stored).
    """
    names = []
    for split in ("source", "target"):
        for r in radii:
            if relative in (None, False):
                names.append(f"local_flatness_{split}@{_radius_key(r, False)}")
            if relative in (None, True):
                names.append(f"local_flatness_{split}@{_radius_key(r, True)}")
    return names


# --- rows --------------------------------------------------------------------------------------

def generalization_gap(attrs: dict[str, Any]) -> float:
    """Source in-split minus source out-split accuracy (unweighted means over source domains).

    ``NaN`` when the run has no per-domain accuracies for its source domains.
    """
    accs = attrs.get("per_domain_accuracies") or {}
    if not isinstance(accs, dict) or not accs:
        return math.nan
    test_envs = attrs.get("test_envs") or []
    if isinstance(test_envs, (int, np.integer)):
        test_envs = [int(test_envs)]
    envs = sorted({int(m.group(1)) for k in accs if (m := re.match(r"^env(\d+)_(in|out)_acc$", k))})
    source = [e for e in envs if e not in set(test_envs)]
    ins = [_as_float(accs.get(f"env{e}_in_acc")) for e in source]
    outs = [_as_float(accs.get(f"env{e}_out_acc")) for e in source]
    if not source or any(math.isnan(v) for v in ins + outs):
        return math.nan
    return float(np.mean(ins) - np.mean(outs))


def build_rows(collection: Collection, measures: Sequence[str] | None = None,
               radii: Sequence[float] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per run, and the measure columns shown.

    Args:
        collection: :func:`load_inputs`'s result.
        measures: measure names to show (validated); default every scalar measure present in at
            least one run plus local flatness at :func:`default_local_flatness_measures`.
        radii: local-flatness radii to show instead of the default (source and target, each in the
            kind, absolute or relative, that the runs stored).

    Returns:
        ``(rows, measure_names)``; a row has :data:`BASE_COLUMNS`, ``bits_label``, ``label``,
        ``dataset``, ``model``, ``members``, ``sources`` and a value (``NaN`` if missing) for every
        measure column.
    """
    runs = sorted(collection.runs.values(), key=_run_sort_key)
    values = {r.run_id: run_measures(r) for r in runs}
    if measures is not None:
        names = check_measure_names(measures)
    else:
        present = {k for v in values.values() for k in v}
        names = [m for m in static_columns() if m in present]
        names += pattern_columns(present)
        if radii is not None:
            for r in radii:
                found = [m for m in local_flatness_at([r]) if m in present]
                if not found:
                    stored = sorted({_LF_NAME.match(k).group(2) + (_LF_NAME.match(k).group(3) or "")
                                     for k in present if _LF_NAME.match(k)}, key=lambda t: float(t.removesuffix("rel")))
                    raise FlatlabError(f"no run holds local flatness at radius {r:g}: the stored radii are "
                                       f"{', '.join(stored) if stored else 'none'} ('rel' = relative to ||w||)")
                names += found
            names.sort(key=lambda m: (0, column_order(m), "", 0.0) if not _LF_NAME.match(m) else (1, *_lf_sort_key(m)))
        else:
            names += default_local_flatness_measures(runs)
    rows = []
    for run in runs:
        a = run.attrs
        id_acc, ood_acc = _as_float(a.get("id_acc")), _as_float(a.get("ood_acc"))
        row: dict[str, Any] = {
            "run_id": run.run_id,
            "label": run.label,
            "algorithm": a.get("algorithm"),
            "bits": a.get("bits"),
            "bits_label": bits_label(a.get("bits")),
            "seed": a.get("seed"),
            "test_domain": test_domain(a),
            "dataset": a.get("dataset"),
            "model": a.get("model"),
            "members": len(a["members"]) if isinstance(a.get("members"), list) else None,
            "id_acc": id_acc,
            "ood_acc": ood_acc,
            "generalization_gap": generalization_gap(a),
            "domain_gap": id_acc - ood_acc,
            "sources": list(run.sources),
        }
        for name in names:
            row[name] = values[run.run_id].get(name, math.nan)
        rows.append(row)
    return rows, names


def _run_sort_key(run: RunRecord) -> tuple:
    a = run.attrs
    bits = a.get("bits")
    return (str(test_domain(a) or ""), str(a.get("algorithm") or ""), 32.0 if bits is None else _as_float(bits),
            _as_float(a.get("seed")) if a.get("seed") is not None else math.inf, run.run_id)


# --- statistics --------------------------------------------------------------------------------

def _finite_pairs(rows: Sequence[dict[str, Any]], measure: str, target: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    xs, ys, idx = [], [], []
    for i, row in enumerate(rows):
        x, y = _as_float(row.get(measure)), _as_float(row.get(target))
        if math.isfinite(x) and math.isfinite(y):
            xs.append(x)
            ys.append(y)
            idx.append(i)
    return np.asarray(xs), np.asarray(ys), idx


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Kendall's tau-b and Spearman's rho with two-sided p-values; NaN where undefined.

    Both coefficients are NaN for fewer than 2 pairs or a constant vector; the p-values are also
    NaN for exactly 2 pairs (the sign is all two points can say).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    out = {"n": int(len(x)), "kendall_tau": math.nan, "kendall_p": math.nan,
           "spearman_rho": math.nan, "spearman_p": math.nan}
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tau = stats.kendalltau(x, y)
        rho = stats.spearmanr(x, y)
    out.update(kendall_tau=float(tau.statistic), kendall_p=float(tau.pvalue),
               spearman_rho=float(rho.statistic), spearman_p=float(rho.pvalue))
    if len(x) < 3:  # two points: the sign is all there is; a p-value would mislead
        out.update(kendall_p=math.nan, spearman_p=math.nan)
    return out


def rank_correlations(rows: Sequence[dict[str, Any]], measures: Sequence[str],
                      targets: Sequence[str] = TARGETS) -> list[dict[str, Any]]:
    """Per measure and target: correlations per test domain and pooled (``scope = "pooled"``)."""
    domains = sorted({str(r["test_domain"]) for r in rows if r.get("test_domain") is not None})
    out = []
    for measure in measures:
        for target in targets:
            scopes = [(d, [r for r in rows if r.get("test_domain") is not None and str(r["test_domain"]) == d])
                      for d in domains]
            scopes.append(("pooled", list(rows)))
            for scope, subset in scopes:
                x, y, _ = _finite_pairs(subset, measure, target)
                out.append({"measure": measure, "target": target, "scope": scope, **rank_correlation(x, y)})
    return out


def _axis_value(row: dict[str, Any], axis: str) -> str:
    value = row.get(axis)
    if axis == "bits":
        return bits_label(value)
    return "-" if value is None else str(value)


def granulated_tau(rows: Sequence[dict[str, Any]], measure: str, target: str,
                   axes: Sequence[str] = GRANULATED_AXES) -> dict[str, Any]:
    """Jiang et al.'s granulated Kendall tau of ``measure`` against ``target``.

    Returns:
        ``{"granulated_tau": Psi, "axes": {axis: {"tau": psi_i, "cells": number of defined cells}},
        "varying_axes": [...]}``; Psi and psi_i are NaN where undefined.
    """
    usable = [r for r in rows if math.isfinite(_as_float(r.get(measure))) and math.isfinite(_as_float(r.get(target)))]
    varying = [a for a in axes if len({_axis_value(r, a) for r in usable}) > 1]
    per_axis: dict[str, dict[str, Any]] = {}
    for axis in varying:
        others = [a for a in axes if a != axis]
        cells: dict[tuple, list[dict[str, Any]]] = {}
        for r in usable:
            key = (str(r.get("test_domain")), *(_axis_value(r, a) for a in others))
            cells.setdefault(key, []).append(r)
        taus = []
        for members in cells.values():
            if len({_axis_value(r, axis) for r in members}) < 2:
                continue
            x, y, _ = _finite_pairs(members, measure, target)
            tau = rank_correlation(x, y)["kendall_tau"]
            if math.isfinite(tau):
                taus.append(tau)
        per_axis[axis] = {"tau": float(np.mean(taus)) if taus else math.nan, "cells": len(taus)}
    defined = [v["tau"] for v in per_axis.values() if math.isfinite(v["tau"])]
    return {"measure": measure, "target": target, "granulated_tau": float(np.mean(defined)) if defined else math.nan,
            "axes": per_axis, "varying_axes": varying}


def grouped_means(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Per (algorithm, bits): ``{column: {"mean", "stderr", "n"}}`` over runs where it is finite.

    stderr = sample standard deviation (ddof 1) / sqrt(n); NaN for n < 2.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r.get("algorithm")), bits_label(r.get("bits"))), []).append(r)
    out = []
    for (algorithm, bits), members in sorted(groups.items(), key=lambda kv: (kv[0][0], _bits_order(kv[0][1]))):
        stats: dict[str, dict[str, float]] = {}
        for col in columns:
            vals = np.asarray([_as_float(m.get(col)) for m in members], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            n = int(len(vals))
            stats[col] = {"mean": float(vals.mean()) if n else math.nan,
                          "stderr": float(vals.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan, "n": n}
        out.append({"algorithm": algorithm, "bits": members[0].get("bits"), "bits_label": bits, "runs": len(members),
                    "stats": stats})
    return out


def _bits_order(label: str) -> float:
    return 32.0 if label == "fp" else _as_float(label.rstrip("b"))


# --- the report --------------------------------------------------------------------------------

def build_report(paths: Sequence[str | os.PathLike[str]], measures: Sequence[str] | None = None,
                 radii: Sequence[float] | None = None) -> dict[str, Any]:
    """Everything ``flatlab report`` prints: rows, correlations, granulated taus, grouped means.

    Raises:
        FlatlabError: bad inputs (see :func:`load_inputs`), no run in any input, unknown measure.
    """
    if measures is not None:
        check_measure_names(measures)
    collection = load_inputs(paths)
    if not collection.runs:
        raise FlatlabError("the inputs hold no runs (only surfaces): pass a results file with /runs or run folders")
    rows, names = build_rows(collection, measures, radii)
    correlations = rank_correlations(rows, names)
    granulated = [granulated_tau(rows, m, t) for m in names for t in TARGETS]
    groups = grouped_means(rows, ["id_acc", "ood_acc", "generalization_gap", "domain_gap", *names])
    return {"inputs": collection.inputs, "measures": names,
            "measure_descriptions": {m: describe_measure(m) for m in names},
            "rows": rows, "correlations": correlations, "granulated": granulated, "groups": groups}


def describe_measure(name: str) -> str:
    """What a measure column means, in words (from its declaration)."""
    return describe_column(name)


def _cell(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None  # printed "-": missing, never zero
    return value


def report_text(report: dict[str, Any]) -> str:
    """The human tables of a report."""
    from flatlab.commands.common import fmt, table

    names = report["measures"]
    rows = report["rows"]
    header = ["run", "algorithm", "bits", "seed", "test", "id_acc", "ood_acc", "gen_gap", "dom_gap", *names]
    body = [[r["run_id"][:8], r["algorithm"], r["bits_label"], r["seed"], r["test_domain"],
             *(_cell(r[c]) for c in ("id_acc", "ood_acc", "generalization_gap", "domain_gap")),
             *(_cell(r[m]) for m in names)] for r in rows]
    parts = [f"{len(rows)} run(s) from {', '.join(report['inputs'])}", table(body, header)]
    if names:
        legend = [[m, report["measure_descriptions"][m]] for m in names]
        parts.append("measures (larger = sharper):\n" + table(legend))
        domains = {c["scope"] for c in report["correlations"] if c["scope"] != "pooled"}
        # One test domain: its rows equal the pooled ones; print them once (the JSON keeps both).
        shown = [c for c in report["correlations"] if len(domains) > 1 or c["scope"] == "pooled"]
        corr = [[c["measure"], c["target"], c["scope"], c["n"], _cell(c["kendall_tau"]), _cell(c["kendall_p"]),
                 _cell(c["spearman_rho"]), _cell(c["spearman_p"])] for c in shown]
        parts.append("rank correlations:\n" + table(corr, ["measure", "with", "test domain", "n", "tau", "p",
                                                           "rho", "p"]))
        gran = []
        for g in report["granulated"]:
            per_axis = "  ".join(f"{a} {fmt(_cell(v['tau']))} ({v['cells']} cells)" for a, v in g["axes"].items())
            gran.append([g["measure"], g["target"], _cell(g["granulated_tau"]), per_axis or "no axis varies"])
        parts.append("granulated tau (Jiang et al.; axes algorithm, bits, seed; test domain held fixed):\n"
                     + table(gran, ["measure", "with", "Psi", "psi per axis"]))
    else:
        parts.append("no measures in the inputs: run `flatlab sharpness CKPT --out FILE` (curvature, --all bounds) "
                     "and pass FILE here")
    cols = ["id_acc", "ood_acc", "generalization_gap", "domain_gap", *names]
    grp = []
    for g in report["groups"]:
        cells = []
        for c in cols:
            s = g["stats"][c]
            if s["n"] == 0:
                cells.append("-")
            elif s["n"] == 1:
                cells.append(fmt(s["mean"]))
            else:
                cells.append(f"{fmt(s['mean'])} +- {fmt(s['stderr'], 2)}")
        grp.append([g["algorithm"], g["bits_label"], g["runs"], *cells])
    parts.append("means +- standard error per (algorithm, bits):\n"
                 + table(grp, ["algorithm", "bits", "runs", "id_acc", "ood_acc", "gen_gap", "dom_gap", *names]))
    return "\n\n".join(parts)


def rows_csv(report: dict[str, Any]) -> str:
    """The per-run table as CSV; a missing value is an empty cell (never 0)."""
    cols = ["run_id", "algorithm", "bits", "seed", "test_domain", "dataset", "model", "members", "id_acc", "ood_acc",
            "generalization_gap", "domain_gap", *report["measures"]]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in report["rows"]:
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
            elif isinstance(v, float):
                cells.append(repr(v))
            else:
                cells.append(str(v))
        writer.writerow(cells)
    return buf.getvalue()


__all__ = [
    "BASE_COLUMNS",
    "GRANULATED_AXES",
    "TARGETS",
    "Collection",
    "RunRecord",
    "SurfaceRecord",
    "bits_label",
    "build_report",
    "build_rows",
    "check_measure_names",
    "describe_measure",
    "generalization_gap",
    "granulated_tau",
    "grouped_means",
    "load_inputs",
    "local_flatness_values",
    "rank_correlation",
    "rank_correlations",
    "report_text",
    "rows_csv",
    "run_estimates",
    "run_measures",
    "pattern_columns",
    "static_columns",
    "test_domain",
]


def measure_checkpoints(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                        measures: Sequence[Any], settings: Any = None, quiet: bool = False,
                        provenance: dict[str, Any] | None = None) -> str | None:
    """Measure every run folder or checkpoint among ``paths`` into the results file ``out``
    with :func:`flatlab.pipeline.measure_checkpoint` (runs it already holds groups for are
    skipped); return ``out`` if any run is in it, else None. This is ``flatlab report --measure``.

    Raises:
        FlatlabError: a checkpoint that cannot be measured.
    """
    import sys

    from flatlab.checkpoint import load_checkpoint
    from flatlab.pipeline import measure_checkpoint
    from flatlab.results import is_results_file, read_results, run_id_for

    checkpoints = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and (path / "model.pt").is_file():
            checkpoints.append(path / "model.pt")
        elif path.is_file() and not is_results_file(path) and path.suffix == ".pt":
            load_checkpoint(path)  # a readable flatlab checkpoint, or a one-line error
            checkpoints.append(path)
    target = Path(out)
    done: set[str] = set()
    if target.exists():
        if not is_results_file(target):
            raise FlatlabError(f"the measurements' results file {target} exists and is not a flatlab results file")
        done = {rid for rid, run in read_results(target).get("runs", {}).items() if len(run) > 1}
    for ckpt in checkpoints:
        if run_id_for(ckpt) in done:
            continue
        if not quiet:
            sys.stderr.write(f"measuring {ckpt} ...\n")
        measure_checkpoint(ckpt, measures, settings=settings, results=target, provenance=provenance)
    return str(target) if target.exists() else None
