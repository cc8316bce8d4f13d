"""Curvature through scaled-dot-product attention, LayerNorm and GELU (float64, tiny models).

PyTorch's fused attention kernels have no double backward and no forward derivative, so flatlab
runs every product under the math kernel; these tests check that the products then equal the
dense float64 matrices, the explicit-softmax path of ``need_weights=True``, and central finite
differences of gradients computed through the fused kernel itself.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flatlab.curvature import (
    CURVATURES,
    CurvatureWarning,
    GGNOperator,
    HessianOperator,
    curvature_operator,
    dense_curvature,
    dense_hessian,
    lanczos_top_eigenvalues,
)
from flatlab.curvature.operator import ATTENTION_NOTE


class TinyAttention(nn.Module):
    """Linear embedding, one 2-head self-attention, mean over tokens, linear head (111 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.need_weights = False
        self.embed = nn.Linear(3, 4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attention(h, h, h, need_weights=self.need_weights)
        return self.head(a.mean(dim=1))


def _attention_case():
    torch.manual_seed(0)
    model = TinyAttention().double().eval()
    x = torch.randn(10, 4, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return model, [(x[:6], y[:6]), (x[6:], y[6:])]


def _tiny_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2,
                                                 hidden_dim=8, mlp_dim=16, num_classes=3).double().eval()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    return model, [(x, y)]


def _need_weights(attention: nn.MultiheadAttention) -> None:
    """Make ``attention`` compute explicit softmax weights (no scaled_dot_product_attention)."""
    original = attention.forward

    def forward(*args, **kwargs):
        kwargs["need_weights"] = True
        return original(*args, **kwargs)

    attention.forward = forward


@pytest.mark.parametrize("method", ["double-backward", "forward-over-reverse"])
def test_attention_hessian_eigenvalues_equal_dense_and_explicit_softmax(method):
    model, data = _attention_case()
    exact = np.linalg.eigvalsh(dense_hessian(model, data).numpy())[::-1][:3]
    with pytest.warns(CurvatureWarning, match="math scaled-dot-product-attention kernel"):
        op = HessianOperator(model, data, method=method)
    assert op.notes == [ATTENTION_NOTE]
    fused = lanczos_top_eigenvalues(op, k=3, rtol=1e-9)
    np.testing.assert_allclose(fused.eigenvalues, exact, rtol=1e-8)
    model.need_weights = True  # the explicit softmax path, no SDPA at all
    explicit = lanczos_top_eigenvalues(HessianOperator(model, data, method=method), k=3, rtol=1e-9)
    np.testing.assert_allclose(fused.eigenvalues, explicit.eigenvalues, rtol=1e-9)


@pytest.mark.parametrize("kind", CURVATURES)
def test_attention_products_of_every_curvature_equal_dense(kind):
    model, data = _attention_case()
    dense = dense_curvature(kind, model, data).numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = curvature_operator(kind, model, data)
        block = op.restricted(["attention.in_proj_weight", "attention.out_proj.weight"])
    # said once: the restricted block inherits the note without warning again
    assert [str(w.message).count("math scaled-dot-product") for w in caught] == [1]
    assert block.notes == op.notes
    v = np.random.default_rng(0).standard_normal((op.dim, 2))
    np.testing.assert_allclose(op @ v, dense @ v, rtol=1e-10, atol=1e-13)
    plain = curvature_operator(kind, nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double(), data)
    assert plain.notes == []  # no attention, no note


def test_vision_transformer_hessian_equals_finite_differences_of_fused_gradients():
    # LayerNorm, GELU, the class token and attention: H v against central differences of
    # gradients taken through PyTorch's default (fused) attention kernel.
    model, data = _tiny_vit()
    (x, y), = data
    op = HessianOperator(model, data)
    names = op.param_names
    flat0 = op.parameter_vector()

    def gradient_at(flat: torch.Tensor) -> torch.Tensor:
        weights = {n: c.view(s).clone().requires_grad_(True)
                   for n, c, s in zip(names, torch.split(flat, op.sizes), op.shapes)}
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, weights, (x,)), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(weights.values()))])

    def central(v: torch.Tensor, h: float) -> torch.Tensor:
        return (gradient_at(flat0 + h * v) - gradient_at(flat0 - h * v)) / (2 * h)

    rng = np.random.default_rng(1)
    for _ in range(2):
        v = torch.from_numpy(rng.standard_normal(op.dim))
        # Richardson extrapolation of central differences: error O(h^4) (~1e-9 here), rounding ~1e-11
        h = 1e-4
        truth = (4 * central(v, h / 2) - central(v, h)) / 3
        torch.testing.assert_close(op.product(v), truth, rtol=1e-6, atol=1e-7 * float(truth.abs().max()))


def test_vision_transformer_eigenvalues_equal_forced_math_kernel_and_explicit_softmax():
    model, data = _tiny_vit()
    default = lanczos_top_eigenvalues(HessianOperator(model, data), k=3, rtol=1e-8)
    with sdpa_kernel(SDPBackend.MATH):  # the caller forcing the math kernel itself
        forced = lanczos_top_eigenvalues(HessianOperator(model, data), k=3, rtol=1e-8)
    np.testing.assert_array_equal(default.eigenvalues, forced.eigenvalues)
    _need_weights(model.encoder.layers[0].self_attention)
    explicit = lanczos_top_eigenvalues(HessianOperator(model, data), k=3, rtol=1e-8)
    np.testing.assert_allclose(default.eigenvalues, explicit.eigenvalues, rtol=1e-9)
    assert default.converged and np.all(default.residuals <= 1e-8 * default.eigenvalues)


def test_vision_transformer_ggn_equals_dense():
    model, data = _tiny_vit()
    dense = dense_curvature("ggn", model, data).numpy()
    for method in ("double-vjp", "forward-mode"):
        op = GGNOperator(model, data, method=method)
        v = np.random.default_rng(2).standard_normal(op.dim)
        np.testing.assert_allclose(op @ v, dense @ v, rtol=1e-9, atol=1e-12 * np.abs(dense).max())
