"""Per-domain curvature and eigenspace overlap against dense float64 Hessians and closed forms."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from cases import disjoint_domains_case, multi_domain_mlp_case
from scipy.sparse.linalg import aslinearoperator

from flatlab.curvature.dense import dense_hessian, dense_spectrum
from flatlab.curvature.per_domain import (
    PerDomainCurvatureConfig,
    domain_batches,
    orthonormal_basis,
    overlap_matrix,
    per_domain_curvature,
    subspace_overlap,
)
from flatlab.errors import FlatlabError
from flatlab.plots.overlap import overlap_heatmap

# Tiny models: one thread beats two (see the fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


EXACT = {"rtol": 1e-10}  # float64 models: converge to rounding


def _dense(case, name):
    return dense_spectrum(dense_hessian(case.model, case.domains[name], case.loss_fn))


K = 3


@pytest.fixture(scope="module")
def mlp():
    """The three-domain tiny MLP, its per-domain result (k = 3, 30 trace products) and each
    domain's dense float64 spectrum, computed once for the tests below."""
    case = multi_domain_mlp_case(seed=0)
    result = per_domain_curvature(case.model, case.domains, loss_fn=case.loss_fn,
                                  config=PerDomainCurvatureConfig(k=K, trace_products=30, **EXACT))
    return case, result, {name: _dense(case, name) for name in case.domains}


def test_per_domain_eigenvalues_and_traces_equal_each_domains_dense_hessian(mlp) -> None:
    case, result, dense = mlp
    n = sum(p.numel() for p in case.model.parameters())
    assert result.domains == ("a", "b", "c") and result.num_params == n
    assert result.eigenvalues.shape == (3, K) and all(result.converged) and not result.notes
    for row, name in enumerate(result.domains):
        spectrum = dense[name]
        np.testing.assert_allclose(result.eigenvalues[row], spectrum.eigenvalues[:K], rtol=1e-9)
        assert np.all(result.residuals[row] < 1e-8 * abs(spectrum.eigenvalues[0]))
        # Hutch++ from 30 products: an estimate whose standard error covers its error.
        true = np.trace(spectrum.hessian)
        assert 0 < result.trace_stderrs[row] and abs(result.traces[row] - true) < 4 * result.trace_stderrs[row]
        assert result.trace_products[row] == 30 and result.num_samples[row] == 30
        assert result.eigen_products[row] <= n + 1
    # The domains' Hessians really differ (the test would not see a mixed-up domain otherwise).
    assert np.ptp(result.eigenvalues[:, 0]) > 0.1 * result.eigenvalues[:, 0].max()


def test_overlap_equals_the_dense_eigenvectors_overlap_and_is_symmetric_with_unit_diagonal(mlp) -> None:
    _, result, dense = mlp
    for name, spectrum in dense.items():
        gap = spectrum.eigenvalues[K - 1] - spectrum.eigenvalues[K]
        assert gap > 1e-3 * abs(spectrum.eigenvalues[0]), name  # the top-k subspace is well defined
    for i, a in enumerate(result.domains):
        for j, b in enumerate(result.domains):
            ua, ub = dense[a].eigenvectors[:, :K], dense[b].eigenvectors[:, :K]
            truth = np.linalg.norm(ua.T @ ub, "fro") ** 2 / K
            assert result.overlap[i, j] == pytest.approx(truth, abs=1e-8)
    np.testing.assert_allclose(result.overlap, result.overlap.T, rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.diag(result.overlap), 1.0, rtol=0, atol=1e-13)
    assert np.all((result.overlap >= 0) & (result.overlap <= 1 + 1e-13))
    assert result.overlap_between("a", "b") == result.overlap[0, 1] < 0.99  # different domains, different subspaces
    assert result.eigenvectors is None  # not kept by default


def test_two_copies_of_one_domain_overlap_one() -> None:
    case = multi_domain_mlp_case(seed=1)
    batches = case.domains["a"]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    # The same samples, shuffled and batched differently: the same Hessian up to rounding.
    copy_batches = [(x[order][i:i + 7], y[order][i:i + 7]) for i in range(0, len(y), 7)]
    result = per_domain_curvature(case.model, {"a": batches, "a-copy": copy_batches}, loss_fn=case.loss_fn,
                                  config=PerDomainCurvatureConfig(k=4, trace_products=0, **EXACT))
    assert result.overlap[0, 1] == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(result.eigenvalues[0], result.eigenvalues[1], rtol=1e-10)


