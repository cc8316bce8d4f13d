"""flatlab.stats.permutation and .comparison: p-values against brute-force enumeration, the Monte
Carlo branch against the exact one, paired/unpaired results, NaN handling and argument errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from flatlab.stats import (
    paired_comparison,
    sign_flip_test,
    two_sample_permutation_test,
    unpaired_comparison,
)


def _brute_sign_flip(d: np.ndarray) -> float:
    """Share of all 2^n sign patterns whose |mean| >= the observed |mean| (ties up to 1e-12)."""
    observed = abs(d.mean())
    hits = sum(abs(np.mean(np.array(signs) * d)) >= observed - 1e-12
               for signs in itertools.product((1.0, -1.0), repeat=len(d)))
    return hits / 2 ** len(d)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 11])
def test_sign_flip_equals_brute_force(n: int) -> None:
    d = np.random.default_rng(n).normal(0.3, 1.0, n)
    res = sign_flip_test(d)
    assert res.exact and res.n_permutations == 2 ** n
    assert res.p_value == pytest.approx(_brute_sign_flip(d), abs=1e-15)
    assert res.statistic == pytest.approx(d.mean())


def test_sign_flip_ties_count() -> None:
    # Integer differences: many patterns tie the observed |sum| exactly (and in floating point).
    d = np.array([1.0, 1.0, 2.0, -1.0, 3.0, 0.0, 1.0])
    assert sign_flip_test(d).p_value == pytest.approx(_brute_sign_flip(d), abs=1e-15)
    # Accuracy-like decimals whose sums tie only up to rounding.
    d = np.array([0.1, 0.2, 0.3, -0.6, 0.1, 0.2])
    assert sign_flip_test(d).p_value == pytest.approx(_brute_sign_flip(d), abs=1e-15)
    assert sign_flip_test(np.zeros(6)).p_value == 1.0
    # Constant non-zero differences: only the identity and its negation reach the observed |mean|.
    assert sign_flip_test(np.full(9, 0.01)).p_value == pytest.approx(2 / 2 ** 9)


def test_sign_flip_monte_carlo_close_to_exact_at_16() -> None:
    d = np.random.default_rng(2).normal(0.6, 1.0, 16)  # exact p = 0.028
    exact = sign_flip_test(d)
    mc = sign_flip_test(d, exact_max_n=0, n_permutations=200_000, seed=5)
    assert exact.exact and not mc.exact and mc.n_permutations == 200_000
    sd = math.sqrt(exact.p_value * (1 - exact.p_value) / 200_000)
    assert 0.01 < exact.p_value < 0.5  # a p-value where the comparison means something
    assert abs(mc.p_value - exact.p_value) < 4 * sd + 1 / 200_000


def test_sign_flip_monte_carlo_never_zero() -> None:
    d = np.full(40, 1.0)
    res = sign_flip_test(d, n_permutations=999)
    assert not res.exact and res.p_value == pytest.approx(1 / 1000)


def _brute_two_sample(a: np.ndarray, b: np.ndarray, la: list, lb: list) -> float:
    """Enumerate every relabeling within each stratum; p = share with |T| >= |T_obs|."""
    labels = sorted(set(la), key=str)
    w = {h: (la.count(h) + lb.count(h)) / (len(a) + len(b)) for h in labels}
    pools = {h: np.concatenate([a[np.asarray(la) == h], b[np.asarray(lb) == h]]) for h in labels}
    sizes = {h: la.count(h) for h in labels}

    def t(choice: dict) -> float:
        total = 0.0
        for h in labels:
            mask = np.zeros(len(pools[h]), dtype=bool)
            mask[list(choice[h])] = True
            total += w[h] * (pools[h][mask].mean() - pools[h][~mask].mean())
        return total

    observed = abs(t({h: range(sizes[h]) for h in labels}))
    per = [list(itertools.combinations(range(len(pools[h])), sizes[h])) for h in labels]
    values = [abs(t(dict(zip(labels, combo)))) for combo in itertools.product(*per)]
    return float(np.mean(np.asarray(values) >= observed - 1e-12))


def test_two_sample_unstratified_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 1, 6), rng.normal(0, 1, 5)
    res = two_sample_permutation_test(a, b)
    assert res.exact and res.n_permutations == math.comb(11, 6)
    assert res.p_value == pytest.approx(_brute_two_sample(a, b, [0] * 6, [0] * 5), abs=1e-12)
    assert res.statistic == pytest.approx(a.mean() - b.mean())


def test_two_sample_stratified_equals_brute_force() -> None:
    rng = np.random.default_rng(1)
    la, lb = ["x"] * 4 + ["y"] * 3, ["x"] * 3 + ["y"] * 4
    a = np.concatenate([rng.normal(0.6, 1, 4), rng.normal(5.0, 1, 3)])
    b = np.concatenate([rng.normal(0.0, 1, 3), rng.normal(4.4, 1, 4)])
    res = two_sample_permutation_test(a, b, la, lb)
    assert res.exact and res.n_permutations == math.comb(7, 4) * math.comb(7, 3)
    assert res.p_value == pytest.approx(_brute_two_sample(a, b, la, lb), abs=1e-12)
    # exact as soon as n_permutations covers the 35 * 35 = 1225 relabelings
    assert two_sample_permutation_test(a, b, la, lb, n_permutations=1225).exact
    assert not two_sample_permutation_test(a, b, la, lb, n_permutations=1224).exact


def test_two_sample_stratified_monte_carlo_close_to_exact() -> None:
    rng = np.random.default_rng(4)
    la = lb = [0] * 6 + [1] * 6
    a = np.concatenate([rng.normal(0.5, 1, 6), rng.normal(3.5, 1, 6)])
    b = np.concatenate([rng.normal(0.0, 1, 6), rng.normal(3.0, 1, 6)])
    exact = two_sample_permutation_test(a, b, la, lb, n_permutations=924 ** 2)
    mc = two_sample_permutation_test(a, b, la, lb, n_permutations=100_000, seed=1)
    assert exact.exact and not mc.exact
    sd = math.sqrt(exact.p_value * (1 - exact.p_value) / 100_000)
    assert abs(mc.p_value - exact.p_value) < 4 * sd + 1e-5


def test_paired_comparison_fields() -> None:
    rng = np.random.default_rng(6)
    b = rng.normal(0.4, 0.05, 12)
    a = b + rng.normal(0.05, 0.02, 12)
    strata = ["d0"] * 6 + ["d1"] * 6
    r = paired_comparison(a, b, strata, seed=3)
    d = a - b
    assert r.mean_diff == pytest.approx(d.mean()) and r.sd_diff == pytest.approx(d.std(ddof=1))
    assert (r.n, r.n_strata, r.exact, r.n_permutations, r.test) == (12, 2, True, 4096, "sign-flip permutation")
    assert r.p_value == pytest.approx(_brute_sign_flip(d), abs=1e-15)
    assert r.ci_low < r.mean_diff < r.ci_high and r.ci_low > 0
    assert r.method == "bca" and r.note is None and not r.small_sample
    assert r == paired_comparison(a, b, strata, seed=3)
    # strata shape the CI only: the p-value is the same without them
    assert paired_comparison(a, b, seed=3).p_value == r.p_value


def test_paired_monte_carlo_beyond_exact_max_n() -> None:
    d = np.random.default_rng(7).normal(0.2, 1, 20)
    r = paired_comparison(d, np.zeros(20), n_permutations=5000, seed=1)
    assert not r.exact and r.n_permutations == 5000
    assert r.p_value == sign_flip_test(d, n_permutations=5000, seed=1).p_value


def test_paired_nan_dropped_pairwise() -> None:
    a = np.array([0.5, np.nan, 0.52, 0.55, 0.6, 0.58, 0.57])
    b = np.array([0.4, 0.41, np.nan, 0.45, 0.5, 0.47, 0.49])
    r = paired_comparison(a, b, seed=0)
    keep = ~(np.isnan(a) | np.isnan(b))
    ref = paired_comparison(a[keep], b[keep], seed=0)
    assert (r.mean_diff, r.ci_low, r.p_value, r.n) == (ref.mean_diff, ref.ci_low, ref.p_value, 5)
    assert "2 pair(s) with a missing (NaN) value dropped" in r.note


def test_paired_degenerate() -> None:
    one = paired_comparison([0.5], [0.4])
    assert one.n == 1 and math.isnan(one.ci_low) and math.isnan(one.sd_diff) and one.p_value == 1.0
    assert "single pair" in one.note and one.small_sample
    same = paired_comparison([0.5, 0.6, 0.7, 0.8, 0.9, 0.4], [0.5, 0.6, 0.7, 0.8, 0.9, 0.4])
    assert same.mean_diff == same.ci_low == same.ci_high == 0.0 and same.p_value == 1.0
    assert "all differences equal" in same.note
    lone = unpaired_comparison([0.5], [0.4, 0.45, 0.5, 0.42, 0.47], n_resamples=200)
    assert math.isfinite(lone.ci_low) and "group a: a single run, which adds no resampling variance" in lone.note
    assert lone.small_sample and lone.exact
    assert lone.p_value == pytest.approx(_brute_two_sample(np.array([0.5]), np.array([0.4, 0.45, 0.5, 0.42, 0.47]),
                                                           [0], [0] * 5), abs=1e-12)
    with pytest.raises(ValueError, match="no pair where both values are finite"):
        paired_comparison([np.nan, 1.0], [1.0, np.nan])


def test_unpaired_comparison() -> None:
    rng = np.random.default_rng(8)
    a, b = rng.normal(1.0, 1, 9), rng.normal(0.0, 1, 8)
    r = unpaired_comparison(a, b, seed=2)
    assert r.mean_diff == pytest.approx(a.mean() - b.mean())
    assert (r.n_a, r.n_b, r.exact, r.test) == (9, 8, True, "two-sample permutation")
    assert r.p_value == pytest.approx(_brute_two_sample(a, b, [0] * 9, [0] * 8), abs=1e-12)
    assert r.ci_low < r.mean_diff < r.ci_high
    pooled = math.sqrt((8 * a.var(ddof=1) + 7 * b.var(ddof=1)) / 15)
    assert r.sd_pooled == pytest.approx(pooled)
    # p close to Welch's t on normal data (a sanity check, not a definition)
    assert r.p_value == pytest.approx(stats.ttest_ind(a, b).pvalue, abs=0.02)


def test_unpaired_stratified_statistic_ignores_domain_mix() -> None:
    # Same per-domain means in both groups, different domain mix: no effect, T = 0.
    a = np.array([0.3, 0.3, 0.3, 0.9])
    b = np.array([0.3, 0.9, 0.9, 0.9])
    r = unpaired_comparison(a, b, ["x", "x", "x", "y"], ["x", "y", "y", "y"], n_resamples=200)
    assert r.mean_diff == pytest.approx(0.0, abs=1e-15) and r.p_value == 1.0
    assert r.mean_a - r.mean_b == pytest.approx(-0.3)  # what the unstratified difference would say


def test_unpaired_coverage_of_bootstrap_interval() -> None:
    """BCa CI of a difference of means, groups resampled independently: covers at ~95% (n = 40 each)."""
    rng = np.random.default_rng(9)
    hits, reps = 0, 600
    for r in range(reps):
        a, b = rng.normal(1.0, 1.0, 40), rng.gamma(4.0, 0.25, 40)  # true difference 1 - 1 = 0
        res = unpaired_comparison(a, b, n_resamples=499, seed=r, n_permutations=1)
        hits += res.ci_low <= 0.0 <= res.ci_high
    assert 0.92 <= hits / reps <= 0.98, hits / reps


@pytest.mark.parametrize("call, match", [
    (lambda: paired_comparison([1, 2], [1, 2, 3]), "a and b must be matched pairs of equal length, got 2 and 3"),
    (lambda: paired_comparison([1, 2], [1, 2], exact_max_n=30), "exact_max_n must be >= 0 and <= 24, got 30"),
    (lambda: paired_comparison([1, 2], [1, 2], n_permutations=0), "n_permutations must be >= 1"),
    (lambda: paired_comparison([1, 2], [1, 2], confidence=1.5), r"confidence must be in \(0, 1\), got 1.5"),
    (lambda: unpaired_comparison([1, 2], [1, 2], strata_a=[0, 0]), "strata_a and strata_b must be given together"),
    (lambda: unpaired_comparison([1, 2], [1, 2], [0, 1], [0, 0]), "must hold the same test domains"),
    (lambda: unpaired_comparison([np.nan], [1, 2]), "a holds no finite value"),
    (lambda: sign_flip_test([]), "differences must be a non-empty"),
    (lambda: two_sample_permutation_test([1.0, np.nan], [1.0, 2.0]), "a must be a non-empty 1-D array of finite"),
    (lambda: two_sample_permutation_test([1.0], [2.0], strata_b=[0]), "must be given together"),
    (lambda: two_sample_permutation_test([1.0], [2.0], [0], [1]), "must hold the same test domains"),
])
def test_argument_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
