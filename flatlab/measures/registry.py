"""The registry of measures, and everything derived from their declarations.

``MEASURES`` maps a measure's name to its :class:`~flatlab.measures.base.Measure`, in the order
the measures run and the report shows their columns; ``FAMILIES`` the families. A measure
module registers itself with :func:`register_measure` (the built-in ones are registered when
:mod:`flatlab.measures` is imported). From the declarations this module derives:

* :func:`family_settings`: one :class:`~flatlab.measures.base.SettingSpec` per setting of a
  family (a setting several measures share, e.g. ``split``, is declared identically in each;
  :func:`check_registry` verifies it), which the CLI turns into flags and a study file into keys;
* :func:`configs_from_values`: field values (from flags or a study file) -> validated configs
  of the requested measures;
* :func:`find_column`, :func:`all_columns`, :func:`read_columns`: the report's and figures'
  columns, descriptions and axis labels (the measures', then those of the registered
  :class:`~flatlab.measures.base.ColumnSource` objects: results no one-checkpoint measure
  computes, such as the loss barrier between two checkpoints);
* :func:`fingerprint`: what a stored result must match to be reused by a rerun.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flatlab.errors import FlatlabError
from flatlab.io import settings_fingerprint
from flatlab.measures.base import Family, Measure
from flatlab.measures.columns import Column, ColumnSource, Estimate
from flatlab.measures.config import ConfigError, MeasureConfig, SettingSpec

MEASURES: dict[str, Measure] = {}
FAMILIES: dict[str, Family] = {}
#: Column sources that are not measures (see :class:`~flatlab.measures.base.ColumnSource`).
COLUMN_SOURCES: dict[str, ColumnSource] = {}


def register_family(family: Family) -> Family:
    """Add a family (idempotent for the same declaration)."""
    found = FAMILIES.get(family.name)
    if found is not None and found != family:
        raise FlatlabError(f"measure family {family.name!r} is already registered differently")
    FAMILIES[family.name] = family
    return family


def register_measure(measure: Measure) -> Measure:
    """Add a measure; its family must be registered first, its name and columns must be new."""
    if measure.family not in FAMILIES:
        raise FlatlabError(f"measure {measure.name!r}: unknown family {measure.family!r} (register it first)")
    if measure.name in MEASURES and MEASURES[measure.name] is not measure:
        raise FlatlabError(f"a measure named {measure.name!r} is already registered")
    if measure.config.measure != measure.name:
        raise FlatlabError(f"measure {measure.name!r}: its config class {measure.config.__name__} says "
                           f"measure = {measure.config.measure!r}")
    _check_new_columns(measure, f"measure {measure.name!r}")
    MEASURES[measure.name] = measure
    return measure


def _check_new_columns(owner: Measure | ColumnSource, who: str) -> None:
    """Column names are unique across measures and column sources (the report's columns)."""
    taken = {c.name for other, c in all_columns() if other is not owner}
    for column in owner.columns:
        if column.name in taken:
            raise FlatlabError(f"{who}: column {column.name!r} is already declared by another measure or source")


def register_columns(source: ColumnSource) -> ColumnSource:
    """Add a column source (idempotent for the same object); its column names must be new."""
    if source.name in COLUMN_SOURCES and COLUMN_SOURCES[source.name] is not source:
        raise FlatlabError(f"a column source named {source.name!r} is already registered")
    _check_new_columns(source, f"column source {source.name!r}")
    COLUMN_SOURCES[source.name] = source
    return source


def get_measure(name: str) -> Measure:
    """A measure by name; FlatlabError listing the known ones otherwise."""
    if name not in MEASURES:
        raise FlatlabError(f"unknown measure {name!r}: choose one of {', '.join(MEASURES)}")
    return MEASURES[name]


def measures_of(family: str) -> list[Measure]:
    return [m for m in MEASURES.values() if m.family == family]


def family_settings(family: str) -> list[SettingSpec]:
    """Every setting of a family's measures, once each (first declaration wins; see
    :func:`check_registry` for the agreement of shared settings)."""
    seen: dict[str, SettingSpec] = {}
    for measure in measures_of(family):
        for spec in measure.config.setting_specs():
            seen.setdefault(spec.name, spec)
    return list(seen.values())


def check_registry() -> None:
    """The declarations can live side by side on one command line and in one study file.

    * A shared setting is declared the same way wherever it appears in its family (flag, key,
      default, kind, choices).
    * Every flag is unique across **all** families and the shared measurement settings
      (``flatlab sharpness`` puts every family's flags into one parser): a setting's flag, a
      measure's request flag and ``--all``. Only the identical shared declaration of one family
      appears twice. Setting *names* may repeat across families (``top_k`` of curvature and of
      per-domain curvature): the CLI keeps each family's values apart.
    * Within a family, no two settings share a study-file key.

    Raises:
        FlatlabError: naming the measures and the setting or flag that collide.
    """
    from flatlab.measures.context import MeasurementSettings

    flags: dict[str, str] = {"--all": "the --all request"}
    for spec in MeasurementSettings.setting_specs():
        flags[spec.flag] = f"the measurement setting {spec.name}"
    for measure in MEASURES.values():
        owner = flags.get(measure.request_flag)
        if owner is not None:
            raise FlatlabError(f"request flag {measure.request_flag} of {measure.name} is also {owner}")
        flags[measure.request_flag] = f"{measure.name}'s request flag"
    for family in FAMILIES:
        by_name: dict[str, tuple[str, SettingSpec]] = {}
        keys: dict[str, str] = {}
        for measure in measures_of(family):
            for spec in measure.config.setting_specs():
                if spec.name in by_name:
                    other_measure, other = by_name[spec.name]
                    same = (spec.flag, spec.toml, spec.default, spec.kind, spec.choices) == \
                           (other.flag, other.toml, other.default, other.kind, other.choices)
                    if not same:
                        raise FlatlabError(f"setting {spec.name!r} of {measure.name} differs from its declaration in "
                                           f"{other_measure}: shared settings must be declared identically")
                    continue
                where = f"{measure.name}.{spec.name}"
                if spec.flag in flags and not (measure.value_field == spec.name
                                               and flags[spec.flag] == f"{measure.name}'s request flag"):
                    raise FlatlabError(f"flag {spec.flag} of {where} is also {flags[spec.flag]}")
                if spec.toml in keys:
                    raise FlatlabError(f"study-file key {spec.toml!r} of {where} is also {keys[spec.toml]} "
                                       f"in [measure.{family}]")
                by_name[spec.name] = (measure.name, spec)
                flags[spec.flag] = where
                keys[spec.toml] = where


def configs_from_values(requested: Sequence[str], values: Mapping[str, Any]) -> list[MeasureConfig]:
    """Validated configs of the ``requested`` measures, in registry order.

    Args:
        requested: measure names.
        values: setting name -> value for every setting given (a value for a setting the
            measure does not have is ignored; an unknown measure is an error).

    Raises:
        ConfigError: a bad value (named by its setting).
    """
    for name in requested:
        get_measure(name)
    configs = []
    for measure in MEASURES.values():
        if measure.name not in requested:
            continue
        names = {s.name for s in measure.config.setting_specs()}
        configs.append(measure.config(**{k: v for k, v in values.items() if k in names}))
    return configs


def fingerprint(config: MeasureConfig, context_part: Mapping[str, Any]) -> str:
    """The resume fingerprint of a measure: its name, every setting and what the context adds
    (subset, batch size, seed, device type)."""
    return settings_fingerprint({"measure": config.measure, **config.fingerprint_settings(), **dict(context_part)})


# --- columns ---------------------------------------------------------------------------------

def all_columns() -> list[tuple[Measure | ColumnSource, Column]]:
    """Every column of every measure, in registry order, then the column sources'."""
    return [(m, c) for m in MEASURES.values() for c in m.columns] + \
        [(src, c) for src in COLUMN_SOURCES.values() for c in src.columns]


def find_column(name: str) -> tuple[Measure | ColumnSource, Column] | None:
    """The measure and column a column name belongs to (static names first, then patterns)."""
    for measure, column in all_columns():
        if column.pattern is None and column.name == name:
            return measure, column
    for measure, column in all_columns():
        if column.pattern is not None and column.matches(name):
            return measure, column
    return None


def column_order(name: str) -> int:
    """The position of a column's declaration (for sorting report columns)."""
    for i, (_, column) in enumerate(all_columns()):
        if column.matches(name):
            return i
    return len(all_columns())


def describe_column(name: str) -> str:
    found = find_column(name)
    return found[1].describe(name) if found else name


def axis_label(name: str) -> str:
    found = find_column(name)
    return found[1].axis_label(name) if found else name


def read_columns(run: Mapping[str, Any]) -> dict[str, Estimate]:
    """Every column a run read from a results file holds, with its standard error."""
    out: dict[str, Estimate] = {}
    for measure in MEASURES.values():
        out.update(measure.read(run))
    for source in COLUMN_SOURCES.values():
        out.update(source.read(run))
    return out


def measure_names(names: Iterable[str]) -> list[str]:
    return [get_measure(n).name for n in names]


__all__ = ["COLUMN_SOURCES", "FAMILIES", "MEASURES", "ConfigError", "all_columns", "axis_label", "check_registry", "column_order",
           "configs_from_values", "describe_column", "family_settings", "find_column", "fingerprint",
           "get_measure", "measure_names", "measures_of", "read_columns", "register_columns", "register_family",
           "register_measure"]
