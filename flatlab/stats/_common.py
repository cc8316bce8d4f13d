"""Argument checks, missing-value handling and strata shared by the statistics modules.

Every check raises :class:`ValueError` whose message names the parameter as the caller wrote it
(``"confidence must be in (0, 1), got 1.5"``). Missing values are ``NaN``: they are dropped, and a
result says how many were dropped in its ``note``; ``inf`` is refused (an infinite accuracy or
sharpness is a bug upstream, not a measurement).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Fewer seeds (values) than this in a test domain make a bootstrap interval unreliable (docs/measures.md 9).
MIN_RELIABLE_N = 5

#: Upper bound on the elements of one resampling block; bounds memory whatever the sample size.
BLOCK_ELEMENTS = 2_000_000


def check_open_unit(value: float, name: str) -> float:
    """``value`` as a float in the open interval (0, 1), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def check_int(value: int, name: str, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum], else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be >= {minimum}{upper}, got {value}")
    return int(value)


def check_seed(seed: int) -> np.random.Generator:
    """A numpy Generator from a non-negative integer seed (the only source of randomness)."""
    check_int(seed, "seed", 0)
    return np.random.default_rng(int(seed))


def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_real(value: float, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite real number (optionally > 0 or >= 0), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def as_vector(values: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    """A 1-D float64 copy of ``values``; NaN allowed (missing), inf refused."""
    try:
        arr = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D sequence of numbers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if np.isinf(arr).any():
        raise ValueError(f"{name} holds an infinite value (at index {int(np.flatnonzero(np.isinf(arr))[0])})")
    return arr


def as_labels(labels: Sequence[Hashable] | npt.ArrayLike | None, n: int, name: str) -> list[Hashable] | None:
    """``labels`` as a list of n hashable, non-missing labels (None passes through as None)."""
    if labels is None:
        return None
    items = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)  # type: ignore[arg-type]
    if len(items) != n:
        raise ValueError(f"{name} must have one label per value ({n}), got {len(items)}")
    for i, item in enumerate(items):
        if item is None or (isinstance(item, float) and math.isnan(item)):
            raise ValueError(f"{name} has a missing label at index {i}")
        try:
            hash(item)
        except TypeError:
            raise ValueError(f"{name} labels must be hashable, got {type(item).__name__} at index {i}") from None
    return items


def dropped_note(n_dropped: int, what: str) -> str | None:
    if not n_dropped:
        return None
    return f"{n_dropped} {what} with a missing (NaN) value dropped"


def kept(labels: list[Hashable] | None, keep: npt.NDArray[np.bool_]) -> list[Hashable] | None:
    """The labels at the positions ``keep`` marks (the values there are not missing); None stays None."""
    return None if labels is None else [label for label, k in zip(labels, keep) if k]


def join_notes(*notes: str | None) -> str | None:
    """The non-empty notes joined by '; ', or None when there is nothing to say."""
    kept = [n for n in notes if n]
    return "; ".join(kept) if kept else None


@dataclass(frozen=True)
class Strata:
    """A partition of n positions into strata (test domains), in order of first appearance.

    ``members[h]`` holds the positions of stratum ``h`` (ascending); ``labels[h]`` its label
    (``None`` for the single stratum of unstratified data).
    """

    labels: tuple[Hashable, ...]
    members: tuple[npt.NDArray[np.intp], ...]
    n: int

    @classmethod
    def of(cls, labels: Sequence[Hashable] | None, n: int) -> Strata:
        if labels is None:
            return cls(labels=(None,), members=(np.arange(n, dtype=np.intp),), n=n)
        index: dict[Hashable, list[int]] = {}
        for i, label in enumerate(labels):
            index.setdefault(label, []).append(i)
        return cls(labels=tuple(index), members=tuple(np.asarray(v, dtype=np.intp) for v in index.values()), n=n)

    @property
    def sizes(self) -> npt.NDArray[np.intp]:
        return np.asarray([len(m) for m in self.members], dtype=np.intp)

    @property
    def stratified(self) -> bool:
        return self.labels != (None,)

    def codes(self) -> npt.NDArray[np.intp]:
        """Stratum index of every position."""
        out = np.empty(self.n, dtype=np.intp)
        for h, m in enumerate(self.members):
            out[m] = h
        return out


def small_sample_note(strata: Strata, unit: str = "seeds", where: str = "") -> str | None:
    """The docs/measures.md 9 warning when a stratum holds fewer than :data:`MIN_RELIABLE_N` values."""
    sizes = strata.sizes
    if sizes.min() >= MIN_RELIABLE_N:
        return None
    if not strata.stratified:
        return f"fewer than {MIN_RELIABLE_N} {unit}{where}: the bootstrap interval is unreliable"
    small = [f"{label} ({size})" for label, size in zip(strata.labels, sizes) if size < MIN_RELIABLE_N]
    return (f"fewer than {MIN_RELIABLE_N} {unit}{where} in test domain {', '.join(small)}: "
            "the bootstrap interval is unreliable")


def bootstrap_indices(strata: Strata, n_resamples: int, rng: np.random.Generator):
    """Yield blocks of stratified bootstrap index arrays, shape (b, n), b summing to n_resamples.

    Row r is one resample: column j holds the position drawn for position j, drawn uniformly with
    replacement from position j's own stratum, so every resample keeps each stratum's size. The
    block size depends only on n, so a seed gives the same indices whatever the data.
    """
    n = strata.n
    block = max(1, BLOCK_ELEMENTS // max(n, 1))
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        idx = np.empty((b, n), dtype=np.intp)
        for members in strata.members:
            idx[:, members] = members[rng.integers(0, len(members), size=(b, len(members)))]
        yield idx
        done += b


def resample_counts(idx: npt.NDArray[np.intp], n: int) -> npt.NDArray[np.float64]:
    """counts[r, i] = how often position i was drawn in resample r (float, for matrix products)."""
    b = idx.shape[0]
    flat = (idx + (np.arange(b, dtype=np.intp) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
