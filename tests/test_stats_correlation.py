"""flatlab.stats.correlation: statistics and p-values against scipy, the vectorized bootstrap against
explicit recomputation on every resample, the granulated tau against a hand computation and
flatlab.report.granulated_tau, degenerate inputs and argument errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from flatlab.report import granulated_tau as report_granulated_tau
from flatlab.stats import correlation_with_ci, granulated_tau, granulated_tau_with_ci
from flatlab.stats._common import Strata, bootstrap_indices, resample_counts
from flatlab.stats.correlation import (
    _granulated_plan,
    _psi_of_counts,
    _signs,
    rowwise_spearman,
    weighted_tau_b,
)


def _tied_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=n), 1)  # ties in x
    y = np.round(0.5 * x + rng.normal(size=n), 1)
    return x, y


@pytest.mark.parametrize("method", ["kendall", "spearman"])
def test_statistic_and_p_equal_scipy(method: str) -> None:
    x, y = _tied_data(30, 0)
    res = correlation_with_ci(x, y, method=method, n_resamples=200)
    ref = stats.kendalltau(x, y) if method == "kendall" else stats.spearmanr(x, y)
    assert res.statistic == pytest.approx(ref.statistic, abs=1e-14)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert (res.n, res.method, res.n_strata, res.note) == (30, method, 1, None)


def test_weighted_tau_b_equals_scipy_on_resamples() -> None:
    x, y = _tied_data(15, 1)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 15, size=(50, 15))
    got = weighted_tau_b(resample_counts(idx, 15), _signs(x), _signs(y))
    expected = [stats.kendalltau(x[i], y[i]).statistic for i in idx]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    # a resample with a constant x has no tau
    assert np.isnan(weighted_tau_b(resample_counts(np.full((1, 15), 3), 15), _signs(x), _signs(y)))[0]


def test_rowwise_spearman_equals_scipy() -> None:
    x, y = _tied_data(12, 3)
    idx = np.random.default_rng(4).integers(0, 12, size=(40, 12))
    got = rowwise_spearman(x[idx], y[idx])
    expected = [stats.spearmanr(x[i], y[i]).statistic for i in idx]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["kendall", "spearman"])
def test_interval_equals_percentiles_of_explicit_resamples(method: str) -> None:
    x, y = _tied_data(24, 5)
    strata = ["d0"] * 10 + ["d1"] * 14
    res = correlation_with_ci(x, y, method=method, strata=strata, n_resamples=300, seed=9)
    # the same stratified indices, statistic recomputed by scipy on every resample
    idx = np.concatenate(list(bootstrap_indices(Strata.of(strata, 24), 300, np.random.default_rng(9))))
    f = stats.kendalltau if method == "kendall" else stats.spearmanr
    theta = np.array([f(x[i], y[i]).statistic for i in idx])
    lo, hi = np.quantile(theta[np.isfinite(theta)], [0.025, 0.975])
    assert (res.ci_low, res.ci_high) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert res.n_strata == 2 and res.n_resamples == 300


def test_small_n_has_no_p_or_interval() -> None:
    res = correlation_with_ci([1.0, 2.0, 3.0, 4.0], [0.1, 0.3, 0.2, 0.4])
    assert res.statistic == pytest.approx(stats.kendalltau([1, 2, 3, 4], [0.1, 0.3, 0.2, 0.4]).statistic)
    assert math.isnan(res.p_value) and math.isnan(res.ci_low) and math.isnan(res.ci_high)
    assert "n too small" in res.note and res.small_sample


def test_constant_input_and_nan_rows() -> None:
    res = correlation_with_ci([1.0] * 6, [0.1, 0.3, 0.2, 0.4, 0.5, 0.6])
    assert math.isnan(res.statistic) and math.isnan(res.p_value) and "x is constant" in res.note
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 6.0, 7.0, 3.0])
    y = np.array([0.1, 0.3, 0.2, np.nan, 0.5, 0.4, 0.7, 0.2])
    res = correlation_with_ci(x, y, n_resamples=200, seed=1)
    keep = ~(np.isnan(x) | np.isnan(y))
    ref = correlation_with_ci(x[keep], y[keep], n_resamples=200, seed=1)
    assert (res.statistic, res.ci_low, res.n) == (ref.statistic, ref.ci_low, 6)
    assert "2 run(s) with a missing (NaN) value dropped" in res.note


def test_small_stratum_flagged() -> None:
    x, y = _tied_data(12, 6)
    res = correlation_with_ci(x, y, strata=["a"] * 9 + ["b"] * 3, n_resamples=200)
    assert res.small_sample and "test domain b (3)" in res.note and math.isfinite(res.ci_low)


# --- granulated tau ----------------------------------------------------------------------------

def _hand_example() -> tuple[list[float], list[float], dict[str, list], list[str]]:
    # algorithm, seed, measure m, target t, test domain (the report's hand example)
    rows = [("a", 0, 1.0, 0.9, "d0"), ("b", 0, 2.0, 0.7, "d0"), ("c", 0, 3.0, 0.8, "d0"),
            ("a", 1, 1.5, 0.6, "d0"), ("b", 1, 2.5, 0.65, "d0"), ("c", 1, 0.5, 0.9, "d0"),
            ("a", 0, 1.0, 0.5, "d1"), ("b", 0, 2.0, 0.6, "d1")]
    axes = {"algorithm": [r[0] for r in rows], "bits": [None] * len(rows), "seed": [r[1] for r in rows]}
    return [r[2] for r in rows], [r[3] for r in rows], axes, [r[4] for r in rows]


def test_granulated_tau_hand_computation() -> None:
    """By hand (sign agreement over pairs, no ties):
    algorithm axis: cell (d0, seed 0): ab -, ac -, bc + -> -1/3; cell (d0, seed 1): ab +, ac -, bc - -> -1/3;
                    cell (d1, seed 0): ab + -> +1. psi_algorithm = (-1/3 - 1/3 + 1) / 3 = 1/9
    seed axis: cells (d0, a): -1, (d0, b): -1, (d0, c): -1; d1 has one seed only. psi_seed = -1
    bits never varies. Psi = (1/9 - 1) / 2 = -4/9"""
    x, y, axes, domains = _hand_example()
    g = granulated_tau(x, y, axes, strata=domains)
    assert g.varying_axes == ("algorithm", "seed")
    assert g.tau_of("algorithm").tau == pytest.approx(1 / 9) and g.tau_of("algorithm").cells == 3
    assert g.tau_of("seed").tau == pytest.approx(-1.0) and g.tau_of("seed").cells == 3
    assert g.psi == pytest.approx(-4 / 9) and g.n == 8
    with pytest.raises(KeyError, match="bits"):
        g.tau_of("bits")
    # pooling the domains (no strata) changes the cells, hence the number
    assert granulated_tau(x, y, axes).psi != pytest.approx(-4 / 9)


def _random_rows(seed: int, n: int = 36) -> tuple[np.ndarray, np.ndarray, dict[str, list], list[str]]:
    rng = np.random.default_rng(seed)
    algorithm = list(rng.choice(["erm", "qat", "sam"], n))
    bits = [None if b == 0 else int(b) for b in rng.choice([0, 4, 8], n)]
    seeds = list(rng.integers(0, 3, n))
    domains = list(rng.choice(["0", "15", "30"], n))
    x = np.round(rng.normal(size=n), 1)
    y = np.round(0.3 * x + rng.normal(size=n), 1)
    x[rng.integers(0, n, 3)] = np.nan  # missing measures are dropped, as the report does
    return x, y, {"algorithm": algorithm, "bits": bits, "seed": seeds}, domains


def _report_rows(x, y, axes, domains) -> list[dict]:
    return [{"algorithm": a, "bits": b, "seed": s, "test_domain": d, "m": xi, "t": yi}
            for a, b, s, d, xi, yi in zip(axes["algorithm"], axes["bits"], axes["seed"], domains, x, y)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_granulated_tau_equals_report(seed: int) -> None:
    x, y, axes, domains = _random_rows(seed)
    ours = granulated_tau(x, y, axes, strata=domains)
    ref = report_granulated_tau(_report_rows(x, y, axes, domains), "m", "t")
    assert ours.psi == ref["granulated_tau"]  # identical, not just close
    assert list(ours.varying_axes) == ref["varying_axes"]
    for a in ours.axes:
        assert a.cells == ref["axes"][a.axis]["cells"]
        assert a.tau == ref["axes"][a.axis]["tau"] or (math.isnan(a.tau) and math.isnan(ref["axes"][a.axis]["tau"]))
    x, y, axes, domains = _hand_example()
    assert granulated_tau(x, y, axes, strata=domains).psi == report_granulated_tau(
        _report_rows(x, y, axes, domains), "m", "t")["granulated_tau"]


def test_granulated_bootstrap_counts_equal_report_on_expanded_rows() -> None:
    """Psi of a resample from its counts == the report's Psi on the resampled rows themselves."""
    x, y, axes, domains = _random_rows(3)
    plan, _ = _granulated_plan(x, y, axes, domains)
    keep = ~(np.isnan(x) | np.isnan(y))
    rows = [r for r, k in zip(_report_rows(x, y, axes, domains), keep) if k]
    idx = np.concatenate(list(bootstrap_indices(plan.strata, 40, np.random.default_rng(0))))
    got = _psi_of_counts(plan, resample_counts(idx, plan.strata.n))
    for psi, i in zip(got, idx):
        expected = report_granulated_tau([rows[j] for j in i], "m", "t")["granulated_tau"]
        assert psi == pytest.approx(expected, abs=1e-12) or (math.isnan(psi) and math.isnan(expected))


