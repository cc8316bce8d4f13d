"""The results file: the one module that writes and reads flatlab's HDF5 result files.

Schema (``schema_version`` 1)::

    /                               attrs: schema_version, flatlab_version
    /runs/<run_id>/                 attrs: provenance of the checkpoint (path, sha256, dataset,
                                           domains, test_envs, model, algorithm, bits, act_bits,
                                           seed, step, id_acc, ood_acc, per-domain accuracies,
                                           members, command line, versions)
    /runs/<run_id>/curvature/       top_eigenvalues, residuals, trace, ... (attrs: solver, wrt, hvps)
    /runs/<run_id>/bounds/<name>/   a bound's value and every input as attrs
    /runs/<run_id>/local_flatness/  gammas, source, source_stderr, target, target_stderr
    /runs/<run_id>/surfaces/<name>/ xcoordinates, ycoordinates, train_loss, ...

``run_id`` is the first 16 hex digits of the checkpoint file's SHA-256, so measuring a checkpoint
again replaces its groups instead of adding a twin. Every change of a file is atomic: the file is
copied to a temporary file next to it, modified there and moved into place with ``os.replace``.

Locking: writers in several processes are serialised by a :class:`flatlab.locks.PidLock` on
``<file>.lock``, which records the writer's pid and is removed when the write is done (a lock
left by a killed writer is stale and broken by the next one). Readers take no flatlab lock and
create no file: they only open the HDF5 file read-only. A file that another process holds open
for writing (HDF5's own file locking refuses to open it) is reported as *in use*, naming the
flatlab writer's pid when ``<file>.lock`` records one, never as "not a results file".

Attribute values: numbers, strings and booleans are stored as such; lists and dicts as JSON
strings (read back as lists and dicts); ``None`` is not stored (a missing attribute reads as
absent).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from flatlab import __version__
from flatlab.errors import FlatlabError
from flatlab.io import atomic_path, sha256_file
from flatlab.locks import PidLock, read_holder

SCHEMA_VERSION = 1


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The writers' lock file of results file ``path``: ``<path>.lock`` (present only while a
    write is in progress)."""
    p = Path(path)
    return p.with_name(p.name + ".lock")


def _is_hdf5_lock_error(exc: OSError) -> bool:
    """HDF5 refused to open the file because another process holds it open for writing."""
    text = str(exc).lower()
    return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in text \
        or "already open for write" in text


def in_use_error(path: str | os.PathLike[str]) -> FlatlabError:
    """The error for a file another process holds open for writing (naming it when known)."""
    p = Path(path)
    holder = read_holder(lock_path(p))
    who = f" (flatlab {holder.describe()} is writing it)" if holder is not None and holder.is_alive() else ""
    return FlatlabError(f"{p} is in use by another process{who}: it is open for writing elsewhere (another "
                        "flatlab command, an h5py or HDFView session); wait for it to finish or close it, then rerun")


