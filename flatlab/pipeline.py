"""Run flatlab commands in-process, as a user would type them (the demo, sweeps and
``report --measure`` chain commands this way, so each step is a command a user can rerun)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any

from flatlab.errors import FlatlabError


def run_flatlab(argv: list[str]) -> dict[str, Any] | None:
    """Run one flatlab command in this process; return its ``--json`` payload, raise on failure.

    ``sys.argv`` is set to the command for its duration, so the provenance a command records
    (the results file's ``command_line``) is the flatlab command that made the result.

    Raises:
        FlatlabError: the command's own error line, or its exit status.
    """
    from flatlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["flatlab", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse usage errors
                code = int(exc.code or 0) if not isinstance(exc.code, str) else 2
    finally:
        sys.argv = saved
    if code != 0:
        last = [line for line in err.getvalue().splitlines() if line.startswith("flatlab: error:")]
        reason = last[-1][len("flatlab: error: "):] if last else f"exit status {code}"
        raise FlatlabError(f"`flatlab {' '.join(argv)}` failed: {reason}")
    text = out.getvalue().strip()
    return json.loads(text.splitlines()[-1]) if "--json" in argv and text else None
