"""The ``flatlab`` command: one thin sub-command per stage.

The CLI only parses arguments, calls the library and prints. Each sub-command lives in
``flatlab/commands/<name>.py`` and exposes ``register(subparsers)``. A user error
(:class:`~flatlab.errors.FlatlabError`, a bad flag) ends with one line ``flatlab: error: ...`` on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from flatlab import __version__
from flatlab.errors import FlatlabError

#: Sub-command modules, in the order ``flatlab --help`` lists them.
COMMANDS = ["train", "evaluate", "info", "export", "ensemble", "sharpness", "barrier", "surface", "report", "figures", "demo",
            "sweep"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``flatlab: error:`` line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        cmd = self.prog.replace("flatlab", "").strip()
        hint = f" (see flatlab {cmd} --help)" if cmd else " (see flatlab --help)"
        sys.stderr.write(f"flatlab: error: {message}{hint}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flatlab", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"flatlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"flatlab.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except FlatlabError as exc:
        message = " ".join(str(exc).split())
        sys.stderr.write(f"flatlab: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("flatlab: interrupted; rerun the same command to continue where it stopped\n")
        return 130
    except BrokenPipeError:
        # Output piped into a closed reader (e.g. `| head`): not an error of the computation.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return int(result or 0)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
