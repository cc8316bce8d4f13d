"""Which parameters a curvature measurement differentiates with respect to.

The Hessian of a network is taken with respect to a chosen subset of its parameters:

* ``all``: every trainable parameter;
* ``weights``: only the weight matrices and kernels of linear and convolution layers (no biases,
  no normalization affine parameters);
* ``no-bn``: every trainable parameter except those of normalization layers (BatchNorm and
  friends), whose scale invariance makes their curvature hard to compare across models.

Quantizer step sizes (LSQ scales) are never curvature parameters: they are not weights of the
deployed model, and for ``--wrt latent`` the Hessian is taken through the straight-through
estimator with respect to the latent weights only.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from flatlab.errors import FlatlabError

PARAM_CHOICES = ("all", "weights", "no-bn")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
)


def is_normalization(module: nn.Module) -> bool:
    """True for BatchNorm, InstanceNorm, GroupNorm and LayerNorm modules."""
    return isinstance(module, _NORM_TYPES)


def is_quantizer_scale(qualified_name: str, owner: nn.Module) -> bool:
    """True for a quantizer's learned step size (an LSQ scale), which is not a model weight."""
    leaf = qualified_name.rsplit(".", 1)[-1].lower()
    owner_kind = type(owner).__name__.lower()
    return "scale" in leaf or "step_size" in leaf or "quantizer" in owner_kind


def _owners(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Qualified parameter name -> (owning module's name, owning module)."""
    found: dict[str, tuple[str, nn.Module]] = {}
    for module_name, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            qualified = f"{module_name}.{leaf}" if module_name else leaf
            found.setdefault(qualified, (module_name, module))
    return found


def check_params(params: str | Sequence[str]) -> str | tuple[str, ...]:
    """``params`` as a config stores it: one of :data:`PARAM_CHOICES`, or a non-empty tuple of
    parameter names; FlatlabError naming ``params`` otherwise."""
    if isinstance(params, str):
        if params not in PARAM_CHOICES:
            raise FlatlabError(f"params must be one of {', '.join(PARAM_CHOICES)} or a list of parameter names, "
                               f"got {params!r}")
        return params
    names = tuple(params)
    if not names or not all(isinstance(n, str) for n in names):
        raise FlatlabError(f"params must be one of {', '.join(PARAM_CHOICES)} or a non-empty list of parameter "
                           f"names, got {params!r}")
    return names


def select_parameters(model: nn.Module, which: str | Sequence[str] = "all") -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs a curvature measurement differentiates with respect to.

    Args:
        model: any ``nn.Module``.
        which: ``all``, ``weights``, ``no-bn`` (see the module docstring), or an explicit list of
            qualified parameter names.

    Returns:
        The selected trainable parameters in ``model.named_parameters()`` order; quantizer scales
        are always left out.

    Raises:
        FlatlabError: unknown choice, unknown names, or nothing selected.
    """
    owners = _owners(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not isinstance(which, str):
        wanted = list(which)
        known = {n for n, _ in named}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise FlatlabError(f"no trainable parameter named {missing[0]!r} in the model "
                               f"(names look like {', '.join(list(known)[:3])})")
        chosen = [(n, p) for n, p in named if n in set(wanted)]
    elif which not in PARAM_CHOICES:
        raise FlatlabError(f"unknown parameter choice {which!r}: choose one of {', '.join(PARAM_CHOICES)}")
    else:
        chosen = []
        for name, param in named:
            module_name, owner = owners.get(name, ("", model))
            if is_quantizer_scale(name, owner):
                continue
            if which == "no-bn" and is_normalization(owner):
                continue
            if which == "weights" and (is_normalization(owner) or param.dim() < 2
                                       or not name.endswith("weight")):
                continue
            chosen.append((name, param))
    if not chosen:
        raise FlatlabError(f"the parameter choice {which!r} selects no trainable parameter of this model")
    return chosen


def parameter_blocks(names: Sequence[str]) -> dict[str, list[str]]:
    """Group parameter names by their owning layer (``features.0.weight`` -> ``features.0``),
    keeping the model's order: the blocks of a per-layer (block-diagonal) curvature analysis."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        layer = name.rsplit(".", 1)[0] if "." in name else name
        blocks.setdefault(layer, []).append(name)
    return blocks


__all__ = ["PARAM_CHOICES", "check_params", "is_normalization", "is_quantizer_scale", "parameter_blocks", "select_parameters"]
