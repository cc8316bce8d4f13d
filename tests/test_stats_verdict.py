"""flatlab.stats.verdict: every verdict for direction, non-inferiority and equivalence claims on
constructed data whose answer is known, the seed counts they quote, and argument errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flatlab.stats import (
    confidence_for,
    correlation_with_ci,
    decide,
    granulated_tau_with_ci,
    holm,
    margin_seeds_needed,
    paired_comparison,
    seeds_needed,
    summarize_group,
    unpaired_comparison,
)

DOMAINS = ["d0"] * 8 + ["d1"] * 8  # 8 seeds in each of 2 test domains


def _pairs(mean: float, sd: float, seed: int = 0, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """b ~ accuracies; a = b + d with d of exactly this sample mean and sd."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    z = (z - z.mean()) / z.std(ddof=1)
    b = rng.uniform(0.3, 0.5, n)
    return b + mean + sd * z, b


def _paired(mean: float, sd: float, claim: str, seed: int = 0, **kw):
    a, b = _pairs(mean, sd, seed)
    return paired_comparison(a, b, DOMAINS, confidence=confidence_for(claim), n_resamples=2000, **kw)


# --- direction claims --------------------------------------------------------------------------

def test_direction_supported() -> None:
    ev = _paired(0.05, 0.02, "greater")
    v = decide("greater", ev)
    assert v.verdict == "supported", v.reason
    assert ev.p_value < 0.05 and ev.ci_low > 0 and v.n_needed is None
    assert v.reason.startswith("supported: mean difference 0.05")
    assert decide("less", _paired(-0.05, 0.02, "less")).verdict == "supported"


def test_direction_contradicted() -> None:
    v = decide("greater", _paired(-0.05, 0.02, "greater"))
    assert v.verdict == "contradicted" and "other side" in v.reason


def test_direction_inconclusive_quotes_seeds_needed() -> None:
    ev = _paired(0.01, 0.05, "greater")
    v = decide("greater", ev)
    assert v.verdict == "inconclusive" and ev.p_value >= 0.05
    total = seeds_needed(0.01, ev.sd_diff)  # pairs for 80% power at the observed effect
    assert v.n_needed == math.ceil(total / 2) and v.n_needed_unit == "seeds per test domain"
    assert f"about {v.n_needed} seeds per test domain would settle it" in v.reason
    assert "now 8" in v.reason


def test_direction_min_effect_sizes_the_study() -> None:
    ev = _paired(0.01, 0.05, "greater")
    v = decide("greater", ev, min_effect=0.02)
    assert v.n_needed == math.ceil(seeds_needed(0.02, ev.sd_diff) / 2)
    assert "the minimum effect 0.02" in v.reason


def test_zero_effect_cannot_be_settled_and_is_not_no_difference() -> None:
    ev = _paired(0.0, 0.05, "greater")
    v = decide("greater", ev)
    assert v.verdict == "inconclusive" and v.n_needed is None
    assert "cannot be settled with any practical number of seeds" in v.reason and "min_effect" in v.reason
    # "no difference" needs an equivalence claim, and noisy data do not show it either
    eq = decide("equivalent", _paired(0.0, 0.05, "equivalent"), margin=0.01)
    assert eq.verdict == "inconclusive" and eq.n_needed is not None
    # precise data do
    assert decide("equivalent", _paired(0.0, 0.002, "equivalent"), margin=0.01).verdict == "supported"


def test_enough_seeds_for_min_effect_points_to_equivalence() -> None:
    ev = _paired(0.001, 0.01, "greater")
    v = decide("greater", ev, min_effect=0.05)
    assert v.verdict == "inconclusive" and "state an equivalence claim with margin 0.05" in v.reason


