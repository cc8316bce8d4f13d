"""RotatedDigits: DomainBed's RotatedMNIST protocol on scikit-learn's built-in handwritten digits.

The 1,797 8x8 digits that ship inside scikit-learn are shuffled with a fixed seed, cut into six
disjoint subsets, upsampled (bilinear, 16x16 by default) and rotated by 0, 15, 30, 45, 60 and
75 degrees, one angle per subset. Pixel values are scaled to [0, 1]. Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import InterpolationMode, rotate

from flatlab.data.base import Batch, MultiDomainDataset
from flatlab.errors import FlatlabError

ANGLES = (0, 15, 30, 45, 60, 75)


class RotatedDigits(MultiDomainDataset):
    """Six rotation domains of scikit-learn's digits, held in memory as float32 tensors.

    Args:
        resolution: side of the square images after upsampling (8 keeps the originals).
        data_seed: seeds the assignment of digits to domains (fixed across trials, as in
            DomainBed's RotatedMNIST).
    """

    name = "rotated-digits"

    def __init__(self, resolution: int = 16, data_seed: int = 0) -> None:
        from sklearn.datasets import load_digits

        if not 8 <= int(resolution) <= 128:
            raise FlatlabError(f"rotated-digits resolution must be between 8 and 128, got {resolution}")
        self.resolution = int(resolution)
        self.data_seed = int(data_seed)
        self.options = {"resolution": self.resolution, "data_seed": self.data_seed}
        self.domains = [str(a) for a in ANGLES]
        self.num_classes = 10
        self.input_shape = (1, self.resolution, self.resolution)

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        order = np.random.RandomState(self.data_seed).permutation(len(labels))
        self._x: list[Tensor] = []
        self._y: list[Tensor] = []
        for angle, chunk in zip(ANGLES, np.array_split(order, len(ANGLES))):
            idx = torch.as_tensor(chunk)
            x = images[idx]
            if self.resolution != 8:
                x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                                  align_corners=False)
            if angle:
                x = rotate(x, float(angle), interpolation=InterpolationMode.BILINEAR, fill=0.0)
            self._x.append(x.contiguous())
            self._y.append(labels[idx].clone())

    def domain_size(self, env: int) -> int:
        return len(self._y[env])

    def load(self, env: int, indices: Tensor | np.ndarray, augment: bool = False,
             generator: torch.Generator | None = None) -> Batch:
        # No augmentation for digits (DomainBed uses none for RotatedMNIST either).
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return self._x[env][idx], self._y[env][idx]

    def labels(self, env: int) -> Tensor:
        return self._y[env]
