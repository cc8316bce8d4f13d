"""A side journal of finished grid points: what a rerun resumes from after a kill.

Plain text next to the output (``<out>.journal``): a header line with the settings fingerprint,
then one JSON line per finished point ``{"k": flat index, "v": [train_loss, train_acc, test_loss,
test_acc]}``. Every line is written and flushed to the operating system at once, so a SIGKILL
loses nothing written (an ``fsync`` every few seconds guards against a machine crash as well).
Floats go through ``repr`` and back, which round-trips exactly, so a resumed surface equals an
uninterrupted one bit for bit. A torn last line (killed mid-write) is dropped on reopening.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flatlab.errors import FlatlabError

JOURNAL_FORMAT = "flatlab-surface-journal"
FSYNC_EVERY_S = 2.0


class PointJournal:
    """Append-only journal of finished points for one set of settings.

    Args:
        path: the journal file.
        fingerprint: the settings fingerprint; an existing journal with another one is refused.
        n_points: number of grid points (indices must lie below it).
    """

    def __init__(self, path: str | os.PathLike[str], fingerprint: str, n_points: int) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.n_points = n_points
        self.done: dict[int, list[float]] = {}
        self._last_sync = time.monotonic()
        if self.path.exists():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"format": JOURNAL_FORMAT, "fingerprint": fingerprint,
                                     "points": n_points}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good_end = raw.rfind(b"\n") + 1  # everything after the last newline is a torn write
        lines = raw[:good_end].decode("utf-8", errors="replace").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
            raise FlatlabError(f"{self.path} is not a flatlab surface journal: move it away to start afresh")
        if header.get("fingerprint") != self.fingerprint or header.get("points") != self.n_points:
            raise FlatlabError(
                f"{self.path} holds the progress of a surface with other settings: rerun with the "
                "same settings to resume it, or delete it (or pick another --out) to start this one"
            )
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                k, values = int(rec["k"]), [float(v) for v in rec["v"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if 0 <= k < self.n_points:
                self.done[k] = values
        if good_end < len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)

    def record(self, k: int, values: list[float] | tuple[float, ...]) -> None:
        """Append one finished point (flushed at once)."""
        vals = [float(v) for v in values]
        self._fh.write(json.dumps({"k": int(k), "v": vals}) + "\n")
        self._fh.flush()
        self.done[int(k)] = vals
        now = time.monotonic()
        if now - self._last_sync >= FSYNC_EVERY_S:
            os.fsync(self._fh.fileno())
            self._last_sync = now

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def remove(self) -> None:
        """Close and delete the journal (after the final file is in place)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> PointJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
