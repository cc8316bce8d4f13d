"""Relative flatness (Petzka et al.) against dense float64 Hessians, closed forms and the
layer-wise rescaling invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import (
    linear_regression_case,
    relu_two_layer_case,
    rescale_relu_layers,
    tiny_cnn_bn_case,
    tiny_mlp_case,
)

from flatlab.curvature import dense_hessian
from flatlab.errors import FlatlabError
from flatlab.sharpness import RelativeFlatnessConfig, relative_flatness


def _brute_force_kappa(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'}) by explicit loops over the row blocks."""
    w = weight.detach().double()
    d, n = w.shape
    total = 0.0
    for s in range(d):
        for t in range(d):
            block = hessian[s * n:(s + 1) * n, t * n:(t + 1) * n]
            total += float(w[s] @ w[t]) * float(torch.trace(block))
    return total


def test_exact_equals_the_double_sum_over_the_full_dense_hessian():
    case = tiny_mlp_case()  # 6 -> 5 -> 3, tanh: the last Linear is "2", a 3 x 5 weight
    full = dense_hessian(case.model, case.batches, case.loss_fn).detach()  # every parameter, float64
    names = [n for n, _ in case.model.named_parameters()]
    offset = sum(p.numel() for n, p in case.model.named_parameters() if names.index(n) < names.index("2.weight"))
    block = full[offset:offset + 15, offset:offset + 15]
    truth = _brute_force_kappa(case.model[2].weight, block)
    out = relative_flatness(case.model, case.batches, loss_fn=case.loss_fn)
    assert (out.method, out.layer, out.weight_name, out.layer_shape) == ("exact", "2", "2.weight", (3, 5))
    assert out.kappa == pytest.approx(truth, rel=1e-10)
    assert out.stderr == 0.0 and out.products == 15 and out.num_samples == 40
    assert out.layer_hessian_trace == pytest.approx(float(torch.trace(block)), rel=1e-10)
    assert out.gram_trace == pytest.approx(float(case.model[2].weight.detach().pow(2).sum()), rel=1e-12)


def test_kronecker_identities_behind_the_stochastic_estimator():
    case = tiny_mlp_case(seed=2)
    w = case.model[0].weight.detach().double()  # a hidden layer (5 x 6): H_W is indefinite here
    h = dense_hessian(case.model, case.batches, case.loss_fn, params=["0.weight"]).detach().numpy()
    d, n = w.shape
    gram = (w @ w.T).numpy()
    values, vectors = np.linalg.eigh(gram)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    kappa = _brute_force_kappa(w, torch.from_numpy(h))
    eye = np.eye(n)
    # kappa = Tr((G kron I) H_W) = Tr((R kron I) H_W (R kron I)), R = G^(1/2), row-major order.
    assert np.trace(np.kron(gram, eye) @ h) == pytest.approx(kappa, rel=1e-10)
    assert np.trace(np.kron(root, eye) @ h @ np.kron(root, eye)) == pytest.approx(kappa, rel=1e-10)
    # The naive one-probe form sum G_ss' z_s^T H_ss' z_s' has expectation sum_s G_ss Tr(H_ss)
    # (E[z_s z_s'^T] = delta_ss' I): the off-diagonal blocks are lost, so it is biased.
    diagonal_only = sum(gram[s, s] * np.trace(h[s * n:(s + 1) * n, s * n:(s + 1) * n]) for s in range(d))
    assert abs(diagonal_only - kappa) > 1e-3 * abs(kappa)
    out = relative_flatness(case.model, case.batches, RelativeFlatnessConfig(layer="0"), loss_fn=case.loss_fn)
    assert out.kappa == pytest.approx(kappa, rel=1e-10)


def _cross_entropy_closed_form(model: torch.nn.Sequential, batches) -> float:
    """kappa = 1/N sum_i ||phi_i||^2 sum_{s,s'} G_ss' (diag p_i - p_i p_i^T)_ss' for the classifier."""
    x = torch.cat([xb for xb, _ in batches])
    with torch.no_grad():
        phi = model[:2](x)
        p = torch.softmax(model(x), dim=1)
    w = model[2].weight.detach()
    gram = w @ w.T
    curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return float(((phi.pow(2).sum(1)) * (gram * curvature).sum((1, 2))).mean())


@pytest.mark.parametrize(("method", "products"), [("exact", 18), ("hutchinson", 60), ("hutch++", 12)])
def test_classifier_matches_the_cross_entropy_closed_form(method, products):
    case = relu_two_layer_case()
    truth = _cross_entropy_closed_form(case.model, case.batches)
    config = RelativeFlatnessConfig(method=method, num_products=products, seed=1)
    out = relative_flatness(case.model, case.batches, config)
    assert out.method == method and out.layer == "2" and out.layer_shape == (3, 6)
    assert out.products == products  # hutch++ with 12 < d n = 18: a rank-4 sketch, 4 probes
    if method == "exact":
        assert out.kappa == pytest.approx(truth, rel=1e-10)
    else:
        assert out.stderr > 0
        assert abs(out.kappa - truth) <= 4 * out.stderr
        assert out.layer_hessian_trace is None


