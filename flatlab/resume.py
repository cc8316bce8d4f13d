"""Resuming a measurement from what its results file already holds.

``flatlab sharpness --out RESULTS.h5`` writes each measure to the file as soon as it is done,
with a fingerprint of the settings it was computed with (:func:`flatlab.io.settings_fingerprint`) and its result in JSON. A rerun of the
same command (after a crash or a kill) reads those back and computes only what is missing; a
measure whose settings changed is computed again. Fingerprints cover everything that changes
the numbers (split, subset, seed, solver, tolerances, device type, ...); the checkpoint itself is
covered by the run id (the first 16 hex digits of its SHA-256).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """Arrays and NumPy scalars as tagged JSON (dtype kept), dicts and lists recursively."""
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        return {"__array__": array.tolist(), "dtype": str(array.dtype)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def from_jsonable(value: Any) -> Any:
    """The inverse of :func:`to_jsonable` (0-d arrays come back as NumPy scalars)."""
    if isinstance(value, dict):
        if set(value) == {"__array__", "dtype"}:
            array = np.asarray(value["__array__"], dtype=np.dtype(value["dtype"]))
            return array[()] if array.ndim == 0 else array
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def stored_attr(path: str | os.PathLike[str] | None, run_id: str, group: str, key: str) -> str | None:
    """Attribute ``key`` of ``/runs/<run_id>/<group>`` in a results file, or None when any part
    is missing (no file, not HDF5, no such group or attribute).

    Raises:
        FlatlabError: the file is in use by another process (what it holds is unknown).
    """
    from flatlab.results import open_for_reading

    if path is None or not Path(path).is_file():
        return None
    try:
        with open_for_reading(path) as handle:
            node = handle.get(f"runs/{run_id}/{group}")
            if node is None or key not in node.attrs:
                return None
            value = node.attrs[key]
    except OSError:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


__all__ = ["from_jsonable", "stored_attr", "to_jsonable"]
