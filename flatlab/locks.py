"""Exclusive locks between processes that say who holds them and break when the holder is gone.

A :class:`PidLock` is a lock file holding one JSON line that names its holder::

    {"pid": 4242, "start_time": 1234567, "host": "node1", "command": "flatlab train ..."}

``start_time`` is the process start time in clock ticks since boot (field 22 of
``/proc/<pid>/stat`` on Linux), so a recycled pid is not mistaken for the holder. The exclusion
itself is a POSIX ``flock`` on the file (released by the kernel when the holder dies, even by
SIGKILL); the record adds what ``flock`` cannot tell:

* a refusal names the live holder's pid;
* a lock whose recorded holder is gone is *stale* and is broken, with a note on stderr. (An
  ``flock`` can outlive its process when a forked child inherited the descriptor; where ``flock``
  is not supported, e.g. some network file systems, the record is the only lock there is.)

The holder removes the lock file when it releases the lock, so nothing is left behind. Every
acquirer checks, after ``flock`` succeeds, that the file it locked is still the one at the path
(same inode): a file that was removed or replaced meanwhile is retried, so removal is safe.
Breaking a stale lock removes its file; two processes breaking the same stale lock at the same
moment is the one (microseconds wide) race left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatlab.errors import FlatlabError
from flatlab.io import os_error_reason

try:  # POSIX advisory locks
    import fcntl
except ImportError:  # pragma: no cover - Windows: the pid record alone
    fcntl = None  # type: ignore[assignment]

#: errno values meaning "flock is not supported here" (the pid record then is the lock).
_NO_FLOCK = {getattr(errno, n) for n in ("ENOLCK", "EINVAL", "ENOSYS", "EOPNOTSUPP") if hasattr(errno, n)}


def process_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22),
    or None where ``/proc`` is unavailable or the process does not exist."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall = index 19 after the name
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: pid, start time (ticks since boot, None if unknown), host, command."""

    pid: int
    start_time: int | None
    host: str
    command: str = ""

    @classmethod
    def current(cls) -> LockHolder:
        """This process."""
        pid = os.getpid()
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""
        return cls(pid=pid, start_time=process_start_time(pid), host=socket.gethostname(), command=command[:300])

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "start_time": self.start_time, "host": self.host,
                           "command": self.command}, sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder recorded in a lock file's text, or None (empty, foreign or torn record)."""
        try:
            record: Any = json.loads(text)
            pid = record["pid"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return None
        start = record.get("start_time")
        return cls(pid=pid, start_time=start if isinstance(start, int) else None,
                   host=str(record.get("host", "")), command=str(record.get("command", "")))

    def is_alive(self) -> bool:
        """Whether the holder still runs. A holder on another host cannot be checked: alive.

        On this host: the pid must exist and, when both start times are known, have the recorded
        start time (otherwise the pid was recycled by another process)."""
        if self.host and self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        if self.start_time is not None:
            now = process_start_time(self.pid)
            if now is not None and now != self.start_time:
                return False
        with contextlib.suppress(OSError):
            # A zombie (exited, not yet reaped) holds nothing.
            state = Path(f"/proc/{self.pid}/stat").read_text()
            if state[state.rfind(")") + 2:].split()[0] == "Z":
                return False
        return True

    def describe(self) -> str:
        where = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        return f"pid {self.pid}{where}"


class LockBusy(FlatlabError):
    """The lock is held by a live process (``holder``, None when it left no record)."""

    def __init__(self, message: str, holder: LockHolder | None) -> None:
        super().__init__(message)
        self.holder = holder


def read_holder(path: str | os.PathLike[str]) -> LockHolder | None:
    """The holder recorded in lock file ``path`` (None: no file or no readable record)."""
    try:
        return LockHolder.parse(Path(path).read_text())
    except OSError:
        return None


class PidLock:
    """An exclusive lock on ``path`` for the life of an operation (see the module docstring).

    Args:
        path: the lock file (created; removed again on release).
        busy_message: the refusal, with ``{holder}`` replaced by " (pid N)" when the holder is
            known, e.g. ``"another `flatlab train` is running in runs/a{holder}: wait for it"``.
        blocking: wait for a live holder instead of refusing (writers of a shared file).
        note: write a note on stderr when a stale lock is broken.

    Use as a context manager, or :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, path: str | os.PathLike[str], busy_message: str = "{path} is locked by another process{holder}",
                 blocking: bool = False, note: bool = True) -> None:
        self.path = Path(path)
        self.busy_message = busy_message
        self.blocking = blocking
        self.note = note
        self._fd: int | None = None
        self.broken: LockHolder | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _busy(self, holder: LockHolder | None) -> LockBusy:
        text = f" ({holder.describe()})" if holder is not None else ""
        message = self.busy_message.format(path=self.path, holder=text)
        if holder is not None and holder.host and holder.host != socket.gethostname():
            # Another machine's process cannot be checked from here: say how to clear it.
            message += f" (if that process no longer runs, delete {self.path})"
        return LockBusy(message, holder)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise FlatlabError(f"cannot write {self.path}: {os_error_reason(exc)}") from None

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _break_stale(self, fd: int, holder: LockHolder) -> None:
        if self._same_file(fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.broken = holder
        if self.note:
            sys.stderr.write(f"flatlab: note: broke the stale lock {self.path} of {holder.describe()}, "
                             "which is no longer running\n")

    def acquire(self) -> PidLock:
        """Take the lock (see the class docstring); returns ``self``.

        Raises:
            LockBusy: a live process holds it (and ``blocking`` is False).
            FlatlabError: the lock file cannot be created (``cannot write PATH: REASON``).
        """
        if self._fd is not None:
            return self
        for _ in range(100):  # each retry means the file changed under us; 100 is "never"
            fd = self._open()
            locked = self._try_flock(fd)
            if locked is False:  # held by someone: who?
                holder = LockHolder.parse(_read_fd(fd))
                if holder is not None and not holder.is_alive():
                    self._break_stale(fd, holder)
                    os.close(fd)
                    continue
                if not self.blocking:
                    os.close(fd)
                    raise self._busy(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)  # type: ignore[union-attr]
            elif locked is None:  # no flock here: the record is the lock
                holder = LockHolder.parse(_read_fd(fd))
                if holder is not None and holder.pid != os.getpid() and holder.is_alive():
                    os.close(fd)
                    if not self.blocking:
                        raise self._busy(holder)
                    time.sleep(0.1)
                    continue
            if not self._same_file(fd):
                os.close(fd)  # removed or replaced since we opened it: lock the current one
                continue
            previous = LockHolder.parse(_read_fd(fd))
            if previous is not None and previous.pid != os.getpid() and not previous.is_alive():
                # A holder killed before it could remove its file: its lock died with it.
                self.broken = previous
                if self.note:
                    sys.stderr.write(f"flatlab: note: removed the stale lock {self.path} of "
                                     f"{previous.describe()}, which is no longer running\n")
            os.ftruncate(fd, 0)
            os.pwrite(fd, (LockHolder.current().to_json() + "\n").encode("utf-8"), 0)
            self._fd = fd
            return self
        raise self._busy(read_holder(self.path))  # pragma: no cover - pathological churn

    @staticmethod
    def _try_flock(fd: int) -> bool | None:
        """True: locked; False: held by another; None: flock unsupported here."""
        if fcntl is None:  # pragma: no cover - Windows
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _NO_FLOCK:
                return None
            os.close(fd)
            raise FlatlabError(f"cannot lock {path_of(fd)}: {os_error_reason(exc)}") from None
        return True

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and release the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._same_file(fd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> PidLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def path_of(fd: int) -> str:
    """The path of an open descriptor (Linux ``/proc/self/fd``), or ``fd N``."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _read_fd(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
    except OSError:
        return ""


__all__ = ["LockBusy", "LockHolder", "PidLock", "process_start_time", "read_holder"]
