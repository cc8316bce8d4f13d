"""Flatness vs out-of-domain accuracy: per-run rows, variants with intervals, comparisons, correlations.

Inputs are results files (the README's results-file schema, read through :mod:`flatlab.results`), stand-alone
surface files (Li et al.'s names at the root) and run folders (``flatlab train --out DIR``:
only their provenance and accuracies, since nothing has been measured there).

**Rows.** Per run (ensembles included) a row holds

* its *variant*: the sweep's variant label when the run has one (``/runs/<id>/sweep`` attr
  ``variant``, written by ``flatlab sweep``), else the algorithm followed by the bit width for a
  quantized run (``erm``, ``qat4``, ``sam4``); an ensemble is its own variant (``eoq`` for an
  ensemble of quantized models, ``ensemble`` for full precision, or the sweep's ensemble name);
* algorithm, bits (``None`` = full precision), seed, test domain, id_acc, ood_acc;
* ``generalization_gap`` = mean over the source domains of the in-split accuracy minus the mean
  of their out-split accuracy (unweighted means over domains, as DomainBed's ``val_acc``), from
  the run's per-domain accuracies;
* ``domain_gap`` = id_acc - ood_acc;
* every measure column present (declared by the registered measures, :mod:`flatlab.measures`),
  with its **estimation standard error** ``<column>_stderr`` where the estimator has one
  (Hutch++ trace, Monte Carlo local flatness, ...): the uncertainty of *one* measurement, shown
  as ``value +- se``. A measure a run lacks is ``NaN`` (printed "-"), never zero. Every
  measure is oriented "larger = sharper";
* the training diagnostic ``gaqat_conflict_max`` where the run logged GAQAT's scale-gradient
  conflict: the largest over layers of the layer's conflict fraction averaged over training steps
  (:func:`gaqat_conflict_of_log`).

**Seed-to-seed variation** (a different uncertainty from the estimation error above): per
variant and column, the mean over runs with a stratified bootstrap CI (runs resampled with
replacement within each test domain; BCa by default, :func:`flatlab.stats.summarize_group`),
the sample sd and n; a note when a test domain has fewer than 5 seeds (the interval is then
unreliable, docs/statistics.md section 1).

**Comparisons** of variant A with variant B on a column (:func:`compare_variants`): paired on
(seed, test domain) when both variants have runs with the same seeds and test domains (mean
difference d = A - B, stratified bootstrap CI, exact sign-flip p for up to 16 pairs, Monte Carlo
beyond); an ensemble has no seed, so a comparison with an ensemble is paired on the test domain
only (the other variant averaged over its seeds within each test domain); otherwise unpaired
(difference of stratum-weighted means, permutation test of the labels within test domains).
A report's comparisons are one family: their p-values are Holm-adjusted together. Each comes
with the seeds per test domain that 80% power at the observed effect (or ``min_effect``) needs.

**Correlations.** Per measure and target (ood_acc and both gaps), Kendall's tau-b and Spearman's
rho with their two-sided p-values (:func:`scipy.stats.kendalltau`, :func:`scipy.stats.spearmanr`)
and percentile bootstrap CIs over runs, per test domain and pooled over test domains (pooled:
runs resampled within test domains). With fewer than 5 runs neither p nor CI is given ("n too
small").

Jiang et al.'s granulated tau (Fantastic generalization measures, 2019): for each hyperparameter
axis i that varies (algorithm, bits, seed; the test domain is never an axis, it is always held
fixed),

    psi_i = mean over the cells theta_{-i} (fixed values of every other axis and of the test
            domain) of tau(measure, target) over the runs of that cell,
    Psi   = mean of psi_i over the axes with at least one defined cell.

A cell needs two runs with distinct values of axis i; a cell whose tau is undefined (a constant
vector) is left out. Each cell's tau is scipy's tau-b, equal to Jiang et al.'s sign-agreement
tau when there are no ties. Its CI: runs resampled within test domains, Psi recomputed
(:func:`flatlab.stats.granulated_tau_with_ci`).

Grouped means (:func:`grouped_means`, kept for the figures): per (algorithm, bits), mean,
standard error (sample sd / sqrt(n)) and the same bootstrap CI as the variant summaries.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
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

#: The accuracy columns every run has (ensembles included), in table order.
ACCURACY_COLUMNS = ("id_acc", "ood_acc", "generalization_gap", "domain_gap")

#: Training diagnostics (not measures: no orientation, no correlation): name -> description.
DIAGNOSTIC_COLUMNS = {
    "gaqat_conflict_max": "GAQAT scale-gradient conflict: the largest over layers of the fraction of channels whose "
                          "task and smoothness scale gradients disagree in sign, averaged over training steps",
}

#: Ensemble algorithms (a run with members): EoQ (quantized members) and a full-precision ensemble.
ENSEMBLE_ALGORITHMS = ("eoq", "ensemble")


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
    def variant(self) -> str:
        """The run's variant label (:func:`variant_of`)."""
        return variant_of(self.attrs, self.groups)

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

    @property
    def title(self) -> str:
        """The run as figure titles and legends name it: variant, seed and test domain in words
        (``"qat4 seed 0, test 0°"``; an ensemble ``"eoq (5 members), test 0°"``), never its id."""
        if not self.attrs.get("algorithm"):
            return self.run_id  # a run filed from the Python API without attributes: its chosen name
        head = self.variant
        members = self.attrs.get("members")
        if members:
            head += f" ({len(members)} members)" if isinstance(members, list) else " (ensemble)"
        elif self.attrs.get("seed") is not None:
            head += f" seed {self.attrs['seed']}"
        domain = domain_text(self.attrs)
        return f"{head}, test {domain}" if domain else head


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


def variant_of(attrs: dict[str, Any], groups: dict[str, Any] | None = None) -> str:
    """A run's variant label.

    The sweep's label when the run has a ``sweep`` group with a ``variant`` attribute (``flatlab
    sweep`` writes it: a study's ``label``, e.g. ``fp``, or algorithm + bits); else the algorithm,
    followed by the bit width for a quantized run (``erm``, ``sam``, ``qat4``, ``sam4``), which
    is the label a sweep gives by default. An ensemble (``eoq``, ``ensemble``) is its own
    variant, labelled by its algorithm.
    """
    sweep = (groups or {}).get("sweep")
    if isinstance(sweep, dict):
        label = (sweep.get("attrs") or {}).get("variant")
        if label:
            return str(label)
    algorithm = str(attrs.get("algorithm") or "?")
    if algorithm in ENSEMBLE_ALGORITHMS or attrs.get("members"):
        return algorithm
    bits = attrs.get("bits")
    if bits is None or _as_float(bits) >= 32 or math.isnan(_as_float(bits)):
        return algorithm
    value = float(bits)
    return f"{algorithm}{int(value)}" if value.is_integer() else f"{algorithm}{value:g}"


def is_ensemble(attrs: dict[str, Any]) -> bool:
    """Whether a run is an ensemble (it lists members, or its algorithm is eoq / ensemble)."""
    return bool(attrs.get("members")) or str(attrs.get("algorithm")) in ENSEMBLE_ALGORITHMS


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


#: Data sets whose domain names are numbers in a unit, for labels (RotatedDigits: rotation angles).
DOMAIN_UNITS = {"rotated-digits": "°"}


