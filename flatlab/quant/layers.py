"""Quantized ``nn.Conv2d`` / ``nn.Linear``: LSQ fake-quantized weights (and optionally inputs).

The quantized layers subclass the PyTorch layers, so the latent weights keep their parameter
names (``...weight``, ``...bias``) and code that looks for ``nn.Conv2d``/``nn.Linear`` still finds
them. Each adds ``weight_scale`` (shape (C, 1, ...) per channel, (1,) per tensor) and, with
activation quantization, ``act_scale`` plus two buffers (``act_initialized``, ``act_signed``).

The *effective* layers are what :func:`flatlab.quant.effective_model` builds: plain layers holding
the de-quantized weights ``round(clip(w/s)) * s``; with activation quantization they keep a fixed
input quantizer whose scale is a buffer, so the parameters are exactly the FP architecture's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flatlab.quant.config import QuantConfig
from flatlab.quant.lsq import (
    grad_scale_factor,
    init_scale,
    lsq_codes,
    lsq_quantize,
    signed_range,
    unsigned_range,
)


class QuantLayerMixin:
    """The quantizer state and logic shared by the quantized layers (:class:`QuantConv2d`,
    :class:`QuantLinear`, :class:`~flatlab.quant.attention.QuantMultiheadAttention`).

    Each quantized layer quantizes one weight tensor, read as :attr:`weight`, with the LSQ step
    sizes :attr:`weight_scale`; :attr:`weight_attr` and :attr:`scale_attr` are their parameter
    names in the state dict (``weight``/``weight_scale`` for conv and linear layers,
    ``in_proj_weight``/``in_proj_weight_scale`` for attention).
    """

    #: Parameter name of the quantized (latent) weight, and of its LSQ scale.
    weight_attr: ClassVar[str] = "weight"
    scale_attr: ClassVar[str] = "weight_scale"

    weight: nn.Parameter
    weight_scale: nn.Parameter
    bits: int
    per_channel: bool
    grad_scale_n: str
    act_bits: int | None

    @classmethod
    def _wrapping(cls, layer: nn.Conv2d | nn.Linear, kwargs: dict[str, Any], config: QuantConfig) -> Any:
        """A quantized twin of ``layer`` that reuses its weight/bias Parameter objects (no copy, no
        RNG use): built on the meta device, so construction allocates nothing and draws no random
        numbers."""
        new = cls(**kwargs, device="meta", dtype=layer.weight.dtype)  # type: ignore[call-arg]
        new.weight = layer.weight
        new.bias = layer.bias
        new._setup_quant(config)
        new.train(layer.training)
        return new

    def _setup_quant(self, config: QuantConfig) -> None:
        self.bits = config.bits
        self.per_channel = config.per_channel
        self.grad_scale_n = config.grad_scale_n
        self.act_bits = config.act_bits
        qn, qp = signed_range(self.bits)
        setattr(self, self.scale_attr, nn.Parameter(init_scale(self.weight.detach(), qp, self.per_channel)))
        if self.act_bits is not None:
            dev, dt = self.weight.device, self.weight.dtype
            self.act_scale = nn.Parameter(torch.ones(1, device=dev, dtype=dt))
            self.register_buffer("act_initialized", torch.zeros((), dtype=torch.bool, device=dev))
            self.register_buffer("act_signed", torch.zeros((), dtype=torch.bool, device=dev))

    @property
    def weight_range(self) -> tuple[int, int]:
        """(Qn, Qp): weight codes lie in [-Qn, Qp]."""
        return signed_range(self.bits)

    def weight_grad_scale(self) -> float:
        """g = 1/sqrt(N Qp) with N per :attr:`QuantConfig.grad_scale_n`."""
        _, qp = self.weight_range
        if self.per_channel and self.grad_scale_n == "channel":
            n = self.weight[0].numel()
        else:
            n = self.weight.numel()
        return grad_scale_factor(n, qp)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight ``round(clip(w/s, -Qn, Qp)) * s`` (differentiable, LSQ).

        Without autograd (``torch.no_grad``) the result carries the latent weight's
        ``requires_grad`` flag, as the effective model's Parameter does: PyTorch's matmul picks
        its kernel by that flag even when nothing is recorded (it folds a non-contiguous 3-D input
        into one matrix product for a weight that requires grad; attention's transposed inputs
        take that path), so with the same flag both models run the same kernels bit for bit.
        """
        qn, qp = self.weight_range
        w = lsq_quantize(self.weight, self.weight_scale, qn, qp, self.weight_grad_scale())
        if not torch.is_grad_enabled() and self.weight.requires_grad and not w.requires_grad:
            w.requires_grad_(True)
        return w

    def weight_codes(self) -> torch.Tensor:
        """Integer weight codes in [-Qn, Qp] (int64, same shape as the weight)."""
        qn, qp = self.weight_range
        return lsq_codes(self.weight, self.weight_scale, qn, qp)

    def dequantized_weight(self) -> torch.Tensor:
        """``codes * s``: exactly the weight the forward pass uses, detached."""
        with torch.no_grad():
            return self.weight_codes().to(self.weight.dtype) * self.weight_scale

    def act_range(self) -> tuple[int, int]:
        assert self.act_bits is not None
        return signed_range(self.act_bits) if bool(self.act_signed) else unsigned_range(self.act_bits)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ on the layer input (per tensor); scale initialised from the first batch seen."""
        if self.act_bits is None:
            return x
        if not bool(self.act_initialized):
            with torch.no_grad():
                self.act_signed.fill_(bool((x < 0).any()))
                _, qp = self.act_range()
                self.act_scale.copy_(init_scale(x.detach(), qp, per_channel=False).to(self.act_scale))
                self.act_initialized.fill_(True)
        qn, qp = self.act_range()
        return lsq_quantize(x, self.act_scale, qn, qp, grad_scale_factor(x[0].numel(), qp))

    def extra_repr(self) -> str:  # type: ignore[override]
        base = super().extra_repr()  # type: ignore[misc]
        gran = "per-channel" if self.per_channel else "per-tensor"
        act = f", act_bits={self.act_bits}" if self.act_bits is not None else ""
        quant = f"bits={self.bits}, {gran}, grad_scale_n={self.grad_scale_n}{act}"
        return f"{base}, {quant}" if base else quant


def _conv_kwargs(conv: nn.Conv2d) -> dict[str, Any]:
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
            "dilation": conv.dilation, "groups": conv.groups, "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode}


def _linear_kwargs(linear: nn.Linear) -> dict[str, Any]:
    return {"in_features": linear.in_features, "out_features": linear.out_features,
            "bias": linear.bias is not None}


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight (and optionally input) is LSQ fake-quantized."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: QuantConfig) -> QuantConv2d:
        """Wrap an existing conv, reusing its weight/bias Parameter objects (no copy, no RNG use)."""
        return cls._wrapping(conv, _conv_kwargs(conv), config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` whose weight (and optionally input) is LSQ fake-quantized."""

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        """Wrap an existing linear layer, reusing its Parameter objects."""
        return cls._wrapping(linear, _linear_kwargs(linear), config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


class _FixedInputQuant:
    """Fixed (non-trainable) LSQ input quantizer of an effective layer; the scale is a buffer."""

    act_scale: torch.Tensor
    act_qn: int
    act_qp: int

    def _setup_input_quant(self, layer: QuantLayerMixin) -> None:
        qn, qp = layer.act_range()
        self.act_qn, self.act_qp = qn, qp
        self.register_buffer("act_scale", layer.act_scale.detach().clone())  # type: ignore[attr-defined]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return lsq_quantize(x, self.act_scale, self.act_qn, self.act_qp, 1.0)


class InputQuantConv2d(_FixedInputQuant, nn.Conv2d):
    """Effective conv of an activation-quantized layer: FP weights, fixed input quantizer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.weight, self.bias)


class InputQuantLinear(_FixedInputQuant, nn.Linear):
    """Effective linear layer of an activation-quantized layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.weight, self.bias)


def effective_layer(layer: QuantLayerMixin) -> nn.Module:
    """A plain layer holding ``layer``'s de-quantized weight (fresh Parameters, same names).
    Attention has its own: :func:`flatlab.quant.attention.effective_attention`."""
    if isinstance(layer, QuantConv2d):
        kwargs, plain, with_act = _conv_kwargs(layer), nn.Conv2d, InputQuantConv2d
    elif isinstance(layer, QuantLinear):
        kwargs, plain, with_act = _linear_kwargs(layer), nn.Linear, InputQuantLinear
    else:  # pragma: no cover - guarded by callers
        raise TypeError(f"not a quantized layer: {type(layer).__name__}")
    cls = plain if layer.act_bits is None else with_act
    weight = layer.weight
    new = cls(**kwargs, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(layer.dequantized_weight().clone(), requires_grad=weight.requires_grad)
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    if layer.act_bits is not None:
        new._setup_input_quant(layer)  # type: ignore[union-attr]
    new.train(layer.training)  # type: ignore[attr-defined]
    return new
