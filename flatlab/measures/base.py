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

The pieces live in three modules: :mod:`flatlab.measures.config` (settings and their
validation), :mod:`flatlab.measures.columns` (columns, estimates and how they are read back from
a results file) and this one (the result, the cost and the declaration itself).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flatlab.measures.columns import Column, Estimate
from flatlab.measures.config import MeasureConfig

# --- results ---------------------------------------------------------------------------------

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


__all__ = ["Cost", "Family", "Measure", "MeasureResult"]
