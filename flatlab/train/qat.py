"""``qat``: quantization-aware training after a full-precision warm-up (QT-DoG, docs/measures.md 1-2).

Steps 1 .. quant_start-1 train in full precision; before update ``quant_start`` the model's
eligible layers become LSQ fake-quantized (:func:`flatlab.quant.quantize_model`) and the optimizer
is rebuilt with the new parameter set, so the latent weights *and* the scales keep training. (The
released QT-DoG code swaps the modules but keeps the old optimizer, which then never updates the
scales.) Adam's moments of the parameters that survive the switch (the latent weights, biases,
BatchNorm) carry over; the scales start fresh. Only evaluations at or after the switch may be
selected, so ``model.pt`` is always a quantized checkpoint.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from flatlab.errors import ConfigError, FlatlabError
from flatlab.quant import QuantConfig, quantize_model
from flatlab.train.algorithms import Algorithm, register_algorithm

#: Share of the steps trained in full precision when quant_start is not given (QT-DoG: 2000/5000).
DEFAULT_WARMUP_FRACTION = 0.4

_BOOL_KEYS = ("per_channel", "keep_first_fp", "quantize_classifier")


def default_quant_start(total_steps: int) -> int:
    """40% of the steps, rounded (5000 -> 2000)."""
    return int(round(DEFAULT_WARMUP_FRACTION * total_steps))


def quant_config_from_hparams(hparams: dict[str, Any]) -> QuantConfig:
    """The :class:`QuantConfig` a QAT run's hyperparameters describe (validated)."""
    return QuantConfig(bits=hparams["bits"], per_channel=hparams["per_channel"],
                       grad_scale_n=hparams["grad_scale_n"], act_bits=hparams["act_bits"],
                       keep_first_fp=hparams["keep_first_fp"],
                       quantize_classifier=hparams["quantize_classifier"])


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise FlatlabError(f"{key} must be true or false, got {value!r}")


def _as_int(key: str, flag: str, value: Any) -> int:
    if isinstance(value, bool):
        raise FlatlabError(f"{flag} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    raise FlatlabError(f"{flag} must be an integer, got {value!r}")


@register_algorithm
class QAT(Algorithm):
    """Full-precision warm-up, then LSQ quantization-aware training (QT-DoG).

    Hyperparameters: ``bits`` (2..8, default 8), ``quant_start`` (step of the switch; default 40%
    of the steps), ``act_bits`` (None = weights only), ``per_channel``, ``grad_scale_n``
    (``channel`` | ``tensor``), ``keep_first_fp``, ``quantize_classifier``.
    """

    name = "qat"
    hparam_defaults: ClassVar[dict[str, Any]] = {
        "bits": 8, "quant_start": None, "act_bits": None, "per_channel": True,
        "grad_scale_n": "channel", "keep_first_fp": False, "quantize_classifier": False,
    }

    @classmethod
    def validate_hparams(cls, hparams: dict[str, Any], total_steps: int) -> None:
        """Normalise types in place and check ranges (bits 2..8, 0 <= quant_start < steps)."""
        hparams["bits"] = _as_int("bits", "--bits", hparams["bits"])
        if hparams["act_bits"] is not None:
            hparams["act_bits"] = _as_int("act_bits", "--act-bits", hparams["act_bits"])
        for key in _BOOL_KEYS:
            hparams[key] = _as_bool(key, hparams[key])
        quant_config_from_hparams(hparams)  # raises FlatlabError on bad bits / granularity
        start = hparams["quant_start"]
        if start is not None:
            start = _as_int("quant_start", "--quant-start", start)
            if start < 0:
                raise ConfigError("quant_start", f"must be >= 0, got {start}")
            if start >= total_steps:
                raise ConfigError("quant_start", f"({start}) must be smaller than steps ({total_steps}): "
                                   "quantized training needs at least one step")
            hparams["quant_start"] = start

    def __init__(self, model: nn.Module, hparams: dict[str, Any], total_steps: int,
                 generator: torch.Generator) -> None:
        super().__init__(model, hparams, total_steps, generator)
        self.quant_config = quant_config_from_hparams(hparams)
        start = hparams.get("quant_start")
        self.quant_start = default_quant_start(total_steps) if start is None else int(start)
        self.quantized = False

    def quantize(self) -> None:
        """Quantize the live model and hand the new parameter set to a rebuilt optimizer."""
        old_optimizer = self.optimizer
        quantize_model(self.model, self.quant_config)
        self.optimizer = self.make_optimizer()
        # Parameters that survive the switch are the same objects: keep their Adam moments.
        for param, state in old_optimizer.state.items():
            if any(param is p for group in self.optimizer.param_groups for p in group["params"]):
                self.optimizer.state[param] = state
        self.quantized = True

    def before_step(self, step: int) -> None:
        if not self.quantized and step >= self.quant_start:
            self.quantize()

    def update(self, minibatches: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> dict[str, Any]:
        stats = super().update(minibatches, step)
        stats["log"] = {"quantized": self.quantized}
        return stats

    def selectable(self, step: int) -> bool:
        return step >= self.quant_start

    def checkpoint_meta(self) -> dict[str, Any]:
        if not self.quantized:
            return {"bits": None, "act_bits": None, "quant": None}
        cfg = self.quant_config
        return {"bits": cfg.bits, "act_bits": cfg.act_bits, "quant": cfg.to_dict(),
                "quant_start": self.quant_start}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        # A state saved at or after the switch holds a quantized model and its optimizer.
        if not self.quantized and step >= self.quant_start:
            self.quantize()
        super().load_state_dict(state, step)
