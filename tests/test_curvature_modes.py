"""What every curvature operator promises about the caller's model and data: modes (eval/train,
Dropout), training flags and buffers restored, parameters never moved, batches moved to the
parameters' device, ``output_fn`` adapters, DataLoaders and generators as data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from cases import flat_loss, tiny_cnn_bn_case, tiny_mlp_case
from torch import nn

from flatlab.curvature import (
    CURVATURES,
    CurvatureWarning,
    HessianOperator,
    curvature_operator,
    dense_curvature,
    lanczos_top_eigenvalues,
)
from flatlab.curvature.factory import OPERATOR_CLASSES
from flatlab.errors import FlatlabError


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("kind", CURVATURES)
def test_training_flags_buffers_and_parameters_are_left_as_found(kind):
    case = tiny_cnn_bn_case()
    model = case.model
    model.train()
    model[1].eval()  # a mixed state the caller chose: it must survive exactly
    flags = _flags(model)
    pointers = [(p.data_ptr(), p.device, p.dtype) for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    op = curvature_operator(kind, model, case.batches, case.loss_fn)
    assert _flags(model) == flags
    lanczos_top_eigenvalues(op, k=2)
    op.gradient()
    op.loss()
    assert _flags(model) == flags
    assert [(p.data_ptr(), p.device, p.dtype) for p in model.parameters()] == pointers
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    # a product that fails part-way leaves the flags as found too
    failing = curvature_operator(kind, model, case.batches, lambda out, y: out.sum(dim=1))
    with pytest.raises(FlatlabError, match="loss_fn must return a scalar"):
        failing @ np.ones(op.dim)
    assert _flags(model) == flags


def test_train_mode_uses_batch_statistics_and_restores_running_statistics():
    # Truth: the Hessian and GGN of the training-mode loss (BatchNorm normalizing each batch by its
    # own statistics), by brute force on a copy of the model.
    case = tiny_cnn_bn_case()
    model = case.model.eval()
    running = [b.clone() for b in model.buffers()]
    train_copy = copy.deepcopy(model).train()
    full_loss, weights, flat0 = flat_loss(train_copy, case.batches, case.loss_fn)
    hessian = torch.autograd.functional.hessian(full_loss, flat0).numpy()
    n_total = sum(len(y) for _, y in case.batches)
    ggn = np.zeros_like(hessian)
    for x, y in case.batches:  # batch-level Jacobians: samples interact through the batch statistics
        jac = torch.autograd.functional.jacobian(
            lambda f, x=x: torch.func.functional_call(train_copy, weights(f), (x,)), flat0)
        jac = jac.reshape(-1, flat0.numel()).numpy()
        out = torch.func.functional_call(train_copy, weights(flat0), (x,)).detach()
        lam = torch.autograd.functional.hessian(lambda o, y=y: case.loss_fn(o, y), out).numpy()
        ggn += len(y) / n_total * jac.T @ lam.reshape(jac.shape[0], jac.shape[0]) @ jac
    v = np.random.default_rng(0).standard_normal((flat0.numel(), 2))
    # Every method of both kinds, built as callers build them (the factory), meets the truth.
    truths = {"hessian": hessian, "ggn": ggn}
    for kind, truth in truths.items():
        for method in OPERATOR_CLASSES[kind].methods:
            with pytest.warns(CurvatureWarning, match="mode='train'"):
                op = curvature_operator(kind, model, case.batches, case.loss_fn, method=method, mode="train")
            np.testing.assert_allclose(op @ v, truth @ v, rtol=1e-9, atol=1e-12, err_msg=f"{kind} {method}")
            assert op._cache is None  # train mode without dropout_seed: nothing cached
    eval_op = HessianOperator(model, case.batches, case.loss_fn)
    assert not np.allclose(eval_op @ v[:, 0], hessian @ v[:, 0], rtol=1e-3)  # eval mode is another matrix
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), running))  # running statistics untouched


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _dropout_case():
    torch.manual_seed(0)
    model = DropoutMLP().double().eval()
    x = torch.randn(20, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    return model, [(x[:12], y[:12]), (x[12:], y[12:])]


def test_dropout_products_are_random_unless_seeded():
    model, data = _dropout_case()
    v = torch.from_numpy(np.random.default_rng(1).standard_normal(sum(p.numel() for p in model.parameters())))
    with pytest.warns(CurvatureWarning, match="products are random"):
        random_op = HessianOperator(model, data, mode="train")
    assert not torch.allclose(random_op.product(v), random_op.product(v))
    # With dropout_seed the masks are those a forward pass draws right after torch.manual_seed(seed):
    # the Hessian of the loss with those fixed masks, computed here by brute force.
    full_loss, _, flat0 = flat_loss(copy.deepcopy(model).train(), data, nn.functional.cross_entropy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        truth = torch.autograd.functional.hessian(full_loss, flat0)
    state = torch.get_rng_state()
    for method, cache in [("double-backward", None), ("double-backward", 0), ("forward-over-reverse", None)]:
        with pytest.warns(CurvatureWarning, match="one fixed draw"):
            op = HessianOperator(model, data, method=method, mode="train", dropout_seed=3, cache_bytes=cache)
        first = op.product(v)
        torch.testing.assert_close(first, truth @ v, rtol=1e-10, atol=1e-12)
        assert torch.equal(op.product(v), first)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone
    assert not model.training
    with pytest.raises(FlatlabError, match="dropout_seed applies to mode='train' only"):
        HessianOperator(model, data, dropout_seed=3)


def test_batches_are_moved_to_the_parameters_device(monkeypatch):
    case = tiny_mlp_case()
    op = HessianOperator(case.model, case.batches, case.loss_fn, graph_cache_bytes=0)
    moved = []
    original = torch.Tensor.to

    def recording(self, *args, **kwargs):
        moved.append((self.data_ptr(), args))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording)
    op.product(torch.ones(op.dim, dtype=torch.float64))
    for x, y in case.batches:
        assert (x.data_ptr(), (op.device,)) in moved and (y.data_ptr(), (op.device,)) in moved


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_with_cpu_batches():
    case = tiny_cnn_bn_case()
    v = np.random.default_rng(2).standard_normal(sum(p.numel() for p in case.model.parameters()))
    for kind in CURVATURES:
        cpu = curvature_operator(kind, case.model, case.batches, case.loss_fn) @ v
        gpu_model = copy.deepcopy(case.model).cuda()
        gpu = curvature_operator(kind, gpu_model, case.batches, case.loss_fn)
        assert gpu.device.type == "cuda"
        np.testing.assert_allclose(gpu @ v, cpu, rtol=1e-9, atol=1e-12)


class DictModel(nn.Module):
    """Returns a dict, as many libraries' models do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.inner(x), "aux": x.sum(dim=1)}


