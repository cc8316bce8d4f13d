r"""Deciding a claim: supported, contradicted or inconclusive, with the reason in words.

A claim is about an effect E with a confidence interval [L, U] and (for direction claims) a
p-value: E = mean(A - B) of a :class:`~flatlab.stats.comparison.PairedComparison` or
:class:`~flatlab.stats.comparison.UnpairedComparison`, Kendall's tau / Spearman's rho of a
:class:`~flatlab.stats.correlation.CorrelationResult`, or the granulated tau of a
:class:`~flatlab.stats.correlation.GranulatedTauCI`. The rules, at level :math:`\alpha`:

**Direction claims** "greater" (A > B, E > 0) and "less" (A < B, E < 0; e.g. "tau < 0"). Use the
:math:`1-\alpha` interval and p = the claim's Holm-adjusted p-value (``p_adjusted``; the
evidence's own p when the claim stands alone).

* supported: :math:`p < \alpha` and the CI excludes 0 on the claimed side (L > 0 for "greater");
* contradicted: :math:`p < \alpha` and the CI excludes 0 on the other side (U < 0 for "greater");
* inconclusive otherwise (including p < alpha with a CI that touches 0: the test and the
  interval disagree), with the seeds that would give 80% power (``power``) at the observed effect
  |E|, or at ``min_effect`` when given (:func:`flatlab.stats.power.seeds_needed`; correlations:
  :func:`flatlab.stats.power.correlation_runs_needed`). When not even ``max_seeds`` seeds per
  test domain would do (in particular E = 0), the reason says that an effect that small cannot be
  settled with any practical number of seeds and asks for ``min_effect``.

  The granulated tau has no p-value: its direction claims use the CI alone (supported when it
  excludes 0 on the claimed side), are not part of a Holm family, and carry no seed count (there
  is no closed-form power for a mean of per-cell taus).

**Margin claims** with margin :math:`\Delta > 0`, decided on the :math:`1-2\alpha` interval
(TOST logic: each bound of that interval is a one-sided test at level :math:`\alpha`):

* "at_least" (A at least as good as B up to :math:`\Delta`: E > -Delta, non-inferiority):
  supported if :math:`L > -\Delta`; contradicted if :math:`U < -\Delta`; else inconclusive;
* "at_most" (E < Delta): supported if :math:`U < \Delta`; contradicted if :math:`L > \Delta`;
* "equivalent" (|E| < Delta, e.g. 8-bit indistinguishable from FP): supported if
  :math:`-\Delta < L` and :math:`U < \Delta` (equivalence shown); contradicted if the interval lies
  entirely outside the margin (:math:`U < -\Delta` or :math:`L > \Delta`); else inconclusive.

  Inconclusive margin claims on comparisons get the seeds for 80% power of the one-sided shifted
  t-test or of TOST at the observed effect (:func:`flatlab.stats.power.margin_seeds_needed`).

"No difference" is only ever concluded by a supported equivalence claim; a direction claim whose
test is not significant is inconclusive ("too few seeds"), never evidence of no effect.

**Unreliable or missing intervals.** Evidence with no interval (too few runs, a constant input)
or with fewer than 5 seeds in a test domain (``small_sample``: a bootstrap interval there is
unreliable) is inconclusive whatever the numbers, with the seeds needed (at least 5 per test
domain).

Seed counts are per test domain (a study has the same seeds in every domain): the power formula's
total n (pairs, runs per group, or runs) divided by the number of test domains, rounded up, and at
least 5. The power formulas use the sd of all differences (paired), the pooled sd (unpaired), or
the observed correlation, and the t-test / Fisher z test as a stand-in for the permutation test
(see :mod:`flatlab.stats.power` for why they agree); the count is an estimate ("about").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from flatlab.stats._common import (
    MIN_RELIABLE_N,
    check_choice,
    check_int,
    check_open_unit,
    check_real,
)
from flatlab.stats.comparison import PairedComparison, UnpairedComparison
from flatlab.stats.correlation import CorrelationResult, GranulatedTauCI
from flatlab.stats.power import correlation_runs_needed, margin_seeds_needed, seeds_needed

ClaimKind = Literal["greater", "less", "at_least", "at_most", "equivalent"]
DIRECTION_CLAIMS: tuple[str, ...] = ("greater", "less")
MARGIN_CLAIMS: tuple[str, ...] = ("at_least", "at_most", "equivalent")
VerdictKind = Literal["supported", "contradicted", "inconclusive"]
Evidence = PairedComparison | UnpairedComparison | CorrelationResult | GranulatedTauCI


@dataclass(frozen=True)
class Verdict:
    """The decision on one claim.

    Attributes:
        verdict: "supported", "contradicted" or "inconclusive".
        reason: one sentence with the numbers the rule used.
        claim: the claim kind.
        estimate, ci_low, ci_high, confidence: the effect and the interval the rule used.
        p_value: the p-value the rule used (NaN for margin claims and the granulated tau).
        alpha: the level.
        margin: Delta for margin claims, else None.
        n_needed: for an inconclusive verdict, the seeds (or runs) per test domain for 80% power
            (``power``); None when not computable, not practical, or the verdict is settled.
        n_needed_unit: what n_needed counts ("seeds per test domain", ...); "" when None.
    """

    verdict: VerdictKind
    reason: str
    claim: str
    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float
    alpha: float
    margin: float | None
    n_needed: int | None
    n_needed_unit: str


def confidence_for(claim: ClaimKind, alpha: float = 0.05) -> float:
    """The interval coverage :func:`decide` needs: 1 - alpha for direction claims, 1 - 2 alpha for margins."""
    check_choice(claim, "claim", DIRECTION_CLAIMS + MARGIN_CLAIMS)
    alpha = check_open_unit(alpha, "alpha")
    if claim in MARGIN_CLAIMS and alpha >= 0.5:
        raise ValueError(f"alpha must be < 0.5 for a margin claim (the 1 - 2 alpha interval), got {alpha}")
    return 1.0 - alpha if claim in DIRECTION_CLAIMS else 1.0 - 2.0 * alpha


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


@dataclass(frozen=True)
class _Units:
    """How to turn a power calculation's n into seeds per test domain, and what they are called."""

    unit: str
    strata: int
    current: int  # per test domain now


