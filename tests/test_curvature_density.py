"""Stochastic Lanczos quadrature and per-layer curvature against exact answers."""

from __future__ import annotations

import numpy as np
import pytest
from cases import tiny_cnn_bn_case, tiny_mlp_case

from flatlab.curvature import (
    HessianOperator,
    dense_hessian,
    dense_spectrum,
    lanczos_tridiagonal,
    per_layer_curvature,
    quadrature_rule,
    slq_density,
)
from flatlab.curvature.density import gaussian_broadening


@pytest.mark.parametrize("m", [1, 3, 6])
def test_quadrature_reproduces_moments_up_to_degree_2m_minus_1(m):
    case = tiny_mlp_case()
    op = HessianOperator(case.model, case.batches, case.loss_fn)
    dense = dense_hessian(case.model, case.batches, case.loss_fn).numpy()
    v = np.random.default_rng(0).standard_normal(op.dim)
    v /= np.linalg.norm(v)
    rule = quadrature_rule(lanczos_tridiagonal(op, v, m))
    assert rule.weights.sum() == pytest.approx(1.0, rel=1e-12)
    power = v.copy()
    for k in range(2 * m):
        exact = v @ power
        assert np.sum(rule.weights * rule.nodes**k) == pytest.approx(exact, rel=1e-8, abs=1e-14)
        power = dense @ power
    # degree 2m is generally not reproduced (the rule is Gaussian, not exact beyond 2m - 1)
    assert abs(np.sum(rule.weights * rule.nodes ** (2 * m)) - v @ power) > 1e-10 * abs(v @ power)


def test_nodes_are_the_eigenvalues_when_m_equals_n():
    case = tiny_cnn_bn_case()
    op = HessianOperator(case.model, case.batches, case.loss_fn)
    exact = np.sort(dense_spectrum(dense_hessian(case.model, case.batches, case.loss_fn)).eigenvalues)
    v = np.random.default_rng(1).standard_normal(op.dim)
    rule = quadrature_rule(lanczos_tridiagonal(op, v, op.dim))
    np.testing.assert_allclose(np.sort(rule.nodes), exact, rtol=1e-7, atol=1e-10)


def test_density_integrates_to_one_and_is_repeatable():
    case = tiny_mlp_case()
    op = HessianOperator(case.model, case.batches, case.loss_fn)
    a = slq_density(op, num_steps=10, num_runs=2, seed=3)
    b = slq_density(op, num_steps=10, num_runs=2, seed=3)
    np.testing.assert_array_equal(a.density, b.density)
    assert np.trapezoid(a.density, a.grid) == pytest.approx(1.0, abs=1e-12)
    assert np.all(a.density >= 0)
    assert a.products == 20
    # mean of the density = trace / n estimate; with m = n it is the exact mean eigenvalue
    full = slq_density(op, num_steps=op.dim, num_runs=1, seed=0, sigma=1e-3)
    exact_mean = np.trace(dense_hessian(case.model, case.batches, case.loss_fn).numpy()) / op.dim
    v_mean = float(np.sum(full.nodes[0] * full.weights[0]))
    grid_mean = float(np.trapezoid(full.grid * full.density, full.grid))
    assert grid_mean == pytest.approx(v_mean, rel=1e-6, abs=1e-9)
    assert abs(v_mean - exact_mean) < 5 * np.std(dense_spectrum(
        dense_hessian(case.model, case.batches, case.loss_fn)).eigenvalues) / np.sqrt(op.dim) + 1e-12


def test_broadening_of_a_point_mass_is_a_unit_gaussian():
    grid, density, sigma = gaussian_broadening([np.array([2.0])], [np.array([1.0])], sigma=0.5, num_points=2001)
    peak = density.max()
    assert peak == pytest.approx(1 / (np.sqrt(2 * np.pi) * 0.5), rel=1e-4)
    assert grid[np.argmax(density)] == pytest.approx(2.0, abs=1e-2)


def test_per_layer_blocks_match_dense_diagonal_blocks():
    case = tiny_cnn_bn_case()
    op = HessianOperator(case.model, case.batches, case.loss_fn)
    dense = dense_hessian(case.model, case.batches, case.loss_fn).numpy()
    layers = per_layer_curvature(op, trace_products=300)
    assert [layer.layer for layer in layers] == ["0", "1", "5"]
    start = 0
    for layer in layers:
        block = dense[start:start + layer.num_params, start:start + layer.num_params]
        start += layer.num_params
        assert layer.top_eigenvalue == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=1e-6)
        # tiny blocks: Hutch++ with >= 3n products is exact
        assert layer.trace == pytest.approx(np.trace(block), rel=1e-9, abs=1e-12)
    assert start == op.dim
