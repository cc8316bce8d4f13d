"""Model registry: small MLP, CNN and ViT for the digits, torchvision ResNets and ViT-B/16 for
image data sets.

Every model names its final layer ``classifier`` (an ``nn.Linear``): quantization leaves it in
full precision by default (QT-DoG), and measurements can address it by name.

=========  ================================================  ===========================  ==========
name       architecture                                      options (defaults)           parameters
=========  ================================================  ===========================  ==========
mlp        flatten, [Linear, (BatchNorm), ReLU] x depth      width 64, depth 2            21,258
cnn        3 conv-BatchNorm-ReLU blocks, pool, linear        width 32                     56,554
vit        torchvision VisionTransformer, class token,       width 48, depth 3, heads 4,  59,146
           pre-norm blocks (MultiheadAttention, GELU MLP)    patch 4, mlp_ratio 2
resnet18   torchvision ResNet-18                             freeze_bn                    11,181,642
resnet50   torchvision ResNet-50                             freeze_bn                    23,528,522
vit_b_16   torchvision ViT-B/16 (patch 16, 12 x 768, 12 h)   -                            85,806,346
=========  ================================================  ===========================  ==========

(parameter counts with the defaults and 10 classes: 1x16x16 inputs for mlp, cnn and vit, 3x224x224
for the ResNets and ViT-B/16.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flatlab.errors import ConfigError, FlatlabError


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


class ResNet(nn.Module):
    """torchvision ResNet-18/50 as ``features`` (everything up to the pooled features) plus a
    ``classifier``; never downloads weights (use ``--pretrained PATH``).

    Args:
        input_shape: (C, H, W); a channel count other than 3 replaces the first convolution.
        num_classes: outputs of the classifier.
        depth: 18 or 50.
        freeze_bn: keep BatchNorm in eval mode (running statistics fixed, affine trainable) even
            while training, as DomainBed and SWAD do for pretrained ResNets.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int = 50,
                 freeze_bn: bool = True) -> None:
        super().__init__()
        import torchvision

        builders = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}
        if depth not in builders:
            raise FlatlabError(f"ResNet depth must be 18 or 50, got {depth}")
        net = builders[depth](weights=None)
        if input_shape[0] != 3:
            net.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
        n_features = net.fc.in_features
        net.fc = nn.Identity()
        self.features = net
        self.classifier = nn.Linear(n_features, num_classes)
        self.freeze_bn = freeze_bn

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ViT(nn.Module):
    r"""A Vision Transformer (Dosovitskiy et al. 2021) built on torchvision's ``VisionTransformer``:
    ``features`` is everything up to the class token's final LayerNorm output, ``classifier`` a
    linear layer on it.

    For an image x of side S with C channels and patch side p, with width (hidden size) D, the
    forward pass is

    .. math::

        z_0 &= [x_\text{cls};\ \mathrm{Conv}_{p\times p,\ \text{stride } p}(x)] + E_\text{pos},
            \qquad z_0 \in \mathbb R^{(1 + (S/p)^2) \times D},\\
        y_l &= z_{l-1} + \mathrm{MHA}(\mathrm{LN}(z_{l-1})),\qquad
        z_l = y_l + W_2\, \mathrm{GELU}(W_1 \mathrm{LN}(y_l) + b_1) + b_2 \quad (l = 1..L),\\
        \text{logits} &= W_c\, \mathrm{LN}(z_L)_0 + b_c,

    with :math:`W_1 \in \mathbb R^{rD \times D}` (r = ``mlp_ratio``), LayerNorm eps 1e-6, and
    multi-head self-attention :math:`\mathrm{MHA}(u) = W_o\, [\mathrm{softmax}(Q_h K_h^\top /
    \sqrt{D/H}) V_h]_{h=1..H} + b_o`, where :math:`[Q; K; V] = W_\text{in} u + b_\text{in}`
    (``in_proj_weight`` :math:`W_\text{in} \in \mathbb R^{3D \times D}`, one
    ``nn.MultiheadAttention`` per block, which runs ``scaled_dot_product_attention``). The class
    token starts at zero and the position embeddings at N(0, 0.02^2), as in torchvision; the
    classifier has PyTorch's default ``nn.Linear`` initialisation (torchvision zeroes its own head,
    which flatlab replaces). No dropout.

    Args:
        input_shape: (C, S, S); the patch embedding takes C channels (torchvision's takes 3).
        num_classes: outputs of the classifier.
        width: hidden size D (divisible by ``heads``).
        depth: number of encoder blocks L.
        heads: attention heads H.
        patch: patch side p (divides S).
        mlp_ratio: hidden units of each block's MLP per unit of width, r.

    Raises:
        FlatlabError: a non-square image, a patch that does not divide it, a width not divisible
            by the heads, or a non-positive option.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 48, depth: int = 3,
                 heads: int = 4, patch: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        for name, value in (("width", width), ("depth", depth), ("heads", heads), ("patch", patch),
                            ("mlp_ratio", mlp_ratio)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FlatlabError(f"vit option {name} must be a positive integer, got {value!r}")
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise FlatlabError(f"vit needs square images (C, S, S), got input shape {tuple(input_shape)}")
        channels, side = int(input_shape[0]), int(input_shape[1])
        if side % patch:
            raise FlatlabError(f"vit option patch ({patch}) must divide the image side {side} "
                               "(set --resolution or the patch)")
        if width % heads:
            raise FlatlabError(f"vit option width ({width}) must be divisible by heads ({heads})")
        net = VisionTransformer(image_size=side, patch_size=patch, num_layers=depth, num_heads=heads,
                                hidden_dim=width, mlp_dim=mlp_ratio * width)
        if channels != 3:
            net.conv_proj = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)
            # torchvision's initialisation of the patch embedding
            nn.init.trunc_normal_(net.conv_proj.weight, std=math.sqrt(1 / (channels * patch * patch)))
            nn.init.zeros_(net.conv_proj.bias)
        net.heads = nn.Identity()
        self.features = net
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _vit_b_16(input_shape: tuple[int, ...], num_classes: int) -> ViT:
    """torchvision's ViT-B/16 (patch 16, 12 blocks of width 768, 12 heads, MLP 3072) at the data
    set's resolution; ``--pretrained PATH`` loads a torchvision ``vit_b_16`` state dict (at 224x224:
    the position embeddings have one row per patch of the training resolution)."""
    return ViT(input_shape, num_classes, width=768, depth=12, heads=12, patch=16, mlp_ratio=4)


def _resnet18(input_shape: tuple[int, ...], num_classes: int, freeze_bn: bool = True) -> ResNet:
    return ResNet(input_shape, num_classes, depth=18, freeze_bn=freeze_bn)


def _resnet50(input_shape: tuple[int, ...], num_classes: int, freeze_bn: bool = True) -> ResNet:
    return ResNet(input_shape, num_classes, depth=50, freeze_bn=freeze_bn)


def load_pretrained(model: nn.Module, path: str) -> dict[str, list[str]]:
    """Load backbone weights from a local file into a model (never a download).

    Accepts a torchvision-style state dict (``conv1.weight``, ..., ``fc.*``), a dict holding one
    under ``state_dict`` or ``model``, or a flatlab checkpoint. Keys are matched with or without
    the ``features.`` prefix; the source classifier (``fc``/``classifier``, torchvision ViT's
    ``heads``) is dropped because the class count differs. A tensor whose shape differs from the
    model's (e.g. ViT position embeddings at another resolution) is not loaded and is reported. Loaded with ``torch.load(weights_only=True)``.

    Returns:
        ``{"loaded": [...], "missing": [...]}`` parameter names.

    Raises:
        FlatlabError: unreadable file, or no tensor matched the model.
    """
    from flatlab.checkpoint_format import FORMAT, safe_torch_load

    payload = safe_torch_load(path, what="pretrained weights file")
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        payload = payload["state_dict"]
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict):
        raise FlatlabError(f"{path} holds no state dict of tensors")
    own = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, tensor in payload.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith(("fc.", "classifier.", "heads.")):
            continue
        for candidate in (name, f"features.{name}"):
            if candidate in own and own[candidate].shape == tensor.shape:
                loaded[candidate] = tensor
                break
    if not loaded:
        raise FlatlabError(f"no tensor in {path} fits model {type(model).__name__}: is it the right architecture?")
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in own if k not in loaded and not k.startswith("classifier.")]
    if missing:
        import sys

        sys.stderr.write(f"flatlab: warning: {len(missing)} tensors of the model were not in {path} "
                         f"(first: {missing[0]}); they keep their random initialisation\n")
    return {"loaded": sorted(loaded), "missing": missing}


ModelFactory = Callable[..., nn.Module]

#: name -> (factory, default options). Options are stored in checkpoints to rebuild the model.
MODELS: dict[str, tuple[ModelFactory, dict[str, Any]]] = {
    "mlp": (MLP, {"width": 64, "depth": 2, "batchnorm": False, "bias": True}),
    "cnn": (SmallCNN, {"width": 32, "batchnorm": True, "bias": True}),
    "resnet18": (_resnet18, {"freeze_bn": True}),
    "resnet50": (_resnet50, {"freeze_bn": True}),
    # About the default CNN's parameter count (59,146 vs 56,554 at 16x16): on the 2-core CPU,
    # width 64 / depth 4 (136,906) took 1.8x the time for the same id_acc (docs/readme_vit.md).
    "vit": (ViT, {"width": 48, "depth": 3, "heads": 4, "patch": 4, "mlp_ratio": 2}),
    "vit_b_16": (_vit_b_16, {}),
}


def register_model(name: str, factory: ModelFactory, defaults: dict[str, Any]) -> None:
    """Add a model to the registry."""
    MODELS[name] = (factory, dict(defaults))


def model_names() -> list[str]:
    return sorted(MODELS)


def check_model_option(model: str, key: str, value: Any, default: Any) -> Any:
    """Check a model option against the type of its registry default and return it.

    Integer options of the registered models are sizes (``width``, ``depth``): they must be
    integers >= 1 (a zero-width layer would train a constant predictor without any error).
    Boolean options must be booleans. Options of other types are passed through.

    Raises:
        FlatlabError: e.g. ``width of model cnn must be a positive integer, got -3``.
    """
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false (model {model} option), got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(key, f"must be a positive integer (model {model} option), got {value!r}")
        return value
    return value


def model_options(name: str, **overrides: Any) -> dict[str, Any]:
    """The full option dict of a model: registry defaults, then the non-None overrides, each
    checked by :func:`check_model_option`."""
    if name not in MODELS:
        raise FlatlabError(f"unknown model {name!r}: choose one of {', '.join(model_names())}")
    options = dict(MODELS[name][1])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in options:
            raise FlatlabError(f"model {name} has no option {key!r} (options: {', '.join(options)})")
        options[key] = check_model_option(name, key, value, options[key])
    return options


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    """Build a registered model with the given options (missing ones take the defaults)."""
    full = model_options(name, **options)
    factory = MODELS[name][0]
    return factory(tuple(input_shape), int(num_classes), **full)


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalar parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
