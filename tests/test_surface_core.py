"""Loss surfaces against truth: grids, directions, closed-form quadratic, origin, interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flatlab.errors import FlatlabError
from flatlab.surface.compute import compute_surface, surface_of_model
from flatlab.surface.directions import (
    filter_norms,
    normalize_direction,
    parameter_tensors,
    random_direction,
)
from flatlab.surface.evaluate import SurfaceProblem
from flatlab.surface.grid import parse_axis

# --- grids ------------------------------------------------------------------------------------


def test_axis_parses_linspace():
    axis = parse_axis("-1:2:7")
    np.testing.assert_array_equal(axis.values, np.linspace(-1, 2, 7))
    assert parse_axis("0:0:1").values.tolist() == [0.0]
    assert parse_axis(axis.spec()) == axis


@pytest.mark.parametrize("text", ["-1:1", "1:-1:5", "a:b:c", "-1:1:0", "-1:1:-3", "-1:1:2.5", "1:1:3",
                                  "-1:1:5:2", "", "nan:1:3", "0:inf:3"])
def test_axis_rejects_malformed(text):
    with pytest.raises(FlatlabError, match="--x"):
        parse_axis(text, "--x")


# --- directions -------------------------------------------------------------------------------


def _conv_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).double()


def test_filter_normalized_norms_equal_weights():
    model = _conv_bn_model()
    weights = {n: p.detach() for n, p in parameter_tensors(model).items()}
    d = normalize_direction(random_direction(weights, seed=3), weights, "filter", "biasbn")
    for name, w in weights.items():
        if w.dim() > 1:
            torch.testing.assert_close(filter_norms(d[name]), filter_norms(w), rtol=1e-9, atol=0)
        else:
            assert not d[name].any(), f"{name} should be ignored (biasbn)"
    included = normalize_direction(random_direction(weights, seed=3), weights, "filter", "none")
    torch.testing.assert_close(included["1.weight"], weights["1.weight"])  # Li et al.: d = w for 1-D


def test_layer_and_weight_normalization():
    model = _conv_bn_model()
    weights = {n: p.detach() for n, p in parameter_tensors(model).items()}
    raw = random_direction(weights, seed=1)
    layer = normalize_direction(raw, weights, "layer")
    torch.testing.assert_close(layer["0.weight"].norm(), weights["0.weight"].norm(), rtol=1e-9, atol=0)
    weight = normalize_direction(raw, weights, "weight")
    torch.testing.assert_close(weight["3.weight"], raw["3.weight"] * weights["3.weight"])
    none = normalize_direction(raw, weights, "none")
    torch.testing.assert_close(none["3.weight"], raw["3.weight"])


def test_random_directions_are_seeded_per_tensor():
    weights = {n: p.detach() for n, p in parameter_tensors(_conv_bn_model()).items()}
    a, b = random_direction(weights, 5, 0), random_direction(weights, 5, 0)
    c = random_direction(weights, 5, 1)
    only_linear = random_direction({"3.weight": weights["3.weight"]}, 5, 0)
    torch.testing.assert_close(a["0.weight"], b["0.weight"])
    assert not torch.equal(a["0.weight"], c["0.weight"])
    torch.testing.assert_close(only_linear["3.weight"], a["3.weight"])


# --- closed form: a quadratic -----------------------------------------------------------------


class MatrixQuadratic(nn.Module):
    """L(W) = 1/2 vec(W - C)^T A vec(W - C) with a 2-D weight W, so filter normalization applies."""

    def __init__(self, shape: tuple[int, int], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = shape[0] * shape[1]
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(torch.logspace(1, -2, n, dtype=torch.float64)) @ q.T)
        self.register_buffer("center", torch.randn(shape, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(self.center + torch.randn(shape, generator=g, dtype=torch.float64))

    def value(self, w: torch.Tensor) -> torch.Tensor:
        d = (w - self.center).reshape(-1)
        return 0.5 * d @ self.a @ d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(self.w).expand(x.shape[0]).unsqueeze(1)


def _mean_output(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return out.mean()


def _quadratic_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.zeros(5, 1, dtype=torch.float64)
    y = torch.zeros(5, dtype=torch.long)
    return [(x[:3], y[:3]), (x[3:], y[3:])]


@pytest.mark.parametrize("norm", ["filter", "none"])
def test_quadratic_surface_2d_closed_form_non_square(norm):
    model = MatrixQuadratic((3, 4))
    w0 = model.w.detach().clone()
    x = np.linspace(-1.0, 2.0, 7)     # 7 columns
    y = np.linspace(-0.5, 0.25, 4)    # 4 rows: non-square, asymmetric
    surf = surface_of_model(model, _quadratic_data(), _quadratic_data(), x=x, y=y, norm=norm, seed=11,
                            loss_fn=_mean_output)
    weights = {"w": w0}
    d1 = normalize_direction(random_direction(weights, 11, 0), weights, norm)["w"]
    d2 = normalize_direction(random_direction(weights, 11, 1), weights, norm)["w"]
    if norm == "filter":
        torch.testing.assert_close(filter_norms(d1), filter_norms(w0), rtol=1e-9, atol=0)
    truth = np.array([[float(model.value(w0 + a * d1 + b * d2)) for a in x] for b in y])
    assert surf.values["train_loss"].shape == (len(y), len(x))
    np.testing.assert_allclose(surf.values["train_loss"], truth, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(surf.values["test_loss"], truth, rtol=1e-12, atol=1e-12)
    # The asymmetric grid would not survive a transpose: orientation Z[j, i] = f(x[i], y[j]).
    assert surf.at("train_loss", x[5], y[1]) == pytest.approx(float(model.value(w0 + x[5] * d1 + y[1] * d2)), rel=1e-12)
    torch.testing.assert_close(model.w.detach(), w0)  # the model is left at the origin


def test_quadratic_surface_1d_closed_form():
    model = MatrixQuadratic((2, 5), seed=2)
    w0 = model.w.detach().clone()
    x = np.linspace(-0.3, 1.7, 9)
    surf = surface_of_model(model, _quadratic_data(), None, x=x, seed=4, loss_fn=_mean_output)
    d1 = normalize_direction(random_direction({"w": w0}, 4, 0), {"w": w0}, "filter")["w"]
    truth = np.array([float(model.value(w0 + a * d1)) for a in x])
    np.testing.assert_allclose(surf.values["train_loss"], truth, rtol=1e-12, atol=1e-12)
    assert np.isnan(surf.values["test_loss"]).all()


def test_vmapped_points_equal_sequential():
    from cases import tiny_cnn_bn_case

    case = tiny_cnn_bn_case()
    weights = {n: p.detach().cpu() for n, p in parameter_tensors(case.model).items()}
    dirs = [normalize_direction(random_direction(weights, 0, i), weights, "filter", "none") for i in range(2)]
    x, y = np.linspace(-1, 1, 5), np.linspace(-0.5, 1.0, 3)
    results = []
    for k in (1, 4):
        problem = SurfaceProblem(model=case.model, source=case.batches, target=case.batches[:1], directions=dirs,
                                 loss_fn=case.loss_fn, points_per_pass=k)
        results.append(compute_surface(problem, x, y))
    for name in ("train_loss", "train_acc", "test_loss", "test_acc"):
        np.testing.assert_allclose(results[1].values[name], results[0].values[name], rtol=1e-10, atol=1e-12)


# --- checkpoints: origin and interpolation ----------------------------------------------------


def test_origin_equals_checkpoint_loss(erm_run, tmp_path):
    from flatlab.checkpoint import load_checkpoint
    from flatlab.evaluate import evaluate_models
    from flatlab.surface.runner import SurfaceRequest, run_surface

    outcome = run_surface(SurfaceRequest(checkpoint=str(erm_run), dims=1, x="-0.5:0.5:3",
                                         out=str(tmp_path / "s.h5")))
    ckpt = load_checkpoint(erm_run)
    metrics = evaluate_models(ckpt.build_model("cpu"), ckpt.splits(), 512, "cpu")
    origin = {k: float(v[1]) for k, v in outcome.surface.values.items()}
    assert origin["train_loss"] == pytest.approx(metrics["source_loss"], rel=1e-5)
    assert origin["train_acc"] == pytest.approx(metrics["source_acc"], abs=1e-12)
    assert origin["test_loss"] == pytest.approx(metrics["ood_loss"], rel=1e-5)
    assert origin["test_acc"] == pytest.approx(metrics["ood_acc"], abs=1e-12)
    assert outcome.surface.values["train_loss"][0] > origin["train_loss"]  # away from a trained minimum


def _perturbed_copy(run, out, scale: float, seed: int):
    from flatlab.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(run)
    model = ckpt.build_model("cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale * p.abs().mean())
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.05 * scale)
    save_checkpoint(out, model, ckpt.w0, ckpt.meta)
    return out


def test_interpolation_endpoints_equal_checkpoints(erm_run, tmp_path):
    from flatlab.checkpoint import load_checkpoint
    from flatlab.evaluate import evaluate_models
    from flatlab.surface.runner import SurfaceRequest, run_surface

    second = _perturbed_copy(erm_run, tmp_path / "b.pt", 0.3, 1)
    third = _perturbed_copy(erm_run, tmp_path / "c.pt", 0.2, 2)
    line = run_surface(SurfaceRequest(checkpoint=str(erm_run), model2=str(second), x="0:1:3",
                                      out=str(tmp_path / "line.h5"), max_samples=300))
    plane = run_surface(SurfaceRequest(checkpoint=str(erm_run), model2=str(second), model3=str(third),
                                       x="0:1:2", y="0:1:2", out=str(tmp_path / "plane.h5"), max_samples=300))

    def losses(path):
        ckpt = load_checkpoint(path)
        splits = ckpt.splits()
        src = splits.split_batches("source", 512, 300, 0)
        model = ckpt.build_model("cpu")
        with torch.no_grad():
            return float(sum(nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in src)) / 300

    a, b, c = losses(erm_run), losses(second), losses(third)
    tl = line.surface.values["train_loss"]
    assert tl.shape == (3,)
    assert tl[0] == pytest.approx(a, rel=1e-5) and tl[2] == pytest.approx(b, rel=1e-5)
    pl = plane.surface.values["train_loss"]
    assert pl[0, 0] == pytest.approx(a, rel=1e-5)
    assert pl[0, 1] == pytest.approx(b, rel=1e-5)   # (x=1, y=0) is checkpoint 2
    assert pl[1, 0] == pytest.approx(c, rel=1e-5)   # (x=0, y=1) is checkpoint 3
    assert evaluate_models  # imported for parity with the origin test


def test_reused_directions_renormalized(erm_run, tmp_path):
    from flatlab.surface.io import load_raw_directions
    from flatlab.surface.runner import SurfaceRequest, run_surface

    first = run_surface(SurfaceRequest(checkpoint=str(erm_run), dims=1, x="0:1:2", seed=7,
                                       out=str(tmp_path / "a.h5"), max_samples=100))
    other = _perturbed_copy(erm_run, tmp_path / "b.pt", 0.5, 3)
    second = run_surface(SurfaceRequest(checkpoint=str(other), dims=1, x="0:1:2", directions=str(tmp_path / "a.h5"),
                                        out=str(tmp_path / "b.h5"), max_samples=100))
    raw_a, names, _ = load_raw_directions(tmp_path / "a.h5")
    raw_b, _, _ = load_raw_directions(tmp_path / "b.h5")
    np.testing.assert_array_equal(raw_a, raw_b)  # the same draws ...
    from flatlab.surface.io import read_surface_file

    da = read_surface_file(tmp_path / "a.h5")["arrays"]["directions"]
    db = read_surface_file(tmp_path / "b.h5")["arrays"]["directions"]
    assert not np.allclose(da, db)  # ... scaled to each checkpoint's filters
    assert first.settings["kind"] == "random1d-filter" and second.settings["kind"] == "reused1d-filter"
    assert names


def test_quantized_checkpoint_effective_and_requantized(erm_run, tmp_path):
    """At the origin both modes are the quantized model; away from it, requantization snaps the
    perturbed latent weights back to the b-bit grid, so the two surfaces differ."""
    from flatlab.checkpoint import load_checkpoint, save_checkpoint
    from flatlab.quant import QuantConfig, quantize_model
    from flatlab.surface.runner import SurfaceRequest, run_surface

    ckpt = load_checkpoint(erm_run)
    config = QuantConfig(bits=3)
    model = quantize_model(ckpt.build_model("cpu"), config)
    meta = {**ckpt.meta, "quant": config.to_dict(), "algorithm": "qat", "bits": 3}
    path = tmp_path / "q.pt"
    save_checkpoint(path, model, ckpt.w0, meta)
    common = {"checkpoint": str(path), "dims": 1, "x": "-0.5:0.5:3", "max_samples": 200}
    effective = run_surface(SurfaceRequest(**common, out=str(tmp_path / "e.h5")))
    requant = run_surface(SurfaceRequest(**common, requantize=True, out=str(tmp_path / "r.h5")))
    assert effective.settings["weights"] == "effective (de-quantized)"
    assert requant.settings["weights"] == "requantized latent weights"
    e, r = effective.surface.values["train_loss"], requant.surface.values["train_loss"]
    assert r[1] == pytest.approx(e[1], rel=1e-5)
    assert not np.allclose(r[[0, 2]], e[[0, 2]])


def test_hessian_directions_are_top_eigenvectors():
    from cases import tiny_mlp_case

    from flatlab.surface.directions import flatten_direction, hessian_directions

    case = tiny_mlp_case()
    names = [n for n, p in case.model.named_parameters() if p.dim() > 1]
    params = dict(case.model.named_parameters())
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    n_total = sum(len(y) for _, y in case.batches)

    def loss_of(flat):
        chunks, off = {}, 0
        for n in names:
            chunks[n] = flat[off:off + params[n].numel()].reshape(params[n].shape)
            off += params[n].numel()
        return sum(case.loss_fn(torch.func.functional_call(case.model, chunks, (x,)), y) * len(y) / n_total
                   for x, y in case.batches)

    dense = torch.autograd.functional.hessian(loss_of, flat0)
    values, vectors = torch.linalg.eigh(dense)
    dirs, eigenvalues, _ = hessian_directions(case.model, case.batches, case.loss_fn, names, k=2)
    np.testing.assert_allclose(eigenvalues, values.flip(0)[:2].numpy(), rtol=1e-6)
    for d, i in zip(dirs, (-1, -2)):
        v = flatten_direction(d, names)
        assert abs(abs(float(np.dot(v, vectors[:, i].numpy()))) - 1.0) < 1e-6
        assert np.linalg.norm(v) == pytest.approx(1.0)
