"""Local flatness (SWAD's F_gamma) against the quadratic's closed form."""

from __future__ import annotations

import pytest
import torch
from cases import quadratic_case, tiny_cnn_bn_case

from flatlab.errors import FlatlabError
from flatlab.sharpness import local_flatness


def test_quadratic_flatness_is_gamma_sq_trace_over_2n():
    case = quadratic_case(n_params=8)
    with torch.no_grad():  # off the minimum: the gradient term must cancel too
        case.model.w.add_(0.3)
    a = case.model.a
    n = a.shape[0]
    radii = [0.0, 0.5, 1.0, 2.0]
    out = local_flatness(case.model, {"source": case.batches}, radii, relative=False, samples=400,
                         loss_fn=case.loss_fn, seed=3)
    src = out["splits"]["source"]
    assert out["gammas"] == radii
    for gamma, value, err in zip(radii, src["flatness"], src["stderr"]):
        truth = gamma**2 * float(torch.trace(a)) / (2 * n)
        assert abs(value - truth) <= 4 * err + 1e-12
        if gamma > 0:
            assert err > 0
            assert value == pytest.approx(truth, rel=0.1)
    assert src["flatness"][0] == 0.0


def test_relative_radii_same_seed_same_numbers_and_model_untouched():
    case = tiny_cnn_bn_case()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    splits = {"source": case.batches[:1], "target": case.batches[1:]}
    a = local_flatness(case.model, splits, [0.0, 0.05, 0.1], samples=6, loss_fn=case.loss_fn, seed=1)
    b = local_flatness(case.model, splits, [0.0, 0.05, 0.1], samples=6, loss_fn=case.loss_fn, seed=1)
    assert a == b
    norm = torch.sqrt(sum(p.detach().pow(2).sum() for p in case.model.parameters()))
    assert a["gammas"][2] == pytest.approx(0.1 * float(norm))
    assert set(a["splits"]) == {"source", "target"}
    for k, v in case.model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("radii", [[0.1, 0.05], [0.0, 0.0, 1.0], [-1.0, 1.0], []])
def test_radii_must_increase(radii):
    case = quadratic_case()
    with pytest.raises(FlatlabError):
        local_flatness(case.model, {"source": case.batches}, radii, loss_fn=case.loss_fn, samples=4)


def _even_odd_variances(case, gamma: float) -> tuple[float, float]:
    """Closed form on the quadratic L(w + D) = L(w) + g.D + D^T A D / 2, D uniform on the sphere of
    radius gamma in n dimensions: Var O = gamma^2 ||g||^2 / n (O = g.D), and with u = D / gamma,
    Var E = gamma^4 / 4 Var(u^T A u) = gamma^4 / 4 * 2 (n tr(A^2) - tr(A)^2) / (n^2 (n + 2))."""
    a = case.model.a
    n = a.shape[0]
    g = a @ (case.model.w.detach() - case.model.center)
    var_odd = gamma**2 * float(g @ g) / n
    var_even = gamma**4 / 4 * 2 * (n * float(torch.trace(a @ a)) - float(torch.trace(a)) ** 2) / (n**2 * (n + 2))
    return var_even, var_odd


@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_reported_stderr_is_the_closed_form_for_both_samplings(offset):
    """Independent directions: SE^2 = (Var E + Var O) / N; antithetic pairs: SE^2 = 2 Var E / N.
    At the minimum (g = 0) pairs lose (sqrt 2 larger SE); off it, with the gradient term
    dominating, they win: the claim of the module docstring, checked against the closed form."""
    case = quadratic_case(n_params=8)
    with torch.no_grad():
        case.model.w.add_(offset)
    gamma, n_eval = 1.0, 2000
    var_even, var_odd = _even_odd_variances(case, gamma)
    got = {}
    for paired in (False, True):
        out = local_flatness(case.model, {"source": case.batches}, [gamma], relative=False, samples=n_eval,
                             loss_fn=case.loss_fn, seed=5, antithetic=paired)
        src = out["splits"]["source"]
        assert src["antithetic"] is paired and src["evaluations"] == n_eval
        got[paired] = src["stderr"][0]
    assert got[False] ** 2 * n_eval == pytest.approx(var_even + var_odd, rel=0.15)
    assert got[True] ** 2 * n_eval == pytest.approx(2 * var_even, rel=0.15)
    assert (got[True] < got[False]) == (var_odd > var_even)
    if offset == 0.0:
        assert var_odd == 0.0 and got[True] > 1.3 * got[False]
    else:
        assert var_odd > 3 * var_even and got[True] < 0.7 * got[False]


def test_default_pairs_the_target_split_only():
    case = tiny_cnn_bn_case()
    splits = {"source": case.batches[:1], "target": case.batches[1:]}
    out = local_flatness(case.model, splits, [0.05], samples=6, loss_fn=case.loss_fn, seed=1)
    assert out["antithetic"] == ["target"]
    assert not out["splits"]["source"]["antithetic"] and out["splits"]["target"]["antithetic"]
    assert out["splits"]["source"]["evaluations"] == out["splits"]["target"]["evaluations"] == 6
    both = local_flatness(case.model, splits, [0.05], samples=6, loss_fn=case.loss_fn, seed=1, antithetic="both")
    assert both["splits"]["target"] == out["splits"]["target"]  # common directions: the paired split agrees
    assert both["splits"]["source"]["antithetic"]


def test_measure_setting_chooses_the_paired_splits():
    from flatlab.measures import ConfigError, LocalFlatnessConfig
    from flatlab.pipeline import measure_model

    case = tiny_cnn_bn_case()
    data = {"source": case.batches[:1], "target": case.batches[1:]}
    got = {}
    for choice in ("target", "none", "both"):
        config = LocalFlatnessConfig(gammas_rel=(0.05,), samples=4, antithetic=choice)
        result = measure_model(case.model, data, [config], loss_fn=case.loss_fn)["local_flatness"]
        got[choice] = (result.attrs["source_antithetic"], result.attrs["target_antithetic"])
        assert result.attrs["antithetic"] == choice
    assert got == {"target": (False, True), "none": (False, False), "both": (True, True)}
    with pytest.raises(ConfigError, match="antithetic must be one of"):
        LocalFlatnessConfig(antithetic="yes")
