"""Curvature of quantized checkpoints: effective (de-quantized) weights and latent weights (STE)."""

from __future__ import annotations

import numpy as np
import torch

from flatlab.checkpoint import load_checkpoint
from flatlab.curvature import HessianOperator, lanczos_top_eigenvalues, select_parameters
from flatlab.models import build_model
from flatlab.quant import effective_model


def _batches(ckpt, n: int = 96):
    batches = ckpt.splits().split_batches("source", batch_size=40, max_samples=n, seed=0)
    return [(x.double(), y) for x, y in batches]


def _hand_dequantized_fp_model(ckpt) -> torch.nn.Module:
    """The unquantized architecture holding round(clip(w/s, -Qn, Qp)) * s, computed here by hand."""
    meta = ckpt.meta
    bits = int(meta["quant"]["bits"])
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    model = build_model(meta["model"], meta["input_shape"], meta["num_classes"], **meta["model_options"])
    state = {}
    for key, value in ckpt.state_dict.items():
        if "scale" in key.rsplit(".", 1)[-1]:
            continue
        scale_key = key + "_scale"
        if scale_key in ckpt.state_dict:
            s = ckpt.state_dict[scale_key]
            value = torch.round(torch.clamp(value / s, -qn, qp)) * s
        state[key] = value
    model.load_state_dict(state, strict=True)
    return model.double().eval()


def test_effective_hessian_equals_fp_model_with_dequantized_weights(qat_run):
    ckpt = load_checkpoint(qat_run)
    assert ckpt.is_quantized
    batches = _batches(ckpt)
    effective = ckpt.build_model("cpu", effective=True).double()
    by_hand = _hand_dequantized_fp_model(ckpt)
    op_eff = HessianOperator(effective, batches)
    op_fp = HessianOperator(by_hand, batches)
    assert op_eff.param_names == op_fp.param_names
    torch.testing.assert_close(op_eff.parameter_vector(), op_fp.parameter_vector(), rtol=0, atol=1e-7)
    v = np.random.default_rng(0).standard_normal((op_eff.dim, 2))
    np.testing.assert_allclose(op_eff @ v, op_fp @ v, rtol=1e-6, atol=1e-8)
    top_eff = lanczos_top_eigenvalues(op_eff, k=2)
    top_fp = lanczos_top_eigenvalues(op_fp, k=2)
    np.testing.assert_allclose(top_eff.eigenvalues, top_fp.eigenvalues, rtol=1e-6)


def test_latent_hessian_is_the_ste_masked_effective_hessian(qat_run):
    ckpt = load_checkpoint(qat_run)
    batches = _batches(ckpt, 48)
    latent = ckpt.build_model("cpu").double()
    names = [n for n, _ in select_parameters(latent, "all")]
    assert not any("scale" in n for n in names)  # quantizer step sizes are never curvature parameters
    effective = effective_model(latent).eval()
    op_lat = HessianOperator(latent, batches)
    op_eff = HessianOperator(effective, batches)
    assert op_lat.param_names == op_eff.param_names
    bits = int(ckpt.meta["quant"]["bits"])
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    lookup = dict(latent.named_parameters())
    mask = []
    for name in names:
        p = lookup[name].detach()
        scale = lookup.get(name + "_scale")
        if scale is None:
            mask.append(torch.ones_like(p).reshape(-1))
        else:
            ratio = p / scale.detach()
            mask.append(((ratio >= -qn) & (ratio <= qp)).to(p.dtype).reshape(-1))
    d = torch.cat(mask).numpy()
    assert 0 < d.sum() < len(d) or d.sum() == len(d)
    v = np.random.default_rng(1).standard_normal(op_lat.dim)
    np.testing.assert_allclose(op_lat @ v, d * (op_eff @ (d * v)), rtol=1e-8, atol=1e-10)


def test_latent_model_auto_method_matches_double_backward(qat_run):
    ckpt = load_checkpoint(qat_run)
    batches = _batches(ckpt, 40)
    latent = ckpt.build_model("cpu").double()
    ref = HessianOperator(latent, batches, method="double-backward", graph_cache_bytes=0)
    auto = HessianOperator(latent, batches, method="auto")
    auto.method = "forward-over-reverse"  # falls back to double backward if torch.func cannot run the quantizer
    v = np.random.default_rng(2).standard_normal(ref.dim)
    np.testing.assert_allclose(auto @ v, ref @ v, rtol=1e-8, atol=1e-10)
