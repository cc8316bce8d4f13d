"""Study sweeps: a TOML study file -> jobs (train, then measure) -> one merged results file.

A study names a data set, a model, algorithms (with options such as a list of bit-widths),
seeds, test domains, training hyperparameters and the measurements to run. Its jobs are the
cartesian product ``algorithm variant x seed x test domain`` (a ``bits`` list makes one variant
per bit-width), plus one ensemble job per ``[[ensembles]]`` entry and test domain (EoQ: the
logit-averaged seeds of one variant), plus, after training, one barrier job per ``[[barriers]]``
entry with ``between = [variant1, variant2]``, seed and test domain (the loss barrier on the
line between the two variants' models of that seed and test domain, stored under the first's
run). A ``[[barriers]]`` entry with ``members = "<ensemble>"`` adds a step to that ensemble's
jobs instead: the members' pairwise barrier matrix, stored with the ensemble's run.

Layout of ``OUT`` (``flatlab sweep STUDY --out OUT``)::

    OUT/study.toml              a copy of the study, for the record
    OUT/runs/<job-id>/          the training run folder (model.pt, results.jsonl, done)
    OUT/jobs/<job-id>/job.json  the job's definition (a rerun with another definition is refused)
    OUT/jobs/<job-id>/<step>.h5 one results file per measurement step, written by the worker
    OUT/jobs/<job-id>/<step>.done, done, attempts, error.txt
    OUT/results.h5              the merged results: written by the driver only, atomically

Workers only write their own job folders; the driver merges the job files in job order
(:func:`flatlab.results.merge_results`), so the merged file does not depend on completion order
or backend. A job killed at any point (the driver included, SIGKILL too) continues when the same
command is rerun: training resumes from its ``state.pt``, finished steps are skipped, an
unfinished sharpness step starts over, an unfinished surface resumes from its journal.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flatlab.errors import FlatlabError
from flatlab.io import atomic_write_text, read_toml
from flatlab.measures import FAMILIES, ConfigError, MeasureConfig, MeasurementSettings, get_measure
from flatlab.measures.registry import configs_from_values, family_settings, measures_of

# --- the study schema ----------------------------------------------------------------------------

#: Value kinds of the schema: checked by :func:`_check_value`.
INT, FLOAT, BOOL, STR, TABLE = "int", "float", "bool", "str", "table"
LIST_INT, LIST_FLOAT, LIST_STR, DOMAINS = "list of int", "list of float", "list of str", "domains"

#: ``[[surfaces]]`` keys that are :class:`~flatlab.surface.runner.SurfaceRequest` fields, with their
#: kinds; ``name``, ``dims`` and ``variants`` are the sweep's own.
SURFACE_KEYS: dict[str, str] = {
    "x": STR, "y": STR, "norm": STR, "ignore": STR, "directions": STR, "requantize": BOOL,
    "max_samples": INT, "seed": INT, "batch_size": INT, "device": STR,
}


#: ``[[barriers]]`` keys that are :class:`~flatlab.surface.barrier_runner.BarrierSettings` fields;
#: ``name``, ``between``, ``members`` and ``seeds`` are the sweep's own.
BARRIER_KEYS: dict[str, str] = {
    "bn": STR, "points": INT, "splits": LIST_STR, "max_samples": INT, "batch_size": INT, "seed": INT,
    "bn_batches": INT, "device": STR,
}


def _setting_kind(kind: str) -> str:
    base = kind.removeprefix("optional ")
    return {"int": INT, "float": FLOAT, "bool": BOOL, "str": STR, "floats": LIST_FLOAT, "strs": LIST_STR}[base]


def measure_schema() -> dict[str, dict[str, str]]:
    """The ``[measure]`` part of the study schema, derived from the measure registry: the shared
    settings and one sub-table per family, holding its settings and the keys that request its
    measures (``top_k``/``trace``/... for curvature, ``measures = [...]`` for bounds)."""
    schema = {"measure": {spec.toml: _setting_kind(spec.kind) for spec in MeasurementSettings.setting_specs()}}
    for name, family in FAMILIES.items():
        schema["measure"][name] = TABLE
        keys = {spec.toml: _setting_kind(spec.kind) for spec in family_settings(name)}
        if family.request == "keys":
            for measure in measures_of(name):
                if measure.request_key and measure.request_key not in keys:
                    keys[measure.request_key] = BOOL
        elif family.request == "list":
            keys["measures"] = LIST_STR
        schema[f"measure.{name}"] = keys
    return schema


SCHEMA: dict[str, dict[str, str]] = {
    "study": {"name": STR, "description": STR},
    "data": {"dataset": STR, "data_dir": STR, "test_envs": DOMAINS, "holdout_fraction": FLOAT, "options": TABLE},
    "model": {"name": STR, "options": TABLE, "pretrained": STR},
    "train": {"steps": INT, "eval_every": INT, "seeds": LIST_INT, "device": STR, "hparams": TABLE,
              "trial_seed": INT},
    "algorithms": {"algorithm": STR, "label": STR, "hparams": TABLE, "bits": LIST_INT},
    **measure_schema(),
    "surfaces": {"name": STR, "dims": INT, "variants": LIST_STR, **SURFACE_KEYS},
    "ensembles": {"name": STR, "variant": STR, "seeds": LIST_INT, "batch_size": INT, "device": STR},
    "barriers": {"name": STR, "between": LIST_STR, "members": STR, "seeds": LIST_INT, **BARRIER_KEYS},
}
TOP_LEVEL = {"study": "table", "data": "table", "model": "table", "train": "table", "algorithms": "array",
             "measure": "table", "surfaces": "array", "ensembles": "array", "barriers": "array"}
REQUIRED = {"data": ("dataset", "test_envs"), "train": ("seeds",), "algorithms": ("algorithm",),
            "surfaces": ("name",), "ensembles": ("name", "variant"), "barriers": ("name",)}

#: Algorithms that take twice the gradient work per step (a perturbed second pass).
TWO_PASS_ALGORITHMS = {"sam", "sagm", "gaqat"}


@dataclass
class Variant:
    """One algorithm setting of the study: a label (``qat4``), the algorithm and its hparams."""

    label: str
    algorithm: str
    hparams: dict[str, Any]


@dataclass
class Study:
    """A validated study file."""

    path: Path
    name: str
    description: str
    raw: dict[str, Any]
    dataset: str
    data_dir: str | None
    dataset_options: dict[str, Any]
    holdout_fraction: float
    domains: list[str]
    test_envs: list[list[int]]
    model: str | None
    model_options: dict[str, Any]
    pretrained: str | None
    steps: int | None
    eval_every: int | None
    seeds: list[int]
    trial_seed: int | None
    train_device: str
    shared_hparams: dict[str, Any]
    variants: list[Variant]
    measure: dict[str, Any]
    measure_plan: list[tuple[str, list[MeasureConfig]]]
    measure_settings: MeasurementSettings
    surfaces: list[dict[str, Any]]
    ensembles: list[dict[str, Any]]
    data_available: bool = True
    barriers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One unit of work: train + measure a variant/seed/test domain, or evaluate an ensemble."""

    job_id: str
    kind: str  # "train", "ensemble" or "barrier"
    variant: str
    test_envs: list[int]
    seed: int | None
    definition: dict[str, Any]
    members: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)


