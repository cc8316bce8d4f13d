"""Sharpness-aware training: SAM (Foret et al. 2021) and SAGM (Wang et al. 2023), with or without
QAT (``--bits``), the "DG-SAM + QAT" baseline GAQAT compares against.

Both take two gradients per step on the same minibatch. With g = grad L(w):

* SAM:  e = rho g / ||g||;                   update with grad L(w + e).
* SAGM: e = g (rho / ||g|| - alpha);         update with 1/2 [grad L(w) + grad L(w + e)]
  (docs/measures.md's reading of SAGM).

The perturbation goes on every trainable parameter except LSQ scales, which are not weights.
BatchNorm running statistics are not updated by the perturbed pass (as in the SAM reference code).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flatlab.errors import ConfigError
from flatlab.train.algorithms import Minibatches, register_algorithm
from flatlab.train.optional_qat import OptionalQAT

SCALE_SUFFIXES = ("weight_scale", "act_scale")


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged for the passes inside (momentum 0)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@register_algorithm
class SAM(OptionalQAT):
    """Sharpness-aware minimisation (``--rho``), optionally with QAT (``--bits``)."""

    name = "sam"
    hparam_defaults: ClassVar[dict[str, Any]] = {**OptionalQAT.hparam_defaults, "rho": 0.05}

    @classmethod
    def validate_hparams(cls, hparams: dict[str, Any], total_steps: int) -> None:
        super().validate_hparams(hparams, total_steps)
        rho = float(hparams["rho"])
        if not rho > 0:
            raise ConfigError("rho", f"must be positive, got {hparams['rho']}")
        hparams["rho"] = rho

    def perturbed_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters()
                if p.requires_grad and not n.endswith(SCALE_SUFFIXES)]

    def perturbation(self, grads: list[torch.Tensor], grad_norm: torch.Tensor) -> list[torch.Tensor]:
        scale = self.hparams["rho"] / (grad_norm + 1e-12)
        return [g * scale for g in grads]

    def combine(self, first: dict[nn.Parameter, torch.Tensor], second: dict[nn.Parameter, torch.Tensor],
                param: nn.Parameter) -> torch.Tensor | None:
        """The gradient the optimizer applies to ``param``: SAM uses the perturbed one."""
        return second.get(param)

    def _backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss.detach()

    def _grads(self) -> dict[nn.Parameter, torch.Tensor]:
        return {p: p.grad.detach().clone() for p in self.model.parameters() if p.grad is not None}

    def update(self, minibatches: Minibatches, step: int) -> dict[str, Any]:
        x = torch.cat([b[0] for b in minibatches])
        y = torch.cat([b[1] for b in minibatches])
        loss = self._backward(x, y)
        first = self._grads()
        params = self.perturbed_parameters()
        grads = [first.get(p, torch.zeros_like(p)) for p in params]
        grad_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).to(grads[0].dtype)
        eps = self.perturbation(grads, grad_norm)
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        with frozen_bn_statistics(self.model):
            perturbed_loss = self._backward(x, y)
        second = self._grads()
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.sub_(e)
        for p in self.model.parameters():
            p.grad = self.combine(first, second, p)
        self.after_gradients(first, second, step)
        self.optimizer.step()
        log: dict[str, Any] = {"quantized": self.quantized} if self.uses_quantization else {}
        return {"loss": float(loss), "perturbed_loss": float(perturbed_loss), "log": log}

    def after_gradients(self, first: dict[nn.Parameter, torch.Tensor], second: dict[nn.Parameter, torch.Tensor],
                        step: int) -> None:
        """Hook between the two gradients and the optimizer step (GAQAT edits scale gradients)."""


@register_algorithm
class SAGM(SAM):
    """SAGM: perturbation g (rho/||g|| - alpha), update with the mean of both gradients."""

    name = "sagm"
    hparam_defaults: ClassVar[dict[str, Any]] = {**SAM.hparam_defaults, "alpha": 0.001}

    @classmethod
    def validate_hparams(cls, hparams: dict[str, Any], total_steps: int) -> None:
        super().validate_hparams(hparams, total_steps)
        alpha = float(hparams["alpha"])
        if alpha < 0:
            raise ConfigError("alpha", f"must be >= 0, got {hparams['alpha']}")
        hparams["alpha"] = alpha

    def perturbation(self, grads: list[torch.Tensor], grad_norm: torch.Tensor) -> list[torch.Tensor]:
        scale = self.hparams["rho"] / (grad_norm + 1e-12) - self.hparams["alpha"]
        return [g * scale for g in grads]

    def combine(self, first: dict[nn.Parameter, torch.Tensor], second: dict[nn.Parameter, torch.Tensor],
                param: nn.Parameter) -> torch.Tensor | None:
        a, b = first.get(param), second.get(param)
        if a is None or b is None:
            return b if a is None else a
        return 0.5 * (a + b)
