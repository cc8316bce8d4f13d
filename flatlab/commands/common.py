"""Options and printing shared by the sub-commands.

Output contract: ``--json`` prints exactly one JSON object on stdout and nothing else there;
tables and progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flatlab.io import dumps_json
from flatlab.text import fmt, table  # noqa: F401  (the commands print with these)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (tables go to stderr)")
    parser.add_argument("--quiet", action="store_true", help="nothing for humans: no progress bars, no tables (errors still print)")


def add_device_option(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default,
                        help=f"cpu, cuda, cuda:N or auto (CUDA when available); default {default}")


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's destination, with a note on stderr."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        sys.stderr.write(f"flatlab: note: {option_string} is deprecated here; use {self.new} "
                         f"(the old spelling is accepted until flatlab {DEPRECATED_UNTIL})\n")
        setattr(namespace, self.dest, values)


#: Old flag spellings are accepted until this release.
DEPRECATED_UNTIL = "0.3"


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a deprecated spelling of ``new`` (same destination), hidden from --help."""
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS, **kwargs)


def command_line() -> str:
    """The flatlab command being run, as the user typed it (provenance of what it writes)."""
    from pathlib import Path

    return " ".join(["flatlab" if Path(sys.argv[0]).name in ("flatlab", "__main__.py", "cli.py") else
                     Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "flatlab"


def add_data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="root of a folder data set, if it moved since training (checked against the stored hash)")


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """Print ``payload`` as JSON on stdout (``--json``), or ``text`` (a table) for humans.

    One meaning of ``--quiet`` in every command: nothing for humans (no table, no progress).
    Without ``--json`` the text goes to stdout so it can be piped; with ``--json`` the text
    goes to stderr.
    """
    quiet = getattr(args, "quiet", False)
    if getattr(args, "json", False):
        sys.stdout.write(dumps_json(payload) + "\n")
        if not quiet:
            sys.stderr.write(text.rstrip() + "\n")
    elif not quiet:
        sys.stdout.write(text.rstrip() + "\n")
    sys.stdout.flush()


def parse_json_arg(text: str, flag: str) -> dict[str, Any]:
    from flatlab.errors import FlatlabError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FlatlabError(f"{flag} is not valid JSON ({exc.msg} at character {exc.pos}): e.g. '{{\"lr\": 0.001}}'") from None
    if not isinstance(value, dict):
        raise FlatlabError(f"{flag} must be a JSON object, e.g. '{{\"lr\": 0.001}}'")
    return value
