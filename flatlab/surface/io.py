"""Surface files: standalone loss-landscape-compatible HDF5, or a group of a results file.

A standalone file (``flatlab surface --out surf.h5``) keeps Li et al.'s names at its root, so
their plotting scripts read it::

    /xcoordinates     (nx,)        float64
    /ycoordinates     (ny,)        float64   (2D only)
    /train_loss       (ny, nx)     float64   Z[j, i] = f(x[i], y[j]); 1D: (nx,)
    /train_acc, /test_loss, /test_acc         same shape; NaN = not computed (yet)
    /directions       (ndir, P)    the directions used (flattened over ``direction_names``)
    /raw_directions   (ndir, P)    the raw Gaussian draws (random directions only), for --directions
    attrs: every setting, plus settings_json, settings_fingerprint, complete, points_done,
           direction_names / direction_shapes (JSON), format = "flatlab-surface"

In a results file the same arrays and attributes go under ``/runs/<run_id>/surfaces/<name>/``
through :func:`flatlab.results.write_group`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from flatlab.errors import FlatlabError
from flatlab.io import atomic_path
from flatlab.results import open_for_reading
from flatlab.surface.compute import Surface

FORMAT = "flatlab-surface"
FORMAT_VERSION = 1
ARRAY_NAMES = ("xcoordinates", "ycoordinates", "train_loss", "train_acc", "test_loss", "test_acc",
               "directions", "raw_directions")


def _attr_value(value: Any) -> Any:
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def surface_payload(surface: Surface, directions: np.ndarray | None, raw_directions: np.ndarray | None,
                    direction_names: list[str], direction_shapes: list[list[int]],
                    settings: dict[str, Any], fingerprint: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and attributes of a surface, as written to either kind of file.

    ``directions`` None: the directions are not stored (a surface from the Python API keeps only
    the hash of its draws, ``directions_sha256`` in ``settings``).
    """
    arrays: dict[str, np.ndarray] = {"xcoordinates": np.asarray(surface.xcoordinates, dtype=np.float64)}
    if surface.ycoordinates is not None:
        arrays["ycoordinates"] = np.asarray(surface.ycoordinates, dtype=np.float64)
    for name, arr in surface.values.items():
        arrays[name] = np.asarray(arr, dtype=np.float64)
    if directions is not None:
        arrays["directions"] = np.asarray(directions)
    if raw_directions is not None:
        arrays["raw_directions"] = np.asarray(raw_directions)
    attrs: dict[str, Any] = {k: _attr_value(v) for k, v in settings.items()}
    attrs.update({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings_json": json.dumps(settings, sort_keys=True, default=str),
        "settings_fingerprint": fingerprint,
        "complete": bool(surface.complete),
        "points_done": int(surface.done.sum()),
        "points_total": int(surface.done.size),
        "direction_names": json.dumps(direction_names),
        "direction_shapes": json.dumps(direction_shapes),
        "orientation": "Z[j, i] = f(x[i], y[j]), shape (len(y), len(x))",
    })
    return arrays, attrs


def write_surface_file(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Write a standalone surface file atomically (temp file + rename)."""
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w", track_order=True) as fh:
        for name, arr in arrays.items():
            fh.create_dataset(name, data=arr, track_times=False)
        for key, value in attrs.items():
            fh.attrs[key] = value


def read_surface_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Arrays and attributes of a standalone surface file: ``{"arrays": {...}, "attrs": {...}}``."""
    p = Path(path)
    try:
        with open_for_reading(p) as fh:
            arrays = {k: fh[k][()] for k in fh.keys() if isinstance(fh[k], h5py.Dataset)}
            attrs = {k: _plain(v) for k, v in fh.attrs.items()}
    except OSError as exc:
        raise FlatlabError(f"{p} is not a readable HDF5 file ({' '.join(str(exc).split())[:120]})") from None
    return {"arrays": arrays, "attrs": attrs}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def stored_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """The settings fingerprint of an existing standalone surface file; ``None`` if absent.

    Raises:
        FlatlabError: the file exists but is not a flatlab surface file (it is not overwritten).
    """
    p = Path(path)
    if not p.exists():
        return None
    try:
        with open_for_reading(p) as fh:
            fmt = _plain(fh.attrs.get("format", ""))
            fp = _plain(fh.attrs.get("settings_fingerprint", ""))
            is_results = "runs" in fh
    except OSError:
        raise FlatlabError(f"{p} exists and is not an HDF5 file: refusing to overwrite it; choose another --out") from None
    if is_results:
        raise FlatlabError(f"{p} is a results file: pass it with --results, not --out")
    if fmt != FORMAT:
        raise FlatlabError(f"{p} exists and is not a flatlab surface file: refusing to overwrite it; choose another --out")
    return str(fp)


def load_raw_directions(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """The raw random draws, their tensor names and the settings of an earlier surface.

    Reads a standalone surface file, or a results file: ``FILE#NAME`` picks the surface group
    ``/runs/*/surfaces/NAME``; a bare results file must hold exactly one surface group.

    Raises:
        FlatlabError: no such file, or it holds no raw draws (e.g. Hessian or interpolation axes).
    """
    text = str(path)
    wanted: str | None = None
    if "#" in text and not Path(text).exists():
        text, wanted = text.rsplit("#", 1)
    p = Path(text)
    if not p.exists():
        raise FlatlabError(f"no such directions file: {p}")
    try:
        with open_for_reading(p) as fh:
            groups = [fh]
            if "runs" in fh:
                groups = [fh[f"runs/{r}/surfaces/{s}"] for r in fh["runs"]
                          if "surfaces" in fh[f"runs/{r}"] for s in fh[f"runs/{r}/surfaces"]
                          if wanted is None or s == wanted]
                if len(groups) != 1:
                    which = f" named {wanted!r}" if wanted else ""
                    raise FlatlabError(f"{p} holds {len(groups)} surfaces{which}; --directions needs exactly one "
                                       "(name it as FILE#NAME, or use a standalone file written with --out)")
            g = groups[0]
            if "raw_directions" not in g:
                raise FlatlabError(f"{p} holds no raw random directions (its surface used other axes): "
                                   "reuse a file made with random directions")
            raw = g["raw_directions"][()]
            names = json.loads(_plain(g.attrs["direction_names"]))
            settings = json.loads(_plain(g.attrs.get("settings_json", "{}")))
    except OSError as exc:
        raise FlatlabError(f"{p} is not a readable HDF5 file ({' '.join(str(exc).split())[:120]})") from None
    except KeyError as exc:
        raise FlatlabError(f"{p} is not a flatlab surface file (no {exc})") from None
    return raw, names, settings
