"""DomainBed folder data sets (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet) and any
``root/domain/class/image`` tree.

Decisions (documented in README):

* Domains are the sub-folders of the root, sorted (DomainBed's order); classes are the union of
  the class folders over all domains, sorted, so one class has one label in every domain.
* Unreadable images: every file's header is parsed once when the tree is scanned; a file that
  is not a readable image is **skipped with a warning naming it** (and left out of the file-list
  hash). A file that passes the header check but fails to decode later (a truncated JPEG) stops
  the command with an error naming it.
* Augmentation (DomainBed's: random resized crop with scale (0.7, 1), horizontal flip, colour
  jitter 0.3, 10% grayscale) applies to the training draws from the source in-splits only. Every
  evaluation split, held-out splits included, gets the plain resize (SWAD's correction).
  Augmentation draws its randomness from the trainer's generator, so resumed runs match.
* Decoded images are kept in memory up to ``cache_mb`` megabytes (least recently used beyond);
  past the budget they are decoded again from disk (streamed). Decoding runs in a thread pool
  (Pillow and torch release the GIL), so every worker shares the one cache; worker processes
  would each hold a copy of it.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from flatlab.data.base import Batch, MultiDomainDataset
from flatlab.errors import ConfigError, FlatlabError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

#: DomainBed's data sets: folder name under the root and the domain folders it must hold.
KNOWN_LAYOUTS: dict[str, tuple[str, list[str]]] = {
    "PACS": ("PACS", ["art_painting", "cartoon", "photo", "sketch"]),
    "VLCS": ("VLCS", ["Caltech101", "LabelMe", "SUN09", "VOC2007"]),
    "OfficeHome": ("office_home", ["Art", "Clipart", "Product", "Real World"]),
    "TerraIncognita": ("terra_incognita", ["location_100", "location_38", "location_43", "location_46"]),
    "DomainNet": ("domain_net", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]),
}


class _ByteBudgetCache:
    """A thread-safe LRU cache of decoded uint8 images bounded by total bytes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self.lock:
            value = self.items.get(key)
            if value is None:
                self.misses += 1
                return None
            self.items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple[int, int], value: np.ndarray) -> None:
        if value.nbytes > self.budget:
            return
        with self.lock:
            if key in self.items:
                return
            while self.used + value.nbytes > self.budget and self.items:
                _, old = self.items.popitem(last=False)
                self.used -= old.nbytes
            self.items[key] = value
            self.used += value.nbytes


def _scan_tree(root: Path, domains: list[str]) -> tuple[list[str], list[list[tuple[Path, str]]], list[Path]]:
    """Find images as (path, class name) per domain; returns classes, files, skipped files."""
    files: list[list[tuple[Path, str]]] = []
    classes: set[str] = set()
    skipped: list[Path] = []
    for domain in domains:
        droot = root / domain
        found: list[tuple[Path, str]] = []
        for class_dir in sorted(p for p in droot.iterdir() if p.is_dir()):
            for dirpath, _dirs, names in os.walk(class_dir):
                for name in sorted(names):
                    path = Path(dirpath) / name
                    if path.suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    try:
                        with Image.open(path) as img:
                            img.size  # noqa: B018 - parsing the header is the check
                    except (UnidentifiedImageError, OSError, ValueError):
                        skipped.append(path)
                        continue
                    found.append((path, class_dir.name))
                    classes.add(class_dir.name)
        if not found:
            raise FlatlabError(f"domain folder {droot} holds no readable images in class sub-folders "
                               "(expected root/domain/class/image files)")
        found.sort(key=lambda t: (t[1], str(t[0])))
        files.append(found)
    return sorted(classes), files, skipped