def _where(path: Path, section: str) -> str:
    return f"{path}: [{section}]" if section else str(path)


def _check_value(value: Any, kind: str, key: str, section: str, path: Path) -> Any:
    """Check one value against its schema kind; return it (ints accepted for floats)."""
    def bad(expected: str) -> FlatlabError:
        return FlatlabError(f"{_where(path, section)} {key} = {value!r}: expected {expected}")

    if kind == INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind == FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif kind == BOOL:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == STR:
        if not isinstance(value, str):
            raise bad("a string")
    elif kind == TABLE:
        if not isinstance(value, dict):
            raise bad("a table, e.g. { lr = 0.001 }")
    elif kind in (LIST_INT, LIST_FLOAT, LIST_STR):
        inner = {LIST_INT: INT, LIST_FLOAT: FLOAT, LIST_STR: STR}[kind]
        if not isinstance(value, list) or not value:
            raise bad(f"a non-empty {kind}")
        value = [_check_value(v, inner, key, section, path) for v in value]
    elif kind == DOMAINS:
        if value != "all" and not (isinstance(value, list) and value):
            raise bad('"all" or a non-empty list of domains (indices or names; a list inside is one multi-domain job)')
    return value


def _check_table(table: Mapping[str, Any], section: str, path: Path) -> dict[str, Any]:
    allowed = SCHEMA[section]
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            raise FlatlabError(f"{path}: unknown key {key!r} in [{section}] (known: {', '.join(sorted(allowed))})")
        out[key] = _check_value(value, allowed[key], key, section, path)
    for key in REQUIRED.get(section, ()):
        if key not in out:
            raise FlatlabError(f"{path}: [{section}] needs {key!r}")
    return out


def _resolve_path(text: str | None, base: Path) -> str | None:
    if not text:
        return None
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _domain_info(dataset: str, data_dir: str | None, options: dict[str, Any], path: Path) -> tuple[str, list[str], bool]:
    """(canonical data-set name, domain names, whether the data can be read here)."""
    from flatlab.data import DATASETS, build_dataset, dataset_names
    from flatlab.data.folder import KNOWN_LAYOUTS

    key = dataset if dataset in DATASETS else {k.lower(): k for k in DATASETS}.get(dataset.lower())
    if key is None:
        raise FlatlabError(f"{path}: [data] unknown data set {dataset!r}: choose one of {', '.join(dataset_names())}")
    needs_dir = DATASETS[key][1]
    if needs_dir and (not data_dir or not Path(data_dir).is_dir()):
        if key in KNOWN_LAYOUTS:
            return key, list(KNOWN_LAYOUTS[key][1]), False
        raise FlatlabError(f"{path}: [data] data set {key} needs data_dir = the folder holding its domains "
                           f"({data_dir or 'not given'} is not a folder)")
    try:
        built = build_dataset(key, data_dir=data_dir, **options)
    except FlatlabError as exc:
        raise FlatlabError(f"{path}: [data] {exc}") from None
    except TypeError as exc:
        raise FlatlabError(f"{path}: [data] options: {exc}") from None
    return built.name, list(built.domains), True