def test_granulated_tau_with_ci() -> None:
    x, y, axes, domains = _random_rows(4, n=48)
    res = granulated_tau_with_ci(x, y, axes, strata=domains, n_resamples=500, seed=2)
    point = granulated_tau(x, y, axes, strata=domains)
    assert (res.psi, res.axes, res.varying_axes, res.n) == (point.psi, point.axes, point.varying_axes, point.n)
    assert res.ci_low <= res.psi <= res.ci_high and res.n_strata == 3
    assert res == granulated_tau_with_ci(x, y, axes, strata=domains, n_resamples=500, seed=2)
    tiny = granulated_tau_with_ci([1.0, 2.0, 3.0], [0.3, 0.1, 0.2], {"seed": [0, 1, 2]})
    assert math.isnan(tiny.ci_low) and "n too small" in tiny.note and math.isfinite(tiny.psi)


@pytest.mark.parametrize("call, match", [
    (lambda: correlation_with_ci([1, 2, 3], [1, 2]), "x and y must have the same length, got 3 and 2"),
    (lambda: correlation_with_ci([1, 2, 3], [1, 2, 3], method="pearson"), "method must be one of"),
    (lambda: correlation_with_ci([1, 2, 3], [1, 2, 3], confidence=95), r"confidence must be in \(0, 1\), got 95"),
    (lambda: granulated_tau([1, 2], [1, 2], {}), "axes must be a non-empty mapping"),
    (lambda: granulated_tau([1, 2], [1, 2], {"seed": [0]}), r"axes\['seed'\] must have one value per run \(2\)"),
    (lambda: granulated_tau([1, 2], [1, 2], {"bits": [4, float("nan")]}), r"axes\['bits'\] has a NaN value"),
    (lambda: granulated_tau([1, 2], [1, 2], {"seed": [0, 1]}, strata=["a"]), "strata must have one label per value"),
])
def test_argument_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