class ImageFolderDomains(MultiDomainDataset):
    """Images in ``root/domain/class/image``, one domain per sub-folder.

    Args:
        data_dir: the root (for a named DomainBed data set, the folder holding e.g. ``PACS/``, or
            the ``PACS`` folder itself).
        name: registry name (``folder`` or a DomainBed name).
        resolution: side of the square network input (DomainBed: 224).
        cache_mb: memory budget for decoded images.
        workers: threads that decode and augment.
        expected_domains: the domain folders a named data set must have.
    """

    def __init__(self, data_dir: str, name: str = "folder", resolution: int = 224, cache_mb: int = 4096,
                 workers: int = 4, expected_domains: list[str] | None = None, subdir: str | None = None) -> None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise ConfigError("data_dir", f"{root} does not exist or is not a folder")
        if subdir and (root / subdir).is_dir():
            root = root / subdir
        self.name = name
        self.root = root.resolve()
        self.resolution = int(resolution)
        if self.resolution < 8:
            raise FlatlabError(f"resolution must be at least 8, got {resolution}")
        self.workers = max(1, int(workers))
        self.options = {"resolution": self.resolution, "cache_mb": int(cache_mb), "workers": self.workers}
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if expected_domains is not None:
            missing = [d for d in expected_domains if d not in present]
            if missing:
                raise FlatlabError(f"{root} is not a {name} tree: missing domain folder(s) {', '.join(missing)} "
                                   f"(expected {', '.join(expected_domains)})")
            domains = list(expected_domains)
        else:
            domains = present
        if len(domains) < 2:
            raise ConfigError("data_dir", f"{root} holds {len(domains)} domain folder(s); "
                               "a domain-generalization data set needs at least 2 (root/domain/class/image)")
        self.domains = domains
        classes, files, skipped = _scan_tree(root, domains)
        for path in skipped:
            sys.stderr.write(f"flatlab: warning: skipping unreadable image {path}\n")
        self.skipped = [str(p) for p in skipped]
        self.classes = classes
        self.num_classes = len(classes)
        if self.num_classes < 2:
            raise FlatlabError(f"{root} has {self.num_classes} class folder(s); at least 2 are needed")
        class_index = {c: i for i, c in enumerate(classes)}
        self._paths = [[p for p, _ in found] for found in files]
        self._labels = [torch.tensor([class_index[c] for _, c in found], dtype=torch.int64) for found in files]
        self.input_shape = (3, self.resolution, self.resolution)
        self._cache = _ByteBudgetCache(int(cache_mb) * 1024 * 1024)
        self._pool: ThreadPoolExecutor | None = None
        digest = hashlib.sha256()
        for d, paths in zip(domains, self._paths):
            for p in paths:
                digest.update(str(p.relative_to(self.root)).encode("utf-8") + b"\n")
            digest.update(f"--{d}--".encode())
        self._fingerprint = digest.hexdigest()

    def fingerprint(self) -> str:
        return self._fingerprint

    def domain_size(self, env: int) -> int:
        return len(self._paths[env])

    def labels(self, env: int) -> Tensor:
        return self._labels[env]

    def _decode(self, env: int, i: int) -> np.ndarray:
        cached = self._cache.get((env, i))
        if cached is not None:
            return cached
        path = self._paths[env][i]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
        except (OSError, ValueError) as exc:
            raise FlatlabError(f"cannot decode image {path} ({exc}): remove or replace the file") from None
        self._cache.put((env, i), array)
        return array

    def _eval_tensor(self, image: np.ndarray) -> Tensor:
        t = torch.from_numpy(image).permute(2, 0, 1)
        t = TF.resize(t, [self.resolution, self.resolution], antialias=True)
        return (t.float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD

    def _train_tensor(self, image: np.ndarray, seed: int) -> Tensor:
        """DomainBed's training augmentation with randomness from ``seed`` only."""
        g = torch.Generator().manual_seed(seed)
        t = torch.from_numpy(image).permute(2, 0, 1)
        height, width = t.shape[1:]
        top, left, h, w = _random_resized_crop_params(height, width, (0.7, 1.0), (3 / 4, 4 / 3), g)
        t = TF.resized_crop(t, top, left, h, w, [self.resolution, self.resolution], antialias=True)
        if torch.rand((), generator=g) < 0.5:
            t = TF.horizontal_flip(t)
        factors = torch.empty(3).uniform_(0.7, 1.3, generator=g).tolist()
        hue = float(torch.empty(()).uniform_(-0.3, 0.3, generator=g))
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0:
                t = TF.adjust_brightness(t, factors[0])
            elif op == 1:
                t = TF.adjust_contrast(t, factors[1])
            elif op == 2:
                t = TF.adjust_saturation(t, factors[2])
            else:
                t = TF.adjust_hue(t, hue)
        if torch.rand((), generator=g) < 0.1:
            t = TF.rgb_to_grayscale(t, num_output_channels=3)
        return (t.float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD

    def load(self, env: int, indices: Tensor | np.ndarray, augment: bool = False,
             generator: torch.Generator | None = None) -> Batch:
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        if augment:
            if generator is None:
                raise ValueError("augmented loads need the trainer's generator")
            seeds = torch.randint(0, 2**62, (len(idx),), generator=generator).tolist()

            def work(k: int) -> Tensor:
                return self._train_tensor(self._decode(env, idx[k]), seeds[k])
        else:

            def work(k: int) -> Tensor:
                return self._eval_tensor(self._decode(env, idx[k]))

        if self.workers > 1 and len(idx) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers)
            tensors = list(self._pool.map(work, range(len(idx))))
        else:
            tensors = [work(k) for k in range(len(idx))]
        x = torch.stack(tensors) if tensors else torch.empty(0, *self.input_shape)
        return x, self._labels[env][torch.as_tensor(idx, dtype=torch.int64)]


def _random_resized_crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                                g: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``g`` instead of the global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(()).uniform_(scale[0], scale[1], generator=g))
        aspect = math.exp(float(torch.empty(()).uniform_(log_ratio[0], log_ratio[1], generator=g)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def make_named_dataset(name: str):
    """Factory for a DomainBed data set by name (expects its domain folders)."""
    subdir, domains = KNOWN_LAYOUTS[name]

    def factory(data_dir: str, **options) -> ImageFolderDomains:
        return ImageFolderDomains(data_dir, name=name, expected_domains=domains, subdir=subdir, **options)

    return factory


def make_folder_dataset(data_dir: str, **options) -> ImageFolderDomains:
    return ImageFolderDomains(data_dir, name="folder", **options)
