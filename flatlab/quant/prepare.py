"""Turn a full-precision model into a fake-quantized one, and back into its effective FP form."""

from __future__ import annotations

import copy

from torch import nn

from flatlab.errors import FlatlabError
from flatlab.quant.config import QuantConfig
from flatlab.quant.layers import QuantConv2d, QuantLayerMixin, QuantLinear, effective_layer

#: Exact layer types that get quantized. Subclasses (e.g. attention's out_proj, whose weight is
#: read directly by F.multi_head_attention_forward) are left alone on purpose.
_SWAP: dict[type[nn.Module], type[QuantLayerMixin]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def eligible_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """Qualified names of the layers :func:`quantize_model` replaces, in module order.

    Every ``nn.Conv2d`` and ``nn.Linear`` except ``config.classifier_name`` (unless
    ``quantize_classifier``) and the first such layer when ``keep_first_fp``.

    Raises:
        FlatlabError: no layer named ``classifier_name`` while the classifier should stay FP,
            or nothing left to quantize.
    """
    names = [n for n, m in model.named_modules() if type(m) in _SWAP]
    modules = dict(model.named_modules())
    if not config.quantize_classifier:
        if config.classifier_name not in modules:
            raise FlatlabError(f"the model has no module named {config.classifier_name!r} to keep in full "
                               "precision: set classifier_name to its final layer (e.g. 'fc') or quantize_classifier")
        names = [n for n in names if n != config.classifier_name]
    if config.keep_first_fp and names:
        first = next(n for n, m in model.named_modules() if type(m) in _SWAP)
        names = [n for n in names if n != first]
    if not names:
        raise FlatlabError("the model has no conv or linear layer left to quantize with this configuration")
    return names


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace the eligible layers of ``model`` in place by LSQ fake-quantized layers.

    The latent weights are the same ``Parameter`` objects as before (so their names and values are
    unchanged); each quantized layer gains ``weight_scale`` initialised to 2 mean|w| / sqrt(Qp).
    An optimizer built before this call does not know the scales: rebuild it.

    Returns:
        ``model`` itself (for chaining).
    """
    if any(isinstance(m, QuantLayerMixin) for m in model.modules()):
        raise FlatlabError("the model is already quantized")
    for name in eligible_layers(model, config):
        layer = model.get_submodule(name)
        _set_submodule(model, name, _SWAP[type(layer)].from_float(layer, config))
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
    for name, layer in quantized_layers(copied).items():
        _set_submodule(copied, name, effective_layer(layer))
    return copied