def test_domains_on_disjoint_parameters_overlap_zero_with_the_closed_form_eigenvalues() -> None:
    case = disjoint_domains_case(seed=0)
    k = 2
    result = per_domain_curvature(case.model, case.domains, loss_fn=case.loss_fn,
                                  config=PerDomainCurvatureConfig(k=k, trace_products=18, keep_eigenvectors=True, **EXACT))
    assert result.overlap[0, 1] < 1e-20 and result.overlap[1, 0] < 1e-20
    np.testing.assert_allclose(np.diag(result.overlap), 1.0, atol=1e-13)
    for row, (name, batches) in enumerate(case.domains.items()):
        x = torch.cat([b[0] for b in batches]).numpy()
        hessian = 2 * x.T @ x / len(x)  # MSE of w^T x, one output: H = 2 X^T X / N
        truth = np.sort(np.linalg.eigvalsh(hessian))[::-1]
        np.testing.assert_allclose(result.eigenvalues[row], truth[:k], rtol=1e-10)
        assert result.traces[row] == pytest.approx(np.trace(hessian), rel=1e-10)
        support = np.abs(x).sum(0) > 0
        basis = result.eigenvectors[name]
        assert basis.shape == (6, k) and np.abs(basis[~support]).max() < 1e-10  # on its own block only


def test_float32_eigenvectors_are_reorthonormalized_before_the_overlap(mlp) -> None:
    case, reference, _ = mlp
    model32 = copy.deepcopy(case.model).float()
    domains32 = {name: [(x.float(), y) for x, y in batches] for name, batches in case.domains.items()}
    config = PerDomainCurvatureConfig(k=K, rtol=1e-5, trace_products=0, keep_eigenvectors=True)
    result = per_domain_curvature(model32, domains32, loss_fn=case.loss_fn, config=config)
    for basis in result.eigenvectors.values():
        assert basis.dtype == np.float32
        np.testing.assert_allclose(basis.astype(np.float64).T @ basis.astype(np.float64), np.eye(K), atol=1e-6)
    np.testing.assert_allclose(np.diag(result.overlap), 1.0, atol=1e-6)
    np.testing.assert_allclose(result.overlap, reference.overlap, atol=1e-3)
    np.testing.assert_allclose(result.eigenvalues, reference.eigenvalues, rtol=1e-4)
    assert np.all(np.isnan(result.traces)) and np.all(result.trace_products == 0)


def test_an_operator_factory_replaces_the_hessian() -> None:
    # Known operators per domain: top-2 spans {e0, e1} and {e0, e2}: one shared direction of two.
    matrices = [np.diag([8.0, 7.0, 1.0, 0.5, 0.2, 0.1, 0.0, 0.0]), np.diag([8.0, 1.0, 7.0, 0.5, 0.2, 0.1, 0.0, 0.0])]
    domains = {name: [(torch.tensor([float(i)]), torch.tensor([0]))] for i, name in enumerate(("p", "q"))}
    seen = []

    def operator_fn(model, batches):
        seen.append(model)
        return aslinearoperator(matrices[int(batches[0][0])])

    model = torch.nn.Linear(1, 1)
    result = per_domain_curvature(model, domains, operator_fn=operator_fn,
                                  config=PerDomainCurvatureConfig(k=2, trace_products=24, **EXACT))
    assert seen == [model, model]
    assert result.overlap[0, 1] == pytest.approx(0.5, abs=1e-12)
    np.testing.assert_allclose(result.eigenvalues, [[8, 7], [8, 7]], rtol=1e-12)
    np.testing.assert_allclose(result.traces, [16.8, 16.8], rtol=1e-12)
    # A dense Hessian as the operator gives the default's numbers.
    case = multi_domain_mlp_case(seed=2)
    dense_fn = lambda m, b: aslinearoperator(dense_hessian(m, b, case.loss_fn).numpy())  # noqa: E731
    config = PerDomainCurvatureConfig(k=2, trace_products=0, **EXACT)
    via_dense = per_domain_curvature(case.model, case.domains, operator_fn=dense_fn, config=config)
    default = per_domain_curvature(case.model, case.domains, loss_fn=case.loss_fn, config=config)
    np.testing.assert_allclose(via_dense.eigenvalues, default.eigenvalues, rtol=1e-10)
    np.testing.assert_allclose(via_dense.overlap, default.overlap, atol=1e-9)


def test_subspace_overlap_is_the_mean_squared_cosine_of_the_principal_angles() -> None:
    theta = 0.3
    e = np.eye(5)
    u = e[:, [0, 1]]
    v = np.column_stack([np.cos(theta) * e[:, 0] + np.sin(theta) * e[:, 3], e[:, 1]])
    assert subspace_overlap(u, v) == pytest.approx((np.cos(theta) ** 2 + 1) / 2, rel=1e-14)
    # Non-orthonormal columns of the same span: QR gives the same subspace.
    q, conditioning = orthonormal_basis(v @ np.array([[2.0, 1.0], [0.0, 3.0]]))
    assert subspace_overlap(u, q) == pytest.approx(subspace_overlap(u, v), rel=1e-13) and conditioning > 0.1
    _, dependent = orthonormal_basis(np.column_stack([e[:, 0], e[:, 0] + 1e-9 * e[:, 1]]))
    assert dependent < 1e-6
    np.testing.assert_allclose(overlap_matrix([u, v, u]), [[1, 0.9563, 1], [0.9563, 1, 0.9563], [1, 0.9563, 1]],
                               atol=1e-4)
    with pytest.raises(FlatlabError, match="one shape"):
        subspace_overlap(u, e[:, :3])


