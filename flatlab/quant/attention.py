r"""LSQ on the projections of ``nn.MultiheadAttention`` (ViTs, ``nn.TransformerEncoderLayer``).

``nn.MultiheadAttention`` keeps its input projection as a *parameter*, ``in_proj_weight``
:math:`W_\text{in} = [W_q; W_k; W_v] \in \mathbb R^{3E \times E}` (plus ``in_proj_bias``), not as
a Linear module, and its output projection ``out_proj`` is a ``NonDynamicallyQuantizableLinear``
whose weight ``F.multi_head_attention_forward`` reads directly, so swapping Linear modules alone
would quantize neither. :class:`QuantMultiheadAttention` quantizes both:

* ``in_proj_weight`` with LSQ per output channel (3E channels: every row of :math:`W_q`,
  :math:`W_k` and :math:`W_v` has its own step size; scale ``in_proj_weight_scale`` of shape
  (3E, 1)), :math:`\hat W_\text{in} = \operatorname{round}(\operatorname{clip}(W_\text{in}/s,
  -Q_n, Q_p))\, s`, scale-gradient factor :math:`g = 1/\sqrt{E\, Q_p}` (N = E elements per
  channel, or 3E^2 with ``grad_scale_n = "tensor"``);
* ``out_proj`` is replaced by a :class:`~flatlab.quant.layers.QuantLinear` (its own
  ``out_proj.weight_scale``), listed by :func:`~flatlab.quant.quantized_layers` as
  ``<name>.out_proj``.

The forward pass is PyTorch's own ``nn.MultiheadAttention.forward`` run with
:math:`\hat W_\text{in}` and :math:`\hat W_o` in place of the latent weights (everything else,
masks, ``batch_first``, dropout, ``need_weights``, is PyTorch's code). So the quantized model takes
the same kernel as the deployed (effective) model in every mode: ``scaled_dot_product_attention``
when weights are not needed, and PyTorch's fused inference path
(``torch._native_multi_head_attention``) in eval mode without gradients. The effective model
(:func:`~flatlab.quant.effective_model`) is therefore a plain ``nn.MultiheadAttention`` holding
:math:`\hat W_\text{in}`, :math:`\hat W_o` and gives bit-identical outputs.

With activation quantization (``act_bits``) the attention inputs (query, key, value) go through
the layer's LSQ input quantizer (one scale; self-attention stays self-attention), and the
attention output, which enters ``out_proj`` inside PyTorch's kernel, is quantized by running the
kernel with an identity output projection and a zero bias (exact: every product but one is a
zero) and then
``out_proj`` as a module (input quantizer, quantized weight, bias).

Separate query/key/value weights (``kdim`` or ``vdim`` different from ``embed_dim``) are refused
with a :class:`~flatlab.errors.FlatlabError`: one scale tensor per layer is the contract of the
quantized layers, the packed export and ``flatlab info``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from flatlab.errors import FlatlabError
from flatlab.quant.config import QuantConfig
from flatlab.quant.layers import (
    InputQuantLinear,
    QuantLayerMixin,
    QuantLinear,
    _FixedInputQuant,
    _linear_kwargs,
)


def _mha_kwargs(mha: nn.MultiheadAttention) -> dict[str, Any]:
    """The constructor arguments that rebuild ``mha``'s architecture."""
    return {"embed_dim": mha.embed_dim, "num_heads": mha.num_heads, "dropout": mha.dropout,
            "bias": mha.in_proj_bias is not None, "add_bias_kv": mha.bias_k is not None,
            "add_zero_attn": mha.add_zero_attn, "kdim": mha.kdim, "vdim": mha.vdim,
            "batch_first": mha.batch_first}