@pytest.mark.parametrize("kind", CURVATURES)
def test_output_fn_adapts_dict_and_tuple_outputs(kind):
    case = tiny_mlp_case()
    plain = curvature_operator(kind, case.model, case.batches, case.loss_fn)
    v = np.random.default_rng(3).standard_normal(plain.dim)
    expected = plain @ v
    wrapped = DictModel(case.model)
    with pytest.raises(FlatlabError, match="pass output_fn"):
        curvature_operator(kind, wrapped, case.batches, case.loss_fn) @ v
    adapted = curvature_operator(kind, wrapped, case.batches, case.loss_fn, output_fn=lambda out: out["logits"])
    np.testing.assert_allclose(adapted @ v, expected, rtol=1e-12, atol=1e-14)
    assert adapted.param_names == [f"inner.{n}" for n in plain.param_names]
    with pytest.raises(FlatlabError, match="after output_fn is a tuple"):
        curvature_operator(kind, wrapped, case.batches, case.loss_fn, output_fn=lambda out: (out["logits"],)) @ v
    dense = dense_curvature(kind, wrapped, case.batches, case.loss_fn, output_fn=lambda out: out["logits"]).numpy()
    np.testing.assert_allclose(dense @ v, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", CURVATURES)
def test_dataloaders_and_generators_are_read_once(kind):
    case = tiny_mlp_case()
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    reference = curvature_operator(kind, case.model, case.batches, case.loss_fn)
    v = np.random.default_rng(4).standard_normal(reference.dim)
    expected = reference @ v
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    from_loader = curvature_operator(kind, case.model, loader, case.loss_fn)
    assert from_loader.num_samples == 40 and isinstance(from_loader.data, list)
    first = from_loader @ v
    np.testing.assert_array_equal(from_loader @ v, first)  # one fixed data set, not a reshuffle per product
    np.testing.assert_allclose(first, expected, rtol=1e-10, atol=1e-13)
    from_generator = curvature_operator(kind, case.model, (b for b in case.batches), case.loss_fn)
    np.testing.assert_allclose(from_generator @ v, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(from_generator @ v, expected, rtol=1e-12, atol=1e-14)  # not exhausted
    as_lists = curvature_operator(kind, case.model, [[bx, by] for bx, by in case.batches], case.loss_fn)
    np.testing.assert_allclose(as_lists @ v, expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(FlatlabError, match=r"pair \(x, y\)"):
        curvature_operator(kind, case.model, [x], case.loss_fn)