def load_study(path: str | os.PathLike[str]) -> Study:
    """Read and validate a study file; nothing is run.

    Raises:
        FlatlabError: unreadable TOML, an unknown key (named with its section and the file),
            an unknown data set, model, algorithm, hyperparameter or domain, a bad value.
    """
    from flatlab.models import model_options
    from flatlab.train import get_algorithm
    from flatlab.train.hparams import default_model, default_steps, resolve_hparams

    p = Path(path)
    raw = read_toml(p, "study file")
    for key, value in raw.items():
        if key not in TOP_LEVEL:
            raise FlatlabError(f"{p}: unknown key {key!r} at the top level (known: {', '.join(TOP_LEVEL)})")
        if TOP_LEVEL[key] == "array" and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            raise FlatlabError(f"{p}: {key!r} must be an array of tables ([[{key}]])")
        if TOP_LEVEL[key] == "table" and not isinstance(value, dict):
            raise FlatlabError(f"{p}: {key!r} must be a table ([{key}])")
    for key in ("data", "train", "algorithms"):
        if key not in raw:
            raise FlatlabError(f"{p}: the study needs a [{key}] section" if key != "algorithms"
                               else f"{p}: the study needs at least one [[algorithms]] entry")
    base = p.parent
    info = _check_table(raw.get("study", {}), "study", p)
    data = _check_table(raw["data"], "data", p)
    model = _check_table(raw.get("model", {}), "model", p)
    train = _check_table(raw["train"], "train", p)
    measure = _check_table(raw.get("measure", {}), "measure", p)
    for sub in FAMILIES:
        if sub in measure:
            measure[sub] = _check_table(measure[sub], f"measure.{sub}", p)
    algorithms = [_check_table(a, "algorithms", p) for a in raw["algorithms"]]
    surfaces = [_check_table(s, "surfaces", p) for s in raw.get("surfaces", [])]
    ensembles = [_check_table(e, "ensembles", p) for e in raw.get("ensembles", [])]
    barriers = [_check_table(b, "barriers", p) for b in raw.get("barriers", [])]

    data_dir = _resolve_path(data.get("data_dir"), base)
    dataset_options = dict(data.get("options", {}))
    dataset, domains, available = _domain_info(data["dataset"], data_dir, dataset_options, p)
    notes = [] if available else [f"data set {dataset}: data_dir {data.get('data_dir')!r} is not a folder here; "
                                  "fill it in before running"]
    holdout = float(data.get("holdout_fraction", 0.2))
    if not 0 < holdout < 1:
        raise FlatlabError(f"{p}: [data] holdout_fraction must be in (0, 1), got {holdout}")
    specs = [[d] for d in range(len(domains))] if data["test_envs"] == "all" else \
        [v if isinstance(v, list) else [v] for v in data["test_envs"]]
    names = SimpleNamespace(name=dataset, domains=domains)
    from flatlab.data import resolve_domains

    test_envs: list[list[int]] = []
    for spec in specs:
        try:
            envs = resolve_domains(names, spec)  # type: ignore[arg-type]
        except FlatlabError as exc:
            raise FlatlabError(f"{p}: [data] test_envs: {exc}") from None
        if envs in test_envs:
            raise FlatlabError(f"{p}: [data] test_envs lists domain(s) {envs} twice")
        test_envs.append(envs)

    model_name = model.get("name") or default_model(dataset)
    try:
        opts = model_options(model_name, **model.get("options", {}))
    except FlatlabError as exc:
        raise FlatlabError(f"{p}: [model] {exc}") from None
    pretrained = _resolve_path(model.get("pretrained"), base)
    if pretrained and not Path(pretrained).is_file():
        notes.append(f"model pretrained {model.get('pretrained')!r} is not a file here; fill it in before running")

    steps = train.get("steps")
    if steps is not None and steps < 1:
        raise FlatlabError(f"{p}: [train] steps must be at least 1, got {steps}")
    if train.get("eval_every") is not None and train["eval_every"] < 1:
        raise FlatlabError(f"{p}: [train] eval_every must be at least 1, got {train['eval_every']}")
    seeds = train["seeds"]
    if len(set(seeds)) != len(seeds):
        raise FlatlabError(f"{p}: [train] seeds lists a seed twice: {seeds}")
    shared = dict(train.get("hparams", {}))
    total_steps = steps if steps is not None else default_steps(dataset)

    variants: list[Variant] = []
    for entry in algorithms:
        name = entry["algorithm"]
        try:
            algo = get_algorithm(name)
        except FlatlabError as exc:
            raise FlatlabError(f"{p}: [[algorithms]] {exc}") from None
        bits_list = entry.get("bits")
        if bits_list is not None and "bits" not in algo.hparam_defaults:
            raise FlatlabError(f"{p}: [[algorithms]] {name} takes no bits (bits apply to qat, gaqat, noise, "
                               "sam, sagm, swa, swad)")
        label = entry.get("label", name)
        for bits in bits_list or [None]:
            hp = {**shared, **entry.get("hparams", {})}
            if bits is not None:
                hp["bits"] = bits
            vlabel = f"{label}{bits}" if bits is not None else label
            if not vlabel.replace("_", "").replace("-", "").isalnum():
                raise FlatlabError(f"{p}: [[algorithms]] label {vlabel!r}: use letters, digits, - and _ only")
            try:
                resolved = resolve_hparams(dataset, algo.hparam_defaults, None, hp)
                algo.validate_hparams(resolved, total_steps)
            except FlatlabError as exc:
                raise FlatlabError(f"{p}: [[algorithms]] {vlabel}: {exc}") from None
            if any(v.label == vlabel for v in variants):
                raise FlatlabError(f"{p}: [[algorithms]] two variants are labelled {vlabel!r}: give each a label")
            variants.append(Variant(vlabel, algo.name, hp))

    plan, measure_settings = measure_plan(measure, p)
    check_device_name(train.get("device", "cpu"), f"{p}: [train]")
    for e in ensembles:
        check_device_name(e.get("device", "cpu"), f"{p}: [[ensembles]] {e['name']}:")
    labels = [v.label for v in variants]
    seen: set[str] = set()
    for s in surfaces:
        if s["name"] in seen or not s["name"].replace("_", "").replace("-", "").isalnum():
            raise FlatlabError(f"{p}: [[surfaces]] name {s['name']!r} is repeated or not made of letters, digits, - and _")
        seen.add(s["name"])
        _validate_surface(s, labels, p)
    if ensembles and train.get("trial_seed") is None:
        raise FlatlabError(f"{p}: [[ensembles]] need [train] trial_seed = N: members of different seeds must "
                           "share one in/out split to be evaluated together")
    for e in ensembles:
        if e["name"] in seen or not e["name"].replace("_", "").replace("-", "").isalnum():
            raise FlatlabError(f"{p}: [[ensembles]] name {e['name']!r} is repeated or not made of letters, digits, - and _")
        seen.add(e["name"])
        if e["variant"] not in labels:
            raise FlatlabError(f"{p}: [[ensembles]] {e['name']}: unknown variant {e['variant']!r} "
                               f"(variants: {', '.join(labels)})")
        members = e.get("seeds", seeds)
        if not set(members) <= set(seeds) or len(set(members)) < 2:
            raise FlatlabError(f"{p}: [[ensembles]] {e['name']}: seeds must be at least two of the study's seeds {seeds}")
    for b in barriers:
        if b["name"] in seen or not b["name"].replace("_", "").replace("-", "").isalnum():
            raise FlatlabError(f"{p}: [[barriers]] name {b['name']!r} is repeated or not made of letters, digits, - and _")
        seen.add(b["name"])
        _validate_barrier(b, labels, seeds, [e["name"] for e in ensembles], p)
    return Study(path=p, name=info.get("name", p.stem), description=info.get("description", ""), raw=raw,
                 dataset=dataset, data_dir=data_dir, dataset_options=dataset_options, holdout_fraction=holdout,
                 domains=domains, test_envs=test_envs, model=model_name, model_options=opts, pretrained=pretrained,
                 steps=steps, eval_every=train.get("eval_every"), seeds=seeds, trial_seed=train.get("trial_seed"),
                 train_device=train.get("device", "cpu"), shared_hparams=shared, variants=variants, measure=measure,
                 measure_plan=plan, measure_settings=measure_settings, surfaces=surfaces, ensembles=ensembles,
                 data_available=available, notes=notes, barriers=barriers)


