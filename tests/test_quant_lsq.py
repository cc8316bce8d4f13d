"""LSQ quantizer, quantized layers and model preparation, against the formulas (docs/measures.md 2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatlab.errors import FlatlabError
from flatlab.models import build_model
from flatlab.quant import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    effective_model,
    init_scale,
    lsq_quantize,
    quantize_model,
    quantized_layers,
)
from flatlab.quant.lsq import signed_range, unsigned_range

DT = torch.float64


def _reference(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int):
    """Forward value and the elementwise d w_hat / d x, d w_hat / d s, written out case by case."""
    out = torch.empty_like(x)
    dx = torch.empty_like(x)
    ds = torch.empty_like(x)
    sb = s.expand_as(x)
    for i in range(x.numel()):
        xi, si = float(x.reshape(-1)[i]), float(sb.reshape(-1)[i])
        v = xi / si
        if v < -qn:
            out.view(-1)[i], dx.view(-1)[i], ds.view(-1)[i] = -qn * si, 0.0, -qn
        elif v > qp:
            out.view(-1)[i], dx.view(-1)[i], ds.view(-1)[i] = qp * si, 0.0, qp
        else:
            r = float(torch.round(torch.tensor(v, dtype=DT)))
            out.view(-1)[i], dx.view(-1)[i], ds.view(-1)[i] = r * si, 1.0, -v + r
    return out, dx, ds


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_signed_forward_and_both_gradients_per_channel(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    qn, qp = signed_range(bits)
    assert (qn, qp) == (2 ** (bits - 1), 2 ** (bits - 1) - 1)
    s = (torch.rand(3, 1, generator=g, dtype=DT) + 0.5) * 0.1
    # Values spread over [-1.6, 1.6] * (qp+1) * s: inside, below and above the clipping range.
    x = (torch.rand(3, 40, generator=g, dtype=DT) * 3.2 - 1.6) * (qp + 1) * s
    x.requires_grad_(True)
    s_param = s.clone().requires_grad_(True)
    upstream = torch.randn(3, 40, generator=g, dtype=DT)
    grad_scale = 1.0 / math.sqrt(40 * qp)
    y = lsq_quantize(x, s_param, qn, qp, grad_scale)
    (y * upstream).sum().backward()
    out, dx, ds = _reference(x.detach(), s, qn, qp)
    inside = dx.bool()
    assert inside.any() and (~inside).any(), "the test data must cover both regimes"
    assert (x.detach() / s < -qn).any() and (x.detach() / s > qp).any()
    torch.testing.assert_close(y.detach(), out, rtol=0, atol=1e-15)
    torch.testing.assert_close(x.grad, upstream * dx, rtol=0, atol=0)
    expected_s = (upstream * ds).sum(dim=1, keepdim=True) * grad_scale
    torch.testing.assert_close(s_param.grad, expected_s, rtol=1e-12, atol=1e-15)


def test_per_tensor_and_unsigned_activation_range() -> None:
    g = torch.Generator().manual_seed(0)
    qn, qp = unsigned_range(3)
    assert (qn, qp) == (0, 7)
    x = (torch.rand(5, 6, generator=g, dtype=DT) * 2 - 0.5).requires_grad_(True)  # some negative
    s = torch.tensor([0.13], dtype=DT, requires_grad=True)
    upstream = torch.randn(5, 6, generator=g, dtype=DT)
    y = lsq_quantize(x, s, qn, qp, 0.25)
    (y * upstream).sum().backward()
    out, dx, ds = _reference(x.detach(), s.detach(), qn, qp)
    torch.testing.assert_close(y.detach(), out, rtol=0, atol=1e-15)
    assert y.min() >= 0 and float((y / s).detach().max()) <= qp + 1e-9
    torch.testing.assert_close(x.grad, upstream * dx, rtol=0, atol=0)
    torch.testing.assert_close(s.grad, ((upstream * ds).sum() * 0.25).reshape(1), rtol=1e-12, atol=1e-15)


def test_scale_gradient_is_lsq_straight_through_not_the_true_derivative() -> None:
    """Inside the range the true derivative of round(w/s) s is round(w/s); LSQ's straight-through
    gradient is -w/s + round(w/s) (Esser et al. eq. 3). Check we implement the latter."""
    w = torch.tensor([0.31, -0.52, 0.07], dtype=DT)
    s = torch.tensor([0.1], dtype=DT, requires_grad=True)
    lsq_quantize(w, s, 8, 7, 1.0).sum().backward()
    lsq = float((-w / 0.1 + torch.round(w / 0.1)).sum())
    assert math.isclose(float(s.grad), lsq, rel_tol=1e-12)
    assert not math.isclose(float(s.grad), float(torch.round(w / 0.1).sum()), rel_tol=1e-3)


def test_init_scale_formula() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=DT)
    _, qp = signed_range(4)
    s = init_scale(w, qp, per_channel=True)
    assert s.shape == (4, 1, 1, 1)
    expected = 2 * w.abs().reshape(4, -1).mean(1) / math.sqrt(qp)
    torch.testing.assert_close(s.flatten(), expected)
    st = init_scale(w, qp, per_channel=False)
    assert st.shape == (1,)
    torch.testing.assert_close(st, (2 * w.abs().mean() / math.sqrt(qp)).reshape(1))


@pytest.mark.parametrize("n_mode", ["channel", "tensor"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_layer_grad_scale_n(n_mode: str, per_channel: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, bias=False).double()
    q = QuantConv2d.from_float(conv, QuantConfig(bits=4, per_channel=per_channel, grad_scale_n=n_mode))
    qp = 7
    n = 2 * 3 * 3 if (per_channel and n_mode == "channel") else 3 * 2 * 3 * 3
    assert q.weight_grad_scale() == pytest.approx(1 / math.sqrt(n * qp))
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    q(x).square().sum().backward()
    # Recompute the scale gradient by hand from the quantizer's output gradient.
    w = conv.weight.detach()
    s = q.weight_scale.detach()
    w_hat = torch.round(torch.clamp(w / s, -8, 7)) * s
    w_hat.requires_grad_(True)
    nn.functional.conv2d(x, w_hat).square().sum().backward()
    _, _, ds = _reference(w, s, 8, qp)
    expected = (w_hat.grad * ds)
    expected = expected.sum(dim=(1, 2, 3), keepdim=True) if per_channel else expected.sum().reshape(1)
    torch.testing.assert_close(q.weight_scale.grad, expected / math.sqrt(n * qp))


def test_config_validation_and_round_trip() -> None:
    for bad in (1, 9, 0, -3):
        with pytest.raises(FlatlabError, match="bits must be from 2 to 8"):
            QuantConfig(bits=bad)
    with pytest.raises(FlatlabError, match="integer"):
        QuantConfig(bits="4")  # type: ignore[arg-type]
    with pytest.raises(FlatlabError, match="act_bits"):
        QuantConfig(act_bits=12)
    with pytest.raises(FlatlabError, match="grad_scale_n"):
        QuantConfig(grad_scale_n="layer")
    with pytest.raises(FlatlabError, match="per_channel"):
        QuantConfig(per_channel="yes")  # type: ignore[arg-type]
    cfg = QuantConfig(bits=3, per_channel=False, act_bits=4, keep_first_fp=True)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(FlatlabError, match="unknown quantization option"):
        QuantConfig.from_dict({**cfg.to_dict(), "bitz": 4})


def test_quantize_model_layers_names_and_rng() -> None:
    model = build_model("cnn", (1, 16, 16), 10, width=4)
    fp_names = [n for n, _ in model.named_parameters()]
    weight_ids = {n: id(p) for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    quantize_model(model, QuantConfig(bits=4))
    assert torch.equal(rng, torch.get_rng_state()), "quantizing must not draw random numbers"
    layers = quantized_layers(model)
    assert sorted(layers) == ["features.0", "features.3", "features.6"]
    assert type(model.classifier) is nn.Linear
    # Latent weights are the same Parameter objects under the same names; scales are added.
    for n, p in model.named_parameters():
        if n in weight_ids:
            assert id(p) == weight_ids[n]
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if not n.endswith("weight_scale")] == fp_names
    assert "features.0.weight_scale" in names
    with pytest.raises(FlatlabError, match="already quantized"):
        quantize_model(model, QuantConfig(bits=4))

    first_fp = quantize_model(build_model("cnn", (1, 16, 16), 10, width=4), QuantConfig(keep_first_fp=True))
    assert sorted(quantized_layers(first_fp)) == ["features.3", "features.6"]
    all_q = quantize_model(build_model("mlp", (1, 8, 8), 10, width=4, depth=1), QuantConfig(quantize_classifier=True))
    assert isinstance(all_q.classifier, QuantLinear) and isinstance(all_q.features[1], QuantLinear)
    with pytest.raises(FlatlabError, match="no module named 'classifier'"):
        quantize_model(nn.Sequential(nn.Linear(3, 2)), QuantConfig())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_distinct_values_per_channel_and_effective_model(bits: int) -> None:
    torch.manual_seed(bits)
    fp = build_model("cnn", (1, 16, 16), 10, width=8).double().eval()
    fp_names = [n for n, _ in fp.named_parameters()]
    model = quantize_model(fp, QuantConfig(bits=bits))
    for layer in quantized_layers(model).values():
        w = layer.dequantized_weight().reshape(layer.weight.shape[0], -1)
        distinct = max(len(torch.unique(row)) for row in w)
        assert distinct <= 2**bits
        codes = layer.weight_codes()
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    x = torch.randn(5, 1, 16, 16, dtype=DT)
    eff = effective_model(model)
    assert [n for n, _ in eff.named_parameters()] == fp_names
    assert not quantized_layers(eff) and quantized_layers(model), "the original stays quantized"
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in eff.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert torch.equal(eff(x), model(x))


def test_activation_quantization_and_its_effective_model() -> None:
    torch.manual_seed(0)
    model = quantize_model(build_model("mlp", (1, 4, 4), 3, width=6, depth=2).double(), QuantConfig(bits=4, act_bits=3))
    x = torch.randn(7, 1, 4, 4, dtype=DT)
    model.train()
    model(x)  # initialises the input scales from the first batch
    first, second = model.features[1], model.features[3]
    assert bool(first.act_signed) and not bool(second.act_signed), "raw input is signed, ReLU output is not"
    assert first.act_range() == (4, 3) and second.act_range() == (0, 7)
    names = [n for n, _ in model.named_parameters()]
    assert "features.1.act_scale" in names
    model.eval()
    eff = effective_model(model)
    assert "features.1.act_scale" not in [n for n, _ in eff.named_parameters()]
    assert torch.equal(eff(x), model(x))
    # The scale of the second layer's input gets a gradient.
    model.zero_grad()
    model(x).sum().backward()
    assert second.act_scale.grad is not None and float(second.act_scale.grad.abs()) > 0


def test_hessian_vector_product_through_quantized_model() -> None:
    """Measurements differentiate twice through the quantizer: that must work and be finite."""
    torch.manual_seed(0)
    model = quantize_model(build_model("mlp", (1, 4, 4), 3, width=5, depth=1).double(), QuantConfig(bits=4)).eval()
    x, y = torch.randn(6, 1, 4, 4, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2])
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params, allow_unused=True)
    assert all(h is None or torch.isfinite(h).all() for h in hv)


@pytest.mark.parametrize("per_channel", [True, False])
def test_no_clipping_fast_path_matches_formulas_and_double_backward(per_channel: bool) -> None:
    """When nothing is clipped (the usual 8-bit case) the quantizer takes a mask-free path; it must
    give the same values and gradients as the case-by-case formulas and as the double-backward path."""
    g = torch.Generator().manual_seed(3)
    qn, qp = signed_range(8)
    s = (torch.rand(4, 1, generator=g, dtype=DT) + 0.5) * 0.1 if per_channel else torch.tensor([0.07], dtype=DT)
    x = ((torch.rand(4, 30, generator=g, dtype=DT) * 2 - 1) * 0.9 * qp * s).requires_grad_(True)
    assert (x.detach() / s).abs().max() < qp, "the test data must not be clipped"
    s_param = s.clone().requires_grad_(True)
    upstream = torch.randn(4, 30, generator=g, dtype=DT)
    y = lsq_quantize(x, s_param, qn, qp, 0.3)
    (y * upstream).sum().backward()
    out, dx, ds = _reference(x.detach(), s, qn, qp)
    torch.testing.assert_close(y.detach(), out, rtol=0, atol=1e-15)
    torch.testing.assert_close(x.grad, upstream, rtol=0, atol=0)
    expected_s = (upstream * ds).sum(dim=1, keepdim=True) if per_channel else (upstream * ds).sum().reshape(1)
    torch.testing.assert_close(s_param.grad, expected_s * 0.3, rtol=1e-12, atol=1e-15)
    # The create_graph path (used by Hessian-vector products) gives the same first-order gradients.
    gx, gs = torch.autograd.grad((lsq_quantize(x, s_param, qn, qp, 0.3) * upstream).sum(), [x, s_param],
                                 create_graph=True)
    torch.testing.assert_close(gx, x.grad, rtol=0, atol=0)
    torch.testing.assert_close(gs, s_param.grad, rtol=1e-12, atol=1e-15)
