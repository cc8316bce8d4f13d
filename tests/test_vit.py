"""ViTs: the `vit`/`vit_b_16` models, LSQ on every projection of nn.MultiheadAttention, and the
whole quantized-checkpoint chain (rebuild, effective model, integer export, info, Hessians) on a
ViT trained with 4-bit QAT."""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlab.checkpoint import load_checkpoint
from flatlab.cli import main
from flatlab.errors import FlatlabError
from flatlab.models import build_model, load_pretrained, model_options, num_parameters
from flatlab.quant import (
    QuantConfig,
    effective_model,
    eligible_weights,
    quantize_model,
    quantized_layers,
)
from flatlab.quant.attention import InputQuantMultiheadAttention, QuantMultiheadAttention
from flatlab.quant.layers import QuantLinear
from flatlab.quant.lsq import grad_scale_factor, signed_range

DT = torch.float64
#: Rows of 32 weights: "at most 16 distinct values per channel" is a real constraint on them.
TINY = {"width": 32, "depth": 2, "heads": 2, "patch": 4}


def _tiny_vit(bits: int | None = None, shape: tuple[int, int, int] = (1, 8, 8), seed: int = 0, **config) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("vit", shape, 5, **TINY).to(DT)
    return model if bits is None else quantize_model(model, QuantConfig(bits=bits, **config))


@contextlib.contextmanager
def _one_thread():
    """Tiny matrices: one intra-op thread is several times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _attention_blocks(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


# --- the models --------------------------------------------------------------------------------


def test_vit_defaults_parameter_count_and_options() -> None:
    assert model_options("vit") == {"width": 48, "depth": 3, "heads": 4, "patch": 4, "mlp_ratio": 2}
    # Closed form: patch embedding, class token, position embeddings (1 + (S/p)^2 tokens), per block
    # two LayerNorms, in_proj (3E x E + 3E), out_proj, MLP E -> rE -> E; final LayerNorm; classifier.
    for options, count in (({}, 59_146), ({"width": 64, "depth": 4}, 136_906)):
        model = build_model("vit", (1, 16, 16), 10, **options)
        e, depth = model_options("vit", **options)["width"], model_options("vit", **options)["depth"]
        tokens, hidden = 17, 2 * e
        block = 2 * 2 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * hidden + hidden) + (hidden * e + e)
        assert num_parameters(model) == (16 * e + e) + e + tokens * e + depth * block + 2 * e + (e * 10 + 10) == count
    model = build_model("vit", (1, 16, 16), 10)
    assert type(model.classifier) is nn.Linear and model.classifier.in_features == 48
    assert len(model.features.encoder.layers) == 3
    attn = model.features.encoder.layers.encoder_layer_0.self_attention
    assert isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn.num_heads == 4
    small = build_model("vit", (1, 8, 8), 3, width=12, depth=1, heads=3, patch=2, mlp_ratio=3)
    assert small.features.seq_length == 1 + 16 and small.features.conv_proj.kernel_size == (2, 2)
    assert small.features.encoder.layers.encoder_layer_0.mlp[0].out_features == 36
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("options, shape, needle", [
    ({"width": 30, "heads": 4}, (1, 16, 16), "width (30) must be divisible by heads (4)"),
    ({"patch": 5}, (1, 16, 16), "patch (5) must divide the image side 16"),
    ({}, (1, 16, 12), "square images"),
    ({"depth": 0}, (1, 16, 16), "depth must be a positive integer"),
    ({"heads": 2.5}, (1, 16, 16), "heads must be a positive integer"),
])
def test_vit_refuses_bad_options(options: dict, shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(FlatlabError, match=re.escape(needle)):
        build_model("vit", shape, 10, **options)
    with pytest.raises(FlatlabError, match="model vit_b_16 has no option 'width'"):
        model_options("vit_b_16", width=8)


@pytest.mark.parametrize("argv, needle", [
    (["--model", "vit", "--heads", "5"], "vit option width (48) must be divisible by heads (5)"),
    (["--model", "vit", "--patch", "3"], "vit option patch (3) must divide the image side 16"),
    (["--model", "cnn", "--heads", "2"], "model cnn has no option 'heads'"),
])
def test_cli_vit_flags_and_bad_values_exit_2(tmp_path: Path, capsys, argv: list[str], needle: str) -> None:
    assert main(["train", *argv, "--steps", "2", "--out", str(tmp_path / "r"), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flatlab: error: ") and needle in err, err
    assert not (tmp_path / "r" / "model.pt").exists()


def test_vit_b_16_is_torchvisions_architecture() -> None:
    """Same tensors, names and shapes as torchvision's vit_b_16 (its head renamed ``classifier``);
    built on the meta device, so the test allocates nothing."""
    import torchvision

    with torch.device("meta"):
        ours = build_model("vit_b_16", (3, 224, 224), 7)
        ref = torchvision.models.vit_b_16(weights=None)
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("heads.")}
    our_shapes = {k.removeprefix("features."): v.shape for k, v in ours.state_dict().items()
                  if k.startswith("features.")}
    assert our_shapes == ref_shapes
    assert ours.classifier.weight.shape == (7, 768)
    assert num_parameters(ours) == 85_798_656 + 768 * 7 + 7


def test_load_pretrained_maps_a_torchvision_vit_state_dict(tmp_path: Path) -> None:
    """A torchvision VisionTransformer state dict loads into the `vit` of the same shape: the
    backbone computes exactly torchvision's features, its head is dropped."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    ref = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=1000)
    nn.init.normal_(ref.heads.head.weight)
    torch.save(ref.state_dict(), tmp_path / "vit.pt")
    ours = build_model("vit", (3, 16, 16), 4, width=16, depth=2, heads=2, patch=4)
    report = load_pretrained(ours, str(tmp_path / "vit.pt"))
    assert report["missing"] == [] and not any(k.startswith(("heads", "classifier")) for k in report["loaded"])
    ref.heads = nn.Identity()
    x = torch.randn(3, 3, 16, 16)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours.features(x), ref(x))