def check_device_name(name: str, where: str) -> str:
    """A device name a study may give (cpu, cuda, cuda:N, auto); its availability is checked when
    the sweep starts, before any job runs."""
    if name == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", name):
        return name
    raise FlatlabError(f"{where} device = {name!r}: use cpu, cuda, cuda:N or auto")


def _in_study_words(exc: ConfigError, path: Path, section: str, names: dict[str, str]) -> FlatlabError:
    key = names.get(exc.key, exc.key)
    return FlatlabError(f"{path}: [{section}] {key} {exc.problem}")


def measure_plan(measure: dict[str, Any], path: Path) -> tuple[list[tuple[str, list[MeasureConfig]]], MeasurementSettings]:
    """The study's measurement steps, one per measure family it names, as validated configs.

    Raises:
        FlatlabError: a bad value or a family that asks for nothing, named with the file, the
            section and the key.
    """
    names = {s.name: s.toml for s in MeasurementSettings.setting_specs()}
    values = {spec.name: measure[spec.toml] for spec in MeasurementSettings.setting_specs() if spec.toml in measure}
    values.setdefault("device", "cpu")  # a study is repeatable: CPU unless it says otherwise
    try:
        settings = MeasurementSettings(**values)
    except ConfigError as exc:
        raise _in_study_words(exc, path, "measure", names) from None
    check_device_name(settings.device, f"{path}: [measure]")
    plan: list[tuple[str, list[MeasureConfig]]] = []
    for family_name, family in FAMILIES.items():
        if family_name not in measure:
            continue
        section = measure[family_name]
        where = f"measure.{family_name}"
        members = measures_of(family_name)
        if family.request == "keys":
            requested = [m.name for m in members if (m.request_key in section and section[m.request_key] is not False
                                                     if m.value_field else bool(section.get(m.request_key)))]
            if not requested:
                asks = ", ".join(m.request_key or m.name for m in members)
                raise FlatlabError(f"{path}: [{where}] asks for nothing: set {asks}")
        elif family.request == "list":
            requested = list(section.get("measures", []))
            known = [m.name for m in members]
            for name in requested:
                if name not in known:
                    raise FlatlabError(f"{path}: [{where}] unknown measure {name!r} (choose from {', '.join(known)})")
            if not requested:
                raise FlatlabError(f"{path}: [{where}] needs measures = [...] ({', '.join(known)})")
        else:
            requested = [m.name for m in members]
        specs = family_settings(family_name)
        tomls = {spec.name: spec.toml for spec in specs}
        given = {spec.name: section[spec.toml] for spec in specs if spec.toml in section}
        try:
            configs = configs_from_values(requested, given)
        except ConfigError as exc:
            raise _in_study_words(exc, path, where, tomls) from None
        plan.append((family_name, configs))
    return plan, settings


def _validate_surface(s: dict[str, Any], labels: list[str], path: Path) -> None:
    from flatlab.surface.runner import SurfaceRequest, validate_request

    dims = s.get("dims", 2)
    if dims not in (1, 2):
        raise FlatlabError(f"{path}: [[surfaces]] {s['name']}: dims must be 1 or 2, got {dims}")
    if dims == 1 and "y" in s:
        raise FlatlabError(f"{path}: [[surfaces]] {s['name']}: y applies to dims = 2 only")
    request = SurfaceRequest(checkpoint="", dims=dims, **{k: v for k, v in s.items() if k in SURFACE_KEYS})
    try:
        validate_request(request)
    except FlatlabError as exc:
        raise FlatlabError(f"{path}: [[surfaces]] {s['name']}: {exc}") from None
    check_device_name(request.device, f"{path}: [[surfaces]] {s['name']}:")
    for v in s.get("variants", []):
        if v not in labels:
            raise FlatlabError(f"{path}: [[surfaces]] {s['name']}: unknown variant {v!r} (variants: {', '.join(labels)})")


def _validate_barrier(b: dict[str, Any], labels: list[str], seeds: list[int], ensembles: list[str],
                      path: Path) -> None:
    """A ``[[barriers]]`` entry: exactly one of ``between`` (two variant labels) and ``members``
    (an ``[[ensembles]]`` name); ``seeds`` (with ``between``) among the study's; the settings
    valid (:func:`flatlab.surface.barrier_runner.validate_settings`)."""
    from flatlab.surface.barrier_runner import BarrierSettings, validate_settings

    where = f"{path}: [[barriers]] {b['name']}:"
    if ("between" in b) == ("members" in b):
        raise FlatlabError(f"{where} give either between = [variant1, variant2] (a line between two variants) or "
                           'members = "<ensemble name>" (the pairwise matrix of an ensemble\'s members)')
    if "between" in b:
        pair = b["between"]
        if len(pair) != 2 or pair[0] == pair[1]:
            raise FlatlabError(f"{where} between must name two different variants, got {pair}")
        for v in pair:
            if v not in labels:
                raise FlatlabError(f"{where} unknown variant {v!r} in between (variants: {', '.join(labels)})")
        if not set(b.get("seeds", seeds)) <= set(seeds):
            raise FlatlabError(f"{where} seeds must be among the study's seeds {seeds}, got {b['seeds']}")
    else:
        if b["members"] not in ensembles:
            raise FlatlabError(f"{where} members = {b['members']!r} names no [[ensembles]] entry "
                               f"(ensembles: {', '.join(ensembles) or 'none'})")
        if "seeds" in b:
            raise FlatlabError(f"{where} seeds applies to between only (the ensemble's seeds are its members)")
    settings = BarrierSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in b.items()
                                  if k in BARRIER_KEYS})
    try:
        validate_settings(settings)
    except FlatlabError as exc:
        raise FlatlabError(f"{where} {exc}") from None


def barrier_settings(b: dict[str, Any]) -> dict[str, Any]:
    """The JSON definition of a ``[[barriers]]`` entry's settings (defaults filled in)."""
    from flatlab.surface.barrier_runner import BarrierSettings

    defaults = BarrierSettings()
    out = {k: b.get(k, getattr(defaults, k)) for k in BARRIER_KEYS}
    out["splits"] = list(out["splits"])
    return out


# --- jobs ----------------------------------------------------------------------------------------

def _env_tag(envs: list[int]) -> str:
    return "te" + "+".join(str(e) for e in envs)


