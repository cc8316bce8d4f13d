"""The scalar columns a measure's results offer the report and the figures, and how they are
read back from a results file.

A :class:`Column` has a label, a unit, a description and its orientation (larger = sharper,
always, by convention); an :class:`Estimate` is one column's value with its standard error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """A number with its estimation standard error (None where the estimator has none)."""

    value: float
    stderr: float | None = None

    def __str__(self) -> str:
        if self.stderr is None or not math.isfinite(self.stderr):
            return f"{self.value:.4g}"
        return f"{self.value:.4g} +- {self.stderr:.2g}"


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


__all__ = ["Column", "ColumnSource", "Estimate", "attr_estimates", "group_node", "scalar"]
