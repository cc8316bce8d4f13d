"""Multi-domain data sets, DomainBed's in/out splits, and the named splits every command uses.

Split names (README, Data splits), everywhere in flatlab:

* ``source``: the source domains' *in* splits, without augmentation (the training set, size m);
* ``source-out``: the source domains' held-out *out* splits (model selection, ``id_acc``);
* ``target``: every sample of the test domain(s) (``ood_acc``).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flatlab.errors import ConfigError, FlatlabError

SPLIT_NAMES = ("source", "source-out", "target")

Batch = tuple[Tensor, Tensor]


def seed_hash(*args: object) -> int:
    """DomainBed's ``misc.seed_hash``: a stable 31-bit integer derived from the arguments."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def in_out_indices(n: int, holdout_fraction: float, trial_seed: int, env_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (in, out) exactly as DomainBed's ``split_dataset`` does.

    DomainBed shuffles the keys with ``RandomState(seed_hash(trial_seed, env_i))`` and takes the
    first ``int(n * holdout_fraction)`` as the *out* split; the rest is *in*.
    """
    keys = list(range(n))
    np.random.RandomState(seed_hash(trial_seed, env_index)).shuffle(keys)
    n_out = int(n * holdout_fraction)
    out = np.sort(np.asarray(keys[:n_out], dtype=np.int64))
    in_ = np.sort(np.asarray(keys[n_out:], dtype=np.int64))
    return in_, out


class MultiDomainDataset(ABC):
    """A data set made of named domains that share one label space.

    Subclasses hold or stream the samples; :meth:`load` returns a batch of tensors for a domain and
    a set of indices, with train-time augmentation only when ``augment`` is true.
    """

    name: str
    domains: list[str]
    num_classes: int
    input_shape: tuple[int, ...]
    #: Options that rebuild this exact data set (stored in checkpoints).
    options: dict

    @abstractmethod
    def domain_size(self, env: int) -> int:
        """Number of samples in domain ``env``."""

    @abstractmethod
    def load(self, env: int, indices: Tensor | np.ndarray, augment: bool = False,
             generator: torch.Generator | None = None) -> Batch:
        """Return ``(x, y)`` for samples ``indices`` of domain ``env`` (CPU tensors)."""

    def labels(self, env: int) -> Tensor:
        """All labels of domain ``env`` (used for chance level and class counts)."""
        idx = torch.arange(self.domain_size(env))
        return self.load(env, idx)[1]

    def fingerprint(self) -> str | None:
        """A hash of what is on disk, for data sets read from ``--data-dir`` (None if built in)."""
        return None


def resolve_domains(dataset: MultiDomainDataset, specs: Sequence[str | int]) -> list[int]:
    """Turn test-domain specs (names or indices) into sorted, unique domain indices.

    A spec that equals a domain name is that domain; otherwise an integer is an index.
    """
    out: set[int] = set()
    for spec in specs:
        text = str(spec)
        if text in dataset.domains:
            out.add(dataset.domains.index(text))
            continue
        lowered = [d.lower() for d in dataset.domains]
        if text.lower() in lowered:
            out.add(lowered.index(text.lower()))
            continue
        try:
            idx = int(text)
        except ValueError:
            idx = -1
        if not 0 <= idx < len(dataset.domains):
            raise FlatlabError(
                f"unknown domain {text!r} for {dataset.name}: use an index 0..{len(dataset.domains) - 1} "
                f"or a name ({', '.join(dataset.domains)})"
            )
        out.add(idx)
    if not out:
        raise ConfigError("test_envs", "is empty: give a domain index or name")
    if len(out) == len(dataset.domains):
        raise FlatlabError("every domain is a test domain: leave at least one source domain for training")
    return sorted(out)


@dataclass
class SplitPart:
    """One domain's share of a named split: the domain index and the sample indices."""

    env: int
    indices: np.ndarray


