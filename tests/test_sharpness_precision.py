"""The adaptive sigma search's precision claims against truth.

* On a linear classifier the expected drop under Gaussian weight noise has a closed form, so
  the true sigma* is known: the reported 95% interval must cover it at about the nominal rate
  (plain and magnitude-aware), while flatlab 0.2's fixed-draw search at 2 draws misses its own
  claim (true drop within the tolerance) most of the time.
* On the test suite's CNN and MLP, an independent re-measurement (fresh full-pass draws from
  another stream) at the reported sigma must land within the reported interval, at the default
  settings, and the interval must be narrow.
* Exact contracts: the slice estimator is unbiased (a full cycle of slices is the full-data
  drop), the interval inverts a power law exactly, the plain and magnitude-aware searches draw
  independent noise, the cap stops a probe with a note, and the report reads 1/sigma^2 with a
  standard error.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm
from test_sharpness_bounds import linear_problem

from flatlab.sharpness import fold_batchnorm, magnitude_bounds, pacbayes_bounds, sigma_search
from flatlab.sharpness.perturb import NoiseBank, count_correct, noise_seed, seeded_normal
from flatlab.sharpness.sigma_search import (
    MAGNITUDE_STREAM,
    PLAIN_STREAM,
    Z_CONFIDENCE,
    DrawTest,
    radius_interval,
)

TARGET, TOL = 0.1, 0.01


def closed_form_drop(model, x: torch.Tensor, y: torch.Tensor, eps: float | None):
    """sigma -> a(w) - E a(w + u) for the two-logit linear model (0, w.x).

    With u ~ N(0, diag(s_i^2)), w.x + u.x ~ N(w.x, sum_i x_i^2 s_i^2), so example i stays correct
    with probability Phi(y_i w.x_i / sqrt(sum_j x_ij^2 s_j^2)) (y in {-1, +1}); s_j = sigma
    (plain) or sqrt(sigma^2 w_j^2 + eps^2) (magnitude-aware).
    """
    w = model.weight.detach().reshape(-1).numpy()
    xs, ys = x.numpy(), 2 * y.numpy() - 1
    margins = ys * (xs @ w)
    base = float(np.mean(margins > 0))

    def drop(sigma: float) -> float:
        if eps is None:
            scale = sigma * np.linalg.norm(xs, axis=1)
        else:
            scale = np.sqrt((xs ** 2) @ (sigma ** 2 * w ** 2 + eps ** 2))
        return base - float(np.mean(norm.cdf(margins / scale)))

    return drop


def test_interval_covers_the_true_sigma_at_the_nominal_rate():
    """30 searches each for sigma and sigma' (30 problems) against the closed form.

    A 95% interval covers the truth at least 52 times in 60 with probability 0.997; an 80% one
    only with probability 0.13. (Measured over 300 problems each: 284 and 282 of 300.) The
    fixed-draw search at K = 2 claims |D(sigma) - 0.1| < 0.01 for its sigma; against the truth
    that holds in at most half of the same searches (measured: 79 and 65 of 300; at K = 10, 172
    and 112 of 300; the adaptive search: 265 and 257 of 300, though its claim is the interval).
    """
    covered, old_within, half_widths = 0, 0, []
    for eps in (None, 1e-3):
        for seed in range(30):
            model, _, x, y, batches = linear_problem(seed=seed)
            drop = closed_form_drop(model, x, y, eps)
            truth = brentq(lambda s, f=drop: f(s) - TARGET, 1e-4, 50.0)
            res = sigma_search(model, batches, seed=seed, magnitude_eps=eps)
            assert res.adaptive and res.converged and res.drop_stderr <= TOL / 2
            covered += res.radius_ci_low <= truth <= res.radius_ci_high
            half_widths.append((res.radius_ci_high - res.radius_ci_low) / (2 * res.radius))
            old = sigma_search(model, batches, seed=seed, magnitude_eps=eps, fixed_draws=True, mc_samples=2)
            old_within += abs(drop(old.radius) - TARGET) < TOL
    assert covered >= 52, f"the 95% interval covered the true sigma in only {covered} of 60 searches"
    assert np.median(half_widths) < 0.12
    assert old_within <= 30


def _folded_source(run: Path):
    """The model and training batches exactly as the ``pacbayes`` measure sees them."""
    from flatlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "model.pt")
    torch.manual_seed(0)
    model, _ = fold_batchnorm(ckpt.build_model(torch.device("cpu"), effective=True))
    batches = ckpt.splits().split_batches("source", 256, None, 0, torch.device("cpu"))
    return model, batches


@torch.no_grad()
def _independent_drop(model, batches, sigma: float, eps: float | None, draws: int) -> tuple[float, float]:
    """Mean training-accuracy drop at sigma over fresh full-pass draws of an unrelated stream."""
    correct0, n = count_correct(model, batches)
    params = list(model.parameters())
    base = [p.detach().clone() for p in params]
    drops = []
    for k in range(draws):
        for p, w, z in zip(params, base, seeded_normal(base, noise_seed(12345, "test-independent", k))):
            p.copy_(w + (sigma if eps is None else torch.sqrt(sigma ** 2 * w * w + eps ** 2)) * z)
        drops.append((correct0 - count_correct(model, batches)[0]) / n)
    for p, w in zip(params, base):
        p.copy_(w)
    arr = np.asarray(drops)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(draws))


@pytest.mark.parametrize("fixture, eps, draws", [("erm_run", None, 200), ("mlp_run", None, 1000),
                                                 ("mlp_run", 1e-3, 1000)])
def test_independent_remeasurement_lands_in_the_interval(request, fixture, eps, draws):
    """The issue's check, at the default settings: fresh draws at the reported sigma imply a
    sigma, sigma (0.1 / D_ind)^(1/p), inside the reported 95% interval; the interval's relative
    half-width is below 10%; the re-measurement is at least as precise as the search (so the
    check is not vacuous). (A 95% interval misses its target 5% of the time: on other draws a
    single miss here is possible; the coverage test above is the statistical check.)"""
    run = request.getfixturevalue(fixture)
    model, batches = _folded_source(run)
    bounds = pacbayes_bounds if eps is None else magnitude_bounds
    out = bounds(model, batches)
    assert out["converged"] and not out["fixed_draws"] and "note" not in out
    assert out["drop_stderr"] <= TOL / 2 + 1e-12
    d_ind, se_ind = _independent_drop(model, batches, out["sigma"], eps, draws)
    assert se_ind <= out["drop_stderr"] * 1.05
    implied = out["sigma"] * (TARGET / d_ind) ** (1.0 / out["drop_slope"])
    assert out["sigma_ci_low"] <= implied <= out["sigma_ci_high"], (d_ind, se_ind, out)
    assert (out["sigma_ci_high"] - out["sigma_ci_low"]) / (2 * out["sigma"]) < 0.10
    assert out["inv_sigma_sq_ci_low"] <= out["inv_sigma_sq"] <= out["inv_sigma_sq_ci_high"]
    # The interval's quantile: Student's t with draws - 1 degrees of freedom, about 1.97 here.
    assert Z_CONFIDENCE < out["ci_quantile"] < 2.0
    assert out["inv_sigma_sq_stderr"] == pytest.approx(
        (out["inv_sigma_sq_ci_high"] - out["inv_sigma_sq_ci_low"]) / (2 * out["ci_quantile"]))


def test_a_full_cycle_of_slices_is_the_full_data_drop():
    """Y_u = (J / n) x (slice total): averaged over the J slices with one fixed noise, exactly
    the drop over all the data (the estimator is unbiased over the slice)."""
    model, _, _, _, batches = linear_problem(n=600, seed=3)
    test = DrawTest(model, batches, target_drop=TARGET, tolerance=TOL, target_stderr=TOL / 2, min_draws=10,
                    max_draws=100, draw_examples=64, seed=0, stream="t")
    assert test.count == 600 // 64 and sum(test.slice_sizes) == 600
    params = list(model.parameters())
    base = [p.detach().clone() for p in params]
    z = seeded_normal(base, 7)

    def apply(_u: int) -> None:
        with torch.no_grad():
            for p, w, zz in zip(params, base, z):
                p.copy_(w + 0.3 * zz)

    probe = test.extend(test.start(0.3), apply, test.count)
    apply(0)
    correct, n = count_correct(model, batches)
    with torch.no_grad():
        for p, w in zip(params, base):
            p.copy_(w)
    assert probe.estimate == pytest.approx((test.base_correct - correct) / n, abs=1e-12)


def test_interval_inverts_a_power_law_exactly():
    r, d, se, p = 0.05, 0.093, 0.004, 2.3
    low, high = radius_interval(r, d, se, p, TARGET)
    curve = lambda s: d * (s / r) ** p  # noqa: E731
    assert curve(low) == pytest.approx(TARGET - Z_CONFIDENCE * se, rel=1e-12)
    assert curve(high) == pytest.approx(TARGET + Z_CONFIDENCE * se, rel=1e-12)
    assert low <= r <= high  # |d - target| = 0.007 <= 1.96 x 0.004
    assert radius_interval(r, 0.08, se, p, TARGET)[0] > r  # the target lies above the drop's interval
    assert all(math.isnan(v) for v in radius_interval(r, d, se, -1.0, TARGET))


def test_plain_and_magnitude_searches_draw_independent_noise():
    like = [torch.zeros(2000)]
    plain = NoiseBank(like, 3, 0, PLAIN_STREAM).draw(0)[0]
    mag = NoiseBank(like, 3, 0, MAGNITUDE_STREAM).draw(0)[0]
    assert abs(float(torch.corrcoef(torch.stack([plain, mag]))[0, 1])) < 0.1
    model, _, _, _, batches = linear_problem(seed=1)
    default = sigma_search(model, batches, seed=0, magnitude_eps=1e-3)
    assert default.as_dict() == sigma_search(model, batches, seed=0, magnitude_eps=1e-3,
                                             stream=MAGNITUDE_STREAM).as_dict()
    assert default.radius != sigma_search(model, batches, seed=0, magnitude_eps=1e-3, stream=PLAIN_STREAM).radius


def test_the_cap_stops_the_search_with_a_note():
    model, init, _, _, batches = linear_problem(seed=2)
    out = pacbayes_bounds(model, batches, init, max_samples=12)
    assert out["capped"] and out["draws_at_sigma"] <= 12
    assert out["drop_stderr"] > TOL / 2
    assert "cap of 12 noise draws" in out["note"] and "--max-mc-samples" in out["note"]
    # The interval stays honest: wider than at the default cap.
    full = pacbayes_bounds(model, batches, init)
    assert "note" not in full
    assert out["sigma_ci_high"] - out["sigma_ci_low"] > full["sigma_ci_high"] - full["sigma_ci_low"]


def test_report_reads_inv_sigma_sq_with_its_stderr(mlp_run):
    from flatlab.measures import MagnitudeConfig, MeasurementSettings, PacBayesConfig
    from flatlab.pipeline import measure_checkpoint

    got = measure_checkpoint(mlp_run, [PacBayesConfig(), MagnitudeConfig()],
                             settings=MeasurementSettings(device="cpu", max_samples=300))
    estimates = got.estimates()
    for column, name in (("pacbayes_inv_sigma_sq", "pacbayes"), ("magnitude_inv_sigma_sq", "magnitude")):
        payload = got[name].payload
        assert estimates[column].value == pytest.approx(payload["inv_sigma_sq"])
        assert estimates[column].stderr == pytest.approx(payload["inv_sigma_sq_stderr"])
        assert 0 < estimates[column].stderr < payload["inv_sigma_sq"]
    assert got["pacbayes"].attrs["sigma_ci_low"] < got["pacbayes"].attrs["sigma"] < got["pacbayes"].attrs["sigma_ci_high"]


def test_bad_noise_settings_name_the_setting():
    from flatlab.measures import ConfigError, PacBayesConfig

    with pytest.raises(ConfigError, match="max_mc_samples must be at least max"):
        PacBayesConfig(max_mc_samples=5)
    with pytest.raises(ConfigError, match="draw_examples must be at least 0"):
        PacBayesConfig(draw_examples=-1)
    assert PacBayesConfig(max_mc_samples=5, mc_samples=5, fixed_draws=True).max_mc_samples == 5