def test_hutchinson_within_stderr_of_exact_and_deterministic():
    case = tiny_mlp_case(seed=1)
    exact = relative_flatness(case.model, case.batches, loss_fn=case.loss_fn)
    config = RelativeFlatnessConfig(method="hutchinson", num_products=80, seed=3)
    one = relative_flatness(case.model, case.batches, config, loss_fn=case.loss_fn)
    assert abs(one.kappa - exact.kappa) <= 4 * one.stderr
    assert one.stderr < 0.5 * abs(exact.kappa)  # informative, not a huge error bar
    again = relative_flatness(case.model, case.batches, config, loss_fn=case.loss_fn)
    assert (again.kappa, again.stderr) == (one.kappa, one.stderr)


def test_auto_switches_to_hutchpp_above_the_exact_cap():
    case = relu_two_layer_case()
    out = relative_flatness(case.model, case.batches, RelativeFlatnessConfig(exact_max_size=10, num_products=30))
    assert out.method == "hutch++" and out.products == 30
    with pytest.raises(FlatlabError, match="exact_max_size = 10"):
        relative_flatness(case.model, case.batches, RelativeFlatnessConfig(method="exact", exact_max_size=10))


def test_invariant_to_layerwise_rescaling_while_the_hessian_trace_is_not():
    case = relu_two_layer_case()
    a = 3.0
    # Feature layer (the classifier) times a, the layer before it times 1/a: the same function.
    scaled = rescale_relu_layers(case.model, 1.0 / a)
    x = torch.cat([xb for xb, _ in case.batches])
    assert torch.allclose(case.model(x), scaled(x), rtol=0, atol=1e-12)
    one = relative_flatness(case.model, case.batches)
    two = relative_flatness(scaled, case.batches)
    assert two.kappa == pytest.approx(one.kappa, rel=1e-9)
    assert two.gram_trace == pytest.approx(a**2 * one.gram_trace, rel=1e-12)
    assert two.layer_hessian_trace == pytest.approx(one.layer_hessian_trace / a**2, rel=1e-9)
    config = RelativeFlatnessConfig(method="hutchinson", num_products=20, seed=0)
    assert relative_flatness(scaled, case.batches, config).kappa == pytest.approx(
        relative_flatness(case.model, case.batches, config).kappa, rel=1e-9)


def test_least_squares_reduces_to_weight_norm_times_covariance_trace():
    # One output, squared loss: H_W = X^T X / N, so kappa = ||w||^2 tr(X^T X / N) (the ridge link).
    case = linear_regression_case(n=12, k=3)
    x = torch.cat([xb for xb, _ in case.batches])
    truth = float(case.model.weight.detach().pow(2).sum()) * float(torch.trace(x.T @ x / len(x)))
    for method in ("exact", "hutchinson"):
        out = relative_flatness(case.model, case.batches, RelativeFlatnessConfig(method=method, num_products=30),
                                loss_fn=case.loss_fn)
        assert out.kappa == pytest.approx(truth, rel=1e-10 if method == "exact" else 0.3)
        assert out.layer == "" and out.weight_name == "weight"


def test_model_left_unchanged():
    case = tiny_cnn_bn_case()
    model = case.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("exact", "hutchinson"):
        relative_flatness(model, case.batches, RelativeFlatnessConfig(method=method, num_products=4))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(mod.training for mod in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_layer_errors_list_the_layers():
    case = tiny_cnn_bn_case()  # Conv2d "0", BatchNorm "1", Linear "5"
    with pytest.raises(FlatlabError) as info:
        relative_flatness(case.model, case.batches, RelativeFlatnessConfig(layer="fc"))
    assert "no layer named 'fc'" in str(info.value)
    assert "Linear layers: '5'" in str(info.value) and "Conv layers (not supported): '0'" in str(info.value)
    with pytest.raises(FlatlabError, match="'0' is a Conv2d: relative flatness is computed for nn.Linear layers only"):
        relative_flatness(case.model, case.batches, RelativeFlatnessConfig(layer="0"))
    frozen = relu_two_layer_case()
    frozen.model[2].weight.requires_grad_(False)
    with pytest.raises(FlatlabError, match="frozen"):
        relative_flatness(frozen.model, frozen.batches)
    with pytest.raises(FlatlabError, match="has none"):
        relative_flatness(torch.nn.Sequential(torch.nn.Flatten()), case.batches)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "lanczos"}, "method must be one of auto, exact, hutchinson, hutch++, got 'lanczos'"),
    ({"num_products": 1}, "num_products must be at least 2, got 1"),
    ({"method": "hutch++", "num_products": 2}, "num_products must be at least 3 for hutch++"),
    ({"exact_max_size": 0}, "exact_max_size must be at least 1, got 0"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"layer": ""}, "layer must be a module name"),
])
def test_bad_settings_raise_naming_the_parameter(kwargs, message):
    with pytest.raises(FlatlabError) as info:
        RelativeFlatnessConfig(**kwargs)
    assert message in str(info.value)
