"""Plain-text tables for humans: numbers to 4 significant digits, missing values as '-'.

Used by the report (a library function that returns text) and by every command's output.
"""

from __future__ import annotations

import math
from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    """Human formatting: floats to ``digits`` significant digits, missing values as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}"
    return str(value)


def table(rows: list[list[Any]], header: list[str] | None = None) -> str:
    """A plain aligned text table."""
    cells = [[fmt(c) for c in r] for r in rows]
    if header:
        cells.insert(0, list(header))
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["fmt", "table"]
