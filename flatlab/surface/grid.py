"""Grid axes given as ``min:max:num`` (Li et al.'s notation), validated strictly.

An axis ``a:b:n`` is ``numpy.linspace(a, b, n)``: ``n`` evenly spaced coordinates from ``a`` to ``b``
inclusive (``n = 1`` gives the single coordinate ``a``, which then must equal ``b``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flatlab.errors import FlatlabError

#: The default axis of every surface: 51 points from -1 to 1 (0 is a grid point).
DEFAULT_AXIS = "-1:1:51"

#: Refuse absurd grids before allocating them (a 51x51 surface has 2,601 points).
MAX_POINTS_PER_AXIS = 100_000


@dataclass(frozen=True)
class Axis:
    """One grid axis: ``num`` evenly spaced coordinates from ``start`` to ``stop`` inclusive."""

    start: float
    stop: float
    num: int

    @property
    def values(self) -> np.ndarray:
        """The coordinates, float64, ``numpy.linspace(start, stop, num)``."""
        return np.linspace(self.start, self.stop, self.num, dtype=np.float64)

    def spec(self) -> str:
        """The ``min:max:num`` text that parses back to this axis."""
        return f"{self.start!r}:{self.stop!r}:{self.num}"

    def __len__(self) -> int:
        return self.num


def parse_axis(text: str, flag: str = "--x") -> Axis:
    """Parse ``min:max:num`` into an :class:`Axis`.

    Rules: three fields separated by ``:``; ``min`` and ``max`` finite numbers with ``min < max``
    (or ``min == max`` with ``num == 1``); ``num`` a positive integer.

    Raises:
        FlatlabError: for anything else (``-1:1``, ``1:-1:5``, ``a:b:c``, ``-1:1:0`` ...), naming the
            flag and giving an example.
    """
    example = f"e.g. {flag} {DEFAULT_AXIS} (min:max:number of points)"
    fields = str(text).strip().split(":")
    if len(fields) != 3:
        raise FlatlabError(f"{flag} {text!r} is not min:max:num ({len(fields)} field(s) instead of 3); {example}")
    try:
        start, stop = float(fields[0]), float(fields[1])
    except ValueError:
        raise FlatlabError(f"{flag} {text!r}: min and max must be numbers; {example}") from None
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise FlatlabError(f"{flag} {text!r}: min and max must be finite; {example}")
    try:
        num = int(fields[2])
    except ValueError:
        raise FlatlabError(f"{flag} {text!r}: the number of points must be a whole number; {example}") from None
    if num <= 0:
        raise FlatlabError(f"{flag} {text!r}: the number of points must be at least 1, got {num}; {example}")
    if num > MAX_POINTS_PER_AXIS:
        raise FlatlabError(f"{flag} {text!r}: {num} points on one axis is more than {MAX_POINTS_PER_AXIS}")
    if num == 1 and start != stop:
        raise FlatlabError(f"{flag} {text!r}: one point needs min == max (e.g. {flag} 0:0:1)")
    if num > 1 and not start < stop:
        raise FlatlabError(f"{flag} {text!r}: min must be smaller than max (got {start:g} >= {stop:g}); {example}")
    return Axis(start, stop, num)


def axis_from_values(values: np.ndarray | list[float]) -> Axis:
    """The :class:`Axis` whose ``linspace`` reproduces ``values`` (checked)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise FlatlabError("an axis needs at least one coordinate")
    axis = Axis(float(arr[0]), float(arr[-1]), int(arr.size))
    if not np.allclose(axis.values, arr, rtol=0, atol=1e-12 * max(1.0, float(np.abs(arr).max()))):
        raise FlatlabError("the coordinates are not evenly spaced: give the axis as min:max:num")
    return axis
