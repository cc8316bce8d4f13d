"""Atomic file writes, output-path checks and small I/O helpers shared by every stage.

A result never appears half-written: everything is written to a temporary file in the target
folder, flushed to disk, then moved into place with :func:`os.replace` (atomic on POSIX). The
temporary file of ``DIR/NAME`` is ``DIR/.NAME.<random><suffix>.tmp`` (:func:`temp_pattern`), so a
command can recognise, and after a kill remove, the temporary files it made itself.

Output paths are checked before any work starts (:func:`check_writable`), and an operating-system
error on an output path becomes one :class:`~flatlab.errors.FlatlabError` line
``cannot write PATH: REASON`` (:func:`os_error_reason`), never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flatlab.errors import FlatlabError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: errno -> what it means for an output path, in words a user can act on.
_OS_REASONS: dict[int, str] = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a part of the path is a file, not a folder",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ENOENT: "a part of the path does not exist",
}

#: errno values of a failed write that carry no file name (``write(2)`` errors).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def os_error_reason(exc: OSError) -> str:
    """A short, lower-case reason for an OS error on a path (``permission denied``, ...)."""
    if exc.errno in _OS_REASONS:
        return _OS_REASONS[exc.errno]
    return (exc.strerror or type(exc).__name__).lower()


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (``.`` for a relative path at worst)."""
    current = path
    while not (current.exists() or current.is_symlink()):
        if current.parent == current:
            break
        current = current.parent
    return current


def _probe_folder(folder: Path) -> None:
    """Create and remove a temporary file in ``folder``: the one test of writability that also
    holds for root, read-only mounts and pseudo file systems (``os.access`` says yes to root)."""
    fd, name = tempfile.mkstemp(prefix=".flatlab-probe.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(name)


def check_writable(path: str | os.PathLike[str], kind: Literal["file", "folder"] = "file") -> Path:
    """Check, before any work starts and without leaving anything behind, that an output can be
    written at ``path``: a file (written by temp file + rename in its folder) or a folder (created
    with its parents if missing).

    The path itself must not be of the other kind; its nearest existing ancestor must be a folder
    in which a file can be created (tested by creating and removing a temporary file there).

    Returns:
        ``Path(path)``.

    Raises:
        FlatlabError: ``cannot write PATH: REASON``, e.g. it is a folder where a file is expected,
            a part of the path is a file, permission denied, read-only file system.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    p = Path(path)
    if str(path).strip() == "":
        raise FlatlabError(f"an empty path was given where a {kind} to write is expected")
    try:
        if p.exists():
            if kind == "file" and p.is_dir():
                raise FlatlabError(f"cannot write {p}: it is a folder, not a file (give a file name, e.g. "
                                   f"{p / 'out.h5'})")
            if kind == "folder" and not p.is_dir():
                raise FlatlabError(f"cannot write {p}: it is a file, not a folder (give a folder name)")
            probe = p if kind == "folder" else p.parent
        else:
            probe = _first_existing(p.parent)
            if probe.exists() and not probe.is_dir():
                raise FlatlabError(f"cannot write {p}: {probe} is a file, not a folder")
        _probe_folder(probe)
    except OSError as exc:
        raise FlatlabError(f"cannot write {p}: {os_error_reason(exc)}") from None
    return p


def temp_pattern(name: str) -> str:
    """The glob pattern of :func:`atomic_path`'s temporary files for target file ``name``."""
    return f".{name}.*.tmp"


def clear_own_files(folder: str | os.PathLike[str], own_names: Iterable[str],
                    own_patterns: Iterable[str] = (), keep: Iterable[str] = ()) -> list[Path]:
    """Delete from ``folder`` the files a command made itself, or refuse and delete nothing.

    Every entry of ``folder`` must be a plain file whose name is in ``own_names`` or matches one
    of ``own_patterns`` (:mod:`fnmatch` globs, e.g. :func:`temp_pattern` of each own name); any
    other entry (a foreign file, a sub-folder, a link) is refused before anything is deleted, so a
    mistyped output folder (a home directory, a data folder) never loses a file. Names in ``keep``
    (e.g. the lock file the command holds) are own files that stay.

    Returns:
        The files deleted, sorted. A missing folder deletes nothing.

    Raises:
        FlatlabError: the folder holds something that is not the command's own (named in the
            message), or ``folder`` is a file.
    """
    root = Path(folder)
    if not root.exists():
        return []
    if not root.is_dir():
        raise FlatlabError(f"{root} is a file, not a folder: refusing to clear it")
    names, patterns, kept = set(own_names), list(own_patterns), set(keep)
    entries = sorted(root.iterdir())
    for entry in entries:
        own = entry.name in names or any(fnmatch.fnmatchcase(entry.name, pat) for pat in patterns)
        if not own or entry.is_symlink() or not entry.is_file():
            what = "folder" if entry.is_dir() and not entry.is_symlink() else "file"
            raise FlatlabError(f"refusing to clear {root}: it holds the {what} {entry.name}, which this command "
                               "did not write; move it away or choose another output folder")
    removed = []
    for entry in entries:
        if entry.name not in kept:
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def remove_stale_temp_files(folder: str | os.PathLike[str], own_names: Iterable[str]) -> list[Path]:
    """Remove :func:`atomic_path` temporary files of the given target names from ``folder``.

    Only call this while holding the lock that serialises every writer of those targets (e.g. a
    run folder's lock): then no live writer owns such a file, and each one is the leftover of a
    killed process (SIGKILL skips ``atomic_path``'s cleanup).

    Returns:
        The files removed, sorted.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    patterns = [temp_pattern(n) for n in own_names]
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.is_file() and not entry.is_symlink() and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left untouched. An OS error of
    this function's own steps (creating the folder and the temporary file, the final rename) or
    one naming the temporary file becomes ``FlatlabError("cannot write PATH: REASON")``.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    except OSError as exc:
        raise FlatlabError(f"cannot write {target}: {os_error_reason(exc)}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp_path, 0o666 & ~umask)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and (exc.filename in (str(tmp_path), str(target))
                                         or (exc.filename is None and exc.errno in _WRITE_ERRNOS)):
            # The write itself failed (no space, a folder at the target, ...): name the target.
            raise FlatlabError(f"cannot write {target}: {os_error_reason(exc)}") from None
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def settings_fingerprint(settings: dict[str, Any], *arrays: np.ndarray) -> str:
    """SHA-256 over the canonical JSON of the settings and the bytes of the given arrays (what a
    result was computed with: a rerun with the same fingerprint may reuse it)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode("utf-8"))
    for arr in arrays:
        a = np.ascontiguousarray(arr)
        digest.update(str((a.dtype.str, a.shape)).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """Hex SHA-256 of an array's bytes in C order (e.g. the raw random draws of a surface)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def read_toml(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The table of the TOML file at ``path``; FlatlabError naming ``what`` (``study file``)
    when the file is missing, unreadable or not valid UTF-8 TOML."""
    p = Path(path)
    if not p.is_file():
        raise FlatlabError(f"no such {what}: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FlatlabError(f"{p} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise FlatlabError(f"cannot read {what} {p}: {os_error_reason(exc)}") from None


def dumps_json(obj: Any) -> str:
    """JSON with sorted keys and NaN written as null (strict JSON for other tools)."""
    return json.dumps(_nan_to_none(obj), sort_keys=True)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj
