"""What a floating-point result depends on besides the code, the data and the settings.

Two runs of flatlab give bit-identical numbers only under the same

* flatlab and torch versions (kernels and their reduction orders change between releases),
* number of torch threads (``torch.get_num_threads()``: a parallel reduction splits a sum into
  one partial sum per thread, and floating-point addition is not associative),
* device kind (CPU or a CUDA model; on CUDA also the CUDA build),
* CPU instruction set (oneDNN/MKL and torch's own kernels dispatch on AVX2, AVX-512, AMX, ...:
  the same sum is vectorized differently).

:func:`environment` collects these (and the CPU model, which names the instruction set in
words) as flat attributes; :mod:`flatlab.pipeline` writes them on every results group it
writes, the surface runner on every surface group and :mod:`flatlab.ensemble` on ensemble
runs. :func:`environment_note` says, in one line, how the environment of a stored result
differs from the current one (for a resume, whose reused values keep the old rounding).
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

#: Instruction-set flags (from /proc/cpuinfo) that change which vectorized kernels run.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "sve")

#: The attributes that decide whether two results can be bit-identical (compared by :func:`environment_note`).
REPRODUCIBILITY_KEYS = ("flatlab_version", "torch_version", "torch_threads", "device", "device_name", "cpu_flags")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, ()
    found_model = False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and not found_model:
            model, found_model = value.strip(), True
        elif key in ("flags", "Features"):
            flags.update(value.split())
    return model, tuple(f for f in ISA_FLAGS if f in flags)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    return _cpuinfo()[0]


def cpu_flags() -> list[str]:
    """The instruction-set flags of :data:`ISA_FLAGS` this CPU has (empty where unknown)."""
    return list(_cpuinfo()[1])


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """The environment record: flat, JSON- and HDF5-attribute-friendly values.

    Keys: ``flatlab_version``, ``torch_version``, ``torch_threads`` (this process's
    ``torch.get_num_threads()`` now), ``device`` (``cpu`` / ``cuda``), ``device_name`` (the
    CPU model, or the CUDA device's name), ``cpu`` (the CPU model), ``cpu_flags`` (space
    separated, see :data:`ISA_FLAGS`), ``machine`` (``x86_64``, ...), ``python_version``, and on
    CUDA ``cuda_version``.
    """
    from flatlab import __version__

    kind = torch.device(device).type if device is not None else "cpu"
    record: dict[str, Any] = {
        "flatlab_version": __version__,
        "torch_version": str(torch.__version__),
        "torch_threads": int(torch.get_num_threads()),
        "device": kind,
        "device_name": cpu_model(),
        "cpu": cpu_model(),
        "cpu_flags": " ".join(cpu_flags()),
        "machine": platform.machine(),
        "python_version": platform.python_version(),
    }
    if kind == "cuda" and torch.cuda.is_available():
        index = torch.device(device).index  # type: ignore[arg-type]
        record["device_name"] = torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())
        record["cuda_version"] = str(torch.version.cuda)
    return record


def environment_note(stored: Mapping[str, Any], current: Mapping[str, Any] | None = None, what: str = "") -> str | None:
    """One line naming the reproducibility keys in which ``stored`` differs from ``current``
    (default: :func:`environment` now), or None if it differs in none of those it holds.

    Values are compared as text (HDF5 attributes come back as numpy scalars or bytes).
    """
    if current is None:
        current = environment(str(stored.get("device") or "cpu"))
    changed = []
    for key in REPRODUCIBILITY_KEYS:
        if key not in stored or stored[key] is None:
            continue
        old = stored[key].decode() if isinstance(stored[key], bytes) else str(stored[key])
        new = str(current.get(key))
        if old != new:
            changed.append(f"{key} {old} -> {new}")
    if not changed:
        return None
    prefix = f"{what}: " if what else ""
    return (f"{prefix}measured earlier under another environment ({'; '.join(changed)}): resumed values keep the "
            "earlier rounding, new ones get this one's, so the last digits of the two may differ")


__all__ = ["ISA_FLAGS", "REPRODUCIBILITY_KEYS", "cpu_flags", "cpu_model", "environment", "environment_note"]