def check_quantizable_attention(name: str, mha: nn.MultiheadAttention) -> None:
    """Refuse attention with separate q/k/v projection weights (see the module docstring)."""
    if not mha._qkv_same_embed_dim:
        raise FlatlabError(f"attention layer {name!r} has separate query/key/value weights (kdim {mha.kdim}, "
                           f"vdim {mha.vdim} != embed_dim {mha.embed_dim}): flatlab quantizes packed in_proj_weight "
                           "only; keep the model in full precision or use kdim = vdim = embed_dim")


class _Projection:
    """What attention reads of a projection: ``weight`` and ``bias``."""

    __slots__ = ("bias", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight
        self.bias = bias


class _AttentionView:
    """``self`` for ``nn.MultiheadAttention.forward``: the module, with ``in_proj_weight`` and
    ``out_proj`` replaced (every other attribute and method is the module's own)."""

    def __init__(self, module: nn.MultiheadAttention, in_proj_weight: torch.Tensor, out_proj: _Projection) -> None:
        self._module = module
        self.in_proj_weight = in_proj_weight
        self.out_proj = out_proj

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class _AttentionForward:
    """The forward pass shared by the quantized and the effective activation-quantized attention."""

    embed_dim: int
    out_proj: nn.Linear

    def _attention_weights(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """(in-projection weight, out-projection weight) the forward pass uses."""
        raise NotImplementedError

    def _quantizes_inputs(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _out_proj_quantizes_input(self) -> bool:
        out = self.out_proj
        return isinstance(out, InputQuantLinear) or (isinstance(out, QuantLinear) and out.act_bits is not None)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward`` (same arguments) with the quantized weights."""
        if self._quantizes_inputs():
            query, key, value = self._quantize_qkv(query, key, value)
        in_weight, out_weight = self._attention_weights()
        if self._out_proj_quantizes_input():
            # The kernel applies out_proj itself: run it with an identity projection (exact),
            # then out_proj as a module, which quantizes its input.
            eye = torch.eye(self.embed_dim, dtype=out_weight.dtype, device=out_weight.device)
            zero = torch.zeros(self.embed_dim, dtype=out_weight.dtype, device=out_weight.device)
            view = _AttentionView(self, in_weight, _Projection(eye, zero))  # type: ignore[arg-type]
            out, weights = nn.MultiheadAttention.forward(view, query, key, value, *args, **kwargs)  # type: ignore[arg-type]
            return self.out_proj(out), weights
        view = _AttentionView(self, in_weight, _Projection(out_weight, self.out_proj.bias))  # type: ignore[arg-type]
        return nn.MultiheadAttention.forward(view, query, key, value, *args, **kwargs)  # type: ignore[arg-type]

    def _quantize_qkv(self, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input quantization of query, key and value, keeping ``query is key is value``."""
        quantize = self.quantize_input  # type: ignore[attr-defined]
        q = quantize(query)
        k = q if key is query else quantize(key)
        if value is key:
            v = k
        elif value is query:
            v = q
        else:
            v = quantize(value)
        return q, k, v


class QuantMultiheadAttention(_AttentionForward, QuantLayerMixin, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with LSQ fake-quantized ``in_proj_weight`` and ``out_proj``.

    Parameters: the latent ``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
    ``out_proj.bias`` (same objects and names as the FP module), ``in_proj_weight_scale`` (3E, 1)
    and ``out_proj.weight_scale`` (E, 1); ``bias_k``/``bias_v`` stay FP. As a quantized layer its
    :attr:`weight` is ``in_proj_weight`` and :attr:`weight_scale` is ``in_proj_weight_scale``
    (aliases, so code written for quantized conv/linear layers reads it the same way).
    """

    weight_attr: ClassVar[str] = "in_proj_weight"
    scale_attr: ClassVar[str] = "in_proj_weight_scale"

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        """The latent quantized weight, ``in_proj_weight`` (3E, E)."""
        return self.in_proj_weight

    @property
    def weight_scale(self) -> nn.Parameter:  # type: ignore[override]
        """The LSQ step sizes of ``in_proj_weight``, ``in_proj_weight_scale`` (3E, 1) or (1,)."""
        return self.in_proj_weight_scale

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, config: QuantConfig, name: str = "attention",
                   quantize_out_proj: bool = True) -> QuantMultiheadAttention:
        """Wrap ``mha``, reusing its Parameter objects (no copy, no RNG use: built on the meta device).

        Args:
            mha: the attention module (``kdim == vdim == embed_dim``).
            config: the quantization configuration.
            name: its qualified name, for error messages.
            quantize_out_proj: also replace ``out_proj`` by a :class:`QuantLinear`.
        """
        check_quantizable_attention(name, mha)
        new = cls(**_mha_kwargs(mha), device="meta", dtype=mha.in_proj_weight.dtype)
        new.in_proj_weight = mha.in_proj_weight
        new.in_proj_bias = mha.in_proj_bias
        new.bias_k, new.bias_v = mha.bias_k, mha.bias_v
        new.out_proj = QuantLinear.from_float(mha.out_proj, config) if quantize_out_proj else mha.out_proj
        new._setup_quant(config)
        new.train(mha.training)
        return new

    def _attention_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.out_proj.quantized_weight() if isinstance(self.out_proj, QuantLinear) else self.out_proj.weight
        return self.quantized_weight(), out

    def _quantizes_inputs(self) -> bool:
        return self.act_bits is not None


class InputQuantMultiheadAttention(_AttentionForward, _FixedInputQuant, nn.MultiheadAttention):
    """Effective attention of an activation-quantized layer: FP (de-quantized) weights and a fixed
    LSQ quantizer on query, key and value (its scale a buffer); ``out_proj`` an
    :class:`InputQuantLinear` when it quantized its input too."""

    def _attention_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.in_proj_weight, self.out_proj.weight

    def _quantizes_inputs(self) -> bool:
        return True


def _effective_linear(layer: nn.Linear, cls: type[nn.Linear]) -> nn.Linear:
    """A ``cls`` layer holding ``layer``'s deployed weight (de-quantized if quantized) and bias."""
    weight = layer.dequantized_weight() if isinstance(layer, QuantLinear) else layer.weight.detach()
    new = cls(**_linear_kwargs(layer), device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.clone(), requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    new.train(layer.training)
    return new


def effective_attention(layer: QuantMultiheadAttention) -> nn.MultiheadAttention:
    """The deployed attention of ``layer``: de-quantized ``in_proj_weight`` and ``out_proj.weight``
    in a plain ``nn.MultiheadAttention`` (fresh Parameters, the FP names), or an
    :class:`InputQuantMultiheadAttention` when the layer quantizes its inputs."""
    cls: type[nn.MultiheadAttention] = (nn.MultiheadAttention if layer.act_bits is None
                                        else InputQuantMultiheadAttention)
    new = cls(**_mha_kwargs(layer), device="meta", dtype=layer.in_proj_weight.dtype)
    new.in_proj_weight = nn.Parameter(layer.dequantized_weight().clone(),
                                      requires_grad=layer.in_proj_weight.requires_grad)
    for attr in ("in_proj_bias", "bias_k", "bias_v"):
        p = getattr(layer, attr)
        if p is not None:
            setattr(new, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    out_proj = layer.out_proj
    out_act = isinstance(out_proj, QuantLinear) and out_proj.act_bits is not None
    new.out_proj = _effective_linear(out_proj, InputQuantLinear if out_act else NonDynamicallyQuantizableLinear)
    if out_act:
        new.out_proj._setup_input_quant(out_proj)  # type: ignore[operator]
    if layer.act_bits is not None:
        new._setup_input_quant(layer)  # type: ignore[union-attr]
    new.train(layer.training)
    return new


__all__ = ["InputQuantMultiheadAttention", "QuantMultiheadAttention", "check_quantizable_attention",
           "effective_attention"]
