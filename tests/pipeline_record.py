"""The numbers of a small pipeline, for the "same numbers" check of the library redesign.

:func:`numbers_of` walks a results file and keeps every number it holds (datasets and numeric
attributes of every group), keyed by a label of the run (algorithm, bits, seed, test domain)
rather than its run id, because a run id is the checkpoint's SHA-256 and checkpoints record
versions and provenance that may change without any number changing. Strings (paths, command
lines, fingerprints, JSON records) are left out: they are provenance, not results.

``python tests/pipeline_record.py OUT.json`` runs ``flatlab demo --quick`` and the tiny sweep
of ``tests/test_sweep.py`` in a temporary folder and writes the record.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

#: Attributes that are timings or counts of work done, not results.
#: Arrays longer than this are recorded by digest.
LONG = 64

SKIPPED_ATTRS = {"seconds", "seconds_per_point", "elapsed", "wall_seconds"}


def _run_label(attrs: Any) -> str:
    def get(key: str) -> Any:
        value = attrs.get(key)
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        return value

    members = get("members")
    n_members = len(json.loads(members)) if isinstance(members, str) else None
    return f"{get('algorithm')}|bits={get('bits')}|seed={get('seed')}|test={get('test_envs')}|members={n_members}"


def _number(value: Any) -> Any:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        return None
    flat = arr.astype(np.float64).ravel()
    if flat.size > LONG:  # long arrays (directions, grids) by digest: equal bytes, equal digest
        return {"sha256": hashlib.sha256(flat.tobytes()).hexdigest(), "size": int(flat.size),
                "sum": float(np.nansum(flat))}
    return [None if not math.isfinite(v) else v for v in flat.tolist()]


def _walk(node: h5py.Group, prefix: str, out: dict[str, Any]) -> None:
    for key, value in node.attrs.items():
        if key in SKIPPED_ATTRS:
            continue
        number = _number(value)
        if number is not None:
            out[f"{prefix}@{key}"] = number
    for key, child in node.items():
        if isinstance(child, h5py.Group):
            _walk(child, f"{prefix}/{key}", out)
        else:
            number = _number(child[()])
            if number is not None:
                out[f"{prefix}/{key}"] = number


def numbers_of(path: str | Path) -> dict[str, Any]:
    """``{run label: {group/array or group@attr: [numbers]}}`` for every run of a results file."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as handle:
        for run in handle["runs"].values():
            values: dict[str, Any] = {}
            for key, child in run.items():
                if isinstance(child, h5py.Group):
                    _walk(child, key, values)
            label = _run_label(run.attrs)
            for attr in ("id_acc", "ood_acc", "step"):
                if attr in run.attrs:
                    values[f"@{attr}"] = _number(run.attrs[attr])
            out[label] = values
    return out


def machine() -> dict[str, Any]:
    """What the numbers depend on besides the code."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags: list[str] = []
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = sorted({f for f in ("avx2", "avx512f", "fma", "amx_tile") if f" {f}" in text})
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "machine": platform.machine(), "cpu_flags": flags}


def record(directory: Path) -> dict[str, Any]:
    from flatlab.cli import main

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_sweep import TINY  # noqa: E402

    where = machine()  # before the sweep changes this process's thread count
    demo = directory / "demo"
    assert main(["demo", "--quick", "--out", str(demo), "--quiet"]) == 0
    study = directory / "tiny.toml"
    study.write_text(TINY)
    assert main(["sweep", str(study), "--out", str(directory / "sweep"), "--workers", "2", "--quiet"]) == 0
    return {"machine": where, "demo_quick": numbers_of(demo / "results.h5"),
            "tiny_sweep": numbers_of(directory / "sweep" / "results.h5")}


if __name__ == "__main__":
    import tempfile

    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rec = record(Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")


def differences(recorded: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Every recorded number that ``found`` lacks or holds with another value (exact equality:
    the same code path on the same machine gives the same bits). Numbers ``found`` adds (new
    attributes such as the thread count) are not differences."""
    out = []
    for label, values in recorded.items():
        if label not in found:
            out.append(f"run {label} is missing")
            continue
        for key, value in values.items():
            if key not in found[label]:
                out.append(f"{label}: {key} is missing")
            elif found[label][key] != value:
                out.append(f"{label}: {key} = {found[label][key]} != recorded {value}")
    return out


def same_machine(rec: dict[str, Any]) -> bool:
    """Whether this machine can reproduce the record bit for bit (torch version, threads, CPU)."""
    import torch

    here = machine()
    here["threads"] = torch.get_num_threads()
    return all(here.get(k) == rec["machine"].get(k) for k in ("torch", "cpu", "machine", "cpu_flags")) and \
        rec["machine"]["threads"] == 2


RECORD = Path(__file__).resolve().parent / "data" / "pipeline_record.json"


def check_against_record(part: str, results: str | Path) -> None:
    """Assert that ``results`` holds the recorded numbers of ``part`` (``demo_quick`` or
    ``tiny_sweep``).

    On the machine kind the record was made on (same torch build, CPU model and instruction
    set), every number must be identical. Elsewhere floating-point rounding differs, training
    trajectories diverge and only the structure can be compared: every recorded run and number
    must be present (a changed pipeline that drops a measure still fails).
    """
    rec = json.loads(RECORD.read_text())
    found = numbers_of(results)
    if same_machine(rec):
        problems = differences(rec[part], found)
    else:
        problems = [p for p in differences(rec[part], found) if "missing" in p]
    assert not problems, f"{len(problems)} difference(s) from {RECORD.name}: " + "; ".join(problems[:10])
