"""Small problems with known answers, shared by the correctness tests (curvlinops style).

Every case builds, in float64, a model, a loss and a list of batches small enough that the dense
Hessian, exact traces and closed-form surfaces can be computed by brute force.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class Case:
    name: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def tiny_mlp_case(seed: int = 0, n: int = 40, batch: int = 16) -> Case:
    """MLP 6 -> 5 -> 3 with ReLU, cross-entropy, uneven last batch (weights |B|/N matter)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Case("tiny-mlp", model.eval(), _batches(x, y, batch), nn.functional.cross_entropy)


def tiny_cnn_bn_case(seed: int = 0, n: int = 24, batch: int = 10) -> Case:
    """Conv(1->2) + BatchNorm (eval statistics) + Tanh + pool + Linear(2->3)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        bn = model[1]
        bn.running_mean.copy_(torch.randn(2, generator=g, dtype=torch.float64) * 0.1)
        bn.running_var.copy_(torch.rand(2, generator=g, dtype=torch.float64) + 0.5)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Case("tiny-cnn-bn", model.eval(), _batches(x, y, batch), nn.functional.cross_entropy)


class Quadratic(nn.Module):
    """f(w) = 1/2 (w - c)^T A (w - c), independent of the data: a model whose loss surface,
    Hessian (A) and local flatness are known in closed form."""

    def __init__(self, a: torch.Tensor, center: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("center", center)
        self.w = nn.Parameter(center.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One "logit" per sample carrying the quadratic; the loss_fn below reads it.
        d = self.w - self.center
        return (0.5 * d @ self.a @ d).expand(x.shape[0]).unsqueeze(1)


def quadratic_case(n_params: int = 8, seed: int = 0) -> Case:
    """Quadratic with a known positive-definite A and a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_params, n_params, generator=g, dtype=torch.float64))
    eig = torch.logspace(1, -2, n_params, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    model = Quadratic(a, torch.randn(n_params, generator=g, dtype=torch.float64))
    x = torch.zeros(6, 1, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)

    def loss_fn(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return out.mean()

    return Case("quadratic", model, _batches(x, y, 4), loss_fn)


# --- tiny flatlab checkpoints (untrained) -------------------------------------------------------
# For tests of what commands accept, refuse and write: nothing about them depends on training.

def tiny_meta() -> tuple[dict, torch.nn.Module]:
    """Metadata and an untrained model of a valid checkpoint (rotated digits at 8x8, MLP width 4)."""
    from flatlab.data import build_dataset
    from flatlab.models import build_model, model_options

    ds = build_dataset("rotated-digits", resolution=8)
    opts = model_options("mlp", width=4, depth=1)
    torch.manual_seed(0)
    model = build_model("mlp", ds.input_shape, ds.num_classes, **opts)
    meta = {"dataset": ds.name, "dataset_options": ds.options, "data_dir": None, "data_hash": ds.fingerprint(),
            "domains": list(ds.domains), "num_classes": ds.num_classes, "input_shape": list(ds.input_shape),
            "test_envs": [0], "test_env_names": [ds.domains[0]], "holdout_fraction": 0.2, "model": "mlp",
            "model_options": opts, "algorithm": "erm", "hparams": {}, "seed": 0, "trial_seed": 0,
            "hparams_seed": 0, "steps": 1, "step": 1, "bits": None, "quant": None, "accuracies": {}}
    return meta, model


def write_tiny_checkpoint(path: Path, quantized: bool = False, **meta_changes) -> Path:
    """A flatlab checkpoint of an untrained tiny MLP; ``meta_changes`` edit its metadata (a value
    of ``...`` removes the key)."""
    from flatlab.checkpoint import save_checkpoint

    meta, model = tiny_meta()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    if quantized:
        from flatlab.quant import QuantConfig, quantize_model

        config = QuantConfig(bits=4)
        model = quantize_model(model, config)
        meta.update(algorithm="qat", bits=4, act_bits=None, quant=config.to_dict())
    for key, value in meta_changes.items():
        if value is ...:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_checkpoint(path, model, w0, meta)
    return path


def write_raw_checkpoint(path: Path, meta: object) -> Path:
    """A file in the checkpoint format whose metadata is ``meta`` (anything, e.g. a string)."""
    _, model = tiny_meta()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"format": "flatlab-checkpoint", "format_version": 1, "meta": meta, "state_dict": state,
                "w0": state}, path)
    return path
