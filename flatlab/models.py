"""Model registry: small MLP and CNN for the digits, torchvision ResNets for image data sets.

Every model names its final layer ``classifier`` (an ``nn.Linear``): quantization leaves it in
full precision by default (QT-DoG), and measurements can address it by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flatlab.errors import FlatlabError


class MLP(nn.Module):
    """Flatten -> [Linear -> (BatchNorm1d) -> ReLU] x depth -> classifier.

    Args:
        input_shape: (C, H, W) of one sample.
        num_classes: outputs of the classifier.
        width: hidden units per layer.
        depth: number of hidden layers (>= 1).
        batchnorm: add BatchNorm1d after each hidden linear layer.
        bias: use biases (a bias-free ReLU net is positively homogeneous per layer).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 64, depth: int = 2,
                 batchnorm: bool = False, bias: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width, bias=bias))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            fan_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(fan_in, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (conv -> BatchNorm -> ReLU; strides 1, 2, 2), global average pool,
    linear classifier. ``width`` channels in the first block, ``2 * width`` after.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 16,
                 batchnorm: bool = True, bias: bool = True) -> None:
        super().__init__()
        channels = input_shape[0]
        widths = [width, 2 * width, 2 * width]
        strides = [1, 2, 2]
        layers: list[nn.Module] = []
        for out_ch, stride in zip(widths, strides):
            # A conv followed by BatchNorm needs no bias of its own.
            layers.append(nn.Conv2d(channels, out_ch, 3, stride=stride, padding=1,
                                    bias=bias and not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU())
            channels = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ModelFactory = Callable[..., nn.Module]

#: name -> (factory, default options). Options are stored in checkpoints to rebuild the model.
MODELS: dict[str, tuple[ModelFactory, dict[str, Any]]] = {
    "mlp": (MLP, {"width": 64, "depth": 2, "batchnorm": False, "bias": True}),
    "cnn": (SmallCNN, {"width": 32, "batchnorm": True, "bias": True}),
}


def register_model(name: str, factory: ModelFactory, defaults: dict[str, Any]) -> None:
    """Add a model to the registry."""
    MODELS[name] = (factory, dict(defaults))


def model_names() -> list[str]:
    return sorted(MODELS)


def model_options(name: str, **overrides: Any) -> dict[str, Any]:
    """The full option dict of a model: registry defaults, then the non-None overrides."""
    if name not in MODELS:
        raise FlatlabError(f"unknown model {name!r}: choose one of {', '.join(model_names())}")
    options = dict(MODELS[name][1])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in options:
            raise FlatlabError(f"model {name} has no option {key!r} (options: {', '.join(options)})")
        options[key] = value
    return options


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    """Build a registered model with the given options (missing ones take the defaults)."""
    full = model_options(name, **options)
    factory = MODELS[name][0]
    return factory(tuple(input_shape), int(num_classes), **full)


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalar parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