class DomainSplits:
    """A data set with its test domains and DomainBed in/out splits: the source of every split.

    Args:
        dataset: the multi-domain data set.
        test_envs: indices of the test (target) domains.
        trial_seed: seeds the in/out split (DomainBed's ``trial_seed``).
        holdout_fraction: share of each domain held out as its *out* split (DomainBed: 0.2).
    """

    def __init__(self, dataset: MultiDomainDataset, test_envs: Sequence[int], trial_seed: int,
                 holdout_fraction: float = 0.2) -> None:
        if not 0.0 < holdout_fraction < 1.0:
            raise FlatlabError(f"holdout fraction must lie in (0, 1), got {holdout_fraction}")
        n_domains = len(dataset.domains)
        outside = [e for e in test_envs if not 0 <= int(e) < n_domains]
        if outside:
            raise FlatlabError(f"test domain index {outside[0]} is outside 0..{n_domains - 1}: "
                               f"{dataset.name} has {n_domains} domains ({', '.join(map(str, dataset.domains))})")
        self.dataset = dataset
        self.test_envs = sorted(int(e) for e in test_envs)
        self.trial_seed = int(trial_seed)
        self.holdout_fraction = float(holdout_fraction)
        self.in_idx: list[np.ndarray] = []
        self.out_idx: list[np.ndarray] = []
        for env in range(len(dataset.domains)):
            in_, out = in_out_indices(dataset.domain_size(env), holdout_fraction, trial_seed, env)
            self.in_idx.append(in_)
            self.out_idx.append(out)

    @property
    def source_envs(self) -> list[int]:
        return [e for e in range(len(self.dataset.domains)) if e not in self.test_envs]

    def parts(self, split: str) -> list[SplitPart]:
        """The (domain, indices) parts that make up a named split."""
        if split == "source":
            return [SplitPart(e, self.in_idx[e]) for e in self.source_envs]
        if split == "source-out":
            return [SplitPart(e, self.out_idx[e]) for e in self.source_envs]
        if split == "target":
            return [SplitPart(e, np.arange(self.dataset.domain_size(e))) for e in self.test_envs]
        raise FlatlabError(f"unknown split {split!r}: choose one of {', '.join(SPLIT_NAMES)}")

    def split_size(self, split: str) -> int:
        return int(sum(len(p.indices) for p in self.parts(split)))

    def iter_batches(self, parts: Sequence[SplitPart], batch_size: int) -> Iterator[Batch]:
        """Batches over the given parts, in order, without augmentation."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FlatlabError(f"batch_size must be a positive integer, got {batch_size!r}")
        for part in parts:
            for start in range(0, len(part.indices), batch_size):
                chunk = part.indices[start:start + batch_size]
                yield self.dataset.load(part.env, chunk, augment=False)

    def split_batches(self, split: str, batch_size: int = 512, max_samples: int | None = None,
                      seed: int = 0, device: torch.device | str = "cpu") -> list[Batch]:
        """Materialise a named split as a list of batches on ``device``.

        Measurements reuse the same tensors for every Hessian-vector product or grid point, so the
        data are prepared once. ``max_samples`` takes a seeded random subset of that size.

        Raises:
            FlatlabError: if the split is empty.
        """
        parts = self.parts(split)
        total = sum(len(p.indices) for p in parts)
        if total == 0:
            raise FlatlabError(f"split {split!r} is empty: check the test domains and the data")
        if max_samples is not None and max_samples < total:
            if max_samples <= 0:
                raise ConfigError("max_samples", f"must be positive, got {max_samples}")
            flat = np.concatenate([np.stack([np.full(len(p.indices), p.env), p.indices], 1) for p in parts])
            rng = np.random.RandomState(seed_hash("subset", seed, split))
            chosen = flat[np.sort(rng.choice(total, size=max_samples, replace=False))]
            parts = [SplitPart(int(e), chosen[chosen[:, 0] == e, 1]) for e in np.unique(chosen[:, 0])]
        xs, ys = [], []
        for x, y in self.iter_batches(parts, 4096):
            xs.append(x)
            ys.append(y)
        x_all = torch.cat(xs).to(device)
        y_all = torch.cat(ys).to(device)
        return [(x_all[i:i + batch_size], y_all[i:i + batch_size]) for i in range(0, len(y_all), batch_size)]
