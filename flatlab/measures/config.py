"""A measure's settings: a frozen, self-validating config dataclass.

Each field of a :class:`MeasureConfig` subclass is made with :func:`setting`, which records its
one-line help, its command-line flag and its study-file (TOML) key, its choices and bounds. The
dataclass validates itself at construction (``__post_init__`` -> :meth:`MeasureConfig.validate`)
and raises :class:`ConfigError`, which names the parameter in the caller's words (``top_k must
be at least 1, got 0``); the CLI rewrites the name into its flag, a study file into its key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
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


__all__ = ["ConfigError", "MeasureConfig", "SettingSpec", "setting"]
