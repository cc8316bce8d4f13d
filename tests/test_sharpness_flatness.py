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
