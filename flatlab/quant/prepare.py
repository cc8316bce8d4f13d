"""Turn a full-precision model into a fake-quantized one, and back into its effective FP form.

What gets quantized (QT-DoG: every conv and linear layer except the final classifier): every
``nn.Conv2d`` and ``nn.Linear`` module, and every ``nn.MultiheadAttention``, whose input
projection is the parameter ``in_proj_weight`` and whose output projection ``out_proj`` is a
Linear subclass read by the attention kernel; both are quantized through
:class:`~flatlab.quant.attention.QuantMultiheadAttention` (``<name>`` for ``in_proj_weight`` and
``<name>.out_proj`` in :func:`eligible_layers` / :func:`quantized_layers`).
"""

from __future__ import annotations

import copy

from torch import nn

from flatlab.errors import FlatlabError
from flatlab.quant.attention import (
    QuantMultiheadAttention,
    check_quantizable_attention,
    effective_attention,
)
from flatlab.quant.config import QuantConfig
from flatlab.quant.layers import QuantConv2d, QuantLayerMixin, QuantLinear, effective_layer

#: Exact layer types that get quantized. Subclasses are left alone on purpose: attention's
#: ``out_proj`` (a ``NonDynamicallyQuantizableLinear``, whose weight F.multi_head_attention_forward
#: reads directly) is quantized by its ``QuantMultiheadAttention``, never as a module of its own.
_SWAP: dict[type[nn.Module], type[QuantLayerMixin]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear,
                                                      nn.MultiheadAttention: QuantMultiheadAttention}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _candidates(model: nn.Module) -> list[str]:
    """Names of the swappable layers in module order, each attention followed by its out_proj."""
    names = []
    for name, module in model.named_modules():
        if type(module) in _SWAP:
            names.append(name)
            if type(module) is nn.MultiheadAttention:
                names.append(f"{name}.out_proj" if name else "out_proj")
    return names


def eligible_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """Qualified names of the layers :func:`quantize_model` replaces, in module order.

    Every ``nn.Conv2d`` and ``nn.Linear`` and every ``nn.MultiheadAttention`` (its
    ``in_proj_weight``) followed by its ``out_proj``, except ``config.classifier_name`` (unless
    ``quantize_classifier``) and the first such layer when ``keep_first_fp`` (an attention layer
    kept in full precision keeps its ``out_proj`` too).

    Raises:
        FlatlabError: no layer named ``classifier_name`` while the classifier should stay FP,
            nothing left to quantize, or attention with separate q/k/v weights.
    """
    candidates = _candidates(model)
    names = list(candidates)
    modules = dict(model.named_modules())
    if not config.quantize_classifier:
        if config.classifier_name not in modules:
            raise FlatlabError(f"the model has no module named {config.classifier_name!r} to keep in full "
                               "precision: set classifier_name to its final layer (e.g. 'fc') or quantize_classifier")
        names = [n for n in names if n != config.classifier_name]
    if config.keep_first_fp and candidates:
        first = candidates[0]
        names = [n for n in names if n != first]
        if type(modules[first]) is nn.MultiheadAttention:
            names = [n for n in names if n != f"{first}.out_proj"]
    if not names:
        raise FlatlabError("the model has no conv or linear layer left to quantize with this configuration")
    for n in names:
        if type(modules[n]) is nn.MultiheadAttention:
            check_quantizable_attention(n, modules[n])  # type: ignore[arg-type]
    return names


def eligible_weights(model: nn.Module, config: QuantConfig) -> dict[str, nn.Parameter]:
    """The latent weight :func:`quantize_model` would quantize in each eligible layer, by layer name
    (as :func:`eligible_layers`): ``weight`` for conv and linear layers, ``in_proj_weight`` for
    attention. The Parameter objects themselves (they stay the latent weights after quantization).
    For code that perturbs or inspects "the weights QAT would quantize" (e.g. the ``noise``
    algorithm), which must not assume every such layer has a ``weight``."""
    modules = dict(model.named_modules())
    return {name: getattr(modules[name], "in_proj_weight" if isinstance(modules[name], nn.MultiheadAttention)
                          else "weight") for name in eligible_layers(model, config)}


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace the eligible layers of ``model`` in place by LSQ fake-quantized layers.

    The latent weights are the same ``Parameter`` objects as before (so their names and values are
    unchanged); each quantized layer gains ``weight_scale`` (``in_proj_weight_scale`` for
    attention) initialised per output channel to 2 mean|w_c| / sqrt(Qp). An optimizer built
    before this call does not know the scales: rebuild it.

    Returns:
        ``model`` itself (for chaining).
    """
    if any(isinstance(m, QuantLayerMixin) for m in model.modules()):
        raise FlatlabError("the model is already quantized")
    names = eligible_layers(model, config)
    chosen = set(names)
    for name in names:
        layer = model.get_submodule(name)
        if type(layer) is nn.MultiheadAttention:
            out_proj = f"{name}.out_proj" if name else "out_proj"
            new: nn.Module = QuantMultiheadAttention.from_float(layer, config, name=name,
                                                                quantize_out_proj=out_proj in chosen)
        elif type(layer) in _SWAP:
            new = _SWAP[type(layer)].from_float(layer, config)  # type: ignore[attr-defined]
        else:  # an out_proj, quantized with its attention just before
            continue
        _set_submodule(model, name, new)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    """The quantized layers of ``model`` by qualified name (empty for an FP model)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}


def is_quantized(model: nn.Module) -> bool:
    return bool(quantized_layers(model))


def effective_model(model: nn.Module) -> nn.Module:
    """A deep copy in which every quantized layer is a plain layer holding its de-quantized weights.

    The result has exactly the parameter names of the unquantized architecture (no scales) and
    computes the same function as ``model`` in eval mode; measurements (Hessians, sharpness,
    surfaces) use it to study the deployed weights. An FP model gives a plain deep copy.
    """
    copied = copy.deepcopy(model)
    replaced: list[str] = []
    for name, layer in quantized_layers(copied).items():
        if any(name.startswith(f"{r}.") for r in replaced):
            continue  # an attention's out_proj: rebuilt with its attention
        plain = effective_attention(layer) if isinstance(layer, QuantMultiheadAttention) else effective_layer(layer)
        _set_submodule(copied, name, plain)
        replaced.append(name)
    return copied
