"""flatlab.stats.power: seeds needed against simulated experiments, TOST power against numerical
integration and simulation, the normal approximation, edge cases and argument errors.

The simulations run the t-test whose power the formulas compute exactly (one-sample t on the
paired differences, pooled two-sample t), on normal data, so they check the noncentral-t algebra
and the search for n. The report's paired p-value is the sign-flip permutation test; on normal
differences its power matches the t-test's (Pitman efficiency 1, and the same rejection region
asymptotically), which one more simulation checks at n = 10 with the library's own sign-flip test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from flatlab.stats import (
    correlation_runs_needed,
    margin_power_at,
    margin_seeds_needed,
    power_at,
    seeds_needed,
    sign_flip_test,
)
from flatlab.stats.correlation import rowwise_spearman

EXPERIMENTS = 2000
MC_SD = math.sqrt(0.8 * 0.2 / EXPERIMENTS)  # 0.0089 at power 0.8


def _paired_t_power(n: int, effect: float, sd: float, rng: np.random.Generator) -> float:
    d = rng.normal(effect, sd, size=(EXPERIMENTS, n))
    return float(np.mean(stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05))


def _unpaired_t_power(n: int, effect: float, sd: float, rng: np.random.Generator) -> float:
    a, b = rng.normal(effect, sd, size=(EXPERIMENTS, n)), rng.normal(0.0, sd, size=(EXPERIMENTS, n))
    return float(np.mean(stats.ttest_ind(a, b, axis=1).pvalue < 0.05))


@pytest.mark.parametrize("effect, sd, expected_n", [(1.0, 1.0, 10), (0.02, 0.04, 34)])
def test_seeds_needed_paired_agrees_with_simulation(effect: float, sd: float, expected_n: int) -> None:
    n = seeds_needed(effect, sd)
    assert n == expected_n
    rng = np.random.default_rng(0)
    simulated = {m: _paired_t_power(m, effect, sd, rng) for m in range(n - 3, n + 4)}
    for m, p in simulated.items():  # the exact power at every n, within Monte Carlo error
        assert abs(p - power_at(m, effect, sd)) < 4 * MC_SD, (m, p)
    assert simulated[n] > 0.8 - 3 * MC_SD
    assert simulated[n - 2] < 0.8 - 3 * MC_SD  # clearly less two seeds short
    n_sim = min(m for m, p in simulated.items() if p >= 0.8 - MC_SD)
    assert abs(n_sim - n) <= 2


def test_seeds_needed_unpaired_agrees_with_simulation() -> None:
    n = seeds_needed(1.0, 1.0, paired=False)
    assert n == 17  # per group
    rng = np.random.default_rng(1)
    for m in (n - 2, n, n + 2):
        assert abs(_unpaired_t_power(m, 1.0, 1.0, rng) - power_at(m, 1.0, 1.0, paired=False)) < 4 * MC_SD
    assert _unpaired_t_power(n, 1.0, 1.0, rng) > 0.8 - 3 * MC_SD
    assert _unpaired_t_power(n - 3, 1.0, 1.0, rng) < 0.8 - 3 * MC_SD


def test_sign_flip_power_close_to_t_power() -> None:
    rng = np.random.default_rng(2)
    d = rng.normal(1.0, 1.0, size=(EXPERIMENTS, 10))
    rejected = np.mean([sign_flip_test(row).p_value < 0.05 for row in d])
    assert abs(rejected - power_at(10, 1.0, 1.0)) < 0.05


def test_normal_approximation_is_one_or_two_below_exact() -> None:
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    for ratio in (0.1, 0.3, 0.5, 1.0):
        approx = math.ceil((z / ratio) ** 2)
        assert 0 <= seeds_needed(ratio, 1.0) - approx <= 2
        assert 0 <= seeds_needed(ratio, 1.0, paired=False) - math.ceil(2 * (z / ratio) ** 2) <= 2


def test_power_at_properties() -> None:
    assert power_at(10, 0.0, 1.0) == 0.05  # no effect: the level
    assert power_at(10, -0.7, 1.0) == power_at(10, 0.7, 1.0)
    assert power_at(10, 0.7, 1.0, two_sided=False) > power_at(10, 0.7, 1.0)
    assert seeds_needed(0.7, 1.0, two_sided=False) < seeds_needed(0.7, 1.0)
    assert power_at(5, 0.1, 0.0) == 1.0
    # scale invariance: only effect / sd matters
    assert power_at(12, 0.02, 0.04) == pytest.approx(power_at(12, 0.5, 1.0), rel=1e-12)
    # far tails stay finite (scipy's nct can return NaN there)
    assert power_at(10_000, 3.0, 1.0) == 1.0


def test_seeds_needed_edge_cases() -> None:
    assert seeds_needed(0.0, 1.0) is None  # no effect to detect
    assert seeds_needed(0.5, 0.0) == 2  # no noise: the minimum n
    assert seeds_needed(0.001, 1.0, max_n=1000) is None  # not practical
    assert seeds_needed(10.0, 1.0) == 3
    assert seeds_needed(-1.0, 1.0) == seeds_needed(1.0, 1.0)


def _tost_by_quadrature(n: int, effect: float, sd: float, margin: float, paired: bool) -> float:
    """TOST power by adaptive quadrature over s (chi distribution), at small n where quad is safe."""
    dof, k = (n - 1, math.sqrt(n)) if paired else (2 * n - 2, math.sqrt(n / 2))
    c = stats.t.ppf(0.95, dof)
    up, lo = k * (margin - effect) / sd, k * (margin + effect) / sd

    def f(u: float) -> float:
        bracket = stats.norm.cdf(up - c * u) - stats.norm.cdf(-lo + c * u)
        return max(0.0, bracket) * stats.chi.pdf(u * math.sqrt(dof), dof) * math.sqrt(dof)

    return integrate.quad(f, 0, (up + lo) / (2 * c), limit=500, epsabs=1e-13)[0]


@pytest.mark.parametrize("n, effect, paired", [(3, 0.0, True), (12, 0.1, True), (40, 0.2, False), (200, 0.3, True)])
def test_tost_power_equals_quadrature(n: int, effect: float, paired: bool) -> None:
    got = margin_power_at(n, effect, 1.0, 0.5, kind="equivalent", paired=paired)
    assert got == pytest.approx(_tost_by_quadrature(n, effect, 1.0, 0.5, paired), abs=1e-9)


def test_margin_seeds_agree_with_simulation() -> None:
    rng = np.random.default_rng(3)
    crit = {n: stats.t.ppf(0.95, n - 1) for n in range(2, 100)}

    def simulate(n: int, effect: float, kind: str) -> float:
        d = rng.normal(effect, 1.0, size=(EXPERIMENTS, n))
        mean, se = d.mean(axis=1), d.std(axis=1, ddof=1) / math.sqrt(n)
        above = mean - crit[n] * se > -0.5  # one-sided test of delta > -margin at 5%
        below = mean + crit[n] * se < 0.5
        return float(np.mean(above & below if kind == "equivalent" else above))

    for kind, effect in (("equivalent", 0.0), ("equivalent", 0.15), ("at_least", -0.1)):
        n = margin_seeds_needed(effect, 1.0, 0.5, kind=kind)
        short = n - max(3, n // 5)  # the power curve flattens as n grows: "clearly less" needs more seeds short
        for m in (short, n):
            assert abs(simulate(m, effect, kind) - margin_power_at(m, effect, 1.0, 0.5, kind=kind)) < 4 * MC_SD
        assert simulate(n, effect, kind) > 0.8 - 3 * MC_SD
        assert simulate(short, effect, kind) < 0.8 - 3 * MC_SD


def test_margin_edge_cases() -> None:
    assert margin_seeds_needed(0.6, 1.0, 0.5, kind="equivalent") is None  # outside the margin
    assert margin_seeds_needed(-0.5, 1.0, 0.5, kind="at_least") is None  # at -margin
    assert margin_seeds_needed(0.5, 1.0, 0.5, kind="at_most") is None
    assert margin_seeds_needed(0.1, 0.0, 0.5, kind="equivalent") == 2
    assert margin_power_at(5, 0.7, 0.0, 0.5, kind="equivalent") == 0.0
    assert margin_seeds_needed(0.2, 1.0, 0.5, kind="at_most") == margin_seeds_needed(-0.2, 1.0, 0.5, kind="at_least")


@pytest.mark.parametrize("method, r", [("kendall", 0.3), ("kendall", 0.5), ("spearman", 0.3), ("spearman", 0.5)])
def test_correlation_runs_needed_agree_with_simulation(method: str, r: float) -> None:
    """Fisher-z approximation vs simulated bivariate normal data at the returned n, tested as scipy
    tests (tolerance 0.05 around 0.8 power: the formula is an approximation)."""
    rng = np.random.default_rng(4)
    n = correlation_runs_needed(r, method=method)
    z_a, z_b = stats.norm.ppf(0.975), stats.norm.ppf(0.8)
    if method == "kendall":
        assert n == math.ceil(4 + 0.437 * ((z_a + z_b) / math.atanh(r)) ** 2)
        rho = math.sin(math.pi * r / 2)  # Pearson rho of a bivariate normal whose Kendall tau is r
    else:
        assert n == math.ceil(3 + ((z_a + z_b * math.sqrt(1 + r * r / 2)) / math.atanh(r)) ** 2)
        rho = 2 * math.sin(math.pi * r / 6)  # ... whose Spearman rho is r
    experiments = 1000 if method == "kendall" else EXPERIMENTS  # scipy's kendalltau loops over rows
    xy = rng.multivariate_normal([0, 0], [[1.0, rho], [rho, 1.0]], size=(experiments, n))
    if method == "kendall":
        p = stats.kendalltau(xy[..., 0], xy[..., 1], axis=1).pvalue
    else:
        rs = rowwise_spearman(xy[..., 0], xy[..., 1])
        p = 2 * stats.t.sf(np.abs(rs) * np.sqrt((n - 2) / (1 - rs ** 2)), n - 2)  # scipy.stats.spearmanr's p
    assert abs(np.mean(p < 0.05) - 0.8) < 0.05


def test_correlation_runs_edge_cases() -> None:
    assert correlation_runs_needed(0.0) is None
    assert correlation_runs_needed(1.0) == 5
    assert correlation_runs_needed(-0.3) == correlation_runs_needed(0.3)
    assert correlation_runs_needed(0.01, max_n=1000) is None


@pytest.mark.parametrize("call, match", [
    (lambda: power_at(1, 0.5, 1.0), "n must be >= 2, got 1"),
    (lambda: power_at(5, 0.5, -1.0), "sd must be >= 0"),
    (lambda: power_at(5, 0.5, 1.0, alpha=1.5), r"alpha must be in \(0, 1\), got 1.5"),
    (lambda: seeds_needed(0.5, 1.0, power=1.0), r"power must be in \(0, 1\), got 1.0"),
    (lambda: seeds_needed(float("nan"), 1.0), "effect must be a finite number"),
    (lambda: seeds_needed(0.5, 1.0, max_n=1), "max_n must be >= 2"),
    (lambda: margin_seeds_needed(0.0, 1.0, 0.0, kind="equivalent"), "margin must be > 0"),
    (lambda: margin_seeds_needed(0.0, 1.0, 0.5, kind="tost"), "kind must be one of"),
    (lambda: correlation_runs_needed(1.5), r"statistic must be in \[-1, 1\]"),
    (lambda: correlation_runs_needed(0.3, method="pearson"), "method must be one of"),
])
def test_argument_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
