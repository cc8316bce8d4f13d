r"""Claims files: a paper's checkable statements about a study, and one verdict per claim.

A claims file (TOML, format in ``docs/claims.md``) states what a paper says in terms of a
study's results: "4-bit QAT is flatter than ERM by local flatness on the target domain" is a
*comparison* of the column ``local_flatness_target@...`` between variants ``qat4`` and
``erm`` with the expected direction ``less``. :func:`evaluate_claims` turns every claim into
one or more tests on the runs of a :class:`~flatlab.report.Collection` and decides each with
:func:`flatlab.stats.decide`: **supported**, **contradicted** or **inconclusive**, or **not
testable** when the results lack what the claim needs ("needs variant qat8"), never silently
dropped.

Kinds of claim and their effect E (A - B throughout; :mod:`flatlab.report` matches the runs):

* ``comparison``: a column of variant ``a`` vs variant ``b``; E = mean(A - B) over pairs matched
  on (seed, test domain), on test domain only for an ensemble, else the difference of
  stratum-weighted means (:func:`flatlab.report.compare_variants`).
* ``value``: a column of variant ``a`` vs a constant ``value``; E = mean(A) - value, the
  sign-flip test of the differences (a one-sample test), stratified bootstrap CI.
* ``accuracy``: an accuracy (``ood_acc`` by default, or ``id_acc``) of ``a`` vs variant ``b``,
  or vs ``against`` = ``best_member`` / ``mean_member`` (each ensemble of ``a`` against the best
  / mean of its own members' accuracies on the same test domain: d_e = acc(ensemble e) -
  max_j acc(member j of e); the best member is picked by the very accuracy compared, an oracle
  choice that favours the members) or ``fp_ensemble`` (an ensemble of full-precision models,
  algorithm ``ensemble``, with as many members, paired on test domain).
* ``correlation``: ``measure`` against ``target`` (``ood_acc`` by default) over the runs (single
  models; ``variants`` restricts them): Kendall's tau-b, Spearman's rho (scipy p-value, bootstrap
  CI resampling runs within test domains) or Jiang et al.'s granulated tau (axes algorithm, bits,
  seed; CI only). E = the statistic; ``expect = "less"`` claims a negative correlation.
* ``correlation_difference``: does ``measure`` track ``target`` better than ``versus``? With
  t_M the rank correlation (Kendall or Spearman) of column M with the target over the runs
  that hold both columns, and f(t) = |t| (``sign = "absolute"``, default), -t (``negative``) or
  t (``positive``): E = f(t_measure) - f(t_versus). Its CI is a percentile bootstrap that
  resamples runs within test domains and recomputes both correlations on the same resample;
  there is no p-value (CI-only rule).

Decision rules (docs/statistics.md section 6), at level alpha (``[claims] alpha``, or
``--alpha``): direction claims (``greater``, ``less``) need the Holm-adjusted p < alpha and the
1 - alpha CI excluding 0 on the claimed side; margin claims (``at_least``, ``at_most``,
``equivalent`` with ``margin`` Delta > 0) are decided on the 1 - 2 alpha CI (TOST): at_least is
supported when L > -Delta, at_most when U < Delta, equivalent when -Delta < L and U < Delta.
CI-only tests (granulated tau, correlation differences) have no p-value: a direction claim is
supported when the 1 - alpha CI excludes 0 on the claimed side. Holm-Bonferroni runs over the
direction tests of one claims file that have a p-value (margin and CI-only tests are not part of
that family). Fewer than 5 seeds (runs) in a test domain make a bootstrap interval unreliable:
such a test is inconclusive whatever its numbers, with the seeds that would settle it.

Variants are labels as :func:`flatlab.report.variant_of` gives them; a claim may name a glob
pattern (``qat*`` expands to one test per matching variant), ``{bits}`` (``noise{bits}`` vs
``qat{bits}``: one test per bit width both variants have), or ``reference`` (the report's
reference variant: ``--reference``, else ``[claims] reference``, else ``erm`` / ``fp``).
Measures are report columns; ``local_flatness_<split>@max`` is the largest radius every measured
run holds, and glob patterns expand over the columns present.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from flatlab.errors import FlatlabError
from flatlab.io import read_toml
from flatlab.report import (
    ACCURACY_COLUMNS,
    DIAGNOSTIC_COLUMNS,
    Collection,
    Comparison,
    NotTestable,
    Uncertainty,
    build_rows,
    compare_variants,
    default_local_flatness_measures,
    default_reference,
    interval_text,
    p_text,
    run_measures,
    static_columns,
    variants_of,
)

#: Kinds of claim.
CLAIM_KINDS = ("comparison", "value", "accuracy", "correlation", "correlation_difference")
#: Expected outcomes: two directions and three margin claims.
EXPECTATIONS = ("greater", "less", "at_least", "at_most", "equivalent")
DIRECTIONS = ("greater", "less")
MARGINS = ("at_least", "at_most", "equivalent")
#: ``against`` values of an accuracy claim.
AGAINST = ("best_member", "mean_member", "fp_ensemble")
#: Correlation statistics.
STATISTICS = ("granulated", "kendall", "spearman")
#: ``sign`` of a correlation difference.
SIGNS = ("absolute", "negative", "positive")
#: The four verdicts.
VERDICTS = ("supported", "contradicted", "inconclusive", "not testable")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LABEL = re.compile(r"^[A-Za-z0-9_*?\[\]{}!-]+$")
_GLOB = re.compile(r"[*?\[]")

#: Keys of the ``[claims]`` table and their types.
FILE_KEYS: dict[str, str] = {"source": "text", "description": "text", "alpha": "number", "min_effect": "effects",
                             "reference": "label", "variants": "labels", "extra_columns": "labels"}

#: Keys of every claim, then of each kind: key -> type; a key in REQUIRED must be given.
COMMON_KEYS: dict[str, str] = {"id": "text", "text": "text", "kind": "text", "expect": "text", "margin": "number",
                               "min_effect": "number", "source": "text", "note": "text"}
KIND_KEYS: dict[str, dict[str, str]] = {
    "comparison": {"measure": "label", "a": "label", "b": "label"},
    "value": {"measure": "label", "a": "label", "value": "number"},
    "accuracy": {"a": "label", "b": "label", "against": "text", "measure": "label"},
    "correlation": {"measure": "label", "target": "label", "statistic": "text", "variants": "labels"},
    "correlation_difference": {"measure": "label", "versus": "label", "target": "label", "statistic": "text",
                               "sign": "text", "variants": "labels"},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "comparison": ("measure", "a", "b"),
    "value": ("measure", "a"),
    "accuracy": ("a",),
    "correlation": ("measure",),
    "correlation_difference": ("measure", "versus"),
}


# --- the file ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """One ``[[claim]]`` of a claims file (validated; defaults filled in).

    Attributes are the file's keys (docs/claims.md): ``id``, ``text``, ``kind``, ``expect``,
    ``measure`` (a column, pattern or ``...@max``), ``a``, ``b`` (variant labels or patterns),
    ``against``, ``value``, ``target``, ``statistic``, ``versus``, ``sign``, ``variants``,
    ``margin``, ``min_effect``, ``source`` (where in the paper) and ``note``.
    """

    id: str
    text: str
    kind: str
    expect: str
    measure: str | None = None
    a: str | None = None
    b: str | None = None
    against: str | None = None
    value: float = 0.0
    target: str = "ood_acc"
    statistic: str = "granulated"
    versus: str | None = None
    sign: str = "absolute"
    variants: tuple[str, ...] = ()
    margin: float | None = None
    min_effect: float | None = None
    source: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class ClaimsFile:
    """A parsed claims file: the ``[claims]`` settings and the claims in file order."""

    path: str
    claims: tuple[Claim, ...]
    source: str | None = None
    description: str | None = None
    alpha: float | None = None
    min_effect: float | dict[str, float] | None = None
    reference: str | None = None
    variants: tuple[str, ...] = ()
    extra_columns: tuple[str, ...] = ()

    def labels(self) -> set[str]:
        """Every exact variant label the claims name (patterns, ``{bits}`` and ``reference`` excluded)."""
        out = set()
        for c in self.claims:
            for label in (c.a, c.b, *c.variants):
                if label and label != "reference" and not _GLOB.search(label) and "{bits}" not in label:
                    out.add(label)
        return out


def _algorithm_names() -> list[str]:
    from flatlab.train import ALGORITHMS

    return sorted(ALGORITHMS)


def possible_labels(declared: Iterable[str] = ()) -> list[str]:
    """Labels a study can give a variant by default: every registered algorithm, alone and with
    2..8 bits (``qat4``), ``fp`` (a study's usual label for full-precision ERM), ``eoq`` and
    ``ensemble`` (ensembles), plus ``declared`` (a claims file's ``[claims] variants``)."""
    names = _algorithm_names()
    return [*names, *(f"{n}{b}" for n in names for b in range(2, 9)), "fp", "eoq", "ensemble", *declared]


def known_columns(extra: Iterable[str] = ()) -> list[str]:
    """Column names a claim may use: accuracies, gaps, diagnostics, every registered measure's
    columns and ``extra``; local flatness as ``local_flatness_<source|target>@<radius>[rel]``."""
    return [*ACCURACY_COLUMNS, *DIAGNOSTIC_COLUMNS, *static_columns(), *extra]


_LF_EXAMPLES = ("local_flatness_source@0.1rel", "local_flatness_target@0.1rel", "local_flatness_source@1",
                "local_flatness_target@1")


class _Problem(Exception):
    """A claims-file problem before the file and claim are named."""


def _type_of(value: Any, kind: str, key: str) -> Any:
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise _Problem(f"{key} must be a number, got {value!r}: write e.g. {key} = 0.01")
        return float(value)
    if kind in ("text", "label"):
        if not isinstance(value, str) or not value.strip():
            raise _Problem(f"{key} must be a non-empty string, got {value!r}: write e.g. {key} = \"...\"")
        value = value.strip()
        if kind == "label" and not _LABEL.match(value.replace("@", "").replace(".", "")):
            raise _Problem(f"{key} {value!r} has characters a label or column cannot have")
        return value
    if kind == "labels":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) and v.strip() for v in items):
            raise _Problem(f"{key} must be a string or a list of strings, got {value!r}: write e.g. "
                           f"{key} = [\"qat4\", \"qat8\"]")
        return tuple(v.strip() for v in items)
    if kind == "effects":
        if isinstance(value, dict):
            return {str(k): _type_of(v, "number", f"{key}.{k}") for k, v in value.items()}
        return _type_of(value, "number", key)
    raise AssertionError(kind)


