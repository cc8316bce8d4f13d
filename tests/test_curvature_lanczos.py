"""Lanczos top-k eigenvalues against the dense spectrum (float64)."""

from __future__ import annotations

import numpy as np
import pytest
from cases import tiny_cnn_bn_case, tiny_mlp_case

from flatlab.curvature import (
    HessianOperator,
    dense_hessian,
    dense_spectrum,
    lanczos_top_eigenvalues,
)
from flatlab.errors import FlatlabError

# Both solvers at tight settings: ARPACK at its float64 default tolerance, the early-stopping
# Lanczos with rtol 1e-9 (the default rtol 1e-3 is tested in test_early_stopping_lanczos_*).
TIGHT = [{"method": "arpack"}, {"method": "lanczos", "rtol": 1e-9}]


@pytest.mark.parametrize("settings", TIGHT, ids=["arpack", "lanczos"])
@pytest.mark.parametrize("make_case", [tiny_mlp_case, tiny_cnn_bn_case])
def test_top5_equals_dense_eigenvalues(make_case, settings):
    case = make_case()
    exact = dense_spectrum(dense_hessian(case.model, case.batches, case.loss_fn)).eigenvalues[:5]
    op = HessianOperator(case.model, case.batches, case.loss_fn)
    result = lanczos_top_eigenvalues(op, k=5, **settings)
    np.testing.assert_allclose(result.eigenvalues, exact, rtol=1e-6)
    assert np.all(np.diff(result.eigenvalues) <= 0)  # largest first
    assert np.all(result.residuals < 1e-6 * abs(exact[0]))
    # the residual is a certificate: each Ritz value lies within it of the spectrum
    for value, residual in zip(result.eigenvalues, result.residuals):
        assert np.min(np.abs(exact - value)) <= residual + 1e-12
    assert result.products == op.num_products > 5


@pytest.mark.parametrize("settings", TIGHT, ids=["arpack", "lanczos"])
def test_largest_algebraic_not_magnitude(settings):
    # A spectrum with a large negative eigenvalue: "LA" must return the positive ones.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    values = np.concatenate([[-50.0], np.linspace(10, 0.1, 59)])
    result = lanczos_top_eigenvalues(q @ np.diag(values) @ q.T, k=3, **settings)
    np.testing.assert_allclose(result.eigenvalues, [10, values[2], values[3]], rtol=1e-8)


@pytest.mark.parametrize("method", ["arpack", "lanczos"])
def test_same_seed_same_numbers_and_k_limits(method):
    case = tiny_mlp_case()
    op = HessianOperator(case.model, case.batches, case.loss_fn)
    a = lanczos_top_eigenvalues(op, k=3, seed=4, method=method)
    b = lanczos_top_eigenvalues(op, k=3, seed=4, method=method)
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    np.testing.assert_array_equal(a.residuals, b.residuals)
    assert a.products == b.products
    full = lanczos_top_eigenvalues(op, k=op.dim, method=method)  # k = n: every eigenvalue
    exact = dense_spectrum(dense_hessian(case.model, case.batches, case.loss_fn)).eigenvalues
    np.testing.assert_allclose(full.eigenvalues, exact, rtol=1e-8, atol=1e-12)
    with pytest.raises(FlatlabError, match="outside"):
        lanczos_top_eigenvalues(op, k=op.dim + 1)
    with pytest.raises(FlatlabError, match="outside"):
        lanczos_top_eigenvalues(op, k=0)


@pytest.mark.parametrize("make_case", [tiny_mlp_case, tiny_cnn_bn_case])
@pytest.mark.parametrize("rtol", [1e-3, 1e-8])
def test_early_stopping_lanczos_top5_meets_its_tolerance(make_case, rtol):
    case = make_case()
    hessian = np.asarray(dense_hessian(case.model, case.batches, case.loss_fn))
    exact = dense_spectrum(hessian).eigenvalues[:5]
    op = HessianOperator(case.model, case.batches, case.loss_fn)
    result = lanczos_top_eigenvalues(op, k=5, method="lanczos", rtol=rtol, seed=1)
    assert result.converged
    assert np.all(np.diff(result.eigenvalues) <= 0)  # largest first
    # the stopping rule bounds each eigenvalue's error by rtol * |theta| (the residual)
    assert np.all(np.abs(result.eigenvalues - exact) <= rtol * np.abs(exact))
    # residuals come from the Lanczos relation, no extra products: they equal ||H u - theta u||
    true = np.linalg.norm(hessian @ result.eigenvectors - result.eigenvectors * result.eigenvalues, axis=0)
    np.testing.assert_allclose(result.residuals, true, rtol=1e-6, atol=1e-12 * abs(exact[0]))
    assert np.all(result.residuals <= rtol * np.abs(result.eigenvalues) * (1 + 1e-6))
    np.testing.assert_allclose(result.eigenvectors.T @ result.eigenvectors, np.eye(5), atol=1e-8)
    # one product per Lanczos step, fewer than the ARPACK default path
    assert result.products == op.num_products
    arpack = lanczos_top_eigenvalues(HessianOperator(case.model, case.batches, case.loss_fn), k=5, method="arpack")
    if rtol >= 1e-3:
        assert result.products < arpack.products


