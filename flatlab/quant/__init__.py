"""Quantization: LSQ fake quantization, quantized layers, model preparation and integer export."""

from flatlab.quant.attention import (
    InputQuantMultiheadAttention,
    QuantMultiheadAttention,
    effective_attention,
)
from flatlab.quant.config import QuantConfig
from flatlab.quant.layers import QuantConv2d, QuantLayerMixin, QuantLinear
from flatlab.quant.lsq import LSQFunction, grad_scale_factor, init_scale, lsq_codes, lsq_quantize
from flatlab.quant.prepare import (
    effective_model,
    eligible_layers,
    eligible_weights,
    is_quantized,
    quantize_model,
    quantized_layers,
)

__all__ = [
    "InputQuantMultiheadAttention",
    "LSQFunction",
    "QuantConfig",
    "QuantConv2d",
    "QuantLayerMixin",
    "QuantLinear",
    "QuantMultiheadAttention",
    "effective_attention",
    "effective_model",
    "eligible_layers",
    "eligible_weights",
    "grad_scale_factor",
    "init_scale",
    "is_quantized",
    "lsq_codes",
    "lsq_quantize",
    "quantize_model",
    "quantized_layers",
]