def measurement_steps(study: Study, variant: str) -> list[tuple[str, dict[str, Any]]]:
    """The measurement steps of a job as (name, JSON definition): one per measure family, then
    one per surface that applies to ``variant``."""
    steps: list[tuple[str, dict[str, Any]]] = []
    settings = study.measure_settings.settings()
    for family, configs in study.measure_plan:
        steps.append((family, {"kind": "measure", "settings": settings,
                               "measures": [{"measure": c.measure, "config": c.settings()} for c in configs]}))
    for s in study.surfaces:
        if s.get("variants") and variant not in s["variants"]:
            continue
        request = {k: v for k, v in s.items() if k in SURFACE_KEYS}
        request.setdefault("device", "cpu")
        steps.append((f"surface-{s['name']}", {"kind": "surface", "dims": s.get("dims", 2), "name": s["name"],
                                               "request": request}))
    return steps


def expand_jobs(study: Study) -> list[Job]:
    """Every job of a study, in the fixed order the merged results follow."""
    jobs: list[Job] = []
    by_key: dict[tuple[str, tuple[int, ...], int], str] = {}
    for variant in study.variants:
        for envs in study.test_envs:
            for seed in study.seeds:
                job_id = f"{variant.label}-{_env_tag(envs)}-s{seed}"
                train = {"dataset": study.dataset, "test_envs": [str(e) for e in envs], "algorithm": variant.algorithm,
                         "model": study.model, "model_options": study.model_options,
                         "dataset_options": study.dataset_options, "data_dir": study.data_dir, "steps": study.steps,
                         "eval_every": study.eval_every, "seed": seed, "trial_seed": study.trial_seed,
                         "holdout_fraction": study.holdout_fraction, "hparam_flags": variant.hparams,
                         "device": study.train_device, "pretrained": study.pretrained}
                steps = measurement_steps(study, variant.label)
                definition = {"kind": "train", "study": study.name, "variant": variant.label, "train": train,
                              "steps": [[n, a] for n, a in steps]}
                jobs.append(Job(job_id, "train", variant.label, envs, seed, definition, steps=[n for n, _ in steps]))
                by_key[(variant.label, tuple(envs), seed)] = job_id
    for e in study.ensembles:
        for envs in study.test_envs:
            members = [by_key[(e["variant"], tuple(envs), s)] for s in e.get("seeds", study.seeds)]
            step = {"kind": "ensemble", "device": e.get("device", "cpu"), "batch_size": e.get("batch_size", 512)}
            job_id = f"{e['name']}-{_env_tag(envs)}"
            steps: list[list[Any]] = [["ensemble", step]]
            for b in study.barriers:
                if b.get("members") == e["name"]:
                    steps.append([f"barriers-{b['name']}", {"kind": "member-barriers", "name": b["name"],
                                                            "settings": barrier_settings(b)}])
            definition = {"kind": "ensemble", "study": study.name, "variant": e["variant"], "members": members,
                          "steps": steps}
            jobs.append(Job(job_id, "ensemble", e["variant"], envs, None, definition, members=members,
                            steps=[n for n, _ in steps]))
    for b in study.barriers:
        if "between" not in b:
            continue
        first, second = b["between"]
        for envs in study.test_envs:
            for seed in b.get("seeds", study.seeds):
                members = [by_key[(first, tuple(envs), seed)], by_key[(second, tuple(envs), seed)]]
                job_id = f"barrier-{b['name']}-{_env_tag(envs)}-s{seed}"
                step = {"kind": "barrier", "name": b["name"], "settings": barrier_settings(b)}
                definition = {"kind": "barrier", "study": study.name, "variant": first, "members": members,
                              "steps": [["barrier", step]]}
                jobs.append(Job(job_id, "barrier", first, envs, seed, definition, members=members,
                                steps=["barrier"]))
    ids = [j.job_id for j in jobs]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise FlatlabError(f"{study.path}: two jobs would be called {twice[0]!r}: rename a variant, ensemble or "
                           "barrier")
    return jobs


# --- running one job (in a worker) ----------------------------------------------------------------