def test_unknown_method_and_bad_rtol():
    matrix = np.diag(np.arange(1.0, 11.0))
    with pytest.raises(FlatlabError, match="unknown eigenvalue method"):
        lanczos_top_eigenvalues(matrix, k=2, method="power")
    with pytest.raises(FlatlabError, match="rtol"):
        lanczos_top_eigenvalues(matrix, k=2, method="lanczos", rtol=0.0)
    with pytest.raises(FlatlabError, match="method='arpack'"):
        lanczos_top_eigenvalues(matrix, k=2, tol=1e-6)  # tol is ARPACK's setting, not the default solver's
    # A Krylov space (dimension 2) smaller than k: Lanczos restarts from fresh orthogonal vectors and
    # returns k exact eigenvalues with ~0 residuals. Single-vector Lanczos does not resolve
    # multiplicities, so which copies of 5 and 1 it returns is not asserted.
    result = lanczos_top_eigenvalues(np.diag([5.0] * 6 + [1.0] * 6), k=4, method="lanczos", rtol=1e-10)
    assert len(result.eigenvalues) == 4 and result.eigenvalues[0] == pytest.approx(5.0)
    assert np.all(np.min(np.abs(result.eigenvalues[:, None] - np.array([5.0, 1.0])), axis=1) < 1e-12)
    assert np.all(result.residuals < 1e-12)


def test_float32_model_keeps_a_float32_basis_and_meets_rtol():
    # A float32 model: the basis (and the returned eigenvectors) stay float32, products go straight
    # into a reused buffer, and the stopping rule still bounds the error against the float64 truth.
    case = tiny_cnn_bn_case()
    exact = dense_spectrum(dense_hessian(case.model, case.batches, case.loss_fn)).eigenvalues[:3]
    model32 = case.model.float()
    batches32 = [(x.float(), y) for x, y in case.batches]
    op = HessianOperator(model32, batches32, case.loss_fn)
    result = lanczos_top_eigenvalues(op, k=3, rtol=1e-4, seed=2)
    assert result.converged and result.eigenvectors.dtype == np.float32
    assert np.all(np.abs(result.eigenvalues - exact) <= 1e-4 * np.abs(exact) + 1e-5 * abs(exact[0]))
    hessian = np.asarray(dense_hessian(model32.double(), case.batches, case.loss_fn))
    vectors = result.eigenvectors.astype(np.float64)
    true = np.linalg.norm(hessian @ vectors - vectors * result.eigenvalues, axis=0)
    np.testing.assert_allclose(result.residuals, true, rtol=1e-2, atol=1e-5 * abs(exact[0]))


def test_thick_restart_under_a_basis_memory_cap_still_meets_rtol():
    # A separated top-3 over a bulk; the basis may hold 12 vectors of 200, so it restarts (keeping
    # the best Ritz vectors) several times and must still deliver the exact top-3 with true residuals.
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    spectrum = np.concatenate([[10.0, 9.0, 8.0], np.linspace(0.0, 7.0, 197)])
    matrix = q @ np.diag(spectrum) @ q.T
    vector_bytes = 200 * 8  # a numpy operator: float64 basis
    free = lanczos_top_eigenvalues(matrix, k=3, rtol=1e-10)
    capped = lanczos_top_eigenvalues(matrix, k=3, rtol=1e-10, max_basis_bytes=12 * vector_bytes)
    assert capped.converged and capped.note == ""
    assert capped.products > 8  # more products than the 8-vector working basis: it restarted
    for result in (free, capped):
        np.testing.assert_allclose(result.eigenvalues, [10.0, 9.0, 8.0], rtol=1e-9)
        true = np.linalg.norm(matrix @ result.eigenvectors - result.eigenvectors * result.eigenvalues, axis=0)
        np.testing.assert_allclose(result.residuals, true, rtol=1e-5, atol=1e-12)
        assert np.all(result.residuals <= 1e-10 * np.abs(result.eigenvalues) * (1 + 1e-6))
        np.testing.assert_allclose(result.eigenvectors.T @ result.eigenvectors, np.eye(3), atol=1e-8)


def test_basis_memory_cap_and_step_limit_are_reported():
    # 200 closely spaced eigenvalues and rtol 1e-12: 40 products are not enough; with a 12-vector
    # cap the note says it restarted, and every residual still bounds its Ritz value's error.
    matrix = np.diag(np.linspace(1.0, 1.1, 200))
    vector_bytes = 200 * 8
    result = lanczos_top_eigenvalues(matrix, k=3, rtol=1e-12, maxiter=40, max_basis_bytes=12 * vector_bytes)
    assert not result.converged and result.products == 40
    assert "thick restarts" in result.note and "method='arpack'" in result.note
    exact = np.linspace(1.0, 1.1, 200)
    for value, residual in zip(result.eigenvalues, result.residuals):
        assert np.min(np.abs(exact - value)) <= residual + 1e-12
    with pytest.raises(FlatlabError, match="max_basis_bytes"):
        lanczos_top_eigenvalues(matrix, k=3, max_basis_bytes=6 * vector_bytes)
    assert lanczos_top_eigenvalues(matrix, k=3, rtol=1e-2).note == ""
