"""Loss and error barriers on the line between two models, against closed forms and brute force."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import deep_linear_pair, fit_classifier, linear_regression_pair, relu_mlp_pair
from torch import nn

from flatlab.errors import FlatlabError
from flatlab.surface.barrier import (
    BarrierConfig,
    interpolate_models,
    loss_barrier,
    pairwise_barriers,
    reestimate_bn_statistics,
)

# Tiny models: one thread beats two (see the fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _state_at(m1: nn.Module, m2: nn.Module, a: float) -> dict[str, torch.Tensor]:
    """(1 - a) w1 + a w2 for every floating-point entry of the state dicts (brute force)."""
    s1, s2 = m1.state_dict(), m2.state_dict()
    return {k: (1 - a) * v + a * s2[k] if v.is_floating_point() else v.clone() for k, v in s1.items()}


def _brute_force(m1: nn.Module, m2: nn.Module, a: float, batches, loss_fn) -> tuple[float, float, np.ndarray]:
    """Loss, accuracy and per-sample losses of a fresh copy loaded with the interpolated state."""
    model = copy.deepcopy(m1)
    model.load_state_dict(_state_at(m1, m2, a))
    model.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        out = model(x)
        per = loss_fn(out, y, reduction="none")
        return float(per.mean()), float((out.argmax(1) == y).double().mean()), per.numpy()


# -- exact truths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bn", ["interpolate", "reestimate"])
def test_barrier_of_a_model_with_itself_is_exactly_zero(bn: str) -> None:
    pair = relu_mlp_pair(seed=1, batchnorm=True)
    twin = copy.deepcopy(pair.model1)
    result = loss_barrier(pair.model1, twin, {"source": pair.batches, "target": pair.batches[:1]},
                          config=BarrierConfig(num_points=11, bn=bn))
    for profile in result.splits.values():
        assert profile.loss_barrier == 0.0
        assert profile.error_barrier == 0.0
        assert np.all(profile.loss_gaps == 0.0) and np.all(profile.error_gaps == 0.0)
        assert np.all(profile.losses == profile.losses[0])  # the same model at every point
    assert result.bn_layers == (1 if bn == "reestimate" else 0)


def _line_coefficients_linear(pair) -> tuple[float, float, float]:
    """L(a) = A + 2 B a + C a^2 for f(x) = W x + b, MSE: residual r(a) = r0 + a s."""
    x = torch.cat([b[0] for b in pair.batches]).numpy()
    y = torch.cat([b[1] for b in pair.batches]).numpy()
    w1, b1 = pair.model1.weight.detach().numpy(), pair.model1.bias.detach().numpy()
    w2, b2 = pair.model2.weight.detach().numpy(), pair.model2.bias.detach().numpy()
    r0 = x @ w1.T + b1 - y
    s = x @ (w2 - w1).T + (b2 - b1)
    size = r0.size
    return float((r0 * r0).sum() / size), float((r0 * s).sum() / size), float((s * s).sum() / size)


def test_linear_regression_line_is_the_closed_form_quadratic_and_convex_so_zero_barrier() -> None:
    pair = linear_regression_pair(seed=3)
    result = loss_barrier(pair.model1, pair.model2, {"train": pair.batches}, loss_fn=pair.loss_fn,
                          config=BarrierConfig(num_points=21))
    a = result.alphas
    big_a, b, c = _line_coefficients_linear(pair)
    profile = result.splits["train"]
    np.testing.assert_allclose(profile.losses, big_a + 2 * b * a + c * a * a, rtol=1e-12)
    # gap = -C a (1 - a) <= 0: a convex loss on the line has no barrier; attained at an end.
    np.testing.assert_allclose(profile.loss_gaps, -c * a * (1 - a), atol=1e-12 * big_a)
    assert profile.loss_barrier == 0.0 and profile.loss_barrier_alpha in (0.0, 1.0)
    # Regression targets: no accuracy.
    assert np.isnan(profile.error_barrier) and np.all(np.isnan(profile.accuracies))


def _quartic(pair) -> np.ndarray:
    """Coefficients c0..c4 of L(a) = sum_k c_k a^k for f(x) = V U x with MSE (by hand)."""
    x = torch.cat([b[0] for b in pair.batches]).numpy()
    y = torch.cat([b[1] for b in pair.batches]).numpy()
    u1, v1 = (p.detach().numpy() for p in pair.model1.parameters())
    u2, v2 = (p.detach().numpy() for p in pair.model2.parameters())
    du, dv = u2 - u1, v2 - v1
    # V(a) U(a) = P0 + a P1 + a^2 P2
    p0, p1, p2 = v1 @ u1, v1 @ du + dv @ u1, dv @ du
    r0, s1, s2 = x @ p0.T - y, x @ p1.T, x @ p2.T
    size = r0.size

    def dot(p: np.ndarray, q: np.ndarray) -> float:
        return float((p * q).sum() / size)

    return np.array([dot(r0, r0), 2 * dot(r0, s1), dot(s1, s1) + 2 * dot(r0, s2), 2 * dot(s1, s2), dot(s2, s2)])


def test_deep_linear_line_is_the_closed_form_quartic_and_the_barrier_its_maximum() -> None:
    pair = deep_linear_pair(seed=4, flipped=True, noise=0.1)
    coef = _quartic(pair)
    loss = np.polynomial.Polynomial(coef)
    for points in (11, 201):
        result = loss_barrier(pair.model1, pair.model2, {"train": pair.batches}, loss_fn=pair.loss_fn,
                              config=BarrierConfig(num_points=points))
        a = result.alphas
        profile = result.splits["train"]
        np.testing.assert_allclose(profile.losses, loss(a), rtol=1e-12)
        gap = loss(a) - ((1 - a) * loss(0.0) + a * loss(1.0))
        assert profile.loss_barrier == pytest.approx(gap.max(), rel=1e-10, abs=1e-12)
        assert profile.loss_barrier_alpha == a[int(np.argmax(gap))]
    # The continuous maximum: a root of the gap's derivative in (0, 1) (or an end).
    gap_poly = loss - np.polynomial.Polynomial([loss(0.0), loss(1.0) - loss(0.0)])
    roots = [r.real for r in gap_poly.deriv().roots() if abs(r.imag) < 1e-12 and 0 < r.real < 1]
    best = max([0.0] + [float(gap_poly(r)) for r in roots])
    assert best > 0  # this pair has a real barrier
    # A 201-point grid is within the quadratic error of the vertex: |g''| h^2 / 8.
    h = 1 / 200
    curvature = max(abs(gap_poly.deriv(2)(t)) for t in np.linspace(0, 1, 101))
    assert best - curvature * h * h / 8 - 1e-12 <= profile.loss_barrier <= best + 1e-12


def test_flipped_deep_linear_twin_has_barrier_mean_y_squared_at_one_half() -> None:
    # w2 = -w1 computes the same function; the midpoint is the zero map: L(a) = 16 a^2 (1-a)^2 mean(y^2).
    pair = deep_linear_pair(seed=5, flipped=True)
    y = torch.cat([b[1] for b in pair.batches])
    result = loss_barrier(pair.model1, pair.model2, {"train": pair.batches}, loss_fn=pair.loss_fn,
                          config=BarrierConfig(num_points=11))
    profile = result.splits["train"]
    a = result.alphas
    mean_y2 = float((y * y).mean())
    np.testing.assert_allclose(profile.losses, 16 * a**2 * (1 - a) ** 2 * mean_y2, rtol=1e-11, atol=1e-14)
    assert profile.endpoint_losses[0] < 1e-28 and profile.endpoint_losses[1] < 1e-28
    assert profile.loss_barrier == pytest.approx(mean_y2, rel=1e-12)
    assert profile.loss_barrier_alpha == 0.5


def test_relu_mlps_line_matches_brute_force_and_the_barrier_is_nonnegative() -> None:
    pair = relu_mlp_pair(seed=2, train_steps=200)  # two minima of one problem
    source, target = pair.batches[:2], pair.batches[2:]
    config = BarrierConfig(num_points=11)
    result = loss_barrier(pair.model1, pair.model2, {"source": source, "target": target}, config=config)
    for name, batches in (("source", source), ("target", target)):
        profile = result.splits[name]
        truth = [_brute_force(pair.model1, pair.model2, a, batches, F.cross_entropy) for a in result.alphas]
        np.testing.assert_allclose(profile.losses, [t[0] for t in truth], rtol=1e-12)
        np.testing.assert_allclose(profile.accuracies, [t[1] for t in truth], rtol=0, atol=1e-15)
        assert profile.loss_gaps[0] == 0.0 and profile.loss_gaps[-1] == 0.0
        assert profile.error_gaps[0] == 0.0 and profile.error_gaps[-1] == 0.0
        assert profile.loss_barrier >= 0.0 and profile.error_barrier >= 0.0
        # Barrier = max of L(a) - [(1 - a) L(0) + a L(1)] from the brute-force losses.
        losses = np.array([t[0] for t in truth])
        a = result.alphas
        gaps = losses - ((1 - a) * losses[0] + a * losses[-1])
        assert profile.loss_barrier == pytest.approx(gaps.max(), abs=1e-12)
        i = int(np.argmax(gaps))
        assert profile.loss_barrier_alpha == a[i]
        errors = 1 - np.array([t[1] for t in truth])
        assert profile.error_barrier == pytest.approx((errors - ((1 - a) * errors[0] + a * errors[-1])).max(), abs=1e-12)
        # Stderr of the per-sample paired gaps at the attained alpha.
        per = [t[2] for t in truth]
        sample_gaps = per[i] - ((1 - a[i]) * per[0] + a[i] * per[-1])
        expected = np.std(sample_gaps, ddof=1) / np.sqrt(len(sample_gaps))
        assert profile.loss_barrier_stderr == pytest.approx(expected, rel=1e-9)
        assert profile.num_samples == sum(len(b[1]) for b in batches)
    assert result.splits["source"].loss_barrier > 0  # two random nets: not linearly connected


# -- BatchNorm ------------------------------------------------------------------------------------

def _hand_cumulative_statistics(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over batches of the per-batch mean and unbiased variance of the BN layer's input."""
    first = model[0]
    means, variances = [], []
    with torch.no_grad():
        for x, _ in batches:
            z = first(x)
            means.append(z.mean(0))
            variances.append(z.var(0, unbiased=True))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_bn_reestimation_at_alpha_zero_is_the_cumulative_mean_by_hand() -> None:
    pair = relu_mlp_pair(seed=6, batchnorm=True, n=50, batch=12)  # uneven last batch (2 samples)
    for num in (None, 2):
        model = interpolate_models(pair.model1, pair.model2, 0.0, bn="reestimate", bn_data=pair.batches,
                                   bn_num_batches=num)
        used = pair.batches if num is None else pair.batches[:num]
        mean, var = _hand_cumulative_statistics(pair.model1, used)
        bn = model[1]
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == len(used)
        assert bn.momentum == pair.model1[1].momentum and not model.training
    # The barrier's a = 0 point uses exactly that model.
    reestimated = interpolate_models(pair.model1, pair.model2, 0.0, bn="reestimate", bn_data=pair.batches)
    with torch.no_grad():
        expected = sum(float(F.cross_entropy(reestimated(x), y)) * len(y) for x, y in pair.batches) / 50
    result = loss_barrier(pair.model1, pair.model2, {"source": pair.batches},
                          config=BarrierConfig(num_points=5, bn="reestimate"))
    assert result.splits["source"].losses[0] == pytest.approx(expected, rel=1e-13)
    assert result.bn_layers == 1 and result.bn_batches == len(pair.batches)


