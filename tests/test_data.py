"""RotatedDigits and DomainBed splits: disjoint, complete, deterministic, really rotated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import InterpolationMode, rotate

from flatlab.data import DomainSplits, RotatedDigits, build_dataset, in_out_indices, resolve_domains
from flatlab.errors import FlatlabError


def test_domains_are_disjoint_and_cover_all_digits(digits):
    from sklearn.datasets import load_digits

    total = sum(digits.domain_size(e) for e in range(6))
    assert total == len(load_digits().target) == 1797
    assert digits.domains == ["0", "15", "30", "45", "60", "75"]
    # Domain 0 is unrotated: its 16x16 images, downsampled back, are distinct originals.
    x0, _ = digits.load(0, np.arange(digits.domain_size(0)))
    assert x0.shape[1:] == (1, 16, 16)
    assert 0.0 <= float(x0.min()) and float(x0.max()) <= 1.0 + 1e-6


def test_rotation_is_really_applied():
    plain = RotatedDigits(resolution=8)
    from sklearn.datasets import load_digits

    originals = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    order = np.random.RandomState(0).permutation(1797)
    chunks = np.array_split(order, 6)
    # Domain 0 holds the originals untouched; domain 3 (45 degrees) equals a 45-degree rotation.
    x0, _ = plain.load(0, np.arange(plain.domain_size(0)))
    assert torch.equal(x0[:, 0], originals[torch.as_tensor(chunks[0])])
    x3, _ = plain.load(3, np.arange(plain.domain_size(3)))
    expected = rotate(originals[torch.as_tensor(chunks[3])].unsqueeze(1), 45.0,
                      interpolation=InterpolationMode.BILINEAR, fill=0.0)
    assert torch.allclose(x3, expected)
    assert not torch.allclose(x3[:, 0], originals[torch.as_tensor(chunks[3])])


def test_in_out_split_is_disjoint_complete_and_deterministic():
    in_a, out_a = in_out_indices(300, 0.2, trial_seed=0, env_index=2)
    in_b, out_b = in_out_indices(300, 0.2, trial_seed=0, env_index=2)
    assert np.array_equal(in_a, in_b) and np.array_equal(out_a, out_b)
    assert len(out_a) == 60 and len(in_a) == 240
    assert set(in_a).isdisjoint(out_a) and set(in_a) | set(out_a) == set(range(300))
    in_c, _ = in_out_indices(300, 0.2, trial_seed=1, env_index=2)
    assert not np.array_equal(in_a, in_c)


def test_named_splits(digits):
    splits = DomainSplits(digits, [0, 2], trial_seed=0)
    assert splits.source_envs == [1, 3, 4, 5]
    src = splits.parts("source")
    assert [p.env for p in src] == [1, 3, 4, 5]
    target = splits.parts("target")
    assert sum(len(p.indices) for p in target) == digits.domain_size(0) + digits.domain_size(2)
    batches = splits.split_batches("source", batch_size=100)
    assert sum(len(y) for _, y in batches) == splits.split_size("source")
    sub = splits.split_batches("source", batch_size=100, max_samples=150, seed=3)
    sub2 = splits.split_batches("source", batch_size=100, max_samples=150, seed=3)
    assert sum(len(y) for _, y in sub) == 150
    assert all(torch.equal(a[0], b[0]) for a, b in zip(sub, sub2))
    with pytest.raises(FlatlabError):
        splits.parts("train")


def test_resolve_domains_by_name_and_index(digits):
    assert resolve_domains(digits, ["0"]) == [0]
    assert resolve_domains(digits, ["45", 1]) == [1, 3]
    with pytest.raises(FlatlabError, match="unknown domain"):
        resolve_domains(digits, ["90"])
    with pytest.raises(FlatlabError, match="every domain"):
        resolve_domains(digits, list(range(6)))


def test_unknown_dataset():
    with pytest.raises(FlatlabError, match="unknown data set"):
        build_dataset("mnist")