def setup_worker(threads: int) -> dict[str, Any]:
    """Worker state: a fixed PyTorch thread count, so results do not depend on the backend."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    return {"threads": threads}


def run_job(state: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """Run (or continue) one job; never raises: returns ``{"job_id", "ok", "error", ...}``."""
    t0 = time.perf_counter()
    job_dir = Path(task["job_dir"])
    try:
        with open(job_dir / "attempts", "a", encoding="utf-8") as fh:
            fh.write(f"{time.time():.3f} pid {os.getpid()}\n")
        run_id = _run_job_steps(task)
        atomic_write_text(job_dir / "done", json.dumps({"job_id": task["job_id"], "run_id": run_id,
                                                        "seconds": round(time.perf_counter() - t0, 2)}))
        return {"job_id": task["job_id"], "ok": True, "run_id": run_id, "seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - a failed job is reported, it does not stop the others
        message = " ".join(str(exc).split()) if isinstance(exc, FlatlabError) else f"{type(exc).__name__}: {exc}"
        return {"job_id": task["job_id"], "ok": False, "error": message, "traceback": traceback.format_exc(),
                "seconds": time.perf_counter() - t0}


def run_step(step: dict[str, Any], target: Path, task: dict[str, Any], provenance: str) -> str:
    """Run one measurement step of a job through the library; return the run id it wrote."""
    from flatlab.results import run_id_for
    from flatlab.train import resolve_device

    command = {"command_line": provenance}
    if step["kind"] == "measure":
        from flatlab.pipeline import measure_checkpoint

        configs = [get_measure(m["measure"]).config(**m["config"]) for m in step["measures"]]
        checkpoint = Path(task["run_dir"]) / "model.pt"
        measure_checkpoint(checkpoint, configs, settings=MeasurementSettings(**step["settings"]), results=target,
                           provenance=command)
        return run_id_for(checkpoint)
    if step["kind"] == "surface":
        from flatlab.surface.runner import SurfaceRequest, run_surface

        request = SurfaceRequest(checkpoint=str(Path(task["run_dir"]) / "model.pt"), dims=step["dims"],
                                 results=str(target), name=step["name"], workers=1,
                                 **{k: v for k, v in step["request"].items() if k != "device"})
        request.device = str(resolve_device(step["request"].get("device", "cpu")))
        run_surface(request, None, provenance=command)
        return run_id_for(request.checkpoint)
    if step["kind"] == "ensemble":
        from flatlab.ensemble import evaluate_ensemble, load_members, write_ensemble_results

        members = load_members([Path(task["runs_dir"]) / m for m in task["definition"]["members"]])
        result = evaluate_ensemble(members, resolve_device(step["device"]), int(step["batch_size"]))
        return str(write_ensemble_results(target, members, result, provenance=command))
    if step["kind"] in ("barrier", "member-barriers"):
        from flatlab.surface.barrier_runner import (
            BarrierRequest,
            MemberBarrierRequest,
            run_barrier,
            run_member_barriers,
        )

        settings = {k: (tuple(v) if isinstance(v, list) else v) for k, v in step["settings"].items()}
        paths = [str(Path(task["runs_dir"]) / m / "model.pt") for m in task["definition"]["members"]]
        common = {**settings, "results": str(target), "name": step["name"]}
        if step["kind"] == "barrier":
            outcome = run_barrier(BarrierRequest(checkpoint1=paths[0], checkpoint2=paths[1], **common),
                                  provenance=command)
        else:
            from flatlab.results import read_results

            ensemble_file = Path(task["job_dir"]) / "ensemble.h5"  # the job's first step: the ensemble's run
            runs = read_results(ensemble_file)["runs"] if ensemble_file.exists() else {}
            run_id, run = next(iter(runs.items())) if runs else (None, {})
            outcome = run_member_barriers(MemberBarrierRequest(members=paths, run_id=run_id, **common),
                                          provenance=command, run_attrs=run.get("attrs") or None)
        return str(outcome.run_id)
    raise FlatlabError(f"unknown step kind {step['kind']!r} in a job definition: the sweep folder comes from "
                       "another flatlab version; use another --out")


def _run_job_steps(task: dict[str, Any]) -> str:
    from flatlab.checkpoint import load_checkpoint
    from flatlab.results import run_attrs_from_checkpoint, run_id_for, write_group

    definition = task["definition"]
    job_dir = Path(task["job_dir"])
    if definition["kind"] == "train":
        from flatlab.train import TrainConfig, train

        cfg = dict(definition["train"])
        if not (Path(task["run_dir"]) / "done").exists():
            train(TrainConfig(out=task["run_dir"], quiet=True, **cfg))
        run_id = run_id_for(Path(task["run_dir"]) / "model.pt")
    else:
        run_id = ""
    for name, step in definition["steps"]:
        marker = job_dir / f"{name}.done"
        if marker.exists():
            run_id = run_id or json.loads(marker.read_text()).get("run_id", "")
            continue
        target = job_dir / f"{name}.h5"
        if step["kind"] == "measure":
            # An unfinished measurement step starts over (a surface resumes from its journal instead).
            target.unlink(missing_ok=True)
        found = run_step(step, target, task, provenance=f"flatlab sweep {definition['study']} "
                                                          f"(job {task['job_id']}, step {name})")
        run_id = run_id or found
        atomic_write_text(marker, json.dumps({"run_id": run_id}))
    if definition["kind"] == "train":
        from flatlab.report import gaqat_conflict_of_log

        ckpt = load_checkpoint(Path(task["run_dir"]) / "model.pt")
        target = job_dir / "sweep.h5"
        target.unlink(missing_ok=True)
        attrs = run_attrs_from_checkpoint(ckpt, f"flatlab sweep {definition['study']}")
        write_group(target, run_id, attrs, "sweep", {},
                    {"job_id": task["job_id"], "variant": definition["variant"], "study": definition["study"]})
        # GAQAT logs its scale-gradient conflict per evaluation in results.jsonl; the report reads
        # the step-weighted training mean per layer from /runs/<id>/train (gaqat_conflict_max).
        conflict = gaqat_conflict_of_log(Path(task["run_dir"]) / "results.jsonl")
        if conflict:
            write_group(target, run_id, attrs, "train", {},
                        {"gaqat_conflict": conflict, "source": "results.jsonl: step-weighted mean of gaqat_conflict"})
    elif definition["kind"] == "ensemble" and run_id:
        from flatlab.results import read_results

        # The ensemble's variant label is the study's ensemble name (job id = <name>-te<envs>).
        target = job_dir / "ensemble.h5"
        run = read_results(target)["runs"].get(run_id) if target.exists() else None
        if run is not None:
            write_group(target, run_id, run.get("attrs", {}), "sweep", {},
                        {"job_id": task["job_id"], "variant": task["job_id"].rsplit("-te", 1)[0],
                         "members_variant": definition["variant"], "study": definition["study"]})
    return run_id


# --- the driver ----------------------------------------------------------------------------------

@dataclass
class JobOutcome:
    job_id: str
    status: str  # done (now), skipped (done before), failed, blocked
    seconds: float = 0.0
    error: str | None = None
    run_id: str | None = None


@dataclass
class SweepSummary:
    study: str
    out: Path
    results: Path | None
    outcomes: list[JobOutcome]
    seconds: float

    @property
    def failed(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if o.status in ("failed", "blocked")]

    def as_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        return {"study": self.study, "out": str(self.out), "results": str(self.results) if self.results else None,
                "seconds": round(self.seconds, 2), "counts": counts,
                "jobs": [{"job_id": o.job_id, "status": o.status, "seconds": round(o.seconds, 2), "error": o.error,
                          "run_id": o.run_id} for o in self.outcomes]}


def job_status(out: Path, job: Job) -> str:
    """done, started (something on disk) or pending."""
    job_dir = out / "jobs" / job.job_id
    if (job_dir / "done").exists():
        return "done"
    if (job_dir / "attempts").exists() or (out / "runs" / job.job_id / "run.json").exists():
        return "started"
    return "pending"


def _prepare_out(study: Study, out: Path, jobs: list[Job]) -> None:
    """Check OUT holds nothing of another study definition, then write the job definitions."""
    marker = out / "study.toml"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise FlatlabError(f"{out} exists and holds no sweep (no study.toml): choose another output folder")
    for job in jobs:
        path = out / "jobs" / job.job_id / "job.json"
        if path.exists():
            try:
                previous = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                previous = None
            if previous != _jsonable(job.definition):
                raise FlatlabError(f"{out} holds job {job.job_id} with another definition (the study changed): "
                                   "use another --out, or delete that job's folders to redo it")
    for job in jobs:
        path = out / "jobs" / job.job_id / "job.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(job.definition, indent=1, sort_keys=True))
    atomic_write_text(marker, study.path.read_text(encoding="utf-8"))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _task(out: Path, job: Job) -> dict[str, Any]:
    return {"job_id": job.job_id, "job_dir": str((out / "jobs" / job.job_id).resolve()),
            "run_dir": str((out / "runs" / job.job_id).resolve()), "runs_dir": str((out / "runs").resolve()),
            "definition": job.definition}


def job_files(out: Path, job: Job) -> list[Path]:
    """A finished job's results files, in merge order."""
    job_dir = out / "jobs" / job.job_id
    names = (["sweep"] if job.kind == "train" else []) + job.steps
    return [job_dir / f"{n}.h5" for n in names if (job_dir / f"{n}.h5").exists()]


