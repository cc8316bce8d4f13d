"""The shape every measure takes: a validated config, a compute function, a typed result, columns.

A measure is declared once, as a :class:`Measure`:

* ``config``: a frozen dataclass (subclass of :class:`MeasureConfig`) whose fields are the
  measure's settings. Each field is made with :func:`setting`, which records its one-line help,
  its command-line flag and its study-file (TOML) key; the dataclass validates itself at
  construction (``__post_init__`` -> :meth:`MeasureConfig.validate`) and raises
  :class:`ConfigError`, which names the parameter in the caller's words (``top_k must be at
  least 1, got 0``); the CLI rewrites the name into its flag, a study file into its key.
* ``compute(context, config) -> MeasureResult``: the work, on a :class:`MeasureContext` that
  hands out the model views, the data splits and shared caches (one Hessian operator for every
  curvature measure of a run, say).
* ``group``: where the result lives under ``/runs/<run_id>/`` in a results file.
* ``columns``: the scalar columns the report and the figures read from that group, each with a
  label, a unit, a description and its orientation (larger = sharper, always, by convention).
* ``cost(config) -> Cost``: the work in passes over the data, for a sweep's running-time estimate.

From these declarations :mod:`flatlab.measures.registry` derives the ``flatlab sharpness``
flags, the study-file keys and their validation, the resume fingerprints, the report columns,
the figure axis labels and the sweep's cost estimate; nothing else spells them out again.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

# --- errors ---------------------------------------------------------------------------------
from flatlab.errors import ConfigError, FlatlabError  # noqa: E402, F401  (re-exported here)

# --- settings --------------------------------------------------------------------------------

def setting(default: Any, help: str, *, flag: str | None = None, toml: str | None = None,
            choices: Sequence[Any] | None = None, minimum: float | None = None,
            maximum: float | None = None, exclusive_minimum: bool = False,
            shared: bool = False) -> Any:
    """A config field with its metadata (the torchao/curvlinops way: one declaration).

    Args:
        default: the default value (an immutable one: tuples, not lists).
        help: one line for ``--help`` and the docs.
        flag: the ``flatlab sharpness`` flag (default ``--`` + the name with ``-``).
        toml: the study-file key (default: the field name).
        choices: allowed values.
        minimum, maximum: bounds for numbers (``exclusive_minimum``: strictly above ``minimum``).
        shared: the field is shared by several measures of a family (one flag, one TOML key);
            the registry checks that every declaration agrees.
    """
    meta = {"help": help, "flag": flag, "toml": toml, "choices": tuple(choices) if choices else None,
            "minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum, "shared": shared}
    return field(default=default, metadata={"flatlab": meta})


@dataclass(frozen=True)
class SettingSpec:
    """A config field as the CLI and study files see it."""

    name: str
    kind: str  # int, float, str, bool, optional int/float/str, floats / strs (tuples of floats / strings)
    default: Any
    help: str
    flag: str
    toml: str
    choices: tuple[Any, ...] | None
    minimum: float | None
    maximum: float | None
    exclusive_minimum: bool
    shared: bool

    def parse_text(self, text: str) -> Any:
        """A value given as text (a CLI argument) -> the field's type; ConfigError otherwise."""
        base = self.kind.removeprefix("optional ")
        try:
            if base == "int":
                return int(text)
            if base == "float":
                return float(text)
            if base == "floats":
                values = tuple(float(part) for part in text.split(",") if part.strip())
                if not values:
                    raise ValueError
                return values
            if base == "strs":
                words = tuple(part.strip() for part in text.split(",") if part.strip())
                if not words:
                    raise ValueError
                return words
        except ValueError:
            example = ("comma-separated numbers, e.g. 0,0.05,0.1" if base == "floats"
                       else "comma-separated words, e.g. " + ",".join(map(str, self.choices or ("a", "b")))
                       if base == "strs" else f"a{'n integer' if base == 'int' else ' number'}")
            raise ConfigError(self.name, f"must be {example}, got {text!r}") from None
        return text

    def coerce(self, value: Any) -> Any:
        """A value from Python or TOML -> the field's type; ConfigError on a wrong type."""
        base = self.kind.removeprefix("optional ")
        if value is None:
            if self.kind.startswith("optional ") or self.default is None:
                return None
            raise ConfigError(self.name, "must be given (got None)")
        if base == "bool":
            if not isinstance(value, bool):
                raise ConfigError(self.name, f"must be true or false, got {value!r}")
            return value
        if base == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(self.name, f"must be an integer, got {value!r}")
            return int(value)
        if base == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(self.name, f"must be a number, got {value!r}")
            return float(value)
        if base == "floats":
            if isinstance(value, str):
                return self.parse_text(value)
            if not isinstance(value, (list, tuple)) or not value or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
                raise ConfigError(self.name, f"must be a non-empty list of numbers, got {value!r}")
            return tuple(float(v) for v in value)
        if base == "strs":
            if isinstance(value, str):
                return self.parse_text(value)
            if not isinstance(value, (list, tuple)) or not value or any(not isinstance(v, str) for v in value):
                raise ConfigError(self.name, f"must be a non-empty list of strings, got {value!r}")
            return tuple(value)
        if not isinstance(value, str):
            raise ConfigError(self.name, f"must be a string, got {value!r}")
        return value

    def check(self, value: Any) -> None:
        """Choices and bounds; ConfigError naming the parameter."""
        if value is None:
            return
        if self.choices is not None:
            # A value among the declared choices is valid as it is (bounds do not apply: e.g. a
            # norm p in {2, inf}); a tuple setting (strs) checks each element, once each.
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                if item not in self.choices:
                    shown = ", ".join(c if isinstance(c, str) else _show(c) for c in self.choices)
                    got = repr(item) if isinstance(item, str) else _show(item)
                    kind = "made of" if isinstance(value, tuple) else "one of"
                    raise ConfigError(self.name, f"must be {kind} {shown}, got {got}")
            if isinstance(value, tuple) and len(set(value)) != len(value):
                raise ConfigError(self.name, f"lists {', '.join(map(str, value))}: give each once")
            return
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(self.name, f"must be finite, got {value!r}")
            if self.minimum is not None:
                if self.exclusive_minimum and not v > self.minimum:
                    raise ConfigError(self.name, f"must be greater than {self.minimum:g}, got {value!r}")
                if not self.exclusive_minimum and v < self.minimum:
                    raise ConfigError(self.name, f"must be at least {self.minimum:g}, got {value!r}")
            if self.maximum is not None and v > self.maximum:
                raise ConfigError(self.name, f"must be at most {self.maximum:g}, got {value!r}")


