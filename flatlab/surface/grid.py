"""Grid axes given as ``min:max:num`` (Li et al.'s notation), validated strictly.

An axis ``a:b:n`` is ``numpy.linspace(a, b, n)``: ``n`` evenly spaced coordinates from ``a`` to ``b``
inclusive (``n = 1`` gives the single coordinate ``a``, which then must equal ``b``).

Memory: a surface on ``x`` times ``y`` is refused before anything is allocated when its
bookkeeping, ``len(x) * len(y) * BYTES_PER_POINT`` bytes, exceeds ``MEMORY_SHARE`` (25%) of the
machine's physical memory (:func:`check_grid_memory`).
"""

from __future__ import annotations

import math
import os
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


#: Upper bound of the memory one grid point costs while a surface is computed and written,
#: in bytes. Per point :func:`flatlab.surface.compute.compute_surface` holds its coordinate tuple,
#: a (index, coordinates) work item, the finished values twice (the result dict and the
#: journal's record: a tuple/list of four Python floats plus a dict slot each) and the four
#: float64 arrays plus the ``done`` mask of the assembled surface. ``tests/test_surface_robust.py``
#: measures the real peak with ``tracemalloc`` (about 650 bytes per 2D point) and checks that
#: this bound covers it.
BYTES_PER_POINT = 1_500

#: Share of the machine's physical memory one surface may use for its grid.
MEMORY_SHARE = 0.25

#: The budget where the physical memory cannot be read (os.sysconf unavailable).
FALLBACK_MEMORY_BYTES = 4 * 1024**3


def physical_memory_bytes() -> int | None:
    """This machine's physical memory (``SC_PHYS_PAGES * SC_PAGE_SIZE``), or None if unknown."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return int(pages) * int(size) if pages > 0 and size > 0 else None


def grid_memory_budget() -> int:
    """Bytes a surface's grid may use: :data:`MEMORY_SHARE` of the physical memory. A fixed
    share of the physical memory rather than what is free right now, so the same grid is
    accepted or refused the same way on the same machine."""
    total = physical_memory_bytes()
    return int(MEMORY_SHARE * total) if total is not None else FALLBACK_MEMORY_BYTES


def _size_text(n_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{int(n_bytes)} bytes"


@dataclass(frozen=True)
class GridMemory:
    """The memory a grid needs: ``points * BYTES_PER_POINT`` bytes, against a budget."""

    points: int
    bytes_needed: int
    budget: int

    @property
    def fits(self) -> bool:
        return self.bytes_needed <= self.budget


def grid_memory(x: Axis, y: Axis | None = None, budget: int | None = None) -> GridMemory:
    """Memory estimate of a surface on the grid ``x`` (times ``y`` for 2D), in bytes:
    ``len(x) * len(y) * BYTES_PER_POINT``, with the budget (default :func:`grid_memory_budget`)."""
    points = len(x) * (len(y) if y is not None else 1)
    return GridMemory(points=points, bytes_needed=points * BYTES_PER_POINT,
                      budget=grid_memory_budget() if budget is None else int(budget))


def check_grid_memory(x: Axis, y: Axis | None = None, budget: int | None = None) -> GridMemory:
    """Refuse, before anything is allocated, a grid whose arrays would not fit in memory.

    Returns:
        The :class:`GridMemory` estimate (it fits).

    Raises:
        FlatlabError: saying the grid's size, the memory it needs and the budget, and a fix.
    """
    need = grid_memory(x, y, budget)
    if not need.fits:
        shape = f"{len(x)} x {len(y)}" if y is not None else f"{len(x)}-point"
        per_axis = max(1, int(math.sqrt(need.budget / BYTES_PER_POINT)) if y is not None else need.budget // BYTES_PER_POINT)
        raise FlatlabError(
            f"a {shape} grid has {need.points:,} points: computing it would need about "
            f"{_size_text(need.bytes_needed)} of memory, more than the {_size_text(need.budget)} a surface may "
            f"use here ({MEMORY_SHARE:.0%} of the physical memory); use fewer points per axis (at most about "
            f"{per_axis:,}{' each' if y is not None else ''}; the default {DEFAULT_AXIS} has 51)")
    return need