def merge_sweep(study: Study, out: Path, jobs: list[Job]) -> Path | None:
    """Merge every finished job's files into ``OUT/results.h5`` (job order; atomic)."""
    from flatlab.results import merge_results

    done = [j for j in jobs if (out / "jobs" / j.job_id / "done").exists()]
    if not done:
        return None
    mapping: dict[str, str] = {}
    srcs: list[Path] = []
    for job in done:
        record = json.loads((out / "jobs" / job.job_id / "done").read_text())
        mapping[job.job_id] = record.get("run_id", "")
        srcs += job_files(out, job)
    target = out / "results.h5"
    merge_results(target, srcs, attrs={"study": study.name, "sweep_jobs": mapping})
    return target


ProgressFactory = Callable[[int, int], Any]


def run_sweep(study: Study, out: str | os.PathLike[str], *, backend: str = "local", workers: int = 1,
              address: str | None = None, quiet: bool = False) -> SweepSummary:
    """Run (or continue) every job of ``study`` in ``out``; merge the results; return a summary.

    Failed jobs are reported in the summary (with their error, also in ``OUT/jobs/<id>/error.txt``)
    and do not stop the others; an ensemble whose members failed is ``blocked``.

    Raises:
        FlatlabError: bad backend/workers, an unreachable Ray address, ``out`` holding another study,
            data that cannot be read here.
    """
    from tqdm import tqdm

    from flatlab.parallel import BACKENDS, check_address, default_threads, fan_out

    if backend not in BACKENDS:
        raise FlatlabError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if workers < 1:
        raise ConfigError("workers", f"must be at least 1, got {workers}")
    if address is not None:
        if backend != "ray":
            raise ConfigError("address", "names a Ray cluster: use backend ray")
        check_address(address)
    if not study.data_available or study.notes:
        raise FlatlabError(f"{study.path}: {'; '.join(study.notes)}")
    out = Path(out)
    from flatlab.io import check_writable
    from flatlab.train import resolve_device

    check_writable(out, "folder")
    for device in {study.train_device, study.measure_settings.device,
                   *(s.get("device", "cpu") for s in study.surfaces), *(e.get("device", "cpu") for e in study.ensembles)}:
        resolve_device(device)  # a device this machine lacks fails here, not in every job
    jobs = expand_jobs(study)
    _prepare_out(study, out, jobs)
    start = time.perf_counter()
    outcomes: dict[str, JobOutcome] = {}
    for job in jobs:
        if job_status(out, job) == "done":
            record = json.loads((out / "jobs" / job.job_id / "done").read_text())
            outcomes[job.job_id] = JobOutcome(job.job_id, "skipped", run_id=record.get("run_id"))
    bar = tqdm(total=len(jobs), initial=len(outcomes), disable=quiet, file=sys.stderr, desc=f"sweep {study.name}",
               unit="job", dynamic_ncols=True)
    threads = default_threads(workers)
    failed_count = 0

    def phase(todo: list[Job]) -> None:
        nonlocal failed_count
        if not todo:
            return
        running = min(workers, len(todo))
        bar.set_postfix_str(f"running {running}, failed {failed_count}")
        remaining = len(todo)
        try:
            for index, result in fan_out(setup_worker, threads, run_job, [_task(out, j) for j in todo],
                                         backend=backend, workers=workers, address=address):
                job = todo[index]
                remaining -= 1
                if result["ok"]:
                    outcomes[job.job_id] = JobOutcome(job.job_id, "done", result["seconds"], run_id=result["run_id"])
                    (out / "jobs" / job.job_id / "error.txt").unlink(missing_ok=True)
                else:
                    failed_count += 1
                    outcomes[job.job_id] = JobOutcome(job.job_id, "failed", result["seconds"], result["error"])
                    atomic_write_text(out / "jobs" / job.job_id / "error.txt",
                                      result["error"] + "\n\n" + result.get("traceback", ""))
                bar.update(1)
                bar.set_postfix_str(f"running {min(running, remaining)}, failed {failed_count}")
        except FlatlabError:
            raise
        except Exception as exc:  # noqa: BLE001 - a worker process died: the rest are reported
            for job in todo:
                if job.job_id not in outcomes:
                    failed_count += 1
                    outcomes[job.job_id] = JobOutcome(job.job_id, "failed", 0.0,
                                                      f"worker lost ({type(exc).__name__}: {exc}); rerun to continue")
                    bar.update(1)

    phase([j for j in jobs if j.kind == "train" and j.job_id not in outcomes])
    ready: list[Job] = []
    for job in jobs:  # ensembles and barriers: after their members are trained
        if job.kind == "train" or job.job_id in outcomes:
            continue
        bad = [m for m in job.members if outcomes.get(m, JobOutcome(m, "failed")).status not in ("done", "skipped")]
        if bad:
            failed_count += 1
            outcomes[job.job_id] = JobOutcome(job.job_id, "blocked", error=f"member job(s) failed: {', '.join(bad)}")
            bar.update(1)
        else:
            ready.append(job)
    phase(ready)
    bar.close()
    results = merge_sweep(study, out, jobs)
    ordered = [outcomes[j.job_id] for j in jobs]
    return SweepSummary(study.name, out, results, ordered, time.perf_counter() - start)


# --- running-time estimate -------------------------------------------------------------------------

