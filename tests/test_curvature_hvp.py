"""Hessian-vector products against the dense Hessian (float64, tiny models from tests/cases.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import OldStyleSquare, flat_loss, quadratic_case, tiny_cnn_bn_case, tiny_mlp_case
from torch import nn

from flatlab.curvature import (
    HessianOperator,
    dense_hessian,
    hessian_vector_product,
    select_parameters,
)
from flatlab.errors import FlatlabError

CASES = [tiny_mlp_case, tiny_cnn_bn_case]


def brute_force_hessian(case) -> np.ndarray:
    """torch.autograd.functional.hessian of the |B|/N-weighted loss of a flat parameter vector."""
    full_loss, _, flat0 = flat_loss(case.model, case.batches, case.loss_fn)
    return torch.autograd.functional.hessian(full_loss, flat0).numpy()


@pytest.mark.parametrize("make_case", CASES)
def test_dense_hessian_matches_brute_force(make_case):
    case = make_case()
    np.testing.assert_allclose(dense_hessian(case.model, case.batches, case.loss_fn).numpy(),
                               brute_force_hessian(case), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make_case", CASES)
@pytest.mark.parametrize("method,cache", [("double-backward", None), ("double-backward", 0),
                                          ("forward-over-reverse", None)])
def test_hvp_equals_dense_hessian_times_v(make_case, method, cache):
    case = make_case()
    dense = brute_force_hessian(case)
    op = HessianOperator(case.model, case.batches, case.loss_fn, method=method, graph_cache_bytes=cache)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((op.dim, 3))
    np.testing.assert_allclose(op @ block, dense @ block, rtol=1e-10, atol=1e-12)
    assert op.num_products == 3
    v = torch.from_numpy(block[:, 0])
    torch.testing.assert_close(hessian_vector_product(case.model, case.batches, v, case.loss_fn, method=method),
                               torch.from_numpy(dense @ block[:, 0]), rtol=1e-10, atol=1e-12)
    # into a caller's buffer (stale contents must not leak into the product)
    buffer = torch.full((op.dim,), 7.0, dtype=torch.float64)
    assert op.hvp(v, out=buffer) is buffer
    torch.testing.assert_close(buffer, torch.from_numpy(dense @ block[:, 0]), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="out must be"):
        op.hvp(v, out=torch.zeros(op.dim, dtype=torch.float32))


def test_batches_weighted_by_size_not_count():
    case = tiny_mlp_case(n=40, batch=16)  # batches of 16, 16, 8
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    one_batch = HessianOperator(case.model, [(x, y)], case.loss_fn)
    uneven = HessianOperator(case.model, [(x[:3], y[:3]), (x[3:], y[3:])], case.loss_fn)
    v = np.random.default_rng(1).standard_normal(one_batch.dim)
    np.testing.assert_allclose(uneven @ v, one_batch @ v, rtol=1e-10, atol=1e-13)


def test_dataloader_input_and_eval_mode_restored():
    case = tiny_cnn_bn_case()
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    case.model.train()
    op = HessianOperator(case.model, loader, case.loss_fn)
    ref = HessianOperator(case.model, case.batches, case.loss_fn)
    v = np.random.default_rng(2).standard_normal(op.dim)
    np.testing.assert_allclose(op @ v, ref @ v, rtol=1e-10, atol=1e-13)
    assert case.model.training  # the caller's mode is restored
    bn = case.model[1]
    assert bn.num_batches_tracked.item() == 0  # eval mode: running statistics untouched


@pytest.mark.parametrize("which,expected", [("all", None), ("weights", ["0.weight", "5.weight"]),
                                            ("no-bn", ["0.weight", "0.bias", "5.weight", "5.bias"])])
def test_parameter_choice_gives_the_dense_sub_block(which, expected):
    case = tiny_cnn_bn_case()
    names = [n for n, _ in select_parameters(case.model, which)]
    all_names = [n for n, _ in case.model.named_parameters()]
    assert names == (expected or all_names)
    full = dense_hessian(case.model, case.batches, case.loss_fn).numpy()
    offsets = np.cumsum([0] + [p.numel() for p in case.model.parameters()])
    index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(all_names) if n in names])
    op = HessianOperator(case.model, case.batches, case.loss_fn, params=which)
    v = np.random.default_rng(3).standard_normal(op.dim)
    np.testing.assert_allclose(op @ v, full[np.ix_(index, index)] @ v, rtol=1e-10, atol=1e-13)


def test_quadratic_hessian_is_its_matrix():
    case = quadratic_case(8)
    op = HessianOperator(case.model, case.batches, case.loss_fn)
    np.testing.assert_allclose(op @ np.eye(8), case.model.a.numpy(), rtol=1e-12, atol=1e-12)
    assert op.loss() == pytest.approx(0.0, abs=1e-12)


def test_gradient_matches_autograd():
    case = tiny_mlp_case()
    op = HessianOperator(case.model, case.batches, case.loss_fn)
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    grads = torch.autograd.grad(case.loss_fn(case.model(x), y), list(case.model.parameters()))
    torch.testing.assert_close(op.gradient(), torch.cat([g.reshape(-1) for g in grads]))
    assert op.loss() == pytest.approx(float(case.loss_fn(case.model(x), y)), rel=1e-12)


def test_bad_input():
    case = tiny_mlp_case()
    with pytest.raises(FlatlabError, match="empty"):
        HessianOperator(case.model, [], case.loss_fn)
    with pytest.raises(FlatlabError, match="unknown parameter choice"):
        HessianOperator(case.model, case.batches, case.loss_fn, params="biases")
    with pytest.raises(FlatlabError, match="method must be one of"):
        HessianOperator(case.model, case.batches, case.loss_fn, method="magic")
    with pytest.raises(FlatlabError, match="limited to 50"):
        dense_hessian(case.model, case.batches, case.loss_fn, max_params=50)
    with pytest.raises(FlatlabError, match="no trainable parameter named"):
        select_parameters(case.model, ["nope.weight"])
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    with pytest.raises(FlatlabError, match="selects no trainable"):
        select_parameters(frozen, "all")


def test_graph_cache_follows_weight_changes_and_budget():
    case = tiny_mlp_case()
    v = np.random.default_rng(5).standard_normal(53)
    cached = HessianOperator(case.model, case.batches, case.loss_fn, method="double-backward")
    first = cached @ v
    assert cached._cache is not None
    with torch.no_grad():
        case.model[0].weight.mul_(1.5)  # in place: the cached graphs are now stale
    uncached = HessianOperator(case.model, case.batches, case.loss_fn, method="double-backward", graph_cache_bytes=0)
    np.testing.assert_allclose(cached @ v, uncached @ v, rtol=1e-12, atol=1e-14)
    assert not np.allclose(cached @ v, first)
    tiny_budget = HessianOperator(case.model, case.batches, case.loss_fn, method="double-backward", graph_cache_bytes=100)
    np.testing.assert_allclose(tiny_budget @ v, uncached @ v, rtol=1e-12, atol=1e-14)
    assert tiny_budget._cache is None  # over budget: products recompute the graph


class _OldStyleModel(nn.Module):
    """The old-style square on the weights themselves (cases.OldStyleMLP squares activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))

    def forward(self, x):
        return (x * OldStyleSquare.apply(self.w)).sum(dim=1, keepdim=True) ** 2