def test_bn_reestimation_at_an_interior_point_uses_the_interpolated_weights() -> None:
    pair = relu_mlp_pair(seed=7, batchnorm=True)
    a = 0.3
    model = interpolate_models(pair.model1, pair.model2, a, bn="reestimate", bn_data=pair.batches)
    hand = copy.deepcopy(pair.model1)
    hand.load_state_dict(_state_at(pair.model1, pair.model2, a))
    mean, var = _hand_cumulative_statistics(hand, pair.batches)
    torch.testing.assert_close(model[1].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, var, rtol=1e-12, atol=1e-12)
    # "interpolate" moves the statistics like the weights.
    plain = interpolate_models(pair.model1, pair.model2, a)
    torch.testing.assert_close(plain[1].running_var, (1 - a) * pair.model1[1].running_var + a * pair.model2[1].running_var)
    with pytest.raises(FlatlabError, match="bn_data"):
        interpolate_models(pair.model1, pair.model2, a, bn="reestimate")


def test_reestimation_keeps_dropout_off_and_restores_modes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.9), nn.BatchNorm1d(4)).double().train()
    batches = [(torch.randn(6, 3, dtype=torch.float64), torch.zeros(6, dtype=torch.long)) for _ in range(3)]
    assert reestimate_bn_statistics(model, batches) == 1
    with torch.no_grad():
        z = [model[0](x) for x, _ in batches]  # dropout off: the statistics of the evaluated function
    torch.testing.assert_close(model[2].running_mean, torch.stack([t.mean(0) for t in z]).mean(0))
    assert model.training and model[1].training and model[2].momentum == 0.1
    assert reestimate_bn_statistics(nn.Linear(3, 2), batches) == 0