def test_holm_adjusted_p_decides() -> None:
    evs = [_paired(0.024, 0.04, "greater", seed=s) for s in range(3)]  # raw p ~ 0.03
    raw = [e.p_value for e in evs]
    adjusted = holm(raw)
    assert raw[0] < 0.05 <= adjusted[0]  # significant alone, not in the family of three
    assert decide("greater", evs[0]).verdict == "supported"
    v = decide("greater", evs[0], p_adjusted=float(adjusted[0]))
    assert v.verdict == "inconclusive" and v.p_value == adjusted[0] and "adjusted p" in v.reason


def test_test_and_interval_disagreeing_is_inconclusive() -> None:
    ev = _paired(0.005, 0.05, "greater")
    assert ev.ci_low < 0
    v = decide("greater", ev, p_adjusted=0.01)
    assert v.verdict == "inconclusive" and "disagree" in v.reason


def test_small_sample_is_inconclusive_however_large_the_effect() -> None:
    a, b = _pairs(0.2, 0.01, n=8)
    ev = paired_comparison(a, b, ["d0"] * 4 + ["d1"] * 4, n_resamples=1000)
    assert ev.small_sample and ev.p_value < 0.05 and ev.ci_low > 0
    v = decide("greater", ev)
    assert v.verdict == "inconclusive" and "fewer than 5 seeds" in v.reason and v.n_needed == 5


def test_unpaired_direction_claim() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 16))
    z = (z - z.mean(axis=1, keepdims=True)) / z.std(axis=1, ddof=1, keepdims=True)
    ev = unpaired_comparison(0.45 + 0.02 * z[0], 0.40 + 0.02 * z[1], DOMAINS, DOMAINS, n_resamples=2000)
    assert decide("greater", ev).verdict == "supported"  # t = 7
    assert decide("less", ev).verdict == "contradicted"
    z = rng.normal(size=(2, 10))
    z = (z - z.mean(axis=1, keepdims=True)) / z.std(axis=1, ddof=1, keepdims=True)
    weak = unpaired_comparison(0.41 + 0.02 * z[0], 0.40 + 0.02 * z[1], n_resamples=2000)  # t = 1.1
    v = decide("greater", weak)
    assert v.verdict == "inconclusive" and v.n_needed_unit == "seeds per variant"
    assert v.n_needed == max(5, seeds_needed(abs(weak.mean_diff), weak.sd_pooled, paired=False))


def test_correlation_claims() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=30)
    y = -0.8 * x + 0.3 * rng.normal(size=30)
    assert decide("less", correlation_with_ci(x, y, n_resamples=1000)).verdict == "supported"
    assert decide("greater", correlation_with_ci(x, y, n_resamples=1000)).verdict == "contradicted"
    noise = correlation_with_ci(x, rng.normal(size=30), n_resamples=1000)
    v = decide("less", noise)
    assert v.verdict == "inconclusive" and v.n_needed_unit == "runs"
    assert "Kendall tau" in v.reason