def _show(value: Any) -> str:
    """A setting value as a user writes it (2 not 2.0, inf, quoted strings)."""
    if isinstance(value, float):
        return "inf" if math.isinf(value) and value > 0 else f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _kind(annotation: Any) -> str:
    """The setting kind of a field's type annotation."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return "optional " + _kind(inner[0]) if len(inner) == 1 else "str"
    if origin is tuple:
        return "strs" if typing.get_args(annotation)[:1] == (str,) else "floats"
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(annotation, "str")


@dataclass(frozen=True, kw_only=True)
class MeasureConfig:
    """Base of every measure's config: a frozen dataclass validated at construction.

    Subclasses declare fields with :func:`setting` and may override :meth:`validate` for checks
    that involve several fields (call ``super().validate()`` first).
    """

    #: The registered measure name this config belongs to (set by each subclass).
    measure: ClassVar[str] = ""

    def __post_init__(self) -> None:
        try:
            for spec in self.setting_specs():
                value = spec.coerce(getattr(self, spec.name))
                object.__setattr__(self, spec.name, value)
                spec.check(value)
            self.validate()
        except ConfigError as exc:
            if exc.measure is None:
                exc.measure = self.measure or None
            raise

    def validate(self) -> None:
        """Cross-field checks (field types, choices and bounds are checked before)."""

    @classmethod
    def setting_specs(cls) -> list[SettingSpec]:
        """Every field of the config as a :class:`SettingSpec`, in declaration order."""
        hints = typing.get_type_hints(cls)
        specs = []
        for f in dataclasses.fields(cls):
            meta = f.metadata.get("flatlab")
            if meta is None:
                continue
            specs.append(SettingSpec(
                name=f.name, kind=_kind(hints[f.name]), default=f.default, help=meta["help"],
                flag=meta["flag"] or "--" + f.name.replace("_", "-"), toml=meta["toml"] or f.name,
                choices=meta["choices"], minimum=meta["minimum"], maximum=meta["maximum"],
                exclusive_minimum=meta["exclusive_minimum"], shared=meta["shared"]))
        return specs

    def settings(self) -> dict[str, Any]:
        """The settings as plain JSON values (tuples as lists), for fingerprints and records."""
        out = {}
        for spec in self.setting_specs():
            value = getattr(self, spec.name)
            out[spec.name] = list(value) if isinstance(value, tuple) else value
        return out

    def fingerprint_settings(self) -> dict[str, Any]:
        """What the numbers depend on, for the resume fingerprint: the settings, with defaults
        that resolve to a value replaced by it (so ``rtol`` unset and ``rtol = 1e-3`` match)."""
        return self.settings()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MeasureConfig:
        """Build from field names -> values (unknown names are a ConfigError)."""
        known = {s.name for s in cls.setting_specs()}
        for key in values:
            if key not in known:
                raise ConfigError(key, f"is not a setting of {cls.measure} (known: {', '.join(sorted(known))})")
        return cls(**dict(values))


# --- results ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """A number with its estimation standard error (None where the estimator has none)."""

    value: float
    stderr: float | None = None

    def __str__(self) -> str:
        if self.stderr is None or not math.isfinite(self.stderr):
            return f"{self.value:.4g}"
        return f"{self.value:.4g} +- {self.stderr:.2g}"


@dataclass
class MeasureResult:
    """What one measure computed on one model.

    Attributes:
        measure: the registered measure name.
        config: the config it ran with.
        payload: the JSON view (``flatlab sharpness --json``): values, standard errors, every
            input needed to recompute the value by hand.
        arrays: the datasets of its results-file group (a nested mapping is a sub-group).
        attrs: the attributes of its results-file group.
        products: Hessian-vector (or other operator) products or forward passes it used.
        resumed: taken from a results file instead of computed.
    """

    measure: str
    config: MeasureConfig
    payload: dict[str, Any]
    arrays: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    products: int = 0
    resumed: bool = False


@dataclass(frozen=True)
class Cost:
    """A measure's work in passes over its data: ``forward`` forward passes and ``gradient``
    forward+backward passes over each split in ``splits`` (a sweep multiplies by sample counts
    and the model's measured seconds per sample), plus ``examples`` forward evaluations of
    single examples that do not scale with the split's size (e.g. noise draws evaluated on
    slices of a fixed number of examples).

    A split is ``source``, ``source-out`` or ``target`` (each capped at ``max_samples``), or
    ``domains``: every domain taken alone, each capped at ``max_samples`` (the source domains'
    in-splits and the target domain(s), as :meth:`MeasureContext.domain_batches` hands them out).
    """

    forward: float = 0.0
    gradient: float = 0.0
    splits: tuple[str, ...] = ("source",)
    examples: float = 0.0
    #: The measure's own sample cap per split (or per domain), where it has one; else the shared one.
    max_samples: int | None = None


# --- columns ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """A scalar column of the report and the figures.

    A column is either one name (``top_eigenvalue``) or a family of names matched by
    ``pattern`` (local flatness at each stored radius: ``local_flatness_target@0.1rel``); for a
    pattern, ``describe`` and ``axis_label`` receive the regex match.
    """

    name: str
    label: str
    unit: str
    description: str
    larger_is_sharper: bool = True
    pattern: re.Pattern[str] | None = None
    describe_match: Callable[[re.Match[str]], str] | None = None
    label_match: Callable[[re.Match[str]], str] | None = None
    #: For a pattern: the order of the matched names in tables (default: by name).
    order_match: Callable[[re.Match[str]], tuple[Any, ...]] | None = None

    def matches(self, name: str) -> re.Match[str] | None:
        if self.pattern is None:
            return re.fullmatch(re.escape(self.name), name)
        return self.pattern.fullmatch(name)

    def describe(self, name: str) -> str:
        m = self.matches(name)
        return self.describe_match(m) if (m and self.describe_match) else self.description

    def order(self, name: str) -> tuple[Any, ...]:
        """Where ``name`` goes among the names this column matches."""
        m = self.matches(name)
        return self.order_match(m) if (m and self.order_match) else (name,)

    def axis_label(self, name: str) -> str:
        m = self.matches(name)
        label = self.label_match(m) if (m and self.label_match) else self.label
        return f"{label} ({self.unit})" if self.unit and self.unit not in label else label


# --- the measure -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """Measures that share settings and one study-file section ``[measure.<name>]``.

    ``request`` says how a study file asks for a family's measures: ``keys`` (a measure's own
    key, e.g. ``trace = true`` or ``top_k = 5``), ``list`` (``measures = ["pacbayes", ...]``) or
    ``section`` (the section's presence). ``nest``: the JSON output nests each measure's payload
    under its name (else the payloads are merged, as curvature's are).
    """

    name: str
    title: str
    request: str
    nest: bool
    description: str = ""


@dataclass(frozen=True)
class Measure:
    """One registered measure (see the module docstring)."""

    name: str
    family: str
    summary: str
    config: type[MeasureConfig]
    compute: Callable[[Any, Any], MeasureResult]
    group: str
    columns: tuple[Column, ...]
    read: Callable[[Mapping[str, Any]], dict[str, Estimate]]
    cost: Callable[[Any], Cost]
    #: The ``flatlab sharpness`` flag that asks for the measure.
    request_flag: str
    #: For ``keys`` families: the study-file key that asks for it; a config field of the same
    #: name (e.g. ``top_k``) takes its value from that key and the flag.
    request_key: str | None = None
    #: Requested by ``flatlab sharpness --all``.
    in_all: bool = False
    #: A short line for tables: how to print the result (payload -> text rows).
    table: Callable[[dict[str, Any]], list[list[Any]]] | None = None
    #: The results group as a function of the config, where it depends on a setting (the
    #: curvature measures store the Hessian's, the GGN's and the empirical Fisher's apart).
    group_of: Callable[[Any], str] | None = None

    def group_for(self, config: Any) -> str:
        """The results group this config's result lives in."""
        return self.group_of(config) if self.group_of is not None else self.group
    #: ``check(context, config)``: input checks that need the model or the data (a layer name,
    #: a subset size), run by the pipeline for every requested measure before any is computed,
    #: so a bad input is refused before anything is written. Raises FlatlabError / ConfigError.
    check: Callable[[Any, Any], None] | None = None

    @property
    def value_field(self) -> str | None:
        """The config field the request flag carries a value for (``top_k``), if any."""
        if self.request_key and any(s.name == self.request_key for s in self.config.setting_specs()):
            return self.request_key
        return None


@dataclass(frozen=True)
class ColumnSource:
    """Report and figure columns of results that no one-checkpoint measure computes (e.g. the
    loss barrier between two checkpoints, stored under one of them by its own runner).

    The registry treats its columns like a measure's (report columns, descriptions, axis labels),
    but it has no config, no flag and no study-file section of a measure family.

    Attributes:
        name: an identifier (``barriers``).
        group: where its results live under ``/runs/<run_id>/``.
        columns: its :class:`Column` declarations.
        read: ``read(run_groups) -> {column: Estimate}``.
        summary: one line on what it is and which command writes it.
    """

    name: str
    group: str
    columns: tuple[Column, ...]
    read: Callable[[Mapping[str, Any]], dict[str, Estimate]]
    summary: str = ""


def group_node(run: Mapping[str, Any], path: str) -> Mapping[str, Any] | None:
    """The nested-dict node at ``path`` (``bounds/pacbayes``) of a run read by
    :func:`flatlab.results.read_results`, or None."""
    node: Any = run
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Mapping) else None


def scalar(value: Any) -> float:
    """A stored scalar (0-d array, number, 1-element array) as float; NaN otherwise."""
    import numpy as np

    if value is None:
        return math.nan
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return math.nan
    return float(arr.ravel()[0]) if arr.size == 1 else math.nan


def attr_estimates(node: Mapping[str, Any] | None, keys: Iterable[tuple[str, str, str | None]]) -> dict[str, Estimate]:
    """``{column: Estimate(attrs[value_key], attrs[stderr_key])}`` for the attributes present."""
    out: dict[str, Estimate] = {}
    if node is None:
        return out
    attrs = node.get("attrs", {})
    for column, key, stderr_key in keys:
        value = scalar(attrs.get(key))
        if math.isnan(value):
            continue
        se = scalar(attrs.get(stderr_key)) if stderr_key else math.nan
        out[column] = Estimate(value, None if math.isnan(se) else se)
    return out


__all__ = ["Column", "ColumnSource", "ConfigError", "Cost", "Estimate", "Family", "Measure", "MeasureConfig", "MeasureResult",
           "SettingSpec", "attr_estimates", "group_node", "scalar", "setting"]
