"""Fold BatchNorm (eval statistics) into the convolution or linear layer that precedes it.

Jiang et al. (2019) measure sharpness and PAC-Bayes bounds on the network with BatchNorm folded
in (docs/measures.md section 4). For a layer ``z = W x + b`` followed by BatchNorm in eval mode,
``y = gamma (z - mu) / sqrt(var + eps) + beta``, the folded layer is

    W' = s * W (row-wise, one s per output channel),   b' = s (b - mu) + beta,
    s = gamma / sqrt(var + eps),

and computes the same function. The BatchNorm module is removed (replaced by the identity).

Two ways to find the pairs: a torch.fx trace (any traceable model, e.g. torchvision ResNets,
where ``conv1``/``bn1`` are attributes rather than Sequential neighbours), and, for models that
do not trace, a walk over ``nn.Sequential`` containers. Parameter names are kept, so a model and
its initial weights folded the same way line up name by name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: how many BatchNorm layers it folded and how many remain."""

    folded: int
    remaining: int
    method: str


def _can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(layer, _FOLDABLE) or not isinstance(bn, _BatchNorm):
        return False
    if bn.training or not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return False  # batch statistics are not a fixed affine map
    out_features = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
    if bn.num_features != out_features:
        return False
    if isinstance(layer, nn.modules.conv._ConvNd) and getattr(layer, "transposed", False):
        return False
    return True


@torch.no_grad()
def fold_pair(layer: nn.Module, bn: _BatchNorm) -> None:
    """Fold ``bn`` into ``layer`` in place (``layer`` then computes ``bn(layer(x))``).

    Computed in float64 and cast back, so the folded layer matches to float32 round-off.
    """
    dtype = layer.weight.dtype
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine and bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.affine and bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = layer.weight.double() * scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    layer.weight.copy_(weight.to(dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(dtype=dtype, device=layer.weight.device))
    else:
        layer.bias.copy_(bias.to(dtype))


def _fold_sequential(model: nn.Module) -> int:
    folded = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        keys = list(module._modules)
        for first, second in zip(keys, keys[1:]):
            layer, bn = module._modules[first], module._modules[second]
            if layer is not None and bn is not None and _can_fold(layer, bn):
                fold_pair(layer, bn)
                module._modules[second] = nn.Identity()
                folded += 1
    return folded


def _fold_fx(model: nn.Module) -> tuple[nn.Module, int]:
    import torch.fx as fx

    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    folded = 0
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer, bn = modules[prev.target], modules[node.target]
        if not _can_fold(layer, bn):
            continue
        fold_pair(layer, bn)
        node.replace_all_uses_with(prev)
        traced.graph.erase_node(node)
        folded += 1
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced, folded


def count_batchnorm(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """A copy of ``model`` (eval mode) with every foldable BatchNorm folded into its layer.

    The input model is left untouched. Parameter names of the kept layers do not change; a
    bias-free layer that absorbs a BatchNorm gains a ``bias``.

    Returns:
        (folded model in eval mode, report with the number folded and the number left, e.g. a
        BatchNorm that follows a pooling layer, which has no preceding linear map to absorb it).
    """
    work = copy.deepcopy(model).eval()
    if count_batchnorm(work) == 0:
        return work, FoldReport(0, 0, "none")
    try:
        folded_model, folded = _fold_fx(work)
        method = "fx"
    except Exception:  # noqa: BLE001 - untraceable user model: fall back to Sequential neighbours
        work = copy.deepcopy(model).eval()
        folded = _fold_sequential(work)
        folded_model, method = work, "sequential"
    return folded_model.eval(), FoldReport(folded, count_batchnorm(folded_model), method)


__all__ = ["FoldReport", "count_batchnorm", "fold_batchnorm", "fold_pair"]