def test_errors_name_the_parameter_in_the_callers_words() -> None:
    for kwargs, message in [({"k": 0}, "k must be a positive integer"), ({"rtol": 0.0}, "rtol must be positive"),
                            ({"trace_products": 2}, "trace_products must be 0 .* at least 3 for hutch\\+\\+"),
                            ({"trace_method": "exact"}, "trace_method must be one of"),
                            ({"params": "biases"}, "params must be one of"),
                            ({"k": 5, "max_steps": 3}, "max_steps must be an integer of at least k")]:
        with pytest.raises(FlatlabError, match=message):
            PerDomainCurvatureConfig(**kwargs)
    assert PerDomainCurvatureConfig(params=["0.weight"]).to_dict()["params"] == ["0.weight"]
    case = disjoint_domains_case()
    with pytest.raises(FlatlabError, match=r"k \(7\) exceeds the 6 parameters"):
        per_domain_curvature(case.model, case.domains, loss_fn=case.loss_fn, config=PerDomainCurvatureConfig(k=7))
    with pytest.raises(FlatlabError, match="domain 'second' has no samples"):
        per_domain_curvature(case.model, {"first": case.domains["first"], "second": []}, loss_fn=case.loss_fn)
    with pytest.raises(FlatlabError, match="domains is empty"):
        per_domain_curvature(case.model, {})
    sizes = iter([4, 5])
    with pytest.raises(FlatlabError, match="domain 'second' has size 5"):
        per_domain_curvature(case.model, case.domains, config=PerDomainCurvatureConfig(k=1),
                             operator_fn=lambda m, b: aslinearoperator(np.eye(next(sizes))))


def test_domain_batches_follow_the_named_splits() -> None:
    from flatlab.data import DomainSplits, RotatedDigits

    splits = DomainSplits(RotatedDigits(resolution=8), test_envs=[0], trial_seed=0)
    batches = domain_batches(splits, batch_size=64)
    assert list(batches) == ["15", "30", "45", "60", "75", "0"]  # source domains first, then the target
    for env, name in zip([1, 2, 3, 4, 5], ["15", "30", "45", "60", "75"]):
        y = torch.cat([b[1] for b in batches[name]])
        torch.testing.assert_close(y, splits.dataset.labels(env)[torch.as_tensor(splits.in_idx[env])])
        assert max(len(b[1]) for b in batches[name]) == 64
    assert sum(len(b[1]) for b in batches["0"]) == splits.dataset.domain_size(0)
    held_out = domain_batches(splits, source_part="out", include_target=False, max_samples=20, seed=3)
    assert list(held_out) == ["15", "30", "45", "60", "75"]
    again = domain_batches(splits, source_part="out", include_target=False, max_samples=20, seed=3)
    for name in held_out:
        x = torch.cat([b[0] for b in held_out[name]])
        assert len(x) == 20 and torch.equal(x, torch.cat([b[0] for b in again[name]]))
    with pytest.raises(FlatlabError, match="source_part must be 'in' or 'out'"):
        domain_batches(splits, source_part="test")


def test_overlap_heatmap_draws_the_matrix_with_annotated_cells_and_labelled_axes() -> None:
    overlap = np.array([[1.0, 0.25, 0.5], [0.25, 1.0, 0.125], [0.5, 0.125, 1.0]])
    fig = overlap_heatmap(overlap, ["15", "30", "0"], k=5, targets=["0"], title="top-5 Hessian eigenspaces")
    ax = fig.axes[0]
    image = ax.get_images()[0]
    np.testing.assert_array_equal(image.get_array(), overlap)
    assert image.get_clim() == (0.0, 1.0) and image.get_cmap().name == "viridis"
    cells = {t.get_gid(): t.get_text() for t in ax.texts}
    assert cells["cell-0-1"] == "0.25" and cells["cell-2-1"] == "0.12" and cells["cell-1-1"] == "1.00"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["15", "30", "0 (target)"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["15", "30", "0 (target)"]
    assert ax.get_xlabel() == "domain b" and ax.get_ylabel() == "domain a"
    assert "top-5 eigenspace overlap" in fig.axes[1].get_ylabel()
    with pytest.raises(FlatlabError, match="square"):
        overlap_heatmap(np.ones((2, 3)), ["a", "b"])
    with pytest.raises(FlatlabError, match=r"\[0, 1\]"):
        overlap_heatmap(np.array([[1.0, 1.5], [1.5, 1.0]]), ["a", "b"])
    with pytest.raises(FlatlabError, match="2 domain names"):
        overlap_heatmap(overlap, ["a", "b"])