def test_granulated_tau_uses_the_interval_alone() -> None:
    rng = np.random.default_rng(5)
    n = 48
    seeds, algos = [i % 4 for i in range(n)], [("erm", "qat", "sam")[i // 4 % 3] for i in range(n)]
    domains = [str(i // 12) for i in range(n)]
    x = rng.normal(size=n)
    y = -x + 0.1 * rng.normal(size=n)
    ev = granulated_tau_with_ci(x, y, {"algorithm": algos, "seed": seeds}, strata=domains, n_resamples=500)
    v = decide("less", ev)
    assert v.verdict == "supported" and "CI-only rule" in v.reason and math.isnan(v.p_value)


# --- non-inferiority ("at least as good") ------------------------------------------------------

def test_non_inferiority_verdicts() -> None:
    ok = decide("at_least", _paired(0.0, 0.005, "at_least"), margin=0.02)
    assert ok.verdict == "supported" and ok.confidence == pytest.approx(0.90) and "lies above -margin" in ok.reason
    bad = decide("at_least", _paired(-0.05, 0.005, "at_least"), margin=0.02)
    assert bad.verdict == "contradicted" and "entirely below -margin" in bad.reason
    ev = _paired(-0.01, 0.04, "at_least")
    unsure = decide("at_least", ev, margin=0.02)
    assert unsure.verdict == "inconclusive" and ev.ci_low < -0.02 < ev.ci_high
    total = margin_seeds_needed(-0.01, ev.sd_diff, 0.02, kind="at_least")
    assert unsure.n_needed == math.ceil(total / 2)
    beyond = decide("at_least", _paired(-0.025, 0.05, "at_least"), margin=0.02)
    assert beyond.verdict == "inconclusive" and "more likely contradict" in beyond.reason
    assert decide("at_most", _paired(0.0, 0.005, "at_most"), margin=0.02).verdict == "supported"
    assert decide("at_most", _paired(0.05, 0.005, "at_most"), margin=0.02).verdict == "contradicted"


# --- equivalence -------------------------------------------------------------------------------

def test_equivalence_verdicts() -> None:
    ok = decide("equivalent", _paired(0.001, 0.005, "equivalent"), margin=0.02)
    assert ok.verdict == "supported" and "equivalence shown" in ok.reason
    far = decide("equivalent", _paired(0.05, 0.005, "equivalent"), margin=0.02)
    assert far.verdict == "contradicted" and "entirely outside" in far.reason
    ev = _paired(0.0, 0.08, "equivalent")
    unsure = decide("equivalent", ev, margin=0.02)
    assert unsure.verdict == "inconclusive"
    assert unsure.n_needed == math.ceil(margin_seeds_needed(0.0, ev.sd_diff, 0.02, kind="equivalent") / 2)
    assert f"about {unsure.n_needed} seeds per test domain would settle it" in unsure.reason


def test_equivalence_uses_the_90_percent_interval() -> None:
    # The rule is TOST at alpha = 0.05: the 90% CI inside the margin, even where the 95% one is not.
    a, b = _pairs(0.0, 0.015, seed=7)
    ev90 = paired_comparison(a, b, DOMAINS, confidence=0.90, n_resamples=4000)
    ev95 = paired_comparison(a, b, DOMAINS, confidence=0.95, n_resamples=4000)
    margin = (max(abs(ev90.ci_low), abs(ev90.ci_high)) + max(abs(ev95.ci_low), abs(ev95.ci_high))) / 2
    assert decide("equivalent", ev90, margin=margin).verdict == "supported"
    with pytest.raises(ValueError, match="needs the 0.9 interval"):
        decide("equivalent", ev95, margin=margin)


# --- argument errors ---------------------------------------------------------------------------

def test_argument_errors() -> None:
    ev = _paired(0.01, 0.05, "greater")
    eq = _paired(0.01, 0.05, "equivalent")
    cases = [
        (lambda: decide("bigger", ev), "claim must be one of"),
        (lambda: decide("greater", ev, alpha=2.0), r"alpha must be in \(0, 1\), got 2.0"),
        (lambda: decide("greater", ev, margin=0.1), "margin applies to margin claims"),
        (lambda: decide("greater", ev, min_effect=-1.0), "min_effect must be > 0"),
        (lambda: decide("greater", ev, p_adjusted=1.5), r"p_adjusted must be in \[0, 1\]"),
        (lambda: decide("equivalent", eq), "needs margin"),
        (lambda: decide("equivalent", eq, margin=-0.1), "margin must be > 0"),
        (lambda: decide("equivalent", eq, margin=0.1, p_adjusted=0.01), "p_adjusted is not used by margin claims"),
        (lambda: decide("equivalent", eq, margin=0.1, min_effect=0.05), "min_effect sizes direction claims"),
        (lambda: decide("greater", summarize_group([1.0, 2.0, 3.0])), "evidence must be a PairedComparison"),
        (lambda: decide("greater", ev, max_seeds=1), "max_seeds must be >= 2"),
        (lambda: confidence_for("equivalent", 0.6), "alpha must be < 0.5 for a margin claim"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