@contextlib.contextmanager
def open_for_reading(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """``h5py.File(path, "r")``, with a file held open for writing elsewhere reported as in use.

    Raises:
        FlatlabError: the file is in use by another process (:func:`in_use_error`).
        OSError: any other failure to open it (not HDF5, unreadable).
    """
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        if _is_hdf5_lock_error(exc):
            raise in_use_error(path) from None
        raise
    with handle:
        yield handle


def _check_layout(handle: h5py.Group, path: Path) -> None:
    """``/runs`` and each ``/runs/<run_id>`` must be groups (a damaged or foreign file otherwise)."""
    runs = handle.get("runs")
    if runs is None:
        return
    if not isinstance(runs, h5py.Group):
        raise FlatlabError(f"{path} is not a valid flatlab results file: /runs is a dataset, not a group "
                           "(the file was damaged or written by another tool); use another file")
    for run_id, run in runs.items():
        if not isinstance(run, h5py.Group):
            raise FlatlabError(f"{path} is not a valid flatlab results file: /runs/{run_id} is a dataset, "
                               "not a group; use another file")


def _require_group(parent: h5py.Group, name: str, path: Path) -> h5py.Group:
    node = parent.get(name)
    if node is not None and not isinstance(node, h5py.Group):
        raise FlatlabError(f"{path} is not a valid flatlab results file: {node.name} is a dataset where a group "
                           "is expected; use another file")
    return parent.require_group(name)


def run_id_for(checkpoint_path: str | os.PathLike[str]) -> str:
    """Stable identifier of a checkpoint: the first 16 hex digits of its file's SHA-256.

    A run folder is accepted and resolved to its ``model.pt``.
    """
    p = Path(checkpoint_path)
    if p.is_dir() and (p / "model.pt").exists():
        p = p / "model.pt"
    if not p.is_file():
        raise FlatlabError(f"no such checkpoint file: {p}")
    return sha256_file(p)[:16]


def _per_domain_accuracies(ckpt: Any) -> dict[str, float]:
    """Per-domain accuracies of the selected step, read from the run's results.jsonl if present."""
    path = getattr(ckpt, "path", None)
    step = ckpt.meta.get("step")
    if path is None or step is None:
        return {}
    log = Path(path).parent / "results.jsonl"
    if not log.is_file():
        return {}
    found: dict[str, float] = {}
    with open(log, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: the rest of the log is still good
            if row.get("step") == step:
                found = {k: float(v) for k, v in row.items()
                         if k.startswith("env") and k.endswith("_acc") and isinstance(v, (int, float))}
    return found


def versions() -> dict[str, str]:
    """Versions of the software that produced a result."""
    import torch

    return {"flatlab": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
            "h5py": h5py.__version__, "python": platform.python_version()}


def run_attrs_from_checkpoint(ckpt: Any, command_line: str | None = None) -> dict[str, Any]:
    """Provenance attributes of ``/runs/<run_id>`` for a loaded checkpoint.

    Args:
        ckpt: a :class:`flatlab.checkpoint.Checkpoint` (anything with ``meta`` and ``path``).
        command_line: the command that made the result, as its caller knows it (the CLI passes
            the flatlab command; a sweep its job); not recorded when None.

    Returns:
        checkpoint path and sha256, dataset, domains, test_envs, model, model options, algorithm,
        bits, act_bits, seed, step, id_acc, ood_acc, per-domain accuracies, members (ensembles),
        the command line and software versions.
    """
    meta = dict(ckpt.meta)
    quant = meta.get("quant") or {}
    accuracies = meta.get("accuracies") or {}
    path = getattr(ckpt, "path", None)
    attrs: dict[str, Any] = {
        "checkpoint": str(Path(path).resolve()) if path is not None else None,
        "checkpoint_sha256": sha256_file(path) if path is not None and Path(path).is_file() else None,
        "dataset": meta.get("dataset"),
        "domains": list(meta.get("domains", [])),
        "test_envs": list(meta.get("test_envs", [])),
        "model": meta.get("model"),
        "model_options": meta.get("model_options"),
        "algorithm": meta.get("algorithm"),
        "bits": meta.get("bits", quant.get("bits") if isinstance(quant, dict) else None),
        "act_bits": meta.get("act_bits", quant.get("act_bits") if isinstance(quant, dict) else None),
        "seed": meta.get("seed"),
        "trial_seed": meta.get("trial_seed"),
        "step": meta.get("step"),
        "id_acc": accuracies.get("id_acc", meta.get("id_acc")),
        "ood_acc": accuracies.get("ood_acc", meta.get("ood_acc")),
        "source_acc": accuracies.get("source_acc"),
        "val_acc": accuracies.get("val_acc"),
        "per_domain_accuracies": _per_domain_accuracies(ckpt),
        "members": meta.get("members"),
        "command_line": command_line,
        "versions": versions(),
    }
    return {k: v for k, v in attrs.items() if v is not None}


# --- attribute encoding ------------------------------------------------------------------------

def _encode_attr(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=_json_default)
    raise TypeError(f"cannot store attribute of type {type(value).__name__}")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        if value[:1] in "[{":
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if value is None:
            continue
        obj.attrs[key] = _encode_attr(value)


# --- writing -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """Serialise the writers of ``path`` (waiting for a live one); the lock file is removed after."""
    from flatlab.io import check_writable, os_error_reason

    check_writable(path, "file")  # "cannot write PATH: REASON" names the file, not its lock
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlatlabError(f"cannot write {path}: {os_error_reason(exc)}") from None
    with PidLock(lock_path(path), blocking=True):
        yield


def _check_name(name: str, what: str) -> str:
    parts = [p for p in str(name).split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise FlatlabError(f"invalid {what} {name!r} for a results file (use names like 'curvature' or 'bounds/pacbayes')")
    return "/".join(parts)


def check_results_target(path: str | os.PathLike[str]) -> Path:
    """Check, before any work, that results can be written to ``path``: the path is writable
    (:func:`flatlab.io.check_writable`) and an existing file there is a flatlab results file
    with a valid layout (it is never overwritten by another kind of file).

    Raises:
        FlatlabError: ``cannot write PATH: REASON``, a foreign or damaged file, or a file in use.
    """
    from flatlab.io import check_writable

    p = check_writable(path, "file")
    if p.exists():
        if not is_results_file(p):
            raise FlatlabError(f"{p} exists and is not a flatlab results file (HDF5 with schema_version): "
                               "refusing to overwrite it; choose another results file")
        with open_for_reading(p) as handle:
            _check_layout(handle, p)
    return p


def check_group_name(name: str, what: str = "group") -> str:
    """A group path below a run (``curvature``, ``bounds/pacbayes``), normalised; ``.``/``..``
    parts and empty names are refused.

    Raises:
        FlatlabError: an invalid name (e.g. ``../x``).
    """
    return _check_name(name, what)


def _write_arrays(group: h5py.Group, arrays: Mapping[str, Any]) -> None:
    for key, value in arrays.items():
        if isinstance(value, Mapping):  # nested sub-group, e.g. per_layer/<layer>/...
            _write_arrays(group.require_group(_check_name(key, "array name")), value)
            continue
        data = np.asarray(value)
        if data.dtype.kind in "US":
            data = data.astype(h5py.string_dtype())
        elif data.dtype == object:
            data = np.asarray([str(v) for v in data.ravel()], dtype=h5py.string_dtype()).reshape(data.shape)
        group.create_dataset(_check_name(key, "array name"), data=data)


def _open_copy(path: Path, tmp: Path) -> h5py.File:
    if path.exists():
        if not is_results_file(path):
            raise FlatlabError(f"{path} exists but is not a flatlab results file (HDF5 with schema_version): "
                               "choose another --out path")
        shutil.copyfile(path, tmp)
        handle = h5py.File(tmp, "r+")
        found = int(handle.attrs.get("schema_version", 0))
        if found > SCHEMA_VERSION:
            handle.close()
            raise FlatlabError(f"{path} has results schema {found}; this flatlab writes schema {SCHEMA_VERSION}: upgrade flatlab")
        try:
            _check_layout(handle, path)
        except FlatlabError:
            handle.close()
            raise
    else:
        handle = h5py.File(tmp, "w")
    handle.attrs["schema_version"] = SCHEMA_VERSION
    handle.attrs["flatlab_version"] = __version__
    return handle


def write_group(path: str | os.PathLike[str], run_id: str, run_attrs: Mapping[str, Any], group: str,
                arrays: Mapping[str, Any], attrs: Mapping[str, Any] | None = None,
                replace: bool = True) -> None:
    """Write ``/runs/<run_id>/<group>`` of the results file at ``path``, atomically.

    Args:
        path: the HDF5 file (created if absent).
        run_id: the run's identifier (:func:`run_id_for`).
        run_attrs: provenance attributes of ``/runs/<run_id>`` (:func:`run_attrs_from_checkpoint`);
            they replace the run's previous attributes.
        group: group path below the run, possibly nested (``curvature``, ``bounds/pacbayes``).
        arrays: datasets of the group; a nested mapping becomes a sub-group.
        attrs: attributes of the group (settings, scalars).
        replace: replace the group if present; if False an existing group is an error.

    Raises:
        FlatlabError: ``path`` is not a results file, or the group exists and ``replace`` is False.
    """
    target = Path(path)
    run_id = _check_name(run_id, "run id")
    group = _check_name(group, "group")
    with _writer_lock(target), atomic_path(target, suffix=".h5") as tmp:
        with _open_copy(target, tmp) as handle:
            run = _require_group(_require_group(handle, "runs", target), run_id, target)
            for key in list(run.attrs):
                del run.attrs[key]
            _set_attrs(run, run_attrs)
            if group in run:
                if not replace:
                    raise FlatlabError(f"{target} already holds /runs/{run_id}/{group}: pass replace=True to overwrite it")
                del run[group]
            node = run
            for part in group.split("/"):
                node = _require_group(node, part, target)
            _write_arrays(node, arrays)
            _set_attrs(node, attrs or {})


def update_run(path: str | os.PathLike[str], run_id: str, run_attrs: Mapping[str, Any],
               groups: Mapping[str, Callable[[dict[str, Any] | None], tuple[Mapping[str, Any], Mapping[str, Any]]]],
               *, keep_run_attrs: bool = True) -> None:
    """Write several groups of ``/runs/<run_id>`` in one atomic change of the file, each built
    from what the file holds there now.

    Args:
        path: the HDF5 file (created if absent).
        run_id: the run's identifier.
        run_attrs: provenance attributes of the run; with ``keep_run_attrs`` they update the
            run's stored attributes (a key given here wins), else they replace them.
        groups: group path -> ``build(existing) -> (arrays, attrs)``, where ``existing`` is the
            group as stored (the nested dict :func:`read_results` gives a group), or None. The
            build runs under the writers' lock, so no other writer changes the group in between.

    Raises:
        FlatlabError: ``path`` is not a results file, or an invalid name.
    """
    target = Path(path)
    run_id = _check_name(run_id, "run id")
    names = {_check_name(g, "group"): build for g, build in groups.items()}
    with _writer_lock(target), atomic_path(target, suffix=".h5") as tmp:
        with _open_copy(target, tmp) as handle:
            run = _require_group(_require_group(handle, "runs", target), run_id, target)
            if not keep_run_attrs:
                for key in list(run.attrs):
                    del run.attrs[key]
            _set_attrs(run, run_attrs)
            for group, build in names.items():
                found = run.get(group)
                existing = _read_node(found) if isinstance(found, h5py.Group) else None
                arrays, attrs = build(existing)
                if group in run:
                    del run[group]
                node = run
                for part in group.split("/"):
                    node = _require_group(node, part, target)
                _write_arrays(node, arrays)
                _set_attrs(node, attrs)


def write_root_file(path: str | os.PathLike[str], arrays: Mapping[str, Any],
                    attrs: Mapping[str, Any] | None = None) -> None:
    """Write a stand-alone results file whose arrays live at the root (e.g. a loss surface in the
    names Li et al.'s scripts read), replacing any file at ``path`` atomically."""
    target = Path(path)
    with _writer_lock(target), atomic_path(target, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["schema_version"] = SCHEMA_VERSION
            handle.attrs["flatlab_version"] = __version__
            _write_arrays(handle, arrays)
            _set_attrs(handle, attrs or {})


# --- reading -----------------------------------------------------------------------------------

def is_results_file(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is an HDF5 file with a ``schema_version`` attribute on ``/``.

    Raises:
        FlatlabError: the file is in use by another process (the answer is unknown).
    """
    p = Path(path)
    if not p.is_file():
        return False
    try:
        if not h5py.is_hdf5(p):
            return False
        with open_for_reading(p) as handle:
            return "schema_version" in handle.attrs
    except OSError:
        return False


def _read_node(node: h5py.Group) -> dict[str, Any]:
    out: dict[str, Any] = {"attrs": {k: _decode_attr(v) for k, v in node.attrs.items()}}
    for key, child in node.items():
        if isinstance(child, h5py.Group):
            out[key] = _read_node(child)
        else:
            data = child[()]
            if isinstance(data, bytes):
                data = data.decode("utf-8")
            elif isinstance(data, np.ndarray) and data.dtype.kind == "O":
                data = np.asarray([v.decode("utf-8") if isinstance(v, bytes) else v for v in data.ravel()],
                                  dtype=object).reshape(data.shape)
            out[key] = data
    return out


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A nested plain-dict view of a results file.

    Returns:
        ``{"attrs": {...}, "runs": {run_id: {"attrs": {...}, <group>: {"attrs": {...}, <array>: np.ndarray, ...}}}}``
        plus any arrays stored at the root (a stand-alone surface file). ``runs`` is always present.

    Raises:
        FlatlabError: missing file, not a flatlab results file, a damaged layout (``/runs`` not
            a group), or a file in use by another process.
    """
    p = Path(path)
    if not p.exists():
        raise FlatlabError(f"no such results file: {p}")
    if not is_results_file(p):
        raise FlatlabError(f"{p} is not a flatlab results file (HDF5 written by flatlab, e.g. sharpness --results)")
    with open_for_reading(p) as handle:
        _check_layout(handle, p)
        view = _read_node(handle)
    view.setdefault("runs", {})
    view["runs"].pop("attrs", None)
    return view


def _is_container(node: Any) -> bool:
    """A group holding only groups (``surfaces``, ``barriers``, ``bounds``): a folder of results,
    not one result."""
    return isinstance(node, h5py.Group) and len(node) > 0 and all(isinstance(c, h5py.Group) for c in node.values())


def _merge_node(handle: h5py.File, node: Any, parent: h5py.Group, name: str) -> None:
    """Copy ``node`` to ``parent[name]``: a result replaces the one there; a container present
    on both sides is merged child by child (two steps' surfaces of one run both survive)."""
    if name in parent:
        found = parent[name]
        if _is_container(node) and _is_container(found):
            for key, value in node.attrs.items():
                found.attrs[key] = value
            for child in node:
                _merge_node(handle, node[child], found, child)
            return
        del parent[name]
    handle.copy(node, parent, name=name)


def merge_results(path: str | os.PathLike[str], sources: list[str | os.PathLike[str]],
                  attrs: Mapping[str, Any] | None = None) -> None:
    """Write a new results file at ``path`` holding every run of ``sources``, atomically.

    Sources are read in the order given: a run's attributes are the union of its attributes in
    every source (a later source wins on a shared key), and a group present in several sources
    is taken from the last one, except a group holding only groups (``surfaces``,
    ``barriers``, ``bounds``), which is merged by child name (so each step's ``surfaces/<name>``
    survives). The output therefore depends only on the sources and their order
    (``flatlab sweep`` passes them in job order). ``path`` is replaced as a whole; ``attrs`` are
    added to ``/``.

    Raises:
        FlatlabError: a source is missing or not a results file.
    """
    target = Path(path)
    for src in sources:
        if not is_results_file(src):
            raise FlatlabError(f"cannot merge {src}: missing or not a flatlab results file")
    with _writer_lock(target), atomic_path(target, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as out:
            out.attrs["schema_version"] = SCHEMA_VERSION
            out.attrs["flatlab_version"] = __version__
            _set_attrs(out, attrs or {})
            runs = out.require_group("runs")
            for src in sources:
                with open_for_reading(src) as handle:
                    _check_layout(handle, Path(src))
                    if "runs" not in handle:
                        continue
                    for run_id, run in handle["runs"].items():
                        dst = runs.require_group(run_id)
                        for key, value in run.attrs.items():
                            dst.attrs[key] = value
                        for name in run:
                            _merge_node(handle, run[name], dst, name)


# --- results of the Python API ------------------------------------------------------------------

#: A run id given by a user: letters, digits, '.', '-' and '_' (one path component).
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_run_id(run_id: Any) -> str:
    """A user's run id (``"my-resnet"``): a non-empty string of letters, digits, ``.``, ``-``
    and ``_`` (it becomes one group name, ``/runs/<run_id>``).

    Raises:
        ConfigError: naming ``run_id``.
    """
    from flatlab.errors import ConfigError

    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ConfigError("run_id", f"must be letters, digits, '.', '-' and '_', starting with a letter or digit "
                                    f"(e.g. 'my-resnet'), got {run_id!r}")
    return run_id


__all__ = [
    "SCHEMA_VERSION",
    "check_group_name",
    "check_run_id",
    "check_results_target",
    "in_use_error",
    "is_results_file",
    "lock_path",
    "merge_results",
    "open_for_reading",
    "read_results",
    "run_attrs_from_checkpoint",
    "run_id_for",
    "update_run",
    "versions",
    "write_group",
    "write_root_file",
]
