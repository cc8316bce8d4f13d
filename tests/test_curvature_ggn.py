"""GGN and empirical Fisher operators against brute-force dense float64 matrices (tiny models).

The truths are built here sample by sample, independently of flatlab: per-sample Jacobians
(torch.autograd.functional.jacobian), the closed-form softmax cross-entropy output Hessian or
autograd's Hessian of the loss, per-sample gradients from one backward pass each, and the true
Fisher from every class label weighted by the model's probability.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from cases import (
    flat_parameters,
    interpolating_mse_case,
    old_style_case,
    tiny_cnn_bn_case,
    tiny_mlp_case,
)
from torch import nn

from flatlab.curvature import (
    CURVATURES,
    CurvatureConfig,
    CurvatureWarning,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    curvature_operator,
    dense_curvature,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    estimate_trace,
    hutchpp_trace,
    lanczos_top_eigenvalues,
    lanczos_tridiagonal,
    operator_config,
    per_layer_curvature,
    quadrature_rule,
)
from flatlab.errors import FlatlabError

CASES = [tiny_mlp_case, tiny_cnn_bn_case]


Outputs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sample_mean(case, term: Callable[[torch.Tensor, Outputs, torch.Tensor, torch.Tensor], np.ndarray]) -> np.ndarray:
    """(1/N) sum_i term(w, outputs, x_i, y_i) over the case's samples one at a time, ``w`` the flat
    parameters and ``outputs(flat, x)`` the model's outputs at another flat vector."""
    flat0, weights = flat_parameters(case.model)

    def outputs(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(case.model, weights(flat), (x,))

    terms = [term(flat0, outputs, x[i:i + 1], y[i:i + 1]) for x, y in case.batches for i in range(len(y))]
    return sum(terms) / len(terms)


def _gradient(flat0: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """The gradient of ``loss`` (a function of the flat parameters) at ``flat0``, by one backward pass."""
    flat = flat0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(flat), flat)
    return g.numpy()


def brute_force_ggn(case) -> np.ndarray:
    """(1/N) sum_i J_i^T Lambda_i J_i, Lambda_i the Hessian of sample i's loss w.r.t. its outputs
    (closed form for cross-entropy, autograd otherwise), divided by the outputs per sample for MSE."""

    def term(flat0, outputs, x, y):
        jac = torch.autograd.functional.jacobian(lambda f: outputs(f, x)[0], flat0).numpy()
        z = outputs(flat0, x)[0].detach()
        if case.loss_fn is nn.functional.cross_entropy:
            p = torch.softmax(z, 0).numpy()
            lam = np.diag(p) - np.outer(p, p)
        else:
            lam = torch.autograd.functional.hessian(lambda o: case.loss_fn(o[None], y), z).numpy()
        return jac.T @ lam @ jac

    return _sample_mean(case, term)


def brute_force_empirical_fisher(case) -> np.ndarray:
    """(1/N) sum_i g_i g_i^T with g_i the gradient of sample i's loss at its own label."""

    def term(flat0, outputs, x, y):
        g = _gradient(flat0, lambda flat: case.loss_fn(outputs(flat, x), y))
        return np.outer(g, g)

    return _sample_mean(case, term)


def brute_force_true_fisher(case) -> np.ndarray:
    """(1/N) sum_i sum_c p_ic g_ic g_ic^T with g_ic the gradient of -log p(c | x_i)."""

    def term(flat0, outputs, x, _y):
        p = torch.softmax(outputs(flat0, x)[0], 0).detach().numpy()
        grads = [_gradient(flat0, lambda flat, c=c: nn.functional.cross_entropy(outputs(flat, x), torch.tensor([c])))
                 for c in range(len(p))]
        return sum(p_c * np.outer(g, g) for p_c, g in zip(p, grads))

    return _sample_mean(case, term)


@pytest.mark.parametrize("make_case", CASES)
def test_dense_references_equal_brute_force_and_ggn_is_the_fisher(make_case):
    case = make_case()
    ggn = brute_force_ggn(case)
    np.testing.assert_allclose(dense_ggn(case.model, case.batches, case.loss_fn).numpy(), ggn, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(brute_force_true_fisher(case), ggn, rtol=1e-9, atol=1e-13)  # CE: G = Fisher
    fisher = dense_empirical_fisher(case.model, case.batches, case.loss_fn).numpy()
    np.testing.assert_allclose(fisher, brute_force_empirical_fisher(case), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(dense_curvature("ggn", case.model, case.batches, case.loss_fn).numpy(), ggn,
                               rtol=1e-10, atol=1e-13)
    assert not np.allclose(fisher, ggn, rtol=1e-2)  # the empirical Fisher is not the Fisher


@pytest.mark.parametrize("make_case", CASES)
@pytest.mark.parametrize("method,cache", [("double-vjp", None), ("double-vjp", 0), ("forward-mode", None)])
def test_ggn_products_equal_the_dense_ggn(make_case, method, cache):
    case = make_case()
    dense = brute_force_ggn(case)
    op = GGNOperator(case.model, case.batches, case.loss_fn, method=method, cache_bytes=cache)
    assert op.output_hessian == "cross-entropy" and op.kind == "ggn"
    block = np.random.default_rng(0).standard_normal((op.dim, 3))
    np.testing.assert_allclose(op @ block, dense @ block, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(op @ block, dense @ block, rtol=1e-10, atol=1e-13)  # again: cached graphs reused
    assert op.num_products == 6 and op.method == method
    assert (op._cache is not None) == (method == "double-vjp" and cache is None)
    buffer = torch.full((op.dim,), 7.0, dtype=torch.float64)  # stale contents must not leak in
    assert op.product(torch.from_numpy(block[:, 0]), out=buffer) is buffer
    np.testing.assert_allclose(buffer.numpy(), dense @ block[:, 0], rtol=1e-10, atol=1e-13)


def test_ggn_general_loss_uses_autograd_output_hessian():
    # A wrapper around cross-entropy is not recognised: its output Hessian comes from a double
    # backward through the loss, and must equal the closed form.
    case = tiny_mlp_case()
    dense = brute_force_ggn(case)
    wrapped = GGNOperator(case.model, case.batches, lambda z, y: nn.functional.cross_entropy(z, y))
    assert wrapped.output_hessian == "autograd"
    v = np.random.default_rng(1).standard_normal(wrapped.dim)
    np.testing.assert_allclose(wrapped @ v, dense @ v, rtol=1e-10, atol=1e-13)
    # Squared error: Lambda = 2/(B C) I, from autograd as well; both methods.
    mse = interpolating_mse_case()
    perturbed = [(x, y + 0.3) for x, y in mse.batches]  # nonzero residuals (Lambda does not depend on them)
    truth = brute_force_ggn(mse)
    for method in ("double-vjp", "forward-mode"):
        op = GGNOperator(mse.model, perturbed, mse.loss_fn, method=method)
        u = np.random.default_rng(2).standard_normal(op.dim)
        np.testing.assert_allclose(op @ u, truth @ u, rtol=1e-10, atol=1e-13)


def test_ggn_equals_hessian_at_an_interpolating_minimum_and_not_elsewhere():
    case = interpolating_mse_case()
    hessian = dense_hessian(case.model, case.batches, case.loss_fn).numpy()
    ggn = dense_ggn(case.model, case.batches, case.loss_fn).numpy()
    np.testing.assert_allclose(ggn, hessian, rtol=1e-9, atol=1e-12)
    op_h = HessianOperator(case.model, case.batches, case.loss_fn)
    op_g = GGNOperator(case.model, case.batches, case.loss_fn)
    v = np.random.default_rng(3).standard_normal(op_g.dim)
    np.testing.assert_allclose(op_g @ v, op_h @ v, rtol=1e-9, atol=1e-12)
    # The empirical Fisher vanishes there (every per-sample gradient is zero), G does not.
    fisher = EmpiricalFisherOperator(case.model, case.batches, case.loss_fn)
    assert np.abs(fisher @ v).max() < 1e-20 and np.abs(op_g @ v).max() > 1e-3
    # Away from the minimum the residual term makes H differ from G, roughly in proportion.
    gaps = []
    for shift in (0.1, 0.2):
        moved = [(x, y + shift) for x, y in case.batches]
        gaps.append(np.abs(dense_hessian(case.model, moved, case.loss_fn).numpy() - ggn).max())
    assert gaps[0] > 1e-4 and gaps[1] == pytest.approx(2 * gaps[0], rel=1e-6)


@pytest.mark.parametrize("make_case", CASES)
def test_ggn_is_psd_and_lanczos_finds_its_top_eigenvalues(make_case):
    case = make_case()
    dense = brute_force_ggn(case)
    exact = np.linalg.eigvalsh(dense)[::-1]
    assert exact[-1] >= -1e-12 * exact[0]  # positive semi-definite
    op = GGNOperator(case.model, case.batches, case.loss_fn)
    result = lanczos_top_eigenvalues(op, k=5, rtol=1e-9)
    np.testing.assert_allclose(result.eigenvalues, exact[:5], rtol=1e-7)
    assert np.all(result.residuals <= 1e-7 * exact[0])
    quadratic = [float(v @ (op @ v)) for v in np.random.default_rng(4).standard_normal((5, op.dim))]
    assert min(quadratic) >= 0
    # SLQ with m = n: the nodes are G's eigenvalues
    rule = quadrature_rule(lanczos_tridiagonal(op, np.random.default_rng(5).standard_normal(op.dim), op.dim))
    np.testing.assert_allclose(np.sort(rule.nodes)[::-1], exact, rtol=1e-6, atol=1e-9 * exact[0])


@pytest.mark.parametrize("kind", ["ggn", "empirical-fisher"])
def test_hutchpp_trace_covers_the_exact_trace(kind):
    case = tiny_cnn_bn_case()
    dense = brute_force_ggn(case) if kind == "ggn" else brute_force_empirical_fisher(case)
    op = curvature_operator(kind, case.model, case.batches, case.loss_fn)
    est = hutchpp_trace(op, num_products=30, seed=0)
    assert est.products == 30 and est.stderr > 0
    assert abs(est.trace - np.trace(dense)) <= 3 * est.stderr
    exact = estimate_trace(op, 3 * op.dim, "hutch++")  # the sketch spans the space: exact
    assert exact.trace == pytest.approx(np.trace(dense), rel=1e-9)


@pytest.mark.parametrize("make_case", CASES)
@pytest.mark.parametrize("method,cache,chunk", [("vmap", None, None), ("vmap", 0, 3), ("loop", 0, None),
                                                ("loop", None, 7)])
def test_empirical_fisher_products_equal_the_dense_matrix(make_case, method, cache, chunk):
    case = make_case()
    dense = brute_force_empirical_fisher(case)
    op = EmpiricalFisherOperator(case.model, case.batches, case.loss_fn, method=method, cache_bytes=cache,
                                 sample_chunk=chunk)
    block = np.random.default_rng(6).standard_normal((op.dim, 2))
    np.testing.assert_allclose(op @ block, dense @ block, rtol=1e-10, atol=1e-13)
    assert (op._cache is not None) == (cache is None)
    if cache is not None:
        return
    top = lanczos_top_eigenvalues(op, k=3, rtol=1e-9)
    np.testing.assert_allclose(top.eigenvalues, np.linalg.eigvalsh(dense)[::-1][:3], rtol=1e-7)
    # rank <= N: the (N+1)-th eigenvalue vanishes
    n = sum(len(y) for _, y in case.batches)
    if n < op.dim:
        assert np.linalg.eigvalsh(dense)[::-1][n] < 1e-12 * top.eigenvalues[0]


def test_cache_follows_weight_changes():
    case = tiny_mlp_case()
    v = np.random.default_rng(7).standard_normal(53)
    ops = [GGNOperator(case.model, case.batches, case.loss_fn),
           EmpiricalFisherOperator(case.model, case.batches, case.loss_fn)]
    first = [op @ v for op in ops]
    with torch.no_grad():
        case.model[0].weight.mul_(1.5)  # in place: the caches are stale
    for op, before in zip(ops, first):
        fresh = type(op)(case.model, case.batches, case.loss_fn, cache_bytes=0)
        np.testing.assert_allclose(op @ v, fresh @ v, rtol=1e-12, atol=1e-14)
        assert not np.allclose(op @ v, before)
    tiny = GGNOperator(case.model, case.batches, case.loss_fn, cache_bytes=100)
    np.testing.assert_allclose(tiny @ v, ops[0] @ v, rtol=1e-12, atol=1e-14)
    assert tiny._cache is None  # over budget: products rebuild the graphs


@pytest.mark.parametrize("kind", CURVATURES)
def test_per_layer_blocks_equal_dense_diagonal_blocks(kind):
    case = tiny_cnn_bn_case()
    dense = dense_curvature(kind, case.model, case.batches, case.loss_fn).numpy()
    op = curvature_operator(kind, case.model, case.batches, case.loss_fn)
    layers = per_layer_curvature(op, trace_products=300, rtol=1e-9)
    assert [layer.layer for layer in layers] == ["0", "1", "5"]
    start = 0
    for layer in layers:
        block = dense[start:start + layer.num_params, start:start + layer.num_params]
        start += layer.num_params
        assert layer.top_eigenvalue == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=1e-6, abs=1e-12)
        assert layer.trace == pytest.approx(np.trace(block), rel=1e-9, abs=1e-12)
    block_op = op.restricted(["5.weight", "5.bias"])
    assert type(block_op) is type(op) and block_op.dim == 9
    np.testing.assert_allclose(block_op @ np.eye(9), dense[-9:, -9:], rtol=1e-10, atol=1e-13)


def test_auto_falls_back_when_torch_func_cannot_transform():
    case = old_style_case()
    v = np.random.default_rng(8).standard_normal(31)
    ggn = brute_force_ggn(case)
    with pytest.warns(CurvatureWarning, match="cannot differentiate"):
        auto = GGNOperator(case.model, case.batches, case.loss_fn, method="auto")
        auto.method = "forward-mode"
        np.testing.assert_allclose(auto @ v, ggn @ v, rtol=1e-10, atol=1e-13)
    assert auto.method == "double-vjp"
    with pytest.raises(FlatlabError, match="'double-vjp'"):
        GGNOperator(case.model, case.batches, case.loss_fn, method="forward-mode") @ v
    fisher = brute_force_empirical_fisher(case)
    with pytest.warns(CurvatureWarning, match="'loop'"):
        ef = EmpiricalFisherOperator(case.model, case.batches, case.loss_fn)
        np.testing.assert_allclose(ef @ v, fisher @ v, rtol=1e-10, atol=1e-13)
    assert ef.method == "loop"


def test_factory_and_config():
    case = tiny_mlp_case()
    assert CURVATURES == ("hessian", "ggn", "empirical-fisher")
    classes = {"hessian": HessianOperator, "ggn": GGNOperator, "empirical-fisher": EmpiricalFisherOperator}
    for kind in CURVATURES:
        op = curvature_operator(kind, case.model, case.batches, case.loss_fn, params="weights")
        assert type(op) is classes[kind] and op.kind == kind and op.param_names == ["0.weight", "2.weight"]
        config = operator_config(op)
        assert config.kind == kind and config.params == ("0.weight", "2.weight") and config.method == "auto"
        rebuilt = config.build(case.model, case.batches, case.loss_fn)
        v = np.random.default_rng(9).standard_normal(op.dim)
        np.testing.assert_allclose(rebuilt @ v, op @ v, rtol=1e-13, atol=1e-15)
    bad = [({"kind": "fisher"}, "kind must be one of hessian, ggn, empirical-fisher, got 'fisher'"),
           ({"kind": "ggn", "method": "double-backward"}, "method 'double-backward' is not a ggn method"),
           ({"mode": "test"}, "mode must be one of eval, train"),
           ({"cache_bytes": -1}, "cache_bytes must be >= 0"),
           ({"dropout_seed": 1}, "dropout_seed applies to mode='train' only"),
           ({"kind": "ggn", "sample_chunk": 4}, "sample_chunk applies to kind 'empirical-fisher' only"),
           ({"kind": "empirical-fisher", "sample_chunk": 0}, "sample_chunk must be a positive integer, got 0"),
           ({"params": "biases"}, "params must be one of all, weights, no-bn")]
    for settings, message in bad:
        with pytest.raises(FlatlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
            CurvatureConfig(**settings)
    with pytest.raises(FlatlabError, match="sample_chunk must be a positive integer"):
        EmpiricalFisherOperator(case.model, case.batches, case.loss_fn, sample_chunk=-2)


def test_empirical_fisher_refuses_batch_statistics():
    case = tiny_cnn_bn_case()
    with pytest.raises(FlatlabError, match="per-sample gradients"):
        EmpiricalFisherOperator(case.model, case.batches, case.loss_fn, mode="train")
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    with pytest.raises(FlatlabError, match="track_running_stats=False"):
        EmpiricalFisherOperator(model, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))])
