"""Hutchinson and Hutch++ trace estimates against exact traces."""

from __future__ import annotations

import numpy as np
import pytest
from cases import tiny_cnn_bn_case, tiny_mlp_case

from flatlab.curvature import (
    HessianOperator,
    dense_hessian,
    estimate_trace,
    hutchinson_trace,
    hutchpp_trace,
)
from flatlab.errors import FlatlabError


@pytest.mark.parametrize("make_case", [tiny_mlp_case, tiny_cnn_bn_case])
def test_hutchinson_within_three_standard_errors(make_case):
    case = make_case()
    exact = float(np.trace(dense_hessian(case.model, case.batches, case.loss_fn).numpy()))
    op = HessianOperator(case.model, case.batches, case.loss_fn)
    est = hutchinson_trace(op, num_products=60, seed=0)
    assert est.products == 60
    assert est.stderr > 0
    assert abs(est.trace - exact) <= 3 * est.stderr
    again = hutchinson_trace(op, num_products=60, seed=0)
    assert (again.trace, again.stderr) == (est.trace, est.stderr)


def _decaying_matrix(n: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q @ np.diag(1.0 / np.arange(1, n + 1) ** 2) @ q.T


def test_hutchpp_lower_mse_than_hutchinson_at_equal_products():
    matrix = _decaying_matrix()
    exact = np.trace(matrix)
    seeds = range(150)
    mse_h = np.mean([(hutchinson_trace(matrix, 30, seed=s).trace - exact) ** 2 for s in seeds])
    mse_pp = np.mean([(hutchpp_trace(matrix, 30, seed=s).trace - exact) ** 2 for s in seeds])
    assert mse_pp < 0.2 * mse_h


def test_hutchpp_standard_error_covers_the_truth():
    matrix = _decaying_matrix(seed=1)
    exact = np.trace(matrix)
    covered = [abs(e.trace - exact) <= 3 * e.stderr for e in (hutchpp_trace(matrix, 60, seed=s) for s in range(100))]
    assert np.mean(covered) >= 0.95


def test_hutchpp_exact_when_sketch_spans_the_space():
    matrix = _decaying_matrix(n=10)
    est = hutchpp_trace(matrix, num_products=33)
    assert est.trace == pytest.approx(np.trace(matrix), rel=1e-12)
    assert est.stderr == pytest.approx(0.0, abs=1e-12)


def test_bad_trace_arguments():
    matrix = np.eye(4)
    with pytest.raises(FlatlabError):
        hutchinson_trace(matrix, 0)
    with pytest.raises(FlatlabError):
        hutchpp_trace(matrix, 2)
    with pytest.raises(FlatlabError, match="unknown trace method"):
        estimate_trace(matrix, 9, method="exact")
