"""A base for algorithms that train in full precision by default and combine with QAT on request.

With ``bits`` unset (None) the algorithm is full precision throughout. With ``--bits B`` it
follows QT-DoG's schedule exactly as ``qat`` does (warm-up, switch at ``quant_start``, optimizer
rebuilt with latent weights and scales), so SAM + QAT, SWAD after QAT, and so on share one switch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from flatlab.train.qat import QAT, default_quant_start, quant_config_from_hparams


class OptionalQAT(QAT):
    """QAT whose ``bits`` default to None (= full precision)."""

    hparam_defaults: ClassVar[dict[str, Any]] = {**QAT.hparam_defaults, "bits": None}

    @classmethod
    def validate_hparams(cls, hparams: dict[str, Any], total_steps: int) -> None:
        if hparams.get("bits") is None:
            if hparams.get("act_bits") is not None:
                from flatlab.errors import ConfigError

                raise ConfigError("act_bits", "needs bits (weights are quantized whenever activations are)")
            return
        super().validate_hparams(hparams, total_steps)

    def __init__(self, model: nn.Module, hparams: dict[str, Any], total_steps: int,
                 generator: torch.Generator) -> None:
        if hparams.get("bits") is not None:
            super().__init__(model, hparams, total_steps, generator)
            return
        # Full precision: skip QAT's config; never switch.
        super(QAT, self).__init__(model, hparams, total_steps, generator)
        self.quant_config = None
        start = hparams.get("quant_start")
        self.quant_start = default_quant_start(total_steps) if start is None else int(start)
        self.quantized = False

    @property
    def uses_quantization(self) -> bool:
        return self.quant_config is not None

    def before_step(self, step: int) -> None:
        if self.uses_quantization:
            super().before_step(step)

    def selectable(self, step: int) -> bool:
        return super().selectable(step) if self.uses_quantization else True

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        if self.uses_quantization:
            super().load_state_dict(state, step)
        else:
            super(QAT, self).load_state_dict(state, step)


__all__ = ["OptionalQAT", "quant_config_from_hparams"]