# --- LSQ on attention ----------------------------------------------------------------------------


def _reference_attention(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
                         b_out: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention written out: [Q; K; V] = x W_in^T + b_in, softmax(Q K^T / sqrt(d)) V
    per head, then W_o. x: (N, L, E)."""
    n, length, e = x.shape
    d = e // heads
    q, k, v = (x @ w_in.T + b_in).split(e, dim=-1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, length, heads, d).transpose(1, 2)

    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1) @ split(v)
    return a.transpose(1, 2).reshape(n, length, e) @ w_out.T + b_out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_attention_is_attention_with_lsq_weights(bits: int) -> None:
    torch.manual_seed(bits)
    mha = nn.MultiheadAttention(12, 3, batch_first=True).to(DT)
    nn.init.normal_(mha.in_proj_bias)
    nn.init.normal_(mha.out_proj.bias)
    q = QuantMultiheadAttention.from_float(mha, QuantConfig(bits=bits))
    assert q.in_proj_weight is mha.in_proj_weight and q.out_proj.weight is mha.out_proj.weight
    assert q.in_proj_weight_scale.shape == (36, 1) and q.out_proj.weight_scale.shape == (12, 1)
    assert q.weight is q.in_proj_weight and q.weight_scale is q.in_proj_weight_scale
    qn, qp = signed_range(bits)
    w_hat = {}
    for key, w, s in (("in", q.in_proj_weight, q.in_proj_weight_scale), ("out", q.out_proj.weight,
                                                                         q.out_proj.weight_scale)):
        w_hat[key] = (torch.round(torch.clamp(w.detach() / s.detach(), -qn, qp)) * s.detach()).requires_grad_(True)
        # Deployed weights: at most 2^b distinct values per output channel (3E channels for in_proj).
        assert max(len(torch.unique(row)) for row in w_hat[key]) <= 2**bits
    x = torch.randn(4, 5, 12, dtype=DT)
    out, _ = q(x, x, x, need_weights=False)
    expected = _reference_attention(x, w_hat["in"], mha.in_proj_bias.detach(), w_hat["out"],
                                    mha.out_proj.bias.detach(), heads=3)
    torch.testing.assert_close(out, expected)
    # LSQ gradients through attention: d/dw is the straight-through gradient of w_hat inside the
    # range, d/ds = g * sum over the channel of dL/dw_hat * (round(w/s) - w/s) inside, -Qn / Qp outside.
    out.square().sum().backward()
    expected.square().sum().backward()
    for key, w, s in (("in", q.in_proj_weight, q.in_proj_weight_scale), ("out", q.out_proj.weight,
                                                                         q.out_proj.weight_scale)):
        v = w.detach() / s.detach()
        inside = (v >= -qn) & (v <= qp)
        torch.testing.assert_close(w.grad, torch.where(inside, w_hat[key].grad, 0.0))
        ds = torch.where(inside, torch.round(v) - v, torch.clamp(v, -qn, qp))
        g = grad_scale_factor(w.shape[1], qp)
        torch.testing.assert_close(s.grad, (w_hat[key].grad * ds).sum(1, keepdim=True) * g)


def _count_fused_calls(monkeypatch) -> dict[str, int]:
    calls = {"n": 0}
    original = torch._native_multi_head_attention

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", counting)
    return calls


def test_effective_vit_is_bit_identical_in_every_mode(monkeypatch) -> None:
    """The effective model (plain nn.MultiheadAttention with the de-quantized weights) gives the
    quantized model's logits bit for bit: with gradients (SDPA), in PyTorch's fused inference path
    (eval, no gradients; both models take it) and in train mode."""
    model = _tiny_vit(bits=4)
    fp_names = [n for n, _ in _tiny_vit().named_parameters()]
    layers = quantized_layers(model)
    blocks = _attention_blocks(model)
    assert len(blocks) == 2 and all(isinstance(layers[b], QuantMultiheadAttention) for b in blocks)
    assert all(isinstance(layers[f"{b}.out_proj"], QuantLinear) for b in blocks)
    assert type(model.classifier) is nn.Linear and "classifier" not in layers
    eff = effective_model(model)
    assert [n for n, _ in eff.named_parameters()] == fp_names
    for b in blocks:
        attn = eff.get_submodule(b)
        assert type(attn) is nn.MultiheadAttention
        assert type(attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert torch.equal(attn.in_proj_weight, layers[b].dequantized_weight())
    x = torch.randn(6, 1, 8, 8, dtype=DT)
    calls = _count_fused_calls(monkeypatch)
    model.eval()
    eff.eval()
    with torch.no_grad():
        assert torch.equal(model(x), eff(x))
    assert calls["n"] == 2 * len(blocks), "both models run PyTorch's fused inference kernel"
    assert torch.equal(model(x), eff(x))
    assert calls["n"] == 2 * len(blocks), "with gradients both run the SDPA path"
    model.train()
    eff.train()
    assert torch.equal(model(x), eff(x))
    # A quantized model with the fused path switched off still equals the effective one.
    monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: False)
    model.eval()
    eff.eval()
    with torch.no_grad():
        assert torch.equal(model(x), eff(x))


def test_activation_quantized_attention_quantizes_the_out_proj_input() -> None:
    model = _tiny_vit(bits=3, act_bits=4)
    x = torch.randn(6, 1, 8, 8, dtype=DT)
    model.train()
    model(x)  # initialises the activation scales from this batch
    model.eval()
    blocks = _attention_blocks(model)
    for b in blocks:
        attn = model.get_submodule(b)
        assert bool(attn.act_initialized) and bool(attn.out_proj.act_initialized), "out_proj saw its input"
    # Truth: the block's attention computed by hand from quantized inputs and weights.
    attn = model.get_submodule(blocks[0])
    u = torch.randn(2, 5, TINY["width"], dtype=DT)
    qn, qp = attn.act_range()
    uq = torch.round(torch.clamp(u / attn.act_scale, -qn, qp)) * attn.act_scale
    n, length, e = u.shape
    d = e // 2
    qkv = uq @ attn.dequantized_weight().T + attn.in_proj_bias
    q, k, v = (t.reshape(n, length, 2, d).transpose(1, 2) for t in qkv.split(e, dim=-1))
    a = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v).transpose(1, 2).reshape(n, length, e)
    oqn, oqp = attn.out_proj.act_range()
    aq = torch.round(torch.clamp(a / attn.out_proj.act_scale, -oqn, oqp)) * attn.out_proj.act_scale
    expected = aq @ attn.out_proj.dequantized_weight().T + attn.out_proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(u, u, u, need_weights=False)[0], expected)
    eff = effective_model(model).eval()
    assert isinstance(eff.get_submodule(blocks[0]), InputQuantMultiheadAttention)
    fp_names = [n for n, _ in _tiny_vit().named_parameters()]
    assert [n for n, _ in eff.named_parameters()] == fp_names
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert torch.equal(model(x), eff(x))


def test_attention_edge_cases_keep_first_fp_and_refusals() -> None:
    class Net(nn.Module):
        def __init__(self, kdim: int | None = None) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim)
            self.proj = nn.Linear(8, 8)
            self.classifier = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kv = x if self.attn._qkv_same_embed_dim else x[..., :4]
            return self.classifier(self.proj(self.attn(x, kv, kv)[0]).mean(0))

    first_fp = quantize_model(Net(), QuantConfig(bits=4, keep_first_fp=True))
    assert sorted(quantized_layers(first_fp)) == ["proj"], "an FP attention keeps its out_proj FP"
    torch.manual_seed(0)
    net = Net()
    rng = torch.get_rng_state()
    quantize_model(net, QuantConfig(bits=4))
    assert torch.equal(rng, torch.get_rng_state()), "quantizing attention draws no random numbers"
    assert sorted(quantized_layers(net)) == ["attn", "attn.out_proj", "proj"]
    x = torch.randn(5, 2, 8)  # (L, N, E): batch_first=False, fused path off
    assert torch.equal(effective_model(net)(x), net(x))
    with pytest.raises(FlatlabError, match="attention layer 'attn' has separate query/key/value weights"):
        quantize_model(Net(kdim=4), QuantConfig(bits=4))


def test_eligible_weights_are_the_latent_weights_qat_quantizes() -> None:
    fp = _tiny_vit()
    weights = eligible_weights(fp, QuantConfig(bits=4))
    blocks = _attention_blocks(fp)
    for b in blocks:
        assert weights[b] is fp.get_submodule(b).in_proj_weight
        assert weights[f"{b}.out_proj"] is fp.get_submodule(b).out_proj.weight
    assert "classifier" not in weights
    model = quantize_model(fp, QuantConfig(bits=4))
    layers = quantized_layers(model)
    assert list(weights) == list(layers)
    assert all(weights[name] is layer.weight for name, layer in layers.items())


def test_weight_noise_trains_a_vit(tmp_path: Path) -> None:
    from flatlab.train import TrainConfig, train

    with _one_thread():
        train(TrainConfig(out=str(tmp_path / "noise"), quiet=True, steps=4, eval_every=2, model="vit",
                          model_options={"width": 16, "depth": 1, "heads": 2}, dataset_options={"resolution": 8},
                          algorithm="noise", hparam_flags={"bits": 4, "quant_start": 2}))
    assert load_checkpoint(tmp_path / "noise").meta["algorithm"] == "noise"


# --- a ViT trained with 4-bit QAT ------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_qat_run(tmp_path_factory) -> Path:
    """A tiny ViT (width 32, 2 blocks, 2 heads, 8x8 digits: 5 tokens) trained 40 steps, 4-bit LSQ
    from step 10."""
    from flatlab.train import TrainConfig, train

    out = tmp_path_factory.mktemp("vit") / "qat4"
    with _one_thread():
        train(TrainConfig(out=str(out), quiet=True, steps=40, eval_every=10, model="vit", model_options=TINY,
                          dataset_options={"resolution": 8}, algorithm="qat", seed=0,
                          hparam_flags={"bits": 4, "quant_start": 10, "lr": 3e-3}))
    return out


def test_vit_qat_checkpoint_deployed_attention_weights_take_16_values(vit_qat_run: Path, capsys) -> None:
    ckpt = load_checkpoint(vit_qat_run)
    assert ckpt.is_quantized and ckpt.meta["bits"] == 4 and ckpt.meta["model"] == "vit"
    assert ckpt.meta["step"] >= 10
    model = ckpt.build_model()
    layers = quantized_layers(model)
    blocks = _attention_blocks(model)
    assert len(blocks) == 2
    expected = ["features.conv_proj"]
    for b in blocks:
        mlp = b.rsplit(".", 1)[0] + ".mlp"
        expected += [b, f"{b}.out_proj", f"{mlp}.0", f"{mlp}.3"]
    assert list(layers) == expected
    eff = ckpt.build_model(effective=True)
    assert [n for n, _ in eff.named_parameters()] == [n for n, _ in ckpt.build_initial_model().named_parameters()]
    for b in blocks:
        attn = eff.get_submodule(b)
        for name, w in (("in_proj_weight", attn.in_proj_weight), ("out_proj.weight", attn.out_proj.weight)):
            distinct = [len(torch.unique(row)) for row in w.detach()]
            assert len(distinct) == w.shape[0] and max(distinct) <= 16, f"{b}.{name}: {max(distinct)} values"
            latent = ckpt.state_dict[f"{b}.{name}"]
            assert min(len(torch.unique(row)) for row in latent) > 16, "the latent weights are not the limit"
    # The classifier stays full precision: the trained latent weights, unquantized.
    assert type(model.classifier) is nn.Linear
    assert torch.equal(eff.classifier.weight, ckpt.state_dict["classifier.weight"])
    assert max(len(torch.unique(row)) for row in eff.classifier.weight.detach()) > 16
    # The effective model's logits equal the quantized model's, and evaluating the checkpoint
    # reproduces the accuracies recorded when it was selected (a reload gives the same logits).
    splits = ckpt.splits()
    with torch.no_grad():
        for split in ("source", "target"):
            for x, _ in splits.split_batches(split, batch_size=256, max_samples=300):
                assert torch.equal(model(x), eff(x))
                assert torch.equal(model(x), load_checkpoint(vit_qat_run).build_model()(x))
    assert main(["evaluate", str(vit_qat_run), "--json", "--quiet", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("id_acc", "ood_acc", "val_acc"):
        assert metrics[key] == pytest.approx(ckpt.meta["accuracies"][key], abs=1e-12)


def test_vit_export_round_trip_and_info(vit_qat_run: Path, tmp_path: Path, capsys) -> None:
    packed = tmp_path / "vit.packed.pt"
    assert main(["export", str(vit_qat_run), "--out", str(packed), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] is True and report["layers_packed"] == 9
    raw = torch.load(packed, weights_only=True)
    ckpt = load_checkpoint(vit_qat_run)
    model = ckpt.build_model()
    layers = quantized_layers(model)
    assert sorted(raw["layers"]) == sorted(layers)
    for b in _attention_blocks(model):
        entry = raw["layers"][b]
        assert (entry["weight_key"], entry["scale_key"]) == ("in_proj_weight", "in_proj_weight_scale")
        assert entry["shape"] == [96, 32] and entry["codes"].numel() == math.ceil(96 * 32 * 4 / 8)
        assert f"{b}.in_proj_weight" not in raw["state_dict"] and f"{b}.in_proj_weight_scale" in raw["state_dict"]
        assert f"{b}.out_proj.weight" not in raw["state_dict"]
        assert raw["layers"][f"{b}.out_proj"]["weight_key"] == "weight"
    assert "classifier.weight" in raw["state_dict"] and "classifier" not in raw["layers"]
    reloaded = load_checkpoint(packed).build_model()
    x = torch.cat([x for x, _ in ckpt.splits().split_batches("target", batch_size=256, max_samples=200)])
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
    # flatlab info: distinct values per channel <= 16 for every layer, attention projections included.
    for path in (vit_qat_run, packed):
        assert main(["info", str(path), "--json", "--quiet"]) == 0
        info = json.loads(capsys.readouterr().out)
        rows = {r["weight"]: r for r in info["layers"]}
        for b in _attention_blocks(model):
            assert rows[f"{b}.in_proj_weight"]["shape"] == [96, 32]
            assert rows[f"{b}.out_proj.weight"]["shape"] == [32, 32]
        assert all(1 <= r["max_distinct_per_channel"] <= r["limit"] == 16 for r in info["layers"])
        assert info["size_ratio"] < 0.5
    # A tampered attention entry (weight name it cannot have) is refused with one line.
    payload = torch.load(packed, weights_only=True)
    payload["layers"][_attention_blocks(model)[0]]["weight_key"] = "q_proj_weight"
    torch.save(payload, tmp_path / "bad.pt")
    assert main(["evaluate", str(tmp_path / "bad.pt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown weight/scale names 'q_proj_weight'" in err


def _reference_hessian(model: nn.Module, batches: list) -> object:
    """H v of the mean cross-entropy over ``batches`` by double backward through a gradient graph
    built once under the math SDPA kernel, written independently of flatlab.curvature (a scipy
    LinearOperator in float64)."""
    from scipy.sparse.linalg import LinearOperator
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(len(y) for _, y in batches)
    dim = sum(p.numel() for p in params)
    with sdpa_kernel(SDPBackend.MATH):
        graphs = [(torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True), len(y) / n)
                  for x, y in batches]

    def matvec(v):
        chunks = torch.as_tensor(v.reshape(-1), dtype=torch.float32).split([p.numel() for p in params])
        out = torch.zeros(dim, dtype=torch.float64)
        for grads, weight in graphs:
            dot = sum((g * c.view_as(g)).sum() for g, c in zip(grads, chunks))
            hv = torch.autograd.grad(dot, params, retain_graph=True)
            out += torch.cat([h.reshape(-1) for h in hv]).double() * weight
        return out.numpy()

    return LinearOperator((dim, dim), matvec=matvec, dtype="float64")


def test_hessian_measures_run_on_a_vit_checkpoint(vit_qat_run: Path) -> None:
    with _one_thread():
        _check_hessian_measures(vit_qat_run)


def _check_hessian_measures(vit_qat_run: Path) -> None:
    """Top eigenvalues and trace through the library pipeline on the deployed (effective) ViT,
    against an independent operator: ARPACK's top eigenvalues (within the reported residuals) and
    a 40-probe Hutchinson trace (within 4 combined standard errors). Run under the math SDPA
    kernel, then as a user would call it (which needs flatlab/curvature/hvp.py's SDPA fallback)."""
    import numpy as np
    from scipy.sparse.linalg import eigsh
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flatlab.measures import MeasurementSettings
    from flatlab.measures.curvature import TopEigenvaluesConfig, TraceConfig
    from flatlab.pipeline import measure_checkpoint

    settings = MeasurementSettings(max_samples=64, batch_size=64, seed=0, device="cpu")
    configs = [TopEigenvaluesConfig(top_k=2), TraceConfig(trace_products=6)]
    with sdpa_kernel(SDPBackend.MATH):
        measured = measure_checkpoint(vit_qat_run, configs, settings=settings)
    ckpt = load_checkpoint(vit_qat_run)
    model = ckpt.build_model(effective=True)
    op = _reference_hessian(model, ckpt.splits().split_batches("source", 64, 64, 0))
    ref = np.sort(eigsh(op, k=2, which="LA", tol=1e-6, return_eigenvectors=False))[::-1]
    eig = measured["top_eigenvalues"].payload
    assert eig["converged"] and len(eig["top_eigenvalues"]) == 2
    for value, residual, truth in zip(eig["top_eigenvalues"], eig["residuals"], ref):
        assert abs(value - truth) <= residual + 1e-4 * abs(truth), (value, truth, residual)
    trace = measured["trace"].payload
    assert trace["trace_hvps"] == 6 and trace["trace_stderr"] > 0
    rng = np.random.default_rng(0)
    quad = np.array([v @ op.matvec(v) for v in (rng.choice([-1.0, 1.0], size=op.shape[0]) for _ in range(40))])
    ref_trace, ref_se = quad.mean(), quad.std(ddof=1) / math.sqrt(len(quad))
    assert abs(trace["trace"] - ref_trace) <= 4 * math.hypot(trace["trace_stderr"], ref_se)

    # As a user calls it, without choosing a kernel: the operators fall back to the math kernel
    # (PyTorch's CPU flash-attention kernel has no double backward), with the same numbers.
    plain = measure_checkpoint(vit_qat_run, configs, settings=settings)
    assert plain["top_eigenvalues"].payload["top_eigenvalues"] == pytest.approx(eig["top_eigenvalues"], rel=1e-6)
    assert plain["trace"].payload["trace"] == pytest.approx(trace["trace"], rel=1e-6)