def _check_variant(label: str, key: str, possible: Sequence[str]) -> None:
    if label == "reference":
        return
    if "{bits}" in label:
        probe = label.replace("{bits}", "4")
        if not (probe in possible or any(fnmatch.fnmatchcase(p, probe) for p in possible)):
            raise _Problem(f"{key} {label!r} names no possible variant ({probe!r} is none): use "
                           "<algorithm>{bits}, e.g. noise{bits}")
        return
    if _GLOB.search(label):
        if not any(fnmatch.fnmatchcase(p, label) for p in possible):
            raise _Problem(f"{key} pattern {label!r} matches no possible variant label: variants are "
                           "<algorithm>[<bits>] (erm, sam, qat4, ...), fp, eoq or ensemble; declare a study's own "
                           "labels in [claims] variants")
        return
    if label not in possible:
        import difflib

        near = difflib.get_close_matches(label, possible, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise _Problem(f"unknown variant {label!r} in {key}{hint}: variants are <algorithm>[<bits 2-8>] (erm, sam, "
                       "qat4, ...), fp, eoq, ensemble or 'reference'; declare a study's own labels in "
                       "[claims] variants")


def _check_column(name: str, key: str, extra: Sequence[str]) -> None:
    from flatlab.measures.registry import find_column

    known = known_columns(extra)
    if name in known or find_column(name) is not None:
        return
    m = re.fullmatch(r"local_flatness_(source|target)@max", name)
    if m:
        return
    if _GLOB.search(name) and any(fnmatch.fnmatchcase(c, name) for c in [*known, *_LF_EXAMPLES]):
        return
    import difflib

    near = difflib.get_close_matches(name, [*known, "local_flatness_source@max", "local_flatness_target@max"], n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise _Problem(f"unknown measure {name!r} in {key}{hint}: use a report column ({', '.join(known)}), "
                   "local_flatness_<source|target>@<radius>[rel] or @max, a glob pattern over them, or list it in "
                   "[claims] extra_columns if a newer flatlab declares it")


def _parse_claim(raw: Any, index: int, possible: Sequence[str], extra: Sequence[str]) -> Claim:
    name = f"#{index + 1}"
    if not isinstance(raw, dict):
        raise _Problem(f"claim {name} is not a table: write each claim as [[claim]] with key = value lines")
    if "id" in raw and isinstance(raw["id"], str) and raw["id"].strip():
        name = raw["id"].strip()
    try:
        kind = raw.get("kind")
        if kind not in CLAIM_KINDS:
            raise _Problem(f"kind must be one of {', '.join(CLAIM_KINDS)}, got {kind!r}")
        allowed = {**COMMON_KEYS, **KIND_KEYS[kind]}
        for key in raw:
            if key not in allowed:
                raise _Problem(f"unknown key {key!r} for a {kind} claim: its keys are {', '.join(allowed)}")
        for key in ("id", "text", "expect", *REQUIRED[kind]):
            if key not in raw:
                raise _Problem(f"a {kind} claim needs {key}")
        values = {k: _type_of(v, allowed[k], k) for k, v in raw.items()}
        if not _ID.match(values["id"]):
            raise _Problem(f"id {values['id']!r} must be letters, digits, '.', '_' and '-' (starting with a letter "
                           "or digit)")
        expect = values["expect"]
        if expect not in EXPECTATIONS:
            raise _Problem(f"expect must be one of {', '.join(EXPECTATIONS)}, got {expect!r}")
        if expect in MARGINS and (values.get("margin") is None or values["margin"] <= 0):
            raise _Problem(f"an {expect!r} claim needs margin > 0 (the largest difference that does not matter), "
                           "e.g. margin = 0.01")
        if expect in DIRECTIONS and "margin" in values:
            raise _Problem(f"margin applies to at_least, at_most and equivalent claims, not {expect!r}: remove it")
        if expect in MARGINS and "min_effect" in values:
            raise _Problem("min_effect sizes direction claims; a margin claim is sized at its observed effect: "
                           "remove min_effect")
        if values.get("min_effect") is not None and values["min_effect"] <= 0:
            raise _Problem(f"min_effect must be > 0, got {values['min_effect']:g}")
        for key in ("a", "b"):
            if key in values:
                _check_variant(values[key], key, possible)
        for label in values.get("variants", ()):
            _check_variant(label, "variants", possible)
        for key in ("measure", "versus", "target"):
            if key in values:
                _check_column(values[key], key, extra)
        if kind == "accuracy":
            if ("b" in values) == ("against" in values):
                raise _Problem("an accuracy claim needs exactly one of b (a variant) and against "
                               f"({', '.join(AGAINST)})")
            if "against" in values and values["against"] not in AGAINST:
                raise _Problem(f"against must be one of {', '.join(AGAINST)}, got {values['against']!r}")
            values.setdefault("measure", "ood_acc")
            if values["measure"] not in ("ood_acc", "id_acc"):
                raise _Problem(f"an accuracy claim compares ood_acc or id_acc, got measure {values['measure']!r}: "
                               "use a comparison claim for other columns")
        if "statistic" in values:
            allowed_stats = STATISTICS if kind == "correlation" else ("kendall", "spearman")
            if values["statistic"] not in allowed_stats:
                raise _Problem(f"statistic must be one of {', '.join(allowed_stats)} for a {kind} claim, got "
                               f"{values['statistic']!r}")
        if kind == "correlation_difference":
            values.setdefault("statistic", "kendall")
            if values.get("sign", "absolute") not in SIGNS:
                raise _Problem(f"sign must be one of {', '.join(SIGNS)}, got {values['sign']!r}")
            if values["measure"] == values["versus"]:
                raise _Problem("measure and versus are the same column: a correlation difference needs two")
        if kind in ("comparison", "accuracy") and values.get("a") == values.get("b"):
            raise _Problem(f"a and b are the same variant {values['a']!r}")
        return Claim(**values)
    except _Problem as problem:
        raise _Problem(f"claim {name!r}: {problem}") from None


def load_claims(path: str | os.PathLike[str], known_variants: Iterable[str] = ()) -> ClaimsFile:
    """Read and validate a claims file (format: docs/claims.md).

    Args:
        path: the TOML file.
        known_variants: more labels to accept as variants (e.g. those of the results at hand),
            besides :func:`possible_labels` and the file's ``[claims] variants``.

    Raises:
        FlatlabError: one line naming the file, the claim (id or position) and the fix: a missing
            or unreadable file, invalid TOML, an unknown key, kind, expectation, variant or
            measure, a wrong type, a missing required key, a repeated id.
    """
    p = Path(path)
    raw = read_toml(p, "claims file")
    try:
        for key in raw:
            if key not in ("claims", "claim"):
                raise _Problem(f"unknown key {key!r} at the top level: a claims file holds a [claims] table and "
                               "[[claim]] entries")
        head = raw.get("claims", {})
        if not isinstance(head, dict):
            raise _Problem("[claims] must be a table")
        for key in head:
            if key not in FILE_KEYS:
                raise _Problem(f"unknown key {key!r} in [claims]: its keys are {', '.join(FILE_KEYS)}")
        settings = {k: _type_of(v, FILE_KEYS[k], f"[claims] {k}") for k, v in head.items()}
        if "alpha" in settings and not 0 < settings["alpha"] < 0.5:
            raise _Problem(f"[claims] alpha must be in (0, 0.5), got {settings['alpha']:g}")
        effects = settings.get("min_effect")
        for value in (effects.values() if isinstance(effects, dict) else [effects] if effects is not None else []):
            if value <= 0:
                raise _Problem(f"[claims] min_effect must be > 0, got {value:g}")
        declared = tuple(settings.get("variants", ()))
        extra = tuple(settings.get("extra_columns", ()))
        possible = [*possible_labels(declared), *known_variants]
        if "reference" in settings:
            _check_variant(settings["reference"], "[claims] reference", possible)
        if isinstance(effects, dict):
            for column in effects:
                _check_column(column, "[claims] min_effect", extra)
        entries = raw.get("claim", [])
        if not isinstance(entries, list) or not entries:
            raise _Problem("no [[claim]] entries: add at least one (docs/claims.md)")
        claims = [_parse_claim(entry, i, possible, extra) for i, entry in enumerate(entries)]
        seen: set[str] = set()
        for c in claims:
            if c.id in seen:
                raise _Problem(f"claim {c.id!r}: the id is used twice: give every claim its own id")
            seen.add(c.id)
    except _Problem as problem:
        raise FlatlabError(f"{p}: {problem}") from None
    return ClaimsFile(path=str(p), claims=tuple(claims), source=settings.get("source"),
                      description=settings.get("description"), alpha=settings.get("alpha"), min_effect=effects,
                      reference=settings.get("reference"), variants=declared, extra_columns=extra)


# --- tests: one claim on the data ----------------------------------------------------------------

@dataclass
class _Test:
    """One test of a claim (a claim with patterns expands to several)."""

    claim: Claim
    id: str
    a: str | None = None
    b: str | None = None
    measure: str | None = None
    not_testable: str | None = None
    evidence: Any = None
    comparison: Comparison | None = None
    effect_name: str = "mean difference"
    ci_only: bool = False
    n: int | None = None
    n_a: int | None = None
    n_b: int | None = None
    pairing: str | None = None
    unit: str = ""
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Context:
    collection: Collection
    rows: list[dict[str, Any]]
    variants: list[str]
    present: list[str]  # measure columns some run holds, report order
    reference: str | None
    uncertainty: Uncertainty
    extra_columns: tuple[str, ...]


def _match_variants(pattern: str, ctx: _Context) -> list[str] | str:
    """The present variants a label names, or the not-testable reason."""
    if pattern == "reference":
        if ctx.reference is None:
            return "needs a reference variant (no erm or fp variant: give --reference or [claims] reference)"
        if ctx.reference not in ctx.variants:
            return f"needs variant {ctx.reference}"
        return [ctx.reference]
    if _GLOB.search(pattern):
        found = [v for v in ctx.variants if fnmatch.fnmatchcase(v, pattern)]
        return found or f"needs a variant matching {pattern}"
    return [pattern] if pattern in ctx.variants else f"needs variant {pattern}"


def _bits_pairs(a: str, b: str, ctx: _Context) -> list[tuple[str, str]] | str:
    """``{bits}`` in both labels: every bit width both variants have."""
    def regex(label: str) -> re.Pattern[str]:
        return re.compile("^" + re.escape(label).replace(re.escape("{bits}"), r"(\d+)") + "$")

    ra, rb = regex(a), regex(b) if "{bits}" in b else None
    pairs = []
    for v in ctx.variants:
        m = ra.match(v)
        if not m:
            continue
        other = b.replace("{bits}", m.group(1)) if rb else _single(b, ctx)
        if isinstance(other, str) and other in ctx.variants and other != v:
            pairs.append((v, other))
    if pairs:
        return pairs
    return f"needs variants {a} and {b} with the same bit width"


def _single(label: str, ctx: _Context) -> str | None:
    found = _match_variants(label, ctx)
    return found[0] if isinstance(found, list) and len(found) == 1 else None


def _resolve_columns(name: str, ctx: _Context) -> list[str] | str:
    """The columns a claim's measure names, or the not-testable reason."""
    from flatlab.measures.registry import find_column

    fixed = [*ACCURACY_COLUMNS, *DIAGNOSTIC_COLUMNS]
    m = re.fullmatch(r"local_flatness_(source|target)@max", name)
    if m:
        chosen = [c for c in default_local_flatness_measures(list(ctx.collection.runs.values()))
                  if c.startswith(f"local_flatness_{m.group(1)}@")]
        return chosen or f"needs local flatness on {m.group(1)} (no run holds it)"
    if _GLOB.search(name):
        pool = [*fixed, *ctx.present]
        found = [c for c in pool if fnmatch.fnmatchcase(c, name) and not re.search(r"@0(\.0*)?(rel)?$", c)]
        return found or f"needs a column matching {name}"
    if name in DIAGNOSTIC_COLUMNS:
        return [name] if any(math.isfinite(r.get(name, math.nan)) for r in ctx.rows) else \
            f"needs {name} (no run logged it)"
    if name in ACCURACY_COLUMNS or name in ctx.present:
        return [name]
    if find_column(name) is None:
        return f"needs column {name} (no measure of this flatlab version declares it)"
    return f"needs column {name} (no run holds it)"


def _expand(claim: Claim, ctx: _Context) -> list[_Test]:
    """The tests of one claim: patterns over variants and columns expanded."""
    def test(suffix: str = "", **kw: Any) -> _Test:
        return _Test(claim=claim, id=claim.id + (f"[{suffix}]" if suffix else ""), **kw)

    measures: list[str] | str = ["ood_acc"] if claim.measure is None else _resolve_columns(claim.measure, ctx)
    if isinstance(measures, str):
        return [test(measure=claim.measure, not_testable=measures, a=claim.a, b=claim.b)]
    out: list[_Test] = []
    many_measures = len(measures) > 1
    for measure in measures:
        tag = measure if many_measures else ""
        if claim.kind in ("correlation", "correlation_difference"):
            if claim.kind == "correlation_difference":
                versus = _resolve_columns(claim.versus or "", ctx)
                if isinstance(versus, str):
                    out.append(test(tag, measure=measure, not_testable=versus))
                    continue
                out += [test("/".join(t for t in (tag, v if len(versus) > 1 else "") if t), measure=measure,
                             b=v) for v in versus]
            else:
                out.append(test(tag, measure=measure))
            continue
        a = claim.a or ""
        if claim.kind == "accuracy" and claim.against:
            found = _match_variants(a, ctx)
            if isinstance(found, str):
                out.append(test(tag, measure=measure, a=a, b=claim.against, not_testable=found))
                continue
            out += [test("/".join(t for t in (v if len(found) > 1 else "", tag) if t), measure=measure, a=v,
                         b=claim.against) for v in found]
            continue
        if claim.kind == "value":
            found = _match_variants(a, ctx)
            if isinstance(found, str):
                out.append(test(tag, measure=measure, a=a, not_testable=found))
                continue
            out += [test("/".join(t for t in (v if len(found) > 1 else "", tag) if t), measure=measure, a=v,
                         b=f"{claim.value:g}") for v in found]
            continue
        b = claim.b or ""
        if "{bits}" in a:
            pairs = _bits_pairs(a, b, ctx)
            if isinstance(pairs, str):
                out.append(test(tag, measure=measure, a=a, b=b, not_testable=pairs))
                continue
        else:
            fa, fb = _match_variants(a, ctx), _match_variants(b, ctx)
            if isinstance(fa, str) or isinstance(fb, str):
                out.append(test(tag, measure=measure, a=a, b=b,
                                not_testable=fa if isinstance(fa, str) else fb))  # type: ignore[arg-type]
                continue
            pairs = [(x, y) for x in fa for y in fb if x != y]
            if not pairs:
                out.append(test(tag, measure=measure, a=a, b=b, not_testable=f"needs a variant other than {fb[0]}"))
                continue
        many = len(pairs) > 1
        one_b = len({y for _, y in pairs}) == 1
        for x, y in pairs:
            suffix = "/".join(t for t in (((x if one_b else f"{x}-{y}") if many else ""), tag) if t)
            out.append(test(suffix, measure=measure, a=x, b=y))
    return out


def _runs_for_correlation(claim: Claim, ctx: _Context) -> list[dict[str, Any]] | str:
    runs = [r for r in ctx.rows if not r.get("ensemble")]
    if claim.variants:
        chosen: list[str] = []
        for label in claim.variants:
            found = _match_variants(label, ctx)
            if isinstance(found, list):
                chosen += found
        if not chosen:
            return f"needs variant(s) {', '.join(claim.variants)}"
        runs = [r for r in runs if r["variant"] in chosen]
    return runs


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _run_test(t: _Test, ctx: _Context, alpha: float) -> None:
    """Compute the test's evidence at the confidence its claim needs (sets not_testable instead)."""
    from flatlab.stats import (
        confidence_for,
        correlation_with_ci,
        granulated_tau_with_ci,
        paired_comparison,
    )

    claim, u = t.claim, ctx.uncertainty
    confidence = confidence_for(claim.expect, alpha)  # type: ignore[arg-type]
    options = {"confidence": confidence, "method": u.method, "n_resamples": u.resamples, "seed": u.seed}
    measure = t.measure or "ood_acc"
    try:
        if claim.kind in ("comparison",) or (claim.kind == "accuracy" and not claim.against):
            t.comparison = compare_variants(ctx.rows, t.a or "", t.b or "", measure, uncertainty=u,
                                            confidence=confidence)
        elif claim.kind == "accuracy" and claim.against == "fp_ensemble":
            t.comparison = _against_fp_ensemble(t, ctx, measure, confidence)
        elif claim.kind == "accuracy":
            t.comparison = _against_members(t, ctx, measure, options)
        elif claim.kind == "value":
            runs = [r for r in ctx.rows if r["variant"] == t.a and _finite(r.get(measure))]
            if not runs:
                raise NotTestable(f"no run of variant {t.a} holds {measure}")
            values = [float(r[measure]) for r in runs]
            ev = paired_comparison(values, [claim.value] * len(values), [_domain(r) for r in runs], **options)
            t.comparison = Comparison(t.a or "", f"{claim.value:g}", measure, "value", ev,
                                      f"{t.a} against the constant {claim.value:g} (one-sample sign-flip test)")
        elif claim.kind == "correlation":
            runs = _runs_for_correlation(claim, ctx)
            if isinstance(runs, str):
                raise NotTestable(runs)
            usable = [r for r in runs if _finite(r.get(measure)) and _finite(r.get(claim.target))]
            if len(usable) < 2:
                raise NotTestable(f"needs runs holding both {measure} and {claim.target} ({len(usable)} do)")
            x = [float(r[measure]) for r in usable]
            y = [float(r[claim.target]) for r in usable]
            strata = [_domain(r) for r in usable]
            if claim.statistic == "granulated":
                from flatlab.report import _axis_value

                axes = {a: [_axis_value(r, a) for r in usable] for a in ("algorithm", "bits", "seed")}
                t.evidence = granulated_tau_with_ci(x, y, axes, strata, confidence=confidence,
                                                    n_resamples=u.correlation_resamples, seed=u.seed)
                t.ci_only, t.effect_name = True, "granulated tau"
            else:
                t.evidence = correlation_with_ci(x, y, method=claim.statistic, strata=strata,  # type: ignore[arg-type]
                                                 confidence=confidence, n_resamples=u.correlation_resamples,
                                                 seed=u.seed)
                t.effect_name = "Kendall tau" if claim.statistic == "kendall" else "Spearman rho"
            t.n, t.unit = len(usable), "runs"
            t.note = t.evidence.note
        else:
            _correlation_difference(t, ctx, measure, confidence)
    except NotTestable as why:
        t.not_testable = str(why)
        return
    if t.comparison is not None:
        c = t.comparison
        t.evidence, t.pairing, t.unit = c.evidence, c.pairing, c.unit
        t.n = c.n
        t.n_a, t.n_b = getattr(c.evidence, "n_a", None), getattr(c.evidence, "n_b", None)
        t.note = "; ".join(n for n in (c.note, c.evidence.note) if n) or None


def _domain(row: dict[str, Any]) -> str:
    return "-" if row.get("test_domain") is None else str(row["test_domain"])


def _against_members(t: _Test, ctx: _Context, measure: str, options: dict[str, Any]) -> Comparison:
    from flatlab.stats import paired_comparison

    runs = [r for r in ctx.rows if r["variant"] == t.a]
    if not all(r.get("ensemble") for r in runs):
        raise NotTestable(f"variant {t.a} is not an ensemble")
    key = f"member_{measure}"
    usable = [r for r in runs if _finite(r.get(measure)) and r.get(key)
              and any(_finite(v) for v in r[key])]
    if not usable:
        raise NotTestable(f"needs the members' {measure} of {t.a} (the ensemble group of a results file)")
    combine = max if t.claim.against == "best_member" else (lambda v: float(np.mean(v)))
    members = [combine([float(v) for v in r[key] if _finite(v)]) for r in usable]
    ev = paired_comparison([float(r[measure]) for r in usable], members, None, **options)
    what = "the best of its members (by this accuracy: an oracle choice)" if t.claim.against == "best_member" \
        else "the mean of its members"
    return Comparison(t.a or "", t.claim.against or "", measure, "members", ev,
                      f"each {t.a} ensemble against {what}; {len(usable)} ensemble(s)")


def _against_fp_ensemble(t: _Test, ctx: _Context, measure: str, confidence: float) -> Comparison:
    runs = [r for r in ctx.rows if r["variant"] == t.a]
    if not runs or not all(r.get("ensemble") for r in runs):
        raise NotTestable(f"variant {t.a} is not an ensemble")
    size = runs[0].get("members")
    candidates = [v for v in ctx.variants if v != t.a and
                  all(r.get("ensemble") and str(r.get("algorithm")) == "ensemble" and r.get("members") == size
                      for r in ctx.rows if r["variant"] == v)]
    if not candidates:
        raise NotTestable(f"needs an ensemble of {size} full-precision models (algorithm 'ensemble'), as "
                          f"{t.a} has {size} members")
    t.b = candidates[0]
    c = compare_variants(ctx.rows, t.a or "", t.b, measure, uncertainty=ctx.uncertainty, confidence=confidence)
    note = f"FP ensemble {t.b} ({size} members)" + (f"; also present: {', '.join(candidates[1:])}"
                                                      if len(candidates) > 1 else "")
    return replace(c, note="; ".join(n for n in (note, c.note) if n))


@dataclass(frozen=True)
class CorrelationDifference:
    """E = f(t_measure) - f(t_versus) over the same runs, with a percentile bootstrap CI.

    Attributes:
        estimate: E; tau_measure, tau_versus: the two correlations with the target.
        ci_low, ci_high, confidence: the interval; n: runs; n_strata: test domains.
        method: "kendall" or "spearman"; sign: "absolute", "negative" or "positive" (f).
        small_sample: a test domain has fewer than 5 runs; note: what to know.
    """

    estimate: float
    tau_measure: float
    tau_versus: float
    ci_low: float
    ci_high: float
    confidence: float
    n: int
    n_strata: int
    method: str
    sign: str
    small_sample: bool
    note: str | None


def correlation_difference(x: Sequence[float], z: Sequence[float], y: Sequence[float],
                           strata: Sequence[str] | None = None, *, method: str = "kendall", sign: str = "absolute",
                           confidence: float = 0.95, n_resamples: int = 4999, seed: int = 0) -> CorrelationDifference:
    r"""How much better column x tracks y than column z does, with a bootstrap CI.

    With t_x = tau_b(x, y) (or Spearman's rho) and f(t) = |t| (``sign = "absolute"``), -t
    (``"negative"``) or t (``"positive"``): E = f(t_x) - f(t_z). Both correlations use the same
    runs (those where x, z and y are finite). CI: B resamples of runs drawn with replacement
    within each test domain; on each, both correlations are recomputed on that same resample
    (Kendall: tau_b* = w'(S^x o S^y)w / sqrt((w'|S^x|w)(w'|S^y|w)) from the resample counts w,
    as :func:`flatlab.stats.correlation_with_ci`; Spearman: the rank correlation of the
    resampled values), E* = f(t_x*) - f(t_z*), and the percentile interval is taken over the
    resamples where both are defined (none when more than half are undefined). n < 5: no
    interval ("n too small").

    Raises:
        ValueError: inputs of different lengths, an unknown method or sign.
    """
    from scipy import stats as sps

    from flatlab.stats._common import (
        MIN_RELIABLE_N,
        Strata,
        bootstrap_indices,
        resample_counts,
        small_sample_note,
    )
    from flatlab.stats.bootstrap import percentile_interval
    from flatlab.stats.correlation import rowwise_spearman, weighted_tau_b

    if method not in ("kendall", "spearman"):
        raise ValueError(f"method must be 'kendall' or 'spearman', got {method!r}")
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {', '.join(SIGNS)}, got {sign!r}")
    xv, zv, yv = (np.asarray(v, dtype=np.float64) for v in (x, z, y))
    if not len(xv) == len(zv) == len(yv):
        raise ValueError(f"x, z and y must have the same length, got {len(xv)}, {len(zv)} and {len(yv)}")
    keep = np.isfinite(xv) & np.isfinite(zv) & np.isfinite(yv)
    labels = None if strata is None else [s for s, k in zip(strata, keep) if k]
    xv, zv, yv = xv[keep], zv[keep], yv[keep]
    n = len(xv)
    f = {"absolute": np.abs, "negative": np.negative, "positive": lambda v: v}[sign]

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
            return math.nan
        res = sps.kendalltau(a, b) if method == "kendall" else sps.spearmanr(a, b)
        return float(res.statistic)

    tx, tz = corr(xv, yv), corr(zv, yv)
    estimate = float(f(tx) - f(tz))
    cells = Strata.of(labels, n)
    nan = math.nan

    def result(lo: float, hi: float, small: bool, note: str | None) -> CorrelationDifference:
        return CorrelationDifference(estimate, tx, tz, lo, hi, float(confidence), n, len(cells.labels), method, sign,
                                     small, note)

    if n < MIN_RELIABLE_N:
        return result(nan, nan, True, f"n too small ({n} runs, fewer than {MIN_RELIABLE_N}): no interval")
    if math.isnan(estimate):
        return result(nan, nan, False, "a constant column: a correlation is undefined")
    rng = np.random.default_rng(seed)
    blocks = []
    if method == "kendall":
        sy = np.sign(yv[:, None] - yv[None, :])
        sx, sz = np.sign(xv[:, None] - xv[None, :]), np.sign(zv[:, None] - zv[None, :])
        for idx in bootstrap_indices(cells, n_resamples, rng):
            w = resample_counts(idx, n)
            blocks.append(f(weighted_tau_b(w, sx, sy)) - f(weighted_tau_b(w, sz, sy)))
    else:
        for idx in bootstrap_indices(cells, n_resamples, rng):
            blocks.append(f(rowwise_spearman(xv[idx], yv[idx])) - f(rowwise_spearman(zv[idx], yv[idx])))
    theta = np.concatenate(blocks)
    defined = theta[np.isfinite(theta)]
    undefined = len(theta) - len(defined)
    if undefined * 2 > len(theta):
        return result(nan, nan, False, f"{undefined} of {len(theta)} resamples had an undefined correlation: "
                                       "no interval")
    lo, hi = percentile_interval(defined, confidence)
    small = small_sample_note(cells, unit="runs")
    notes = [small, f"{undefined} resamples with an undefined correlation left out" if undefined else None]
    return result(lo, hi, small is not None, "; ".join(n for n in notes if n) or None)


def _correlation_difference(t: _Test, ctx: _Context, measure: str, confidence: float) -> None:
    claim, u = t.claim, ctx.uncertainty
    runs = _runs_for_correlation(claim, ctx)
    if isinstance(runs, str):
        raise NotTestable(runs)
    versus = t.b or ""
    usable = [r for r in runs if all(_finite(r.get(c)) for c in (measure, versus, claim.target))]
    if len(usable) < 2:
        raise NotTestable(f"needs runs holding {measure}, {versus} and {claim.target} ({len(usable)} do)")
    t.evidence = correlation_difference([float(r[measure]) for r in usable], [float(r[versus]) for r in usable],
                                        [float(r[claim.target]) for r in usable], [_domain(r) for r in usable],
                                        method=claim.statistic, sign=claim.sign, confidence=confidence,
                                        n_resamples=u.correlation_resamples, seed=u.seed)
    name = "tau" if claim.statistic == "kendall" else "rho"
    f = {"absolute": "|{}|", "negative": "-{}", "positive": "{}"}[claim.sign]
    t.effect_name = f"{f.format(name + '(' + measure + ')')} - {f.format(name + '(' + versus + ')')}"
    t.ci_only, t.n, t.unit = True, len(usable), "runs"
    ev = t.evidence
    t.extra = {"tau_measure": ev.tau_measure, "tau_versus": ev.tau_versus}
    t.note = "; ".join(n for n in (f"{name}({measure}, {claim.target}) = {ev.tau_measure:.3g}, "
                                   f"{name}({versus}, {claim.target}) = {ev.tau_versus:.3g}", ev.note) if n)


# --- verdicts ------------------------------------------------------------------------------------

def _decide_ci_only(expect: str, est: float, lo: float, hi: float, confidence: float, margin: float | None,
                    small: bool, what: str) -> tuple[str, str]:
    """The CI-only rule (docs/statistics.md section 6, as for the granulated tau): (verdict, reason)."""
    ci = f"{confidence:.0%} CI [{lo:.4g}, {hi:.4g}]"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive", f"inconclusive: {what} {est:.4g} has no interval; more runs would give one"
    if small:
        return "inconclusive", (f"inconclusive: fewer than 5 runs in a test domain: the bootstrap interval is "
                                f"unreliable ({what} {est:.4g}, {ci}); more runs per test domain would settle it")
    if expect in DIRECTIONS:
        claimed, other = (lo > 0, hi < 0) if expect == "greater" else (hi < 0, lo > 0)
        if claimed:
            return "supported", f"supported: {what} {est:.4g}, {ci} excludes 0 on the claimed side (CI-only rule)"
        if other:
            return "contradicted", f"contradicted: {what} {est:.4g}, {ci} excludes 0 on the other side (CI-only rule)"
        return "inconclusive", (f"inconclusive: {what} {est:.4g}, {ci} includes 0; no closed-form power for this "
                                "statistic: more runs narrow its interval")
    assert margin is not None
    m = f"{margin:.4g}"
    if expect == "at_least":
        if lo > -margin:
            return "supported", f"supported: the {ci} of {what} lies above -margin = -{m}"
        if hi < -margin:
            return "contradicted", f"contradicted: the {ci} of {what} lies entirely below -margin = -{m}"
        return "inconclusive", f"inconclusive: the {ci} of {what} contains -margin = -{m}; more runs narrow it"
    if expect == "at_most":
        if hi < margin:
            return "supported", f"supported: the {ci} of {what} lies below margin = {m}"
        if lo > margin:
            return "contradicted", f"contradicted: the {ci} of {what} lies entirely above margin = {m}"
        return "inconclusive", f"inconclusive: the {ci} of {what} contains margin = {m}; more runs narrow it"
    if -margin < lo and hi < margin:
        return "supported", f"supported: equivalence shown, the {ci} of {what} lies within (-{m}, {m})"
    if hi < -margin or lo > margin:
        return "contradicted", f"contradicted: the {ci} of {what} lies entirely outside (-{m}, {m})"
    return "inconclusive", f"inconclusive: the {ci} of {what} is not inside (-{m}, {m}); more runs narrow it"


def _has_p(t: _Test) -> bool:
    return (t.not_testable is None and t.claim.expect in DIRECTIONS and not t.ci_only
            and math.isfinite(getattr(t.evidence, "p_value", math.nan)))


def _family_seeds(t: _Test, effect: float, alpha: float, power: float, m: int) -> int | None:
    """Seeds (runs) per test domain for 80% power within the file's Holm family of m tests: sized
    at alpha / m (:func:`flatlab.report.seeds_per_cell`; correlations: Fisher z runs)."""
    from flatlab.report import seeds_per_cell
    from flatlab.stats import correlation_runs_needed
    from flatlab.stats._common import MIN_RELIABLE_N

    if t.comparison is not None:
        return seeds_per_cell(t.comparison, effect, alpha=alpha, power=power, family=m)
    ev = t.evidence
    if not math.isfinite(effect) or effect == 0:
        return None
    h = max(getattr(ev, "n_strata", 1), 1)
    n = correlation_runs_needed(min(abs(effect), 1.0), method=ev.method, alpha=alpha / max(m, 1), power=power,
                                max_n=1000 * h)
    return None if n is None else max(MIN_RELIABLE_N, math.ceil(n / h))


def _record(t: _Test, alpha: float, p_holm: float, u: Uncertainty, m: int = 1) -> dict[str, Any]:
    from flatlab.stats import decide

    claim = t.claim
    base = {"id": t.id, "claim": claim.id, "text": claim.text, "kind": claim.kind, "expect": claim.expect,
            "margin": claim.margin, "measure": t.measure, "target": claim.target if claim.kind.startswith(
                "correlation") else None, "a": t.a, "b": t.b, "source": claim.source, "alpha": alpha}
    if t.not_testable is not None:
        return {**base, "verdict": "not testable", "reason": f"not testable: {t.not_testable}", "effect": None,
                "effect_name": None, "ci_low": None, "ci_high": None, "confidence": None, "p_value": None,
                "p_holm": None, "in_holm": False, "n": None, "n_a": None, "n_b": None, "pairing": None,
                "seeds_needed": None, "seeds_needed_single": None, "seeds_unit": None, "sd": None, "note": None}
    ev = t.evidence
    est = float(ev.estimate)
    if t.ci_only:
        verdict, reason = _decide_ci_only(claim.expect, est, ev.ci_low, ev.ci_high, ev.confidence, claim.margin,
                                          ev.small_sample, t.effect_name)
        needed, unit, p, single = None, "", math.nan, None
    else:
        if claim.kind.startswith("correlation"):
            min_effect = claim.min_effect
        else:
            min_effect = claim.min_effect if claim.min_effect is not None else u.min_effect_for(t.measure or "")
        kwargs: dict[str, Any] = {"alpha": alpha, "power": u.power}
        if claim.expect in DIRECTIONS:
            kwargs.update(p_adjusted=p_holm if math.isfinite(p_holm) else None, min_effect=min_effect)
        else:
            kwargs.update(margin=claim.margin)
        v = decide(claim.expect, ev, **kwargs)  # type: ignore[arg-type]
        verdict, reason = v.verdict, v.reason
        needed, unit = v.n_needed, v.n_needed_unit
        p = ev.p_value if claim.expect in DIRECTIONS else math.nan  # margin claims use no p-value
        single = needed
        if verdict == "inconclusive" and _has_p(t) and needed is not None:
            effect = min_effect if min_effect is not None else abs(est)
            family = _family_seeds(t, effect, alpha, u.power, m)
            if family is not None and family != needed:
                reason += (f"; within this file's Holm family of {m} test(s), sized at alpha/{m} = {alpha / m:.3g} "
                           f"and for the exact p to reach it: about {family} {t.unit or unit}")
            needed = family
        if t.pairing in ("domain", "members"):
            one = "a single ensemble" if t.pairing == "members" else "a single test domain"
            reason = reason.replace("a single seed", one)
            if needed is not None:
                unit = t.unit
                reason = reason.replace(v.n_needed_unit, t.unit) if v.n_needed_unit else reason
    sd = getattr(ev, "sd_diff", None)
    if sd is None:
        sd = getattr(ev, "sd_pooled", None)
    return {**base, "verdict": verdict, "reason": reason, "effect": est, "effect_name": t.effect_name,
            "seeds_needed_single": single if not t.ci_only else None,
            "ci_low": float(ev.ci_low), "ci_high": float(ev.ci_high), "confidence": float(ev.confidence),
            "method": getattr(ev, "method", "percentile"), "p_value": p,
            "p_holm": p_holm if _has_p(t) else math.nan, "in_holm": _has_p(t), "n": t.n, "n_a": t.n_a,
            "n_b": t.n_b, "pairing": t.pairing, "seeds_needed": needed, "seeds_unit": unit or None,
            "sd": float(sd) if sd is not None else None, "note": t.note, **t.extra}


def evaluate_claims(claims: ClaimsFile, collection: Collection, *, uncertainty: Uncertainty | None = None,
                    alpha: float | None = None, reference: str | None = None) -> dict[str, Any]:
    """One verdict per test of every claim of ``claims`` on the runs of ``collection``.

    Args:
        claims: :func:`load_claims`'s result.
        collection: :func:`flatlab.report.load_inputs`'s result.
        uncertainty: resamples, seed, power and min_effect (its alpha is overridden by ``alpha``,
            else the file's ``alpha``, else 0.05; a ``min_effect`` given here wins over the file's).
        alpha: the level, when given explicitly (``--alpha``).
        reference: the reference variant when given explicitly (``--reference``); else the file's
            ``reference``, else :func:`flatlab.report.default_reference`.

    Returns:
        ``{"file", "source", "description", "alpha", "reference", "family", "m", "counts",
        "results": [...]}``; a result holds id (the claim id, with ``[expansion]`` when a pattern
        made several tests), claim, text, kind, expect, margin, measure, target, a, b, source,
        verdict, reason, effect (E), effect_name, ci_low, ci_high, confidence, p_value, p_holm
        (NaN outside the Holm family), in_holm, n (pairs or runs; n_a, n_b when unpaired),
        pairing, seeds_needed and seeds_unit (for inconclusive verdicts), sd and note.
    """
    u = uncertainty or Uncertainty()
    level = alpha if alpha is not None else (claims.alpha if claims.alpha is not None else u.alpha)
    effects = u.min_effect if u.min_effect is not None else claims.min_effect
    u = replace(u, alpha=level, min_effect=effects)
    runs = list(collection.runs.values())
    present = list(dict.fromkeys(k for r in runs for k in run_measures(r)))
    from flatlab.measures.registry import column_order

    present.sort(key=column_order)
    rows, _ = build_rows(collection, present)
    ref = reference if reference is not None else (claims.reference or default_reference(rows))
    ctx = _Context(collection, rows, variants_of(rows), present, ref, u, claims.extra_columns)
    tests = [t for c in claims.claims for t in _expand(c, ctx)]
    for t in tests:
        if t.not_testable is None:
            _run_test(t, ctx, level)
    from flatlab.stats import holm

    family = [t for t in tests if _has_p(t)]
    adjusted = holm([t.evidence.p_value for t in family]) if family else np.zeros(0)
    p_of = {id(t): float(p) for t, p in zip(family, adjusted)}
    results = [_record(t, level, p_of.get(id(t), math.nan), u, len(family)) for t in tests]
    counts = {v: sum(1 for r in results if r["verdict"] == v) for v in VERDICTS}
    m = len(family)
    text = (f"Holm-Bonferroni over the {m} direction test(s) of this file with a p-value (p_holm); margin claims "
            "(at_least, at_most, equivalent) are decided on their 1 - 2 alpha interval and CI-only tests (granulated "
            "tau, correlation differences) on their 1 - alpha interval, outside the family")
    return {"file": claims.path, "source": claims.source, "description": claims.description, "alpha": level,
            "reference": ref, "family": text, "m": m, "counts": counts, "results": results}


def check_claims(paths: Sequence[str | os.PathLike[str]], claims_path: str | os.PathLike[str], *,
                 uncertainty: Uncertainty | None = None, alpha: float | None = None,
                 reference: str | None = None) -> dict[str, Any]:
    """Load results and a claims file and evaluate every claim (:func:`evaluate_claims`).

    Raises:
        FlatlabError: bad results inputs or a bad claims file (one line naming file and claim).
    """
    from flatlab.report import load_inputs

    collection = load_inputs(paths)
    if not collection.runs:
        raise FlatlabError("the inputs hold no runs (only surfaces): pass a results file with /runs or run folders")
    known = {r.variant for r in collection.runs.values()}
    return evaluate_claims(load_claims(claims_path, known), collection, uncertainty=uncertainty, alpha=alpha,
                           reference=reference)


# --- text ----------------------------------------------------------------------------------------

def _num(v: Any) -> str:
    from flatlab.text import fmt

    return "-" if v is None or not _finite(v) else fmt(float(v))


def _fresh_note(note: str | None, reason: str) -> str | None:
    """The parts of ``note`` that ``reason`` does not already say."""
    if not note:
        return None
    parts = [p for p in note.split("; ") if p and p not in reason
             and not ("fewer than 5" in p and "fewer than 5" in reason)
             and not ("no interval" in p and "no interval" in reason)]
    return "; ".join(parts) or None


#: The columns of a verdict table (:func:`claims_text`, :func:`claims_markdown`).
VERDICT_COLUMNS = ["claim", "verdict", "expect", "effect", "CI", "p", "p_holm", "n", "seeds needed"]


def verdict_rows(result: dict[str, Any]) -> list[list[Any]]:
    """One row per test of a claims result (:func:`evaluate_claims`), as the verdict tables print
    it: :data:`VERDICT_COLUMNS`."""
    body: list[list[Any]] = []
    for r in result["results"]:
        if r["verdict"] == "not testable":
            body.append([r["id"], r["verdict"], r["expect"], "-", "-", "-", "-", "-", "-"])
            continue
        n = r["n"] if r.get("n_a") is None else f"{r['n_a']}+{r['n_b']}"
        ci = interval_text(r["ci_low"], r["ci_high"])
        conf = f"{r['confidence']:.0%} " if r.get("confidence") and ci != "-" else ""
        seeds = "-" if r["seeds_needed"] is None else f"{r['seeds_needed']}"
        body.append([r["id"], r["verdict"], r["expect"] + (f" {r['margin']:g}" if r.get("margin") else ""),
                     _num(r["effect"]), conf + ci, p_text(r["p_value"]), p_text(r["p_holm"]), n, seeds])
    return body


def claims_text(result: dict[str, Any]) -> str:
    """The verdict table of one claims file, then one reason line per test."""
    from flatlab.text import table

    head = [f"claims: {result['file']}" + (f" ({result['source']})" if result.get("source") else ""),
            f"alpha = {result['alpha']:g}; reference variant: {result.get('reference') or 'none'}; "
            f"{result['family']}"]
    counts = ", ".join(f"{k} {v}" for k, v in result["counts"].items() if v)
    reasons = []
    for r in result["results"]:
        note = _fresh_note(r.get("note"), r["reason"])
        reasons.append(f"  {r['id']}: {r['reason']}" + (f" [{note}]" if note else ""))
    return ("\n".join(head) + "\n" + table(verdict_rows(result), VERDICT_COLUMNS)
            + f"\n{counts}\nwhy:\n" + "\n".join(reasons))


def claims_markdown(result: dict[str, Any]) -> str:
    """The verdict table of one claims file as a Markdown table (for a paper or a README)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(VERDICT_COLUMNS) + " |", "|" + "---|" * len(VERDICT_COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in verdict_rows(result)]
    return "\n".join(lines)


__all__ = [
    "AGAINST",
    "CLAIM_KINDS",
    "EXPECTATIONS",
    "STATISTICS",
    "VERDICTS",
    "Claim",
    "ClaimsFile",
    "CorrelationDifference",
    "VERDICT_COLUMNS",
    "check_claims",
    "claims_markdown",
    "claims_text",
    "correlation_difference",
    "evaluate_claims",
    "known_columns",
    "load_claims",
    "possible_labels",
    "verdict_rows",
]