def test_auto_falls_back_when_torch_func_cannot_transform():
    model = _OldStyleModel()
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.zeros(5))]

    def loss_fn(out, _y):
        return out.mean()

    v = np.random.default_rng(6).standard_normal(3)
    ref = HessianOperator(model, data, loss_fn, method="double-backward") @ v
    auto = HessianOperator(model, data, loss_fn, method="auto")
    auto.method = "forward-over-reverse"
    np.testing.assert_allclose(auto @ v, ref, rtol=1e-12)
    assert auto.method == "double-backward"
    explicit = HessianOperator(model, data, loss_fn, method="forward-over-reverse")
    with pytest.raises(FlatlabError, match="double-backward"):
        explicit @ v


def test_affine_eval_batchnorm_is_the_same_function_and_is_undone():
    from flatlab.curvature.hvp import affine_eval_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
                          nn.BatchNorm1d(3, affine=False), nn.BatchNorm1d(3, track_running_stats=False)).double()
    model.train()
    x = torch.randn(8, 2, 6, 6, dtype=torch.float64)
    model(x)  # some running statistics
    model.eval()
    reference = model(x)
    with affine_eval_batchnorm(model):
        patched = [m for m in model.modules() if "forward" in m.__dict__]
        # eval-mode BatchNorm with running statistics only (the last one normalises by batch statistics)
        assert patched == [model[1], model[4]]
        torch.testing.assert_close(model(x), reference, rtol=1e-12, atol=1e-12)
    assert not any("forward" in m.__dict__ for m in model.modules())
    model.train()
    with affine_eval_batchnorm(model):  # training mode uses batch statistics: nothing is patched
        assert not any("forward" in m.__dict__ for m in model.modules())
