"""Domain data sets, looked up by name, and DomainBed's splits.

``build_dataset(name, data_dir=None, **options)`` returns a :class:`MultiDomainDataset`;
:class:`DomainSplits` adds the test domains and the in/out splits and serves the named splits
``source``, ``source-out`` and ``target``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flatlab.data.base import (
    SPLIT_NAMES,
    Batch,
    DomainSplits,
    MultiDomainDataset,
    in_out_indices,
    resolve_domains,
    seed_hash,
)
from flatlab.data.folder import (
    KNOWN_LAYOUTS,
    ImageFolderDomains,
    make_folder_dataset,
    make_named_dataset,
)
from flatlab.data.rotated_digits import RotatedDigits
from flatlab.errors import ConfigError, FlatlabError

DatasetFactory = Callable[..., MultiDomainDataset]

#: name -> (factory, needs --data-dir)
DATASETS: dict[str, tuple[DatasetFactory, bool]] = {
    "rotated-digits": (RotatedDigits, False),
    "folder": (make_folder_dataset, True),
    **{name: (make_named_dataset(name), True) for name in KNOWN_LAYOUTS},
}


def register_dataset(name: str, factory: DatasetFactory, needs_data_dir: bool) -> None:
    """Add a data set to the registry (used by the folder data sets and by users)."""
    DATASETS[name] = (factory, needs_data_dir)


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def build_dataset(name: str, data_dir: str | None = None, **options: Any) -> MultiDomainDataset:
    """Build a data set by registry name.

    Raises:
        FlatlabError: unknown name, or a folder data set without ``data_dir``.
    """
    key = name if name in DATASETS else {k.lower(): k for k in DATASETS}.get(name.lower(), name)
    if key not in DATASETS:
        raise FlatlabError(f"unknown data set {name!r}: choose one of {', '.join(dataset_names())}")
    factory, needs_dir = DATASETS[key]
    if needs_dir:
        if not data_dir:
            raise ConfigError("data_dir", f"must be given: data set {key} is read from disk")
        return factory(data_dir=data_dir, **options)
    return factory(**options)


__all__ = [
    "SPLIT_NAMES",
    "Batch",
    "DomainSplits",
    "ImageFolderDomains",
    "MultiDomainDataset",
    "RotatedDigits",
    "build_dataset",
    "dataset_names",
    "in_out_indices",
    "register_dataset",
    "resolve_domains",
    "seed_hash",
]
