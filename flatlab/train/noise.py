"""``noise``: full-precision training with uniform weight noise (QGen's model of quantization,
and QT-DoG's Table 15 control).

After the same warm-up as QAT (``quant_start``), every step draws, for each layer QAT would
quantize, eps ~ U(-Delta/2, Delta/2) per weight, where Delta is the LSQ step that ``--bits``
would initialise for that output channel, s = 2 mean|w_c| / sqrt(Qp), recomputed from the current
weights every step (QGen: Var(eps) = Delta^2 / 12). With ``--noise-amplitude a`` the noise is
U(-a, a) instead. The gradient is taken at w + eps and applied to w (as QAT's straight-through
estimator does); the stored model is the clean w.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flatlab.errors import ConfigError
from flatlab.quant import QuantConfig, init_scale
from flatlab.quant.prepare import eligible_weights
from flatlab.train.algorithms import Algorithm, Minibatches, register_algorithm
from flatlab.train.qat import default_quant_start


def lsq_step_width(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The per-output-channel LSQ initial step Delta = 2 mean|w_c| / sqrt(2^(b-1) - 1)."""
    return init_scale(weight.detach(), 2 ** (bits - 1) - 1, per_channel=True)


def sample_weight_noise(weight: torch.Tensor, generator: torch.Generator, bits: int | None = None,
                        amplitude: float | None = None) -> torch.Tensor:
    """Draw eps ~ U(-Delta/2, Delta/2) per channel (``bits``) or U(-a, a) (``amplitude``)."""
    u = torch.rand(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype) * 2.0 - 1.0
    if amplitude is not None:
        return u * amplitude
    assert bits is not None
    return u * (lsq_step_width(weight, bits) / 2.0)


@register_algorithm
class WeightNoise(Algorithm):
    """Uniform weight noise on the layers QAT would quantize, after QAT's warm-up."""

    name = "noise"
    hparam_defaults: ClassVar[dict[str, Any]] = {"bits": 8, "noise_amplitude": None, "quant_start": None,
                                                 "keep_first_fp": False, "quantize_classifier": False}

    @classmethod
    def validate_hparams(cls, hparams: dict[str, Any], total_steps: int) -> None:
        if hparams["noise_amplitude"] is None:
            QuantConfig(bits=hparams["bits"])  # same bit range check as QAT
        else:
            amp = float(hparams["noise_amplitude"])
            if not amp > 0:
                raise ConfigError("noise_amplitude", f"must be positive, got {hparams['noise_amplitude']}")
            hparams["noise_amplitude"] = amp
        start = hparams["quant_start"]
        if start is not None and not 0 <= int(start) < total_steps:
            raise ConfigError("quant_start", f"({start}) must lie in [0, steps) for the noise warm-up")

    def __init__(self, model: nn.Module, hparams: dict[str, Any], total_steps: int,
                 generator: torch.Generator) -> None:
        super().__init__(model, hparams, total_steps, generator)
        start = hparams["quant_start"]
        self.noise_start = default_quant_start(total_steps) if start is None else int(start)
        config = QuantConfig(bits=int(hparams["bits"]), keep_first_fp=bool(hparams["keep_first_fp"]),
                             quantize_classifier=bool(hparams["quantize_classifier"]))
        # The weight QAT would quantize in each layer (attention: in_proj_weight), by layer name.
        self.noisy_weights = eligible_weights(model, config)

    def update(self, minibatches: Minibatches, step: int) -> dict[str, Any]:
        if step < self.noise_start:
            return super().update(minibatches, step)
        x = torch.cat([b[0] for b in minibatches])
        y = torch.cat([b[1] for b in minibatches])
        eps = {}
        with torch.no_grad():
            for name, weight in self.noisy_weights.items():
                eps[name] = sample_weight_noise(weight, self.generator, bits=int(self.hparams["bits"]),
                                                amplitude=self.hparams["noise_amplitude"])
                weight.add_(eps[name])
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        with torch.no_grad():
            for name, weight in self.noisy_weights.items():
                weight.sub_(eps[name])
        self.optimizer.step()
        return {"loss": float(loss.detach()), "log": {"noise": True}}
