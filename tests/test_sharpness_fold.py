"""BatchNorm folding: same logits, names kept, original untouched."""

from __future__ import annotations

import torch
from cases import tiny_cnn_bn_case
from torch import nn

from flatlab.models import MLP, SmallCNN
from flatlab.sharpness import fold_batchnorm
from flatlab.sharpness.perturb import weight_names


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.3)


def test_fold_small_cnn_keeps_logits_to_1e5():
    torch.manual_seed(0)
    model = SmallCNN((1, 16, 16), 10, width=8).eval()
    _randomize_bn(model)
    x = torch.rand(32, 1, 16, 16)
    folded, report = fold_batchnorm(model)
    assert report.folded == 3 and report.remaining == 0
    with torch.no_grad():
        assert (model(x) - folded(x)).abs().max() < 1e-5
    # Names kept (conv weights + the bias they gain), the original model untouched.
    names = dict(folded.named_parameters())
    assert "features.0.weight" in names and "features.0.bias" in names and "classifier.weight" in names
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert weight_names(folded) == ["features.0.weight", "features.3.weight", "features.6.weight", "classifier.weight"]


def test_fold_mlp_with_batchnorm1d_and_float64_case():
    torch.manual_seed(1)
    mlp = MLP((1, 8, 8), 10, width=16, depth=2, batchnorm=True).eval()
    _randomize_bn(mlp, 1)
    x = torch.rand(20, 1, 8, 8)
    folded, report = fold_batchnorm(mlp)
    assert report.folded == 2
    with torch.no_grad():
        assert (mlp(x) - folded(x)).abs().max() < 1e-5
    case = tiny_cnn_bn_case()
    folded, report = fold_batchnorm(case.model)
    assert report.folded == 1
    x = case.batches[0][0]
    with torch.no_grad():
        assert (case.model(x) - folded(x)).abs().max() < 1e-12


def test_untraceable_model_falls_back_to_sequential_pairs():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
                return x
            return self.body(x)

    torch.manual_seed(2)
    model = Branchy().eval()
    _randomize_bn(model, 2)
    folded, report = fold_batchnorm(model)
    assert report.method == "sequential" and report.folded == 1 and report.remaining == 0
    x = torch.randn(10, 4)
    with torch.no_grad():
        assert (model(x) - folded(x)).abs().max() < 1e-5