#: Images and classes of the DomainBed folder data sets (for estimates without the data).
KNOWN_SIZES = {"PACS": (9991, 7), "VLCS": (10729, 5), "OfficeHome": (15588, 65), "TerraIncognita": (24788, 10),
               "DomainNet": (586575, 345)}


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def barrier_samples(settings: Mapping[str, Any], src: int, tgt: int, holdout: float) -> float:
    """Samples forwarded along one barrier line: every grid point evaluates each split (and,
    with ``bn = "reestimate"``, runs the source split once more to collect statistics)."""
    cap = int(settings.get("max_samples") or 10**12)
    sizes = {"source": min(int(src * (1 - holdout)), cap), "source-out": min(int(src * holdout), cap),
             "target": min(tgt, cap)}
    per_point = sum(sizes[s] for s in settings.get("splits", ("source", "target")))
    if settings.get("bn") == "reestimate":
        per_point += sizes["source"]
    return float(settings.get("points", 21)) * per_point


def estimate_seconds(study: Study, jobs: list[Job], workers: int = 1) -> dict[str, Any]:
    """A rough running time: the model's measured cost per sample times each job's sample count.

    The model is timed here (one training step and one forward pass of a small batch on random
    inputs, with the thread count one worker gets); every job's work is counted in samples
    through forward or forward+backward passes (training steps, evaluations, Hessian-vector
    products as two backward passes, noise searches, radii x samples, grid points), and the
    total is spread over ``min(workers, jobs)`` workers. Expect tens of percent of error.
    """
    import torch

    from flatlab.models import build_model
    from flatlab.parallel import default_threads
    from flatlab.train import get_algorithm
    from flatlab.train.hparams import default_steps, resolve_hparams

    if study.data_available:
        from flatlab.data import build_dataset

        ds = build_dataset(study.dataset, data_dir=study.data_dir, **study.dataset_options)
        input_shape, num_classes = tuple(ds.input_shape), int(ds.num_classes)
        sizes = [ds.domain_size(e) for e in range(len(study.domains))]
    else:
        total, num_classes = KNOWN_SIZES.get(study.dataset, (10000, 10))
        side = int(study.dataset_options.get("resolution", 224))
        input_shape = (3, side, side)
        sizes = [total // len(study.domains)] * len(study.domains)
    device = "cuda" if study.train_device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(default_threads(workers))
    try:
        model = build_model(study.model, input_shape, num_classes, **study.model_options).to(device)
        n_src = len(study.domains) - len(study.test_envs[0])
        hp = resolve_hparams(study.dataset, {}, None, {k: v for k, v in study.shared_hparams.items()
                                                       if k in ("batch_size",)})
        batch = hp["batch_size"] * n_src
        small = min(batch, 8 if input_shape[-1] >= 64 else batch)
        x = torch.randn(small, *input_shape, device=device)
        y = torch.randint(num_classes, (small,), device=device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        model.train()
        t_fb = _time(step, 2) / small
        model.eval()
        with torch.no_grad():
            t_f = _time(lambda: model(x), 2) / small
    finally:
        torch.set_num_threads(saved_threads)
    steps = study.steps if study.steps is not None else default_steps(study.dataset)
    eval_every = study.eval_every or max(1, min(100, steps // 10))
    holdout = study.holdout_fraction

    def split_samples(split: str, test_envs: list[int], cap: int) -> int:
        """Samples a measure sees on ``split`` (each capped at ``cap``; ``domains``: every domain
        alone, each capped)."""
        src = sum(s for e, s in enumerate(sizes) if e not in test_envs)
        tgt = sum(s for e, s in enumerate(sizes) if e in test_envs)
        if split == "domains":
            return sum(min(int(s * (1 - holdout)), cap) if e not in test_envs else min(s, cap)
                       for e, s in enumerate(sizes))
        return {"source": min(int(src * (1 - holdout)), cap), "source-out": min(int(src * holdout), cap),
                "target": min(tgt, cap)}[split]

    n_all = sum(sizes)
    per_job: dict[str, float] = {}
    for job in jobs:
        src = sum(s for e, s in enumerate(sizes) if e not in job.test_envs)
        tgt = n_all - src
        cap = int(study.measure_settings.max_samples or 10**12)
        if job.kind in ("ensemble", "barrier"):
            seconds = len(job.members) * n_all * t_f if job.kind == "ensemble" else 0.0
            for _name, step in job.definition["steps"]:
                if step["kind"] in ("barrier", "member-barriers"):
                    lines = 1 if step["kind"] == "barrier" else len(job.members) * (len(job.members) - 1) // 2
                    seconds += lines * barrier_samples(step["settings"], src, tgt, study.holdout_fraction) * t_f
            per_job[job.job_id] = seconds
            continue
        algo = get_algorithm(next(v.algorithm for v in study.variants if v.label == job.variant))
        factor = 2.0 if algo.name in TWO_PASS_ALGORITHMS else 1.0
        seconds = steps * batch * t_fb * factor + math.ceil(steps / eval_every) * n_all * t_f
        for _family, configs in study.measure_plan:
            for config in configs:
                cost = get_measure(config.measure).cost(config)
                n = sum(split_samples(split, job.test_envs, int(cost.max_samples or cap)) for split in cost.splits)
                seconds += (cost.gradient * t_fb + cost.forward * t_f) * n + cost.examples * t_f
        for s in study.surfaces:
            if s.get("variants") and job.variant not in s["variants"]:
                continue
            nx = int(str(s.get("x", "-1:1:51")).split(":")[2])
            ny = int(str(s.get("y", "-1:1:51")).split(":")[2]) if s.get("dims", 2) == 2 else 1
            cap_s = int(s.get("max_samples", 10**12))
            seconds += nx * ny * (min(src, cap_s) + min(tgt, cap_s)) * t_f
        per_job[job.job_id] = seconds
    lanes = max(1, min(workers, len(jobs)))
    total = sum(per_job.values())
    return {"per_job": per_job, "total_seconds": total / lanes, "device": device,
            "seconds_per_sample_train": t_fb, "seconds_per_sample_forward": t_f,
            "note": "rough: model timed here on random inputs, work counted in samples"}


__all__ = ["BARRIER_KEYS", "Job", "Study", "SweepSummary", "barrier_samples", "barrier_settings", "estimate_seconds",
           "expand_jobs", "job_status", "load_study", "measure_plan", "measure_schema", "measurement_steps",
           "merge_sweep", "run_step", "run_sweep"]