# -- contracts ------------------------------------------------------------------------------------

def test_different_architectures_are_refused_naming_what_differs() -> None:
    a = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    wider = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    deeper = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2), nn.Linear(2, 2))
    data = {"source": [(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))]}
    with pytest.raises(FlatlabError, match=r"0\.weight has shape \(5, 4\) in model 1 and \(6, 4\) in model 2"):
        loss_barrier(a, wider, data)
    with pytest.raises(FlatlabError, match=r"only model 2 has 3\.weight, 3\.bias"):
        loss_barrier(a, deeper, data)
    with pytest.raises(FlatlabError, match="float32 in model 1 and torch.float64"):
        loss_barrier(a, copy.deepcopy(a).double(), data)
    with pytest.raises(FlatlabError, match=r"model a and model c"):
        pairwise_barriers([a, copy.deepcopy(a), wider], data, labels=["a", "b", "c"])


def test_input_models_are_not_modified() -> None:
    pair = relu_mlp_pair(seed=8, batchnorm=True)
    pair.model2.train()
    before = [copy.deepcopy(m.state_dict()) for m in (pair.model1, pair.model2)]
    loss_barrier(pair.model1, pair.model2, {"source": pair.batches}, config=BarrierConfig(num_points=3, bn="reestimate"))
    pairwise_barriers([pair.model1, pair.model2], {"source": pair.batches}, config=BarrierConfig(num_points=3))
    for m, state in zip((pair.model1, pair.model2), before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[k]), k
    assert not pair.model1.training and pair.model2.training
    assert pair.model1[1].momentum == 0.1


