"""Adaptive / standard sharpness at a fixed radius against closed forms, brute force and the
ReLU rescaling symmetry."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from cases import (
    linear_regression_case,
    quadratic_case,
    relu_two_layer_case,
    rescale_relu_layers,
    tiny_cnn_bn_case,
)

from flatlab.errors import FlatlabError
from flatlab.sharpness import AdaptiveSharpnessConfig, adaptive_sharpness
from flatlab.sharpness.adaptive import apgd_checkpoints, partition_batches


def _scale(case, scaling: str) -> torch.Tensor:
    return case.model.center.abs() if scaling == "adaptive" else torch.ones_like(case.model.center)


# -- (a) quadratic at its minimum: closed forms and brute force ------------------------------------
@pytest.mark.parametrize("scaling", ["standard", "adaptive"])
def test_l2_worst_case_on_quadratic_is_rho_sq_lambda_max_over_2(scaling):
    case = quadratic_case(n_params=8)  # w = w*: the minimum; spectrum 10 ... 0.01
    rho = 0.5
    c = _scale(case, scaling)
    truth = rho**2 * float(torch.linalg.eigvalsh(c[:, None] * case.model.a * c[None, :]).max()) / 2
    out = adaptive_sharpness(case.model, case.batches, AdaptiveSharpnessConfig(rho=rho, scaling=scaling, p=2),
                             loss_fn=case.loss_fn)
    assert out.base_loss == 0.0
    assert out.value <= truth * (1 + 1e-12)  # the ascent finds a feasible point: a lower bound
    assert out.value == pytest.approx(truth, rel=1e-6)
    assert out.num_batches == 1 and out.m is None and math.isnan(out.stderr) and out.stderr_over == "none"


@pytest.mark.parametrize("scaling", ["standard", "adaptive"])
def test_linf_worst_case_on_quadratic_is_the_best_vertex(scaling):
    case = quadratic_case(n_params=3, seed=1)
    rho = 0.5
    c = _scale(case, scaling)
    a = case.model.a
    # A convex function's maximum over a box is at a vertex: enumerate all 2^3.
    vertices = [torch.tensor(s, dtype=torch.float64) * rho * c for s in itertools.product([-1.0, 1.0], repeat=3)]
    truth = max(float(0.5 * v @ a @ v) for v in vertices)
    config = AdaptiveSharpnessConfig(rho=rho, scaling=scaling, p="inf", restarts=3)
    out = adaptive_sharpness(case.model, case.batches, config, loss_fn=case.loss_fn)
    assert out.value == pytest.approx(truth, rel=1e-9)
    assert len(out.run_values[0]) == 4 and max(out.run_values[0]) == out.value


@pytest.mark.parametrize(("scaling", "p", "divisor"),
                         [("standard", 2, 2.0), ("adaptive", 2, 2.0), ("standard", "inf", 6.0), ("adaptive", "inf", 6.0)])
def test_average_case_on_quadratic_is_rho_sq_trace_within_stderr(scaling, p, divisor):
    case = quadratic_case(n_params=8)
    c = _scale(case, scaling)
    with torch.no_grad():  # off the minimum: the gradient term must average out too
        case.model.w.add_(0.3)
    rho = 0.5
    # E[(rho c z)^T A (rho c z)] / 2 = rho^2 tr(C A C) E[z_i^2] / 2, E[z_i^2] = 1 (Gaussian) or 1/3 (uniform).
    truth = rho**2 * float((c**2 * torch.diagonal(case.model.a)).sum()) / divisor
    config = AdaptiveSharpnessConfig(rho=rho, kind="average", scaling=scaling, p=p, samples=400, seed=2)
    out = adaptive_sharpness(case.model, case.batches, config, loss_fn=case.loss_fn)
    assert out.stderr_over == "draws" and out.stderr > 0
    assert abs(out.value - truth) <= 4 * out.stderr
    assert out.value == pytest.approx(truth, rel=0.2)
    assert out.base_loss > 0 and out.perturbed_loss == pytest.approx(out.base_loss + out.value)


# -- (b) the ReLU rescaling symmetry ---------------------------------------------------------------
def _pair(a: float = 3.0):
    case = relu_two_layer_case()
    scaled = rescale_relu_layers(case.model, a)
    x = torch.cat([xb for xb, _ in case.batches])
    assert torch.allclose(case.model(x), scaled(x), rtol=0, atol=1e-12)  # the same function
    return case, scaled


@pytest.mark.parametrize("config", [
    AdaptiveSharpnessConfig(rho=0.05, p=2),
    AdaptiveSharpnessConfig(rho=0.05, p="inf", m=10),
    AdaptiveSharpnessConfig(rho=0.2, kind="average", samples=20),
], ids=["worst-l2", "worst-linf-m10", "average-l2"])
def test_adaptive_sharpness_is_invariant_to_relu_rescaling(config):
    case, scaled = _pair()
    one = adaptive_sharpness(case.model, case.batches, config)
    two = adaptive_sharpness(scaled, case.batches, config)
    assert one.value > 0
    # The ascent path in u = delta / c (and the average case's noise, common random numbers)
    # maps onto itself: equal to round-off, not just to the ascent's tolerance.
    assert two.value == pytest.approx(one.value, rel=1e-9)
    assert two.per_batch == pytest.approx(one.per_batch, rel=1e-9)


@pytest.mark.parametrize("config", [
    AdaptiveSharpnessConfig(rho=0.5, scaling="standard", p=2),
    AdaptiveSharpnessConfig(rho=0.3, scaling="standard", kind="average", samples=20),
], ids=["worst-l2", "average-l2"])
def test_standard_sharpness_changes_under_relu_rescaling(config):
    case, scaled = _pair()
    one = adaptive_sharpness(case.model, case.batches, config)
    two = adaptive_sharpness(scaled, case.batches, config)
    assert one.value > 0 and two.value > 0
    assert abs(two.value / one.value - 1) > 0.3


# -- (c) m-sharpness -------------------------------------------------------------------------------
def _subset_top_eigenvalues(x: torch.Tensor, m: int) -> list[float]:
    return [float(torch.linalg.eigvalsh(x[i:i + m].T @ x[i:i + m] / m).max()) for i in range(0, len(x) - m + 1, m)]


@pytest.mark.parametrize("batch", [4, 5], ids=["m-equals-batch", "subsets-straddle-batches"])
def test_m_sharpness_equals_the_per_subset_closed_form(batch):
    case = linear_regression_case(n=12, k=3, batch=batch)  # batch 5: batches 5, 5, 2, subsets straddle them
    x = torch.cat([xb for xb, _ in case.batches])
    rho = 0.3
    # 100 steps: a subset's top eigengap is only ~20%, where 20 steps stop ~1e-5 short.
    whole = adaptive_sharpness(case.model, case.batches,
                               AdaptiveSharpnessConfig(rho=rho, scaling="standard", steps=100), loss_fn=case.loss_fn)
    per4 = adaptive_sharpness(case.model, case.batches,
                              AdaptiveSharpnessConfig(rho=rho, scaling="standard", m=4, steps=100), loss_fn=case.loss_fn)
    truth_whole = rho**2 * float(torch.linalg.eigvalsh(x.T @ x / len(x)).max()) / 2
    truth_per4 = [rho**2 * lam / 2 for lam in _subset_top_eigenvalues(x, 4)]
    assert whole.value == pytest.approx(truth_whole, rel=1e-6)
    assert per4.per_batch == pytest.approx(truth_per4, rel=1e-6)
    assert per4.value == pytest.approx(sum(truth_per4) / 3, rel=1e-6)
    # lambda_max is convex: the mean over subsets exceeds the whole set's (strictly here).
    assert per4.value > 1.1 * whole.value
    assert per4.num_batches == 3 and per4.samples_left_out == 0 and per4.stderr_over == "batches"
    assert per4.stderr == pytest.approx(torch.tensor(truth_per4).std().item() / math.sqrt(3), rel=1e-5)


def test_m_not_dividing_the_set_leaves_the_remainder_out():
    case = linear_regression_case(n=12, k=3, batch=5)
    x = torch.cat([xb for xb, _ in case.batches])
    out = adaptive_sharpness(case.model, case.batches,
                             AdaptiveSharpnessConfig(rho=0.3, scaling="standard", m=5, steps=100), loss_fn=case.loss_fn)
    assert (out.num_batches, out.num_samples, out.samples_left_out) == (2, 10, 2)
    assert out.per_batch == pytest.approx([0.09 * lam / 2 for lam in _subset_top_eigenvalues(x, 5)], rel=1e-6)


def test_m_average_case_per_subset_within_stderr():
    case = linear_regression_case(n=12, k=3, batch=5)
    x = torch.cat([xb for xb, _ in case.batches])
    rho = 0.3
    config = AdaptiveSharpnessConfig(rho=rho, scaling="standard", kind="average", m=4, samples=200, seed=5)
    out = adaptive_sharpness(case.model, case.batches, config, loss_fn=case.loss_fn)
    truths = [rho**2 * float(torch.trace(x[i:i + 4].T @ x[i:i + 4] / 4)) / 2 for i in range(0, 12, 4)]
    assert len(out.per_batch_stderr) == 3
    for value, err, truth in zip(out.per_batch, out.per_batch_stderr, truths):
        assert err > 0 and abs(value - truth) <= 4 * err
    # The expectation is linear in the subset, so the mean over subsets is the whole set's.
    assert abs(out.value - rho**2 * float(torch.trace(x.T @ x / 12)) / 2) <= 4 * out.stderr


def test_partition_is_consecutive_and_uses_views():
    case = linear_regression_case(n=12, batch=5)
    subsets, left = partition_batches(case.batches, 4)
    assert left == 0 and [[len(y) for _, y in s] for s in subsets] == [[4], [1, 3], [2, 2]]
    x = torch.cat([xb for xb, _ in case.batches])
    assert torch.equal(torch.cat([xb for xb, _ in subsets[1]]), x[4:8])
    whole, left = partition_batches(case.batches, None)
    assert left == 0 and len(whole) == 1 and len(whole[0]) == 3


# -- the model is left as it was; determinism; costs -----------------------------------------------
def test_weights_modes_and_grads_restored():
    case = tiny_cnn_bn_case()
    model = case.model.train()
    model[1].eval()  # a mixed-mode model: each module's own flag must come back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [mod.training for mod in model.modules()]
    for config in (AdaptiveSharpnessConfig(rho=0.05, steps=4),
                   AdaptiveSharpnessConfig(rho=0.05, kind="average", samples=4, params="no-bn")):
        adaptive_sharpness(model, case.batches, config)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [mod.training for mod in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def test_restored_after_an_error_inside_the_ascent():
    case = relu_two_layer_case()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    calls = 0

    def failing_loss(out, y):
        nonlocal calls
        calls += 1
        if calls > 10:
            raise RuntimeError("boom")
        return torch.nn.functional.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        adaptive_sharpness(case.model, case.batches, AdaptiveSharpnessConfig(rho=0.5), loss_fn=failing_loss)
    assert all(torch.equal(v, before[k]) for k, v in case.model.state_dict().items())


def test_same_seed_same_numbers_and_pass_counts():
    case = relu_two_layer_case()
    config = AdaptiveSharpnessConfig(rho=0.1, steps=6, restarts=1, seed=4)
    one = adaptive_sharpness(case.model, case.batches, config)
    assert repr(one.to_dict()) == repr(adaptive_sharpness(case.model, case.batches, config).to_dict())  # NaN stderr
    other = adaptive_sharpness(case.model, case.batches, AdaptiveSharpnessConfig(rho=0.1, steps=6, restarts=1, seed=5))
    assert other.run_values != one.run_values
    # Base loss: 1 forward; each of 2 runs: a gradient at the start and after every step but the
    # last (forward + backward), and one forward for the last point.
    assert (one.forward_passes, one.backward_passes) == (1 + 2 * 7, 2 * 6)
    avg = adaptive_sharpness(case.model, case.batches, AdaptiveSharpnessConfig(rho=0.1, kind="average", samples=7))
    assert (avg.forward_passes, avg.backward_passes) == (1 + 8, 0)  # 7 rounded up to 4 pairs
    assert one.to_dict()["config"]["p"] == 2 and one.num_parameters == 4 * 6 + 6 + 6 * 3 + 3


def test_no_bn_leaves_normalization_parameters_alone():
    case = tiny_cnn_bn_case()
    total = sum(p.numel() for p in case.model.parameters())
    out = adaptive_sharpness(case.model, case.batches, AdaptiveSharpnessConfig(rho=0.05, steps=2, params="no-bn"))
    assert out.num_parameters == total - 4  # BatchNorm2d(2): weight and bias


def test_apgd_checkpoints_follow_the_schedule():
    # p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): .22 .41 .57 .70 .80 .87 .93 .99
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(20) == [5, 9, 12, 14, 16, 18, 19, 20]
    assert apgd_checkpoints(1) == [1]


def test_constant_schedule_never_halves():
    case = relu_two_layer_case()
    out = adaptive_sharpness(case.model, case.batches, AdaptiveSharpnessConfig(rho=0.1, steps=12, schedule="constant"))
    assert out.step_halvings == 0 and out.value >= 0


# -- (d) bad inputs name the parameter -------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rho": 0}, "rho must be positive, got 0"),
    ({"rho": -1}, "rho must be positive, got -1"),
    ({"rho": float("nan")}, "rho must be positive"),
    ({"rho": "big"}, "rho must be a positive number"),
    ({"rho": 0.1, "p": 3}, "p must be 2 or inf, got 3"),
    ({"rho": 0.1, "p": "l1"}, "p must be 2 or inf"),
    ({"rho": 0.1, "kind": "max"}, "kind must be one of worst, average"),
    ({"rho": 0.1, "scaling": "elementwise"}, "scaling must be one of adaptive, standard"),
    ({"rho": 0.1, "m": 0}, "m must be a positive number of samples"),
    ({"rho": 0.1, "m": 2.5}, "m must be a positive number of samples"),
    ({"rho": 0.1, "steps": 0}, "steps must be at least 1, got 0"),
    ({"rho": 0.1, "steps": True}, "steps must be an integer"),
    ({"rho": 0.1, "restarts": -1}, "restarts must be at least 0"),
    ({"rho": 0.1, "samples": 1}, "samples must be at least 2"),
    ({"rho": 0.1, "samples": 3}, "samples must be at least 4 with antithetic"),
    ({"rho": 0.1, "momentum": 0}, "momentum must be positive"),
    ({"rho": 0.1, "momentum": 1.5}, "momentum must be in (0, 1]"),
    ({"rho": 0.1, "improvement_ratio": 2}, "improvement_ratio must be in (0, 1]"),
    ({"rho": 0.1, "initial_step": 0}, "initial_step must be positive"),
    ({"rho": 0.1, "schedule": "cosine"}, "schedule must be one of apgd, constant"),
    ({"rho": 0.1, "params": "weights"}, "params must be one of all, no-bn"),
    ({"rho": 0.1, "seed": -1}, "seed must be at least 0"),
    ({"rho": 0.1, "random_start": "yes"}, "random_start must be true or false"),
    ({"rho": 0.1, "restarts": 2, "random_start": False}, "restarts = 2 needs random_start = true"),
])
def test_bad_settings_raise_naming_the_parameter(kwargs, message):
    with pytest.raises(FlatlabError) as info:
        AdaptiveSharpnessConfig(**kwargs)
    assert message in str(info.value)


def test_p_spellings_and_data_errors():
    assert AdaptiveSharpnessConfig(rho=1, p="inf").p == math.inf
    assert AdaptiveSharpnessConfig(rho=1, p=float("inf")).p == math.inf
    assert AdaptiveSharpnessConfig(rho=1, p="2").p == 2.0
    case = linear_regression_case(n=12)
    with pytest.raises(FlatlabError, match=r"m must be at most the number of samples \(12\), got 13"):
        adaptive_sharpness(case.model, case.batches, AdaptiveSharpnessConfig(rho=1, m=13), loss_fn=case.loss_fn)
    with pytest.raises(FlatlabError, match="no samples"):
        adaptive_sharpness(case.model, [], AdaptiveSharpnessConfig(rho=1), loss_fn=case.loss_fn)
