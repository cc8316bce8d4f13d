"""A model and data of your own for flatlab's measuring commands (README, "Your own model and data").

``digits_rgb`` gives the built-in rotated digits (nothing downloaded) as 3-channel 32x32 images, so
a torchvision architecture takes them unchanged; ``tiny_vit`` builds a small torchvision
VisionTransformer (also for the 1-channel built-in digits, ``--dataset rotated-digits``);
``smoothed_cross_entropy`` is a ``--loss-fn``. The README runs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def digits_rgb(test_env: int = 0, samples: int = 128, batch_size: int = 64) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``{"source": batches, "target": batches}``: the first ``samples`` digits of the source
    rotations (every domain but ``test_env``) and of the test rotation, as 3x32x32 images."""
    from flatlab.data import RotatedDigits

    digits = RotatedDigits(resolution=32)

    def split(envs: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        xs, ys = zip(*(digits.load(e, torch.arange(digits.domain_size(e))) for e in envs))
        x, y = torch.cat(xs)[:samples].repeat(1, 3, 1, 1), torch.cat(ys)[:samples]
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]

    sources = [e for e in range(len(digits.domains)) if e != test_env]
    return {"source": split(sources), "target": split([test_env])}


def tiny_vit(num_classes: int = 10, image_size: int = 32, channels: int = 3) -> nn.Module:
    """A one-block torchvision VisionTransformer (patch 8, width 16, 2 heads) for images of
    ``channels`` x ``image_size`` x ``image_size``."""
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=image_size, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                            mlp_dim=32, num_classes=num_classes)
    if channels != 3:  # torchvision's patch embedding takes RGB
        vit.conv_proj = nn.Conv2d(channels, 16, kernel_size=8, stride=8)
    return vit


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A mean-reduction loss for ``--loss-fn``: cross-entropy with label smoothing 0.1."""
    return F.cross_entropy(logits, y, label_smoothing=0.1)