def test_pairwise_matrix_is_symmetric_zero_on_the_diagonal_and_equals_single_lines() -> None:
    pair = relu_mlp_pair(seed=10, train_steps=200)
    third = copy.deepcopy(pair.model1)
    torch.manual_seed(3)
    for layer in (third[0], third[2]):
        layer.reset_parameters()
    x, y = torch.cat([b[0] for b in pair.batches]), torch.cat([b[1] for b in pair.batches])
    fit_classifier(third, x, y, 200)
    models = [pair.model1, pair.model2, third]
    splits = {"source": pair.batches[:2], "target": pair.batches[2:]}
    config = BarrierConfig(num_points=7)
    result = pairwise_barriers(models, splits, config=config, labels=["m0", "m1", "m2"])
    assert result.labels == ("m0", "m1", "m2")
    for split in splits:
        for matrix in (result.loss_barriers[split], result.error_barriers[split]):
            assert matrix.shape == (3, 3)
            np.testing.assert_array_equal(matrix, matrix.T)
            np.testing.assert_array_equal(np.diag(matrix), 0.0)
        for i in range(3):
            for j in range(i + 1, 3):
                single = loss_barrier(models[i], models[j], splits, config=config).splits[split]
                assert result.loss_barriers[split][i, j] == single.loss_barrier
                assert result.loss_barrier_stderrs[split][j, i] == single.loss_barrier_stderr
                assert result.error_barriers[split][i, j] == single.error_barrier
        assert np.all(result.loss_barriers[split][~np.eye(3, dtype=bool)] > 0)
    assert set(result.pairs) == {(0, 1), (0, 2), (1, 2)}
    with pytest.raises(FlatlabError, match="at least two models"):
        pairwise_barriers(models[:1], splits)


def test_quantized_models_enter_with_their_effective_weights() -> None:
    from flatlab.models import build_model
    from flatlab.quant import QuantConfig
    from flatlab.quant.prepare import quantize_model

    torch.manual_seed(0)
    fp = build_model("mlp", (1, 3, 3), 3, width=6, depth=1).double().eval()
    quantized = quantize_model(copy.deepcopy(fp), QuantConfig(bits=3)).eval()
    x = torch.randn(20, 1, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    result = loss_barrier(quantized, fp, {"source": [(x, y)]}, config=BarrierConfig(num_points=3))
    with torch.no_grad():
        q_loss, fp_loss = float(F.cross_entropy(quantized(x), y)), float(F.cross_entropy(fp(x), y))
    assert q_loss != fp_loss
    assert result.splits["source"].endpoint_losses == (pytest.approx(q_loss, rel=1e-12), pytest.approx(fp_loss, rel=1e-12))


def test_config_is_validated_in_the_callers_words() -> None:
    for kwargs, message in [({"num_points": 1}, "num_points must be"), ({"alphas": (0.0, 0.5)}, "alphas must start at 0"),
                            ({"alphas": (0.0, 0.6, 0.4, 1.0)}, "strictly increasing"),
                            ({"bn": "reset"}, "bn must be one of interpolate, reestimate, got 'reset'"),
                            ({"bn_num_batches": 0}, "bn_num_batches must be a positive integer")]:
        with pytest.raises(FlatlabError, match=message):
            BarrierConfig(**kwargs)
    config = BarrierConfig(alphas=[0, 0.25, 1])
    assert config.alphas == (0.0, 0.25, 1.0) and config.to_dict()["alphas"] == [0.0, 0.25, 1.0]
    np.testing.assert_array_equal(BarrierConfig(num_points=5).grid, [0, 0.25, 0.5, 0.75, 1])
    pair = relu_mlp_pair(seed=9)
    with pytest.raises(FlatlabError, match="split 'target' has no samples"):
        loss_barrier(pair.model1, pair.model2, {"source": pair.batches, "target": []})
    with pytest.raises(FlatlabError, match="needs bn_data"):
        loss_barrier(pair.model1, pair.model2, {"train": pair.batches}, config=BarrierConfig(bn="reestimate"))
