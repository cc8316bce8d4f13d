"""Checks of integer settings shared by the frozen configs of the sharpness measures and the
checkpoint metadata check.

Each raises :class:`~flatlab.errors.FlatlabError` naming the setting as the caller wrote it
(``steps must be at least 1, got 0``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from flatlab.errors import FlatlabError


def is_int(value: Any) -> bool:
    """A Python or numpy integer, and not a bool (``True`` is an int to Python, not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def coerce_int_fields(config: Any, bounds: Iterable[tuple[str, int]]) -> None:
    """Check that each field ``name`` of the frozen dataclass ``config`` is an integer of at least
    ``low`` (``bounds``: ``(name, low)`` pairs) and store it as a Python int (a numpy integer from
    a computed grid would otherwise reach JSON and the results file as a numpy scalar)."""
    for name, low in bounds:
        value = getattr(config, name)
        if not is_int(value):
            raise FlatlabError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise FlatlabError(f"{name} must be at least {low}, got {value}")
        object.__setattr__(config, name, int(value))


__all__ = ["coerce_int_fields", "is_int"]