def _units(evidence: Evidence) -> _Units:
    h = max(evidence.n_strata, 1)
    where = " per test domain" if h > 1 else ""
    if isinstance(evidence, PairedComparison):
        return _Units(f"seeds{where}", h, evidence.n // h)
    if isinstance(evidence, UnpairedComparison):
        return _Units(f"seeds per variant{' and test domain' if h > 1 else ''}", h,
                      min(evidence.n_a, evidence.n_b) // h)
    return _Units(f"runs{where}", h, evidence.n // h)


def decide(claim: ClaimKind, evidence: Evidence, *, alpha: float = 0.05, p_adjusted: float | None = None,
           margin: float | None = None, min_effect: float | None = None, power: float = 0.8,
           max_seeds: int = 1000) -> Verdict:
    r"""Decide ``claim`` on ``evidence`` by the rules in the module docstring.

    Args:
        claim: "greater" (A > B, or statistic > 0), "less", "at_least" (A >= B - margin),
            "at_most" (A <= B + margin) or "equivalent" (|A - B| < margin).
        evidence: a PairedComparison, UnpairedComparison, CorrelationResult or GranulatedTauCI
            computed at ``confidence_for(claim, alpha)``.
        alpha: the level.
        p_adjusted: the claim's Holm-adjusted p-value (:func:`flatlab.stats.multiple.holm` over
            the family's direction claims); None = the evidence's own p-value. Direction claims only.
        margin: Delta > 0, required by margin claims and refused by direction claims.
        min_effect: smallest effect that matters (> 0), used instead of the observed effect to size
            the study when a direction claim is inconclusive.
        power: the power the seed count is for.
        max_seeds: seeds per test domain beyond which a study is called impractical.

    Raises:
        ValueError: a bad argument (named), evidence of another type or computed at the wrong
            confidence, a margin missing or superfluous.
    """
    check_choice(claim, "claim", DIRECTION_CLAIMS + MARGIN_CLAIMS)
    alpha = check_open_unit(alpha, "alpha")
    power = check_open_unit(power, "power")
    check_int(max_seeds, "max_seeds", 2)
    if not isinstance(evidence, PairedComparison | UnpairedComparison | CorrelationResult | GranulatedTauCI):
        raise ValueError("evidence must be a PairedComparison, UnpairedComparison, CorrelationResult or "
                         f"GranulatedTauCI, got {type(evidence).__name__}")
    needed_conf = confidence_for(claim, alpha)
    if abs(evidence.confidence - needed_conf) > 1e-9:
        raise ValueError(f"evidence was computed at confidence {evidence.confidence:g} but a {claim!r} claim at "
                         f"alpha {alpha:g} needs the {needed_conf:g} interval: compute it with "
                         f"confidence=confidence_for({claim!r}, {alpha:g})")
    if claim in DIRECTION_CLAIMS:
        if margin is not None:
            raise ValueError(f"margin applies to margin claims (at_least, at_most, equivalent), not {claim!r}")
        if min_effect is not None:
            min_effect = check_real(min_effect, "min_effect", positive=True)
        if p_adjusted is not None:
            p_adjusted = check_real(p_adjusted, "p_adjusted", nonnegative=True)
            if p_adjusted > 1:
                raise ValueError(f"p_adjusted must be in [0, 1], got {p_adjusted}")
        return _decide_direction(claim, evidence, alpha, p_adjusted, min_effect, power, max_seeds)
    if margin is None:
        raise ValueError(f"a {claim!r} claim needs margin (> 0)")
    margin = check_real(margin, "margin", positive=True)
    if min_effect is not None:
        raise ValueError("min_effect sizes direction claims; margin claims are sized at the observed effect")
    if p_adjusted is not None:
        raise ValueError("p_adjusted is not used by margin claims: they are decided on the 1 - 2 alpha interval")
    return _decide_margin(claim, evidence, alpha, margin, power, max_seeds)


def _unreliable(evidence: Evidence) -> str | None:
    """Why the evidence's interval cannot carry a verdict, or None."""
    if math.isnan(evidence.ci_low) or math.isnan(evidence.ci_high):
        return f"no interval ({evidence.note or 'undefined'})"
    if evidence.small_sample:
        unit = "runs" if isinstance(evidence, CorrelationResult | GranulatedTauCI) else "seeds"
        where = " in a test domain" if evidence.n_strata > 1 else ""
        return f"fewer than {MIN_RELIABLE_N} {unit}{where}: the bootstrap interval is unreliable"
    return None


def _decide_direction(claim: str, ev: Evidence, alpha: float, p_adjusted: float | None, min_effect: float | None,
                      power: float, max_seeds: int) -> Verdict:
    est, lo, hi = ev.estimate, ev.ci_low, ev.ci_high
    ci_only = isinstance(ev, GranulatedTauCI)
    p = math.nan if ci_only else (ev.p_value if p_adjusted is None else p_adjusted)
    p_name = "adjusted p" if p_adjusted is not None else "p"
    ci = f"{ev.confidence:.0%} CI [{_fmt(lo)}, {_fmt(hi)}]"

    def verdict(kind: VerdictKind, reason: str, n_needed: int | None = None, unit: str = "") -> Verdict:
        return Verdict(kind, reason, claim, est, lo, hi, ev.confidence, p, alpha, None, n_needed, unit)

    def inconclusive(why: str) -> Verdict:
        n_needed, unit, sizing = _size_direction(ev, min_effect, alpha, power, max_seeds)
        return verdict("inconclusive", f"inconclusive: {why}; {sizing}", n_needed, unit)

    why_not = _unreliable(ev)
    if why_not:
        return inconclusive(why_not)
    claimed_side = lo > 0 if claim == "greater" else hi < 0
    other_side = hi < 0 if claim == "greater" else lo > 0
    if ci_only:
        if claimed_side:
            return verdict("supported", f"supported: granulated tau {_fmt(est)}, {ci} excludes 0 on the claimed "
                                        "side (CI-only rule: the granulated tau has no p-value)")
        if other_side:
            return verdict("contradicted", f"contradicted: granulated tau {_fmt(est)}, {ci} excludes 0 on the "
                                           "other side (CI-only rule)")
        return inconclusive(f"granulated tau {_fmt(est)}, {ci} includes 0")
    if math.isnan(p):
        return inconclusive("no p-value")
    what = f"{_effect_name(ev)} {_fmt(est)}, {ci}, {p_name} = {p:.3g}"
    if p < alpha and claimed_side:
        return verdict("supported", f"supported: {what} < alpha = {alpha:g} and the CI excludes 0 on the claimed side")
    if p < alpha and other_side:
        return verdict("contradicted", f"contradicted: {what} < alpha = {alpha:g} and the CI excludes 0 on the "
                                       "other side")
    if p < alpha:
        return inconclusive(f"{what} < alpha = {alpha:g} but the CI includes 0 (the test and the interval disagree)")
    return inconclusive(f"{what} >= alpha = {alpha:g}")


def _effect_name(ev: Evidence) -> str:
    if isinstance(ev, CorrelationResult):
        return "Kendall tau" if ev.method == "kendall" else "Spearman rho"
    return "mean difference"


def _per_domain(n_total: int, units: _Units) -> int:
    return max(MIN_RELIABLE_N, math.ceil(n_total / units.strata))


def _size_direction(ev: Evidence, min_effect: float | None, alpha: float, power: float,
                    max_seeds: int) -> tuple[int | None, str, str]:
    """(n per test domain or None, its unit, the sentence) for an inconclusive direction claim."""
    if isinstance(ev, GranulatedTauCI):
        return None, "", "there is no closed-form power for the granulated tau: more runs per cell narrow its interval"
    units = _units(ev)
    effect = min_effect if min_effect is not None else abs(ev.estimate)
    at = f"the minimum effect {_fmt(effect)}" if min_effect is not None else f"the observed effect {_fmt(effect)}"
    cap = max_seeds * units.strata
    if isinstance(ev, CorrelationResult):
        if math.isnan(effect):
            return None, "", "the correlation is undefined"
        n_total = correlation_runs_needed(min(effect, 1.0), method=ev.method, alpha=alpha, power=power, max_n=cap)
    else:
        sd = ev.sd_diff if isinstance(ev, PairedComparison) else ev.sd_pooled
        if math.isnan(sd):
            return None, "", "with a single seed there is no spread to size a study with"
        n_total = seeds_needed(effect, sd, alpha=alpha, power=power, paired=isinstance(ev, PairedComparison),
                               max_n=cap)
    if n_total is None:
        if min_effect is not None:
            return None, "", (f"even {at} would need more than {max_seeds} {units.unit} for {power:.0%} power")
        return None, "", (f"an effect as small as {at} cannot be settled with any practical number of seeds (more "
                          f"than {max_seeds} {units.unit}); give min_effect, the smallest effect that matters, "
                          "to size the study")
    n = _per_domain(n_total, units)
    if n <= units.current:
        if min_effect is not None:
            return n, units.unit, (f"the study already has the {n} {units.unit} that {power:.0%} power at {at} "
                                   "needs: to show the effect is smaller than that, state an equivalence claim "
                                   f"with margin {_fmt(effect)}")
        return n, units.unit, (f"the study already has the {n} {units.unit} that {power:.0%} power at {at} needs: "
                               "the true effect is likely smaller than observed, or absent; give min_effect to "
                               "size the study")
    return n, units.unit, f"about {n} {units.unit} would settle it ({power:.0%} power at {at}; now {units.current})"


def _decide_margin(claim: str, ev: Evidence, alpha: float, margin: float, power: float,
                   max_seeds: int) -> Verdict:
    est, lo, hi = ev.estimate, ev.ci_low, ev.ci_high
    ci = f"{ev.confidence:.0%} CI [{_fmt(lo)}, {_fmt(hi)}]"
    m = _fmt(margin)

    def verdict(kind: VerdictKind, reason: str, n_needed: int | None = None, unit: str = "") -> Verdict:
        return Verdict(kind, reason, claim, est, lo, hi, ev.confidence, math.nan, alpha, margin, n_needed, unit)

    def inconclusive(why: str) -> Verdict:
        n_needed, unit, sizing = _size_margin(claim, ev, alpha, margin, power, max_seeds)
        return verdict("inconclusive", f"inconclusive: {why}; {sizing}", n_needed, unit)

    why_not = _unreliable(ev)
    if why_not:
        return inconclusive(why_not)
    if claim == "at_least":
        if lo > -margin:
            return verdict("supported", f"supported: the {ci} lies above -margin = -{m}")
        if hi < -margin:
            return verdict("contradicted", f"contradicted: the {ci} lies entirely below -margin = -{m}")
        return inconclusive(f"the {ci} contains -margin = -{m}")
    if claim == "at_most":
        if hi < margin:
            return verdict("supported", f"supported: the {ci} lies below margin = {m}")
        if lo > margin:
            return verdict("contradicted", f"contradicted: the {ci} lies entirely above margin = {m}")
        return inconclusive(f"the {ci} contains margin = {m}")
    if -margin < lo and hi < margin:
        return verdict("supported", f"supported: equivalence shown, the {ci} lies within (-{m}, {m})")
    if hi < -margin or lo > margin:
        return verdict("contradicted", f"contradicted: the {ci} lies entirely outside (-{m}, {m})")
    return inconclusive(f"the {ci} is not inside (-{m}, {m})")


def _size_margin(claim: str, ev: Evidence, alpha: float, margin: float, power: float,
                 max_seeds: int) -> tuple[int | None, str, str]:
    if not isinstance(ev, PairedComparison | UnpairedComparison):
        return None, "", "no power formula for margin claims on correlations: more runs narrow the interval"
    units = _units(ev)
    est = ev.estimate
    sd = ev.sd_diff if isinstance(ev, PairedComparison) else ev.sd_pooled
    if math.isnan(sd):
        return None, "", "with a single seed there is no spread to size a study with"
    wrong_side = {"at_least": est <= -margin, "at_most": est >= margin, "equivalent": abs(est) >= margin}[claim]
    if wrong_side:
        return None, "", (f"the observed difference {_fmt(est)} is beyond the margin: more seeds would more likely "
                          "contradict the claim than support it")
    n_total = margin_seeds_needed(est, sd, margin, kind=claim, alpha=alpha, power=power,  # type: ignore[arg-type]
                                  paired=isinstance(ev, PairedComparison), max_n=max_seeds * units.strata)
    if n_total is None:
        return None, "", (f"the observed difference {_fmt(est)} is so close to the margin that more than {max_seeds} "
                          f"{units.unit} would be needed")
    n = _per_domain(n_total, units)
    return n, units.unit, (f"about {n} {units.unit} would settle it ({power:.0%} power at the observed difference "
                           f"{_fmt(est)}; now {units.current})")