def domain_text(attrs: dict[str, Any]) -> str | None:
    """The test domain(s) of a run for a label: :func:`test_domain` with the data set's unit
    (``0°`` for RotatedDigits), or None."""
    domain = test_domain(attrs)
    unit = DOMAIN_UNITS.get(str(attrs.get("dataset")), "")
    if domain is None or not unit:
        return domain
    return "+".join(f"{d}{unit}" if re.fullmatch(r"-?[0-9.]+", d) else d for d in domain.split("+"))


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
                # meshgrid(x, y) order, k = j * len(x) + i (docs/measures.md 6): the same buffer read as
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


def gaqat_conflict_of_log(path: str | os.PathLike[str]) -> dict[str, float]:
    r"""Per layer, GAQAT's scale-gradient conflict fraction averaged over training, from a run's
    ``results.jsonl``.

    Each evaluation line e of a GAQAT run holds ``gaqat_conflict = {layer: c_le}``: the mean,
    over the training steps since the previous evaluation, of the fraction of the layer's output
    channels whose task gradient g_task = dL(w)/ds and smoothness gradient
    g_smooth = d[L(w+e) - L(w)]/ds of the LSQ scale s have opposite signs. The training mean
    weights every line by its number of steps s_e = step_e - step_{e-1} (step_0 = 0)::

        c_l = sum_e s_e c_le / sum_e s_e      (over the lines that hold layer l)

    Lines without ``gaqat_conflict`` (other algorithms), with no new steps, or unreadable are
    skipped.

    Returns:
        ``{layer: c_l}``; empty when the file is missing or no line holds the conflict.
    """
    import json

    log = Path(path)
    if not log.is_file():
        return {}
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    previous = 0
    with open(log, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
                step = int(record.get("step", previous))
            except (ValueError, TypeError, AttributeError):
                continue
            steps, previous = step - previous, max(previous, step)
            conflict = record.get("gaqat_conflict")
            if steps <= 0 or not isinstance(conflict, dict):
                continue
            for layer, value in conflict.items():
                fraction = _as_float(value)
                if math.isfinite(fraction):
                    sums[layer] = sums.get(layer, 0.0) + steps * fraction
                    weights[layer] = weights.get(layer, 0.0) + steps
    return {layer: sums[layer] / weights[layer] for layer in sums if weights[layer] > 0}


def training_diagnostics(run: RunRecord) -> dict[str, float]:
    """The :data:`DIAGNOSTIC_COLUMNS` a run holds (from its ``train`` group, which ``flatlab
    sweep`` writes from the run's results.jsonl, or from a run folder's results.jsonl)."""
    node = run.groups.get("train")
    attrs = node.get("attrs", {}) if isinstance(node, dict) else {}
    conflict = attrs.get("gaqat_conflict")
    out: dict[str, float] = {}
    if isinstance(conflict, dict) and conflict:
        values = [_as_float(v) for v in conflict.values()]
        values = [v for v in values if math.isfinite(v)]
        if values:
            out["gaqat_conflict_max"] = max(values)
    return out


def _load_run_folder(path: Path, collection: Collection) -> None:
    from flatlab.checkpoint import load_checkpoint
    from flatlab.results import run_attrs_from_checkpoint, run_id_for

    ckpt = load_checkpoint(path)
    attrs = run_attrs_from_checkpoint(ckpt)
    attrs.pop("command_line", None)
    folder = path if path.is_dir() else path.parent
    conflict = gaqat_conflict_of_log(folder / "results.jsonl")
    groups = {"train": {"attrs": {"gaqat_conflict": conflict}}} if conflict else {}
    _merge_run(collection, run_id_for(ckpt.path), attrs, groups, str(path))


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
                    # Titles and legends show the run in words (variant, seed, test domain), not its id.
                    shown = _plain_attrs(node.get("attrs", {})).get("label") or name  # a label given in Python
                    collection.surfaces.append(_surface_from_node(
                        node, name, f"{record.title}, {shown}", str(path), run_id, record.quantized, record.title))
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
        ``(rows, measure_names)``; a row has :data:`BASE_COLUMNS`, ``variant``
        (:func:`variant_of`), ``ensemble`` (bool), ``bits_label``, ``label``, ``dataset``,
        ``model``, ``members`` (count), ``members_variant`` (a sweep ensemble's member variant),
        ``member_id_acc`` / ``member_ood_acc`` (an ensemble's members' accuracies, else None),
        ``sources``, a value (``NaN`` if missing) for every measure column and its estimation
        standard error ``<column>_stderr`` (``NaN`` where the estimator has none), and the
        :data:`DIAGNOSTIC_COLUMNS` (``NaN`` if the run has none).
    """
    runs = sorted(collection.runs.values(), key=_run_sort_key)
    estimates = {r.run_id: run_estimates(r) for r in runs}
    values = {rid: {k: e.value for k, e in est.items()} for rid, est in estimates.items()}
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
        ensemble = run.groups.get("ensemble") if isinstance(run.groups.get("ensemble"), dict) else {}
        sweep = run.groups.get("sweep") if isinstance(run.groups.get("sweep"), dict) else {}
        row: dict[str, Any] = {
            "run_id": run.run_id,
            "label": run.label,
            "variant": run.variant,
            "ensemble": is_ensemble(a),
            "members_variant": (sweep.get("attrs") or {}).get("members_variant"),
            "member_id_acc": _float_list(ensemble.get("member_id_acc")),
            "member_ood_acc": _float_list(ensemble.get("member_ood_acc")),
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
        for name in names:
            estimate = estimates[run.run_id].get(name)
            stderr = None if estimate is None else estimate.stderr
            row[f"{name}_stderr"] = math.nan if stderr is None else float(stderr)
        row.update({k: math.nan for k in DIAGNOSTIC_COLUMNS})
        row.update(training_diagnostics(run))
        rows.append(row)
    return rows, names


def _float_list(values: Any) -> list[float] | None:
    if values is None:
        return None
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def _run_sort_key(run: RunRecord) -> tuple:
    a = run.attrs
    bits = a.get("bits")
    return (str(test_domain(a) or ""), str(a.get("algorithm") or ""), 32.0 if bits is None else _as_float(bits),
            _as_float(a.get("seed")) if a.get("seed") is not None else math.inf, run.run_id)


# --- statistics: settings ----------------------------------------------------------------------

@dataclass(frozen=True)
class Uncertainty:
    """How a report computes its intervals, tests and seed counts (docs/statistics.md).

    Attributes:
        alpha: the level of every test, in (0, 0.5). Intervals of means, differences and
            correlations have coverage 1 - alpha (95% at the default); margin claims use 1 - 2 alpha.
        power: the power seed counts are computed for (0.8).
        method: bootstrap interval of means and differences: "bca" (default) or "percentile"
            (correlations always use the percentile interval).
        resamples: bootstrap resamples of means and differences (>= 100; default 9999).
        correlation_resamples: bootstrap resamples of correlations (>= 100; default 4999).
        seed: seed of every resampling generator (same inputs, same numbers).
        min_effect: the smallest effect that matters, used instead of the observed effect to size
            studies: one number for every column, or ``{column: effect}`` (columns not named
            are sized at their observed effect).
    """

    alpha: float = 0.05
    power: float = 0.8
    method: str = "bca"
    resamples: int = 9999
    correlation_resamples: int = 4999
    seed: int = 0
    min_effect: float | Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        def unit(name: str, value: Any, upper: float = 1.0) -> None:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < upper:
                raise FlatlabError(f"{name} must be a number in (0, {upper:g}), got {value!r}")

        unit("alpha", self.alpha, 0.5)
        unit("power", self.power)
        if self.method not in ("bca", "percentile"):
            raise FlatlabError(f"method must be 'bca' or 'percentile', got {self.method!r}")
        for name in ("resamples", "correlation_resamples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 100:
                raise FlatlabError(f"{name} must be an integer >= 100, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise FlatlabError(f"seed must be a non-negative integer, got {self.seed!r}")
        effects = self.min_effect.values() if isinstance(self.min_effect, Mapping) else \
            ([] if self.min_effect is None else [self.min_effect])
        for value in effects:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise FlatlabError(f"min_effect must be a number > 0, got {value!r}")

    @property
    def confidence(self) -> float:
        """Coverage of the intervals of direction comparisons: 1 - alpha."""
        return 1.0 - self.alpha

    def min_effect_for(self, column: str) -> float | None:
        """The smallest effect that matters for ``column``, or None (size at the observed effect)."""
        if isinstance(self.min_effect, Mapping):
            value = self.min_effect.get(column)
            return None if value is None else float(value)
        return None if self.min_effect is None else float(self.min_effect)

    def as_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "confidence": self.confidence, "power": self.power, "method": self.method,
                "resamples": self.resamples, "correlation_resamples": self.correlation_resamples, "seed": self.seed,
                "min_effect": dict(self.min_effect) if isinstance(self.min_effect, Mapping) else self.min_effect}


def _domain(row: dict[str, Any]) -> str:
    """A row's stratum label: its test domain ('-' when unknown)."""
    value = row.get("test_domain")
    return "-" if value is None else str(value)


def _finite(value: Any) -> bool:
    return math.isfinite(_as_float(value))


# --- statistics: rank correlations -------------------------------------------------------------

def _finite_pairs(rows: Sequence[dict[str, Any]], measure: str, target: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    xs, ys, idx = [], [], []
    for i, row in enumerate(rows):
        x, y = _as_float(row.get(measure)), _as_float(row.get(target))
        if math.isfinite(x) and math.isfinite(y):
            xs.append(x)
            ys.append(y)
            idx.append(i)
    return np.asarray(xs), np.asarray(ys), idx


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Kendall's tau-b and Spearman's rho with two-sided p-values; NaN where undefined.

    Both coefficients are NaN for fewer than 2 pairs or a constant vector. The p-values are NaN
    for fewer than 5 pairs (``MIN_RELIABLE_N``): with so few runs the sign is nearly all the data
    can say, and ``note`` says "n too small" (a p-value is never printed as 0 there).
    """
    from flatlab.stats._common import MIN_RELIABLE_N

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    out: dict[str, Any] = {"n": int(len(x)), "kendall_tau": math.nan, "kendall_p": math.nan,
                           "spearman_rho": math.nan, "spearman_p": math.nan, "note": None}
    if len(x) < MIN_RELIABLE_N:
        out["note"] = f"n too small ({len(x)} runs, fewer than {MIN_RELIABLE_N}): no p-value or interval"
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        if len(x) >= 2:
            out["note"] = "constant input: the correlation is undefined"
        return out
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tau = stats.kendalltau(x, y)
        rho = stats.spearmanr(x, y)
    out.update(kendall_tau=float(tau.statistic), kendall_p=float(tau.pvalue),
               spearman_rho=float(rho.statistic), spearman_p=float(rho.pvalue))
    if len(x) < MIN_RELIABLE_N:
        out.update(kendall_p=math.nan, spearman_p=math.nan)
    return out


def rank_correlations(rows: Sequence[dict[str, Any]], measures: Sequence[str],
                      targets: Sequence[str] = TARGETS, uncertainty: Uncertainty | None = None) -> list[dict[str, Any]]:
    """Per measure and target: correlations per test domain and pooled (``scope = "pooled"``).

    Each entry holds :func:`rank_correlation`'s fields plus ``kendall_ci`` and ``spearman_ci``
    (``[low, high]``, percentile bootstrap over runs at 1 - alpha; pooled: runs resampled within
    test domains; NaN for fewer than 5 runs), ``confidence`` and ``note``.
    """
    from flatlab.stats import correlation_with_ci

    u = uncertainty or Uncertainty()
    domains = sorted({str(r["test_domain"]) for r in rows if r.get("test_domain") is not None})
    out = []
    for measure in measures:
        for target in targets:
            scopes = [(d, [r for r in rows if r.get("test_domain") is not None and str(r["test_domain"]) == d])
                      for d in domains]
            scopes.append(("pooled", list(rows)))
            for scope, subset in scopes:
                x, y, idx = _finite_pairs(subset, measure, target)
                entry: dict[str, Any] = {"measure": measure, "target": target, "scope": scope,
                                         **rank_correlation(x, y), "confidence": u.confidence}
                strata = [_domain(subset[i]) for i in idx] if scope == "pooled" else None
                notes = []
                for method, key in (("kendall", "kendall_ci"), ("spearman", "spearman_ci")):
                    entry[key] = [math.nan, math.nan]
                    if len(x) < 2:
                        continue
                    c = correlation_with_ci(x, y, method=method, strata=strata, confidence=u.confidence,
                                            n_resamples=u.correlation_resamples, seed=u.seed)
                    entry[key] = [c.ci_low, c.ci_high]
                    entry["small_sample"] = bool(c.small_sample)
                    if c.note and c.note not in notes:
                        notes.append(c.note)
                entry["note"] = "; ".join(notes) or entry["note"]
                out.append(entry)
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


def granulated_tau_interval(rows: Sequence[dict[str, Any]], measure: str, target: str,
                            uncertainty: Uncertainty | None = None,
                            axes: Sequence[str] = GRANULATED_AXES) -> dict[str, Any]:
    """:func:`granulated_tau` plus its percentile bootstrap CI over runs resampled within test
    domains (:func:`flatlab.stats.granulated_tau_with_ci`): ``ci`` = ``[low, high]`` at
    1 - alpha (NaN for fewer than 5 runs, "n too small" in ``note``)."""
    from flatlab.stats import granulated_tau_with_ci

    u = uncertainty or Uncertainty()
    out = granulated_tau(rows, measure, target, axes)
    usable = [r for r in rows if _finite(r.get(measure)) and _finite(r.get(target))]
    out.update(ci=[math.nan, math.nan], confidence=u.confidence, n=len(usable), note=None)
    if len(usable) < 2:
        out["note"] = f"n too small ({len(usable)} runs)"
        return out
    ci = granulated_tau_with_ci([_as_float(r[measure]) for r in usable], [_as_float(r[target]) for r in usable],
                                {a: [_axis_value(r, a) for r in usable] for a in axes},
                                strata=[_domain(r) for r in usable], confidence=u.confidence,
                                n_resamples=u.correlation_resamples, seed=u.seed)
    out.update(ci=[ci.ci_low, ci.ci_high], note=ci.note, small_sample=ci.small_sample)
    return out


# --- statistics: one variant over seeds --------------------------------------------------------

def _summary(values: Sequence[float], strata: Sequence[str], u: Uncertainty) -> dict[str, Any]:
    """Mean, sd, stderr and the stratified bootstrap CI of ``values`` (finite ones)."""
    from flatlab.stats import summarize_group

    keep = [i for i, v in enumerate(values) if math.isfinite(v)]
    if not keep:
        return {"mean": math.nan, "sd": math.nan, "stderr": math.nan, "n": 0, "n_strata": 0, "ci_low": math.nan,
                "ci_high": math.nan, "confidence": u.confidence, "method": "none", "small_sample": True,
                "note": "no value"}
    s = summarize_group([values[i] for i in keep], strata=[strata[i] for i in keep], confidence=u.confidence,
                        method=u.method, n_resamples=u.resamples, seed=u.seed)
    return {"mean": s.mean, "sd": s.sd, "stderr": s.stderr, "n": s.n, "n_strata": s.n_strata, "ci_low": s.ci_low,
            "ci_high": s.ci_high, "confidence": s.confidence, "method": s.method, "small_sample": s.small_sample,
            "note": s.note}


def grouped_means(rows: Sequence[dict[str, Any]], columns: Sequence[str],
                  uncertainty: Uncertainty | None = None) -> list[dict[str, Any]]:
    """Per (algorithm, bits): ``{column: {"mean", "stderr", "n", "sd", "ci_low", "ci_high", ...}}``
    over the runs where the column is finite.

    stderr = sample standard deviation (ddof 1) / sqrt(n), NaN for n < 2; the CI is the
    stratified bootstrap interval of the mean over seeds (:func:`flatlab.stats.summarize_group`,
    runs resampled within test domains; ``method`` says BCa or percentile, ``note`` why it is
    missing or unreliable).
    """
    u = uncertainty or Uncertainty()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r.get("algorithm")), bits_label(r.get("bits"))), []).append(r)
    out = []
    for (algorithm, bits), members in sorted(groups.items(), key=lambda kv: (kv[0][0], _bits_order(kv[0][1]))):
        stats = {col: _summary([_as_float(m.get(col)) for m in members], [_domain(m) for m in members], u)
                 for col in columns}
        out.append({"algorithm": algorithm, "bits": members[0].get("bits"), "bits_label": bits, "runs": len(members),
                    "stats": stats})
    return out


def _bits_order(label: str) -> float:
    return 32.0 if label == "fp" else _as_float(label.rstrip("b"))


def variants_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The variants among ``rows``: single models, then ensembles, each in order of first appearance."""
    single = [str(r["variant"]) for r in rows if not r.get("ensemble")]
    ensembles = [str(r["variant"]) for r in rows if r.get("ensemble")]
    return list(dict.fromkeys([*single, *ensembles]))


def variant_summaries(rows: Sequence[dict[str, Any]], columns: Sequence[str],
                      uncertainty: Uncertainty | None = None) -> list[dict[str, Any]]:
    """Seed-to-seed variation per variant: for every column, the mean over the variant's runs with
    its stratified bootstrap CI (seeds resampled within test domains), sd, stderr and n.

    Returns:
        ``[{"variant", "runs", "ensemble", "seeds", "test_domains", "stats": {column: {...}}}]``
        with the fields of :func:`flatlab.stats.summarize_group` per column (n = 0 and NaN where
        no run of the variant holds the column).
    """
    u = uncertainty or Uncertainty()
    out = []
    for variant in variants_of(rows):
        members = [r for r in rows if r["variant"] == variant]
        stats = {col: _summary([_as_float(m.get(col)) for m in members], [_domain(m) for m in members], u)
                 for col in columns}
        ensemble = all(m.get("ensemble") for m in members)
        if ensemble:
            for s in stats.values():
                if s["n"] and math.isnan(s["ci_low"]):
                    s["note"] = "an ensemble has no seeds: one ensemble per test domain, no interval over seeds"
        out.append({"variant": variant, "runs": len(members), "ensemble": ensemble,
                    "seeds": sorted({m["seed"] for m in members if m.get("seed") is not None}, key=str),
                    "test_domains": list(dict.fromkeys(_domain(m) for m in members)), "stats": stats})
    return out


# --- statistics: comparing two variants --------------------------------------------------------

class NotTestable(Exception):  # noqa: N818 - a state of the data, not an error of flatlab or the user
    """The results lack what a comparison needs; ``str()`` says what (e.g. "needs variant qat8")."""


#: How two variants' runs were matched.
PAIRINGS = {
    "paired": "paired on (seed, test domain)",
    "domain": "paired on test domain only",
    "unpaired": "unpaired",
    "value": "one variant against a constant",
    "members": "each ensemble against its own members",
}


@dataclass(frozen=True)
class Comparison:
    """Variant A vs variant B on one column: the statistical evidence and how runs were matched.

    Attributes:
        a, b: the variants (A - B is the effect); column: the report column compared.
        pairing: a key of :data:`PAIRINGS`.
        evidence: :class:`flatlab.stats.PairedComparison` (paired, domain, value) or
            :class:`flatlab.stats.UnpairedComparison`.
        note: how the runs were matched and what was left out; None when nothing to say.
    """

    a: str
    b: str
    column: str
    pairing: str
    evidence: Any
    note: str | None

    @property
    def unit(self) -> str:
        """What a seed count for this comparison counts."""
        h = max(getattr(self.evidence, "n_strata", 1), 1)
        if self.pairing == "domain":
            return "test domains (one ensemble each)"
        if self.pairing == "members":
            return "ensembles"
        if self.pairing == "unpaired":
            return "seeds per variant" + (" and test domain" if h > 1 else "")
        return "seeds per test domain" if h > 1 else "seeds"

    @property
    def n(self) -> int:
        ev = self.evidence
        return int(ev.n) if hasattr(ev, "n") else int(min(ev.n_a, ev.n_b))

    @property
    def sd(self) -> float:
        ev = self.evidence
        return float(ev.sd_diff) if hasattr(ev, "sd_diff") else float(ev.sd_pooled)


def _runs_with(rows: Sequence[dict[str, Any]], variant: str, column: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["variant"] == variant and _finite(r.get(column))]


def _domain_means(runs: Sequence[dict[str, Any]], column: str) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for r in runs:
        by.setdefault(_domain(r), []).append(_as_float(r[column]))
    return {d: float(np.mean(v)) for d, v in by.items()}


def compare_variants(rows: Sequence[dict[str, Any]], a: str, b: str, column: str, *,
                     uncertainty: Uncertainty | None = None, confidence: float | None = None) -> Comparison:
    """Variant ``a`` against variant ``b`` on ``column`` (effect = A - B), matched as the study allows.

    * Both variants have seeds: runs are paired on (seed, test domain); with at least 2 pairs (or
      a single pair and no run without a partner) the comparison is paired
      (:func:`flatlab.stats.paired_comparison`, stratified by test domain; runs without a partner
      are left out and counted in the note), else unpaired.
    * An ensemble has no seed: a comparison with one is paired on the test domain only, the
      other variant averaged over its runs within each test domain (n = the shared test domains).
    * Unpaired (:func:`flatlab.stats.unpaired_comparison`): over the test domains both variants
      hold, stratified; runs with a duplicate (seed, test domain) in a variant also force it.

    Args:
        rows: report rows (:func:`build_rows`).
        a, b: variant labels.
        column: a row column (accuracy, gap, measure, diagnostic).
        uncertainty: resamples, method and seed (default :class:`Uncertainty`).
        confidence: interval coverage (default ``1 - alpha``).

    Raises:
        NotTestable: a variant has no run holding a finite ``column``, or the two share no test domain.
    """
    from flatlab.stats import paired_comparison, unpaired_comparison

    u = uncertainty or Uncertainty()
    conf = u.confidence if confidence is None else confidence
    options = {"confidence": conf, "method": u.method, "n_resamples": u.resamples, "seed": u.seed}
    ra, rb = _runs_with(rows, a, column), _runs_with(rows, b, column)
    for variant, runs in ((a, ra), (b, rb)):
        if not runs:
            present = any(r["variant"] == variant for r in rows)
            raise NotTestable(f"no run of variant {variant} holds {column}" if present else f"needs variant {variant}")
    ens_a = all(r.get("seed") is None for r in ra)
    ens_b = all(r.get("seed") is None for r in rb)
    if ens_a or ens_b:
        ma, mb = _domain_means(ra, column), _domain_means(rb, column)
        common = [d for d in ma if d in mb]
        if not common:
            raise NotTestable(f"{a} and {b} share no test domain")
        no_seed = " and ".join(v for v, e in ((a, ens_a), (b, ens_b)) if e)
        averaged = [v for v, e, runs in ((a, ens_a, ra), (b, ens_b, rb)) if not e and len(runs) > len(common)]
        note = (f"{no_seed} has no seed: paired on test domain only"
                + (f" ({averaged[0]} averaged over its seeds in each test domain)" if averaged else "")
                + f"; {len(common)} test domain(s)")
        ev = paired_comparison([ma[d] for d in common], [mb[d] for d in common], None, **options)
        return Comparison(a, b, column, "domain", ev, note)
    keys_a = [(str(r["seed"]), _domain(r)) for r in ra]
    keys_b = [(str(r["seed"]), _domain(r)) for r in rb]
    duplicated = len(set(keys_a)) < len(keys_a) or len(set(keys_b)) < len(keys_b)
    by_b = dict(zip(keys_b, rb))
    common = [(k, r) for k, r in zip(keys_a, ra) if k in by_b]
    dropped = len(ra) + len(rb) - 2 * len(common)
    if not duplicated and common and (len(common) >= 2 or dropped == 0):
        ev = paired_comparison([_as_float(r[column]) for _, r in common],
                               [_as_float(by_b[k][column]) for k, _ in common], [k[1] for k, _ in common], **options)
        note = f"{dropped} run(s) without a partner left out" if dropped else None
        return Comparison(a, b, column, "paired", ev, note)
    why = ("a variant has two runs with the same (seed, test domain)" if duplicated else
           f"{len(common)} (seed, test domain) pair(s) in common")
    domains = [d for d in dict.fromkeys(_domain(r) for r in ra) if d in {_domain(r) for r in rb}]
    if domains:
        sa = [r for r in ra if _domain(r) in domains]
        sb = [r for r in rb if _domain(r) in domains]
        left_out = len(ra) + len(rb) - len(sa) - len(sb)
        ev = unpaired_comparison([_as_float(r[column]) for r in sa], [_as_float(r[column]) for r in sb],
                                 [_domain(r) for r in sa], [_domain(r) for r in sb], **options)
        note = f"unpaired ({why}), stratified by test domain" + (
            f"; {left_out} run(s) in test domains the other variant lacks left out" if left_out else "")
    else:
        ev = unpaired_comparison([_as_float(r[column]) for r in ra], [_as_float(r[column]) for r in rb], **options)
        note = f"unpaired ({why}); the variants share no test domain: not stratified"
    return Comparison(a, b, column, "unpaired", ev, note)


def exact_floor(level: float, *, paired: bool = True, strata: int = 1) -> int:
    r"""The fewest seeds per test domain at which the exact permutation test can reach p < ``level``
    at all.

    Paired (sign flip over n = strata x k pairs): the smallest p is 2 / 2^n = 2^(1-n), so
    n > 1 + log2(1 / level). Unpaired (labels permuted within each of the strata, k runs per
    variant in each): the smallest p is 2 / C(2k, k)^strata. Below this count no effect, however
    large, can be significant (5 pairs, e.g., never give p < 0.05: the smallest is 0.0625).
    """
    if paired:
        n = math.floor(1.0 + math.log2(1.0 / level)) + 1
        return max(1, math.ceil(n / max(strata, 1)))
    k = 1
    while 2.0 / math.comb(2 * k, k) ** max(strata, 1) >= level:
        k += 1
    return k


def seeds_per_cell(comparison: Comparison, effect: float, *, alpha: float, power: float = 0.8,
                   family: int = 1, max_per_cell: int = 1000) -> int | None:
    r"""Seeds per cell (variant x test domain) at which the comparison's test has ``power`` for a
    true effect ``effect`` within a Holm family of ``family`` tests at level ``alpha``.

    Each test is sized at the family's strictest Holm level, the Bonferroni level
    alpha' = alpha / family (Holm compares the smallest p with it; sizing at it guarantees the
    power whatever the other p-values). The t-test stands in for the permutation test
    (docs/statistics.md section 4): paired, n pairs with the observed sd of the differences;
    unpaired, n runs per group with the pooled sd (:func:`flatlab.stats.seeds_needed` at
    alpha'). The total is spread over the test domains (rounded up), and is at least 5 per test
    domain (below which a bootstrap interval is unreliable) and at least :func:`exact_floor`
    (alpha') (below which the exact permutation p cannot reach alpha'). For a comparison paired on
    test domains only (an ensemble) the count is of test domains, for an ensemble against its
    members of ensembles.

    Returns:
        The count, or None when the effect is 0, the sd undefined (a single pair), or more than
        ``max_per_cell`` per cell would be needed.
    """
    from flatlab.stats import seeds_needed
    from flatlab.stats._common import MIN_RELIABLE_N

    sd = comparison.sd
    if not math.isfinite(sd) or not math.isfinite(effect) or effect == 0:
        return None
    level = alpha / max(int(family), 1)
    paired = comparison.pairing != "unpaired"
    h = 1 if comparison.pairing in ("domain", "members") else max(getattr(comparison.evidence, "n_strata", 1), 1)
    total = seeds_needed(abs(effect), sd, alpha=level, power=power, paired=paired, max_n=max_per_cell * h)
    if total is None:
        return None
    return max(MIN_RELIABLE_N, math.ceil(total / h), exact_floor(level, paired=paired, strata=h))


def default_reference(rows: Sequence[dict[str, Any]]) -> str | None:
    """The reference variant: ``erm`` if present, else ``fp``, else the first full-precision ERM
    variant; None when there is none."""
    variants = variants_of(rows)
    for label in ("erm", "fp"):
        if label in variants:
            return label
    for r in rows:
        if str(r.get("algorithm")) == "erm" and r.get("bits_label") == "fp" and not r.get("ensemble"):
            return str(r["variant"])
    return None


def _short_verdict(a: str, b: str, verdict: Any, unit: str) -> str:
    if verdict.verdict == "supported":
        return f"{a} > {b}"
    if verdict.verdict == "contradicted":
        return f"{a} < {b}"
    if verdict.n_needed is not None and "would settle it" in verdict.reason:
        return f"inconclusive: about {verdict.n_needed} {unit} would settle it"
    if verdict.n_needed is not None:
        return (f"inconclusive: the study has the {verdict.n_needed} {unit} 80% power needs; the effect is likely "
                "smaller than observed")
    if "no interval" in verdict.reason:
        return "inconclusive: no interval"
    if "practical number" in verdict.reason or "more than" in verdict.reason:
        return "inconclusive: too small to settle with any practical number of seeds (give --min-effect)"
    return "inconclusive"


def comparison_record(c: Comparison, *, alpha: float, p_holm: float, uncertainty: Uncertainty,
                      family: int = 1) -> dict[str, Any]:
    """The JSON view of a two-sided comparison A vs B and its verdict ("greater", "less" or
    "inconclusive", by :func:`flatlab.stats.decide` with the "greater" rule on the two-sided
    test: A > B when the Holm-adjusted p < alpha and the CI lies above 0, A < B when it lies
    below). ``seeds_needed`` is :func:`seeds_per_cell` within the Holm family of ``family``
    comparisons, ``seeds_needed_single`` the same for this test alone (at alpha)."""
    from flatlab.stats import decide

    ev = c.evidence
    min_effect = uncertainty.min_effect_for(c.column)
    verdict = decide("greater", ev, alpha=alpha, p_adjusted=p_holm if math.isfinite(p_holm) else None,
                     min_effect=min_effect, power=uncertainty.power)
    effect = min_effect if min_effect is not None else abs(ev.mean_diff)
    needed = seeds_per_cell(c, effect, alpha=alpha, power=uncertainty.power, family=family)
    single = seeds_per_cell(c, effect, alpha=alpha, power=uncertainty.power)
    kind = {"supported": "greater", "contradicted": "less"}.get(verdict.verdict, "inconclusive")
    summary = _short_verdict(c.a, c.b, verdict, c.unit)
    if kind == "inconclusive" and needed is not None:
        current = c.n // (1 if c.pairing in ("domain", "members") else max(getattr(ev, "n_strata", 1), 1))
        summary = (f"inconclusive: about {needed} {c.unit} would settle it" if needed > current else
                   f"inconclusive: the study has the {needed} {c.unit} 80% power needs; the effect is likely "
                   "smaller than observed")
    if kind == "inconclusive" and needed is None and not math.isfinite(c.sd):
        summary = (f"inconclusive: a single {'pair' if c.pairing != 'unpaired' else 'run each'}, no interval "
                   "(at least 5 seeds per test domain are needed)")
    return {"a": c.a, "b": c.b, "column": c.column, "pairing": c.pairing, "pairing_text": PAIRINGS[c.pairing],
            "n": c.n, "n_a": getattr(ev, "n_a", None), "n_b": getattr(ev, "n_b", None), "mean_diff": ev.mean_diff,
            "ci_low": ev.ci_low, "ci_high": ev.ci_high, "confidence": ev.confidence, "method": ev.method,
            "sd": c.sd, "p_value": ev.p_value, "p_holm": p_holm, "test": ev.test, "exact": ev.exact,
            "verdict": kind, "summary": summary, "reason": verdict.reason,
            "seeds_needed": needed, "seeds_needed_single": single, "seeds_unit": c.unit,
            "sized_at": "min_effect" if min_effect else "observed effect",
            "small_sample": ev.small_sample, "note": "; ".join(n for n in (c.note, ev.note) if n) or None}


def variant_comparisons(rows: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]], columns: Sequence[str],
                        uncertainty: Uncertainty | None = None) -> dict[str, Any]:
    """Every pair (A, B) on every column: the comparisons of one report, one Holm family.

    Returns:
        ``{"pairs", "family", "m", "results": [comparison_record...], "skipped"}``; a (pair,
        column) whose data the runs lack is counted in ``skipped`` (with the reason), not shown.
    """
    from flatlab.stats import holm

    u = uncertainty or Uncertainty()
    found: list[Comparison] = []
    skipped: list[dict[str, str]] = []
    for a, b in pairs:
        for column in columns:
            try:
                found.append(compare_variants(rows, a, b, column, uncertainty=u))
            except NotTestable as why:
                skipped.append({"a": a, "b": b, "column": column, "reason": str(why)})
    pvalues = np.asarray([c.evidence.p_value for c in found], dtype=np.float64)
    adjusted = holm(pvalues) if len(found) else np.zeros(0)
    m = int(np.count_nonzero(np.isfinite(pvalues)))
    results = [comparison_record(c, alpha=u.alpha, p_holm=float(p), uncertainty=u, family=m)
               for c, p in zip(found, adjusted)]
    family = (f"Holm-Bonferroni over the {m} comparisons of this report (p_holm); verdicts at alpha = {u.alpha:g} "
              f"need p_holm < alpha and a {u.confidence:.0%} CI excluding 0; seeds are sized at alpha/{m} = "
              f"{u.alpha / max(m, 1):.3g}, the family's strictest level")
    return {"pairs": [list(p) for p in pairs], "family": family, "m": m, "results": results, "skipped": skipped}


# --- the report --------------------------------------------------------------------------------

def parse_pairs(pairs: Iterable[str | tuple[str, str]]) -> list[tuple[str, str]]:
    """'A:B' strings (or (A, B) tuples) -> [(A, B)].

    Raises:
        FlatlabError: a pair that is not two non-empty labels joined by ':'.
    """
    out = []
    for pair in pairs:
        if isinstance(pair, tuple):
            a, b = pair
        else:
            a, sep, b = str(pair).partition(":")
            if not sep or not a.strip() or not b.strip() or ":" in b:
                raise FlatlabError(f"compare pair {pair!r} must be two variant labels joined by ':', e.g. qat4:erm")
        out.append((str(a).strip(), str(b).strip()))
    return out


def comparison_pairs(rows: Sequence[dict[str, Any]], reference: str | None,
                     compare: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The comparisons a report shows: every other variant against the reference, then the
    ``compare`` pairs (duplicates dropped).

    Raises:
        FlatlabError: a variant of ``compare`` or the reference that no run has.
    """
    variants = variants_of(rows)
    known = ", ".join(variants) or "none"
    if reference is not None and reference not in variants:
        raise FlatlabError(f"reference {reference!r} is not a variant of these results: the variants are {known}")
    pairs = [(v, reference) for v in variants if reference is not None and v != reference]
    for a, b in compare:
        for v in (a, b):
            if v not in variants:
                raise FlatlabError(f"compare pair {a}:{b}: no run has variant {v!r}; the variants are {known}")
        if a == b:
            raise FlatlabError(f"compare pair {a}:{b} compares a variant with itself")
        if (a, b) not in pairs:
            pairs.append((a, b))
    return pairs


def build_report(paths: Sequence[str | os.PathLike[str]], measures: Sequence[str] | None = None,
                 radii: Sequence[float] | None = None, *, uncertainty: Uncertainty | None = None,
                 reference: str | None = None, compare: Iterable[str | tuple[str, str]] = (),
                 collection: Collection | None = None) -> dict[str, Any]:
    """Everything ``flatlab report`` prints.

    Args:
        paths: results files, surface files, run folders or checkpoints.
        measures: measure columns to show (default: every one present).
        radii: local-flatness radii to show.
        uncertainty: alpha, power, resamples, seed and min_effect (default :class:`Uncertainty`).
        reference: the variant every other one is compared with (default
            :func:`default_reference`: ``erm``, else ``fp``).
        compare: more pairs ``"A:B"`` to compare (effect A - B).
        collection: the inputs already loaded (:func:`load_inputs`), instead of reading ``paths``.

    Returns:
        ``{"inputs", "measures", "measure_descriptions", "diagnostics", "rows", "variants" (seed
        -to-seed summaries), "reference", "comparisons", "correlations", "granulated", "groups"
        (per algorithm and bits), "uncertainty"}``.

    Raises:
        FlatlabError: bad inputs (see :func:`load_inputs`), no run in any input, unknown measure,
            unknown reference or compared variant, bad uncertainty settings.
    """
    u = uncertainty or Uncertainty()
    pairs_given = parse_pairs(compare)
    table = per_run_table(paths, measures, radii, collection=collection)
    collection, rows, names, diagnostics = table["collection"], table["rows"], table["measures"], table["diagnostics"]
    columns = [*ACCURACY_COLUMNS, *names, *diagnostics]
    ref = reference if reference is not None else default_reference(rows)
    pairs = comparison_pairs(rows, ref, pairs_given)
    correlations = rank_correlations(rows, names, uncertainty=u)
    granulated = [granulated_tau_interval(rows, m, t, u) for m in names for t in TARGETS]
    groups = grouped_means(rows, [*ACCURACY_COLUMNS, *names], u)
    return {"inputs": collection.inputs, "measures": names,
            "measure_descriptions": {m: describe_measure(m) for m in names},
            "diagnostics": diagnostics, "diagnostic_descriptions": {d: DIAGNOSTIC_COLUMNS[d] for d in diagnostics},
            "rows": rows, "variants": variant_summaries(rows, columns, u), "reference": ref,
            "comparisons": variant_comparisons(rows, pairs, columns, u),
            "correlations": correlations, "granulated": granulated, "groups": groups, "uncertainty": u.as_dict()}


def per_run_table(paths: Sequence[str | os.PathLike[str]], measures: Sequence[str] | None = None,
                  radii: Sequence[float] | None = None, *, collection: Collection | None = None) -> dict[str, Any]:
    """The report's per-run part, without its statistics: ``{"inputs", "collection", "rows",
    "measures", "diagnostics"}`` (:func:`build_rows`; the diagnostic columns any run has).
    :func:`rows_csv` and :func:`flatlab.store.to_dataframe` take it as they take a report.

    Raises:
        FlatlabError: bad inputs, no run in any input, an unknown measure.
    """
    if measures is not None:
        check_measure_names(measures)
    if collection is None:
        collection = load_inputs(paths)
    if not collection.runs:
        raise FlatlabError("the inputs hold no runs (only surfaces): pass a results file with /runs or run folders")
    rows, names = build_rows(collection, measures, radii)
    diagnostics = [d for d in DIAGNOSTIC_COLUMNS if any(_finite(r.get(d)) for r in rows)]
    return {"inputs": collection.inputs, "collection": collection, "rows": rows, "measures": names,
            "diagnostics": diagnostics}


def describe_measure(name: str) -> str:
    """What a measure column means, in words (from its declaration)."""
    return describe_column(name)


def _cell(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None  # printed "-": missing, never zero
    return value


def value_with_error(value: Any, stderr: Any) -> str:
    """``value +- se`` (the estimation error of one measurement); the value alone without one."""
    from flatlab.text import fmt

    if not _finite(value):
        return "-"
    if _finite(stderr):
        return f"{fmt(float(value))} +- {fmt(float(stderr), 2)}"
    return fmt(float(value))


def interval_text(low: Any, high: Any) -> str:
    """``[low, high]`` to 4 significant digits; ``-`` when there is no interval."""
    from flatlab.text import fmt

    if not (_finite(low) and _finite(high)):
        return "-"
    return f"[{fmt(float(low))}, {fmt(float(high))}]"


def p_text(p: Any) -> str:
    """A p-value for humans: 3 significant digits, ``< 1e-04`` below that (never ``0``), ``-`` if none."""
    if not _finite(p):
        return "-"
    p = float(p)
    return "< 1e-04" if p < 1e-4 else f"{p:.3g}"


def _column_header(name: str) -> str:
    return {"generalization_gap": "gen_gap", "domain_gap": "dom_gap"}.get(name, name)


def report_text(report: dict[str, Any]) -> str:
    """The human tables of a report."""
    from flatlab.text import fmt, table

    names = report["measures"]
    diagnostics = report.get("diagnostics", [])
    rows = report["rows"]
    u = report.get("uncertainty") or Uncertainty().as_dict()
    conf = f"{u['confidence']:.0%}"
    header = ["run", "variant", "algorithm", "bits", "seed", "test", "id_acc", "ood_acc", "gen_gap", "dom_gap",
              *diagnostics, *names]
    body = [[r["run_id"][:8], r.get("variant"), r["algorithm"], r["bits_label"], r["seed"], r["test_domain"],
             *(_cell(r[c]) for c in ACCURACY_COLUMNS), *(_cell(r.get(d)) for d in diagnostics),
             *(value_with_error(r[m], r.get(f"{m}_stderr")) for m in names)] for r in rows]
    parts = [f"{len(rows)} run(s) from {', '.join(report['inputs'])}", table(body, header)]
    if names:
        legend = [[m, report["measure_descriptions"][m]] for m in names]
        legend += [[d, report.get("diagnostic_descriptions", {}).get(d, "")] for d in diagnostics]
        parts.append("measures (larger = sharper unless a description says otherwise); 'value +- se' is the estimation error of that one measurement "
                     "(Hutch++ / Monte Carlo standard error), not seed-to-seed variation:\n" + table(legend))
    else:
        parts.append("no measures in the inputs: run `flatlab sharpness CKPT --results FILE` (curvature, --all bounds) "
                     "and pass FILE here")
    parts.append(_variants_text(report, conf))
    parts.append(_comparisons_text(report, conf))
    if names:
        parts.append(_correlations_text(report, conf))
        gran = []
        for g in report["granulated"]:
            per_axis = "  ".join(f"{a} {fmt(_cell(v['tau']))} ({v['cells']} cells)" for a, v in g["axes"].items())
            ci = g.get("ci", [math.nan, math.nan])
            mark = "*" if g.get("small_sample") and _finite(ci[0]) else ""
            gran.append([g["measure"], g["target"], _cell(g["granulated_tau"]),
                         interval_text(*ci) + mark if _finite(ci[0]) else ("n too small" if g.get("n", 5) < 5 else "-"),
                         per_axis or "no axis varies"])
        parts.append(f"granulated tau (Jiang et al.; axes algorithm, bits, seed; test domain held fixed; {conf} "
                     "percentile bootstrap CI over runs within test domains):\n"
                     + table(gran, ["measure", "with", "Psi", f"{conf} CI", "psi per axis"])
                     + ("\n* fewer than 5 runs in a test domain: the bootstrap interval is unreliable"
                        if any(row[3].endswith("*") for row in gran) else ""))
    return "\n\n".join(parts)


def _variants_text(report: dict[str, Any], conf: str) -> str:
    from flatlab.text import fmt, table

    lines = []
    methods: set[str] = set()
    flagged = False
    for v in report.get("variants", []):
        for column, s in v["stats"].items():
            if s["n"] == 0:
                continue
            mark = ""
            if s["small_sample"] and s["n"] > 1:
                mark, flagged = "*", True
            if s["method"] in ("bca", "percentile"):
                methods.add("BCa" if s["method"] == "bca" else "percentile")
            lines.append([v["variant"], _column_header(column), s["n"], fmt(s["mean"]),
                          interval_text(s["ci_low"], s["ci_high"]) + mark,
                          fmt(s["sd"], 2) if _finite(s["sd"]) else "-"])
    method = " / ".join(sorted(methods)) or "BCa"
    head = (f"seed-to-seed variation per variant: mean, {conf} {method} bootstrap CI over seeds (resampled within "
            "test domains), sd (ddof 1), n runs")
    foot = ("\n* fewer than 5 seeds in a test domain: the bootstrap interval is unreliable (too narrow)"
            if flagged else "")
    return head + ":\n" + table(lines, ["variant", "column", "n", "mean", f"{conf} CI", "sd"]) + foot


def _comparisons_text(report: dict[str, Any], conf: str) -> str:
    from flatlab.text import fmt, table

    comps = report.get("comparisons") or {}
    results = comps.get("results", [])
    ref = report.get("reference")
    if not results:
        why = ("no reference variant (no erm or fp variant): give --reference or --compare A:B"
               if ref is None else f"no other variant to compare with the reference {ref}")
        return f"comparisons: none ({why})"
    body = []
    for c in results:
        n = c["n"] if c["pairing"] != "unpaired" else f"{c['n_a']}+{c['n_b']}"
        body.append([f"{c['a']} - {c['b']}", _column_header(c["column"]), {"paired": "(seed, test)",
                     "domain": "test only", "unpaired": "unpaired"}[c["pairing"]], n, fmt(c["mean_diff"]),
                     interval_text(c["ci_low"], c["ci_high"]), p_text(c["p_value"]), p_text(c["p_holm"]),
                     c["seeds_needed"] if c["seeds_needed"] is not None else "-", c["summary"]])
    head = (f"comparisons (effect = A - B; paired on (seed, test domain) where the study pairs them, on the test "
            f"domain only for an ensemble, else unpaired; {conf} bootstrap CI; sign-flip permutation p, exact up "
            f"to 16 pairs; {comps.get('family', 'Holm')}; 'seeds' = seeds per test domain for 80% power at the "
            "observed effect, or --min-effect, and for the exact p to reach that level):")
    notes = [f"  {c['a']} - {c['b']} ({_column_header(c['column'])}): {c['note']}" for c in results
             if c.get("note") and c["pairing"] != "paired"]
    seen: set[str] = set()
    unique = [n for n in notes if not (n.split(": ", 1)[1] in seen or seen.add(n.split(": ", 1)[1]))]
    text = head + "\n" + table(body, ["A - B", "column", "pairing", "n", "effect", f"{conf} CI", "p", "p_holm",
                                      "seeds", "verdict"])
    if unique:
        text += "\nnotes:\n" + "\n".join(unique[:12])
    return text


def _correlations_text(report: dict[str, Any], conf: str) -> str:
    from flatlab.text import table

    domains = {c["scope"] for c in report["correlations"] if c["scope"] != "pooled"}
    # One test domain: its rows equal the pooled ones; print them once (the JSON keeps both).
    shown = [c for c in report["correlations"] if len(domains) > 1 or c["scope"] == "pooled"]
    corr = []
    for c in shown:
        small = c["n"] < 5
        ci_k, ci_r = c.get("kendall_ci", [math.nan] * 2), c.get("spearman_ci", [math.nan] * 2)
        mark = "*" if c.get("small_sample") and not small else ""
        corr.append([c["measure"], c["target"], c["scope"], c["n"], _cell(c["kendall_tau"]),
                     "n too small" if small else interval_text(*ci_k) + mark,
                     "n too small" if small else p_text(c["kendall_p"]),
                     _cell(c["spearman_rho"]), "n too small" if small else interval_text(*ci_r) + mark,
                     "n too small" if small else p_text(c["spearman_p"])])
    foot = ("\n* fewer than 5 runs in a test domain: the bootstrap interval is unreliable"
            if any(row[5].endswith("*") for row in corr) else "")
    return (f"rank correlations ({conf} percentile bootstrap CI over runs; pooled: resampled within test domains; "
            "n < 5: no p-value or interval):\n"
            + table(corr, ["measure", "with", "test domain", "n", "tau", f"{conf} CI", "p", "rho", f"{conf} CI", "p"])
            + foot)


def csv_columns(report: dict[str, Any]) -> list[str]:
    """The columns of the per-run table (``flatlab report --csv``, :func:`flatlab.store.to_dataframe`):
    run_id, variant, algorithm, bits, seed, test_domain, dataset, model, members, the accuracy
    columns, the diagnostics present, then every measure followed by ``<measure>_stderr``."""
    measure_cols = [c for m in report["measures"] for c in (m, f"{m}_stderr")]
    return ["run_id", "variant", "algorithm", "bits", "seed", "test_domain", "dataset", "model", "members", "id_acc",
            "ood_acc", "generalization_gap", "domain_gap", *report.get("diagnostics", []), *measure_cols]


def rows_csv(report: dict[str, Any]) -> str:
    """The per-run table as CSV (:func:`csv_columns`): every measure followed by
    ``<measure>_stderr`` (its estimation standard error); a missing value is an empty cell
    (never 0)."""
    cols = csv_columns(report)
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
    "ACCURACY_COLUMNS",
    "BASE_COLUMNS",
    "DIAGNOSTIC_COLUMNS",
    "GRANULATED_AXES",
    "PAIRINGS",
    "TARGETS",
    "Collection",
    "Comparison",
    "NotTestable",
    "RunRecord",
    "SurfaceRecord",
    "Uncertainty",
    "bits_label",
    "build_report",
    "build_rows",
    "check_measure_names",
    "compare_variants",
    "comparison_pairs",
    "comparison_record",
    "csv_columns",
    "default_reference",
    "describe_measure",
    "domain_text",
    "exact_floor",
    "gaqat_conflict_of_log",
    "generalization_gap",
    "granulated_tau",
    "granulated_tau_interval",
    "grouped_means",
    "interval_text",
    "is_ensemble",
    "load_inputs",
    "local_flatness_values",
    "p_text",
    "parse_pairs",
    "rank_correlation",
    "rank_correlations",
    "report_text",
    "rows_csv",
    "run_estimates",
    "run_measures",
    "pattern_columns",
    "per_run_table",
    "seeds_per_cell",
    "static_columns",
    "test_domain",
    "training_diagnostics",
    "value_with_error",
    "variant_comparisons",
    "variant_of",
    "variant_summaries",
    "variants_of",
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
