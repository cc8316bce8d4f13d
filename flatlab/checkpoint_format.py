"""The checkpoint file format's constants and its one safe loader.

Kept apart from :mod:`flatlab.checkpoint` (which builds models and quantizers from a checkpoint)
so that the model registry and the packed export can read checkpoint files without importing
what imports them: no module depends back on its dependents.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from flatlab.errors import FlatlabError

FORMAT = "flatlab-checkpoint"
FORMAT_VERSION = 1


def safe_torch_load(path: str | os.PathLike[str], what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with every failure turned into a FlatlabError.

    A file that holds pickled Python objects (which could run code when unpickled) is refused
    without being executed.
    """
    p = Path(path)
    if not p.exists():
        raise FlatlabError(f"no such {what}: {p} (check the path)")
    if p.is_dir():
        raise FlatlabError(f"{p} is a folder, not a {what} file (a run folder holds model.pt)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        first = f"global {found.group(1)}" if found else "unsupported content"
        raise FlatlabError(
            f"refused to load {p}: it holds Python objects that would run code when unpickled "
            f"({first[:120]}); flatlab only loads tensors and plain data (weights_only=True)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError,
            ImportError, KeyError, IndexError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlatlabError(f"{p} is not a readable {what} (truncated or not a torch file: {msg[:160]})") from None


__all__ = ["FORMAT", "FORMAT_VERSION", "safe_torch_load"]
