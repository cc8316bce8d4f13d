"""The ``flatlab`` command: one thin sub-command per stage.

The CLI only parses arguments, calls the library and prints. Each sub-command lives in
``flatlab/commands/<name>.py`` and exposes ``register(subparsers)``. A user error
(:class:`~flatlab.errors.FlatlabError`, a bad flag) ends with one line ``flatlab: error: ...`` on
stderr and exit status 2. So does an operating-system error that names a path (an output under a
read-only folder, a folder where a file is expected, ...) that the library did not already turn
into a FlatlabError: ``flatlab: error: cannot access PATH: REASON``. Progress bars still open are
closed first, so the error line starts on a line of its own.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from flatlab import __version__
from flatlab.errors import ConfigError, FlatlabError

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


def close_progress_bars() -> None:
    """Close every open tqdm bar that draws on the current ``sys.stderr``, so that what stderr
    gets next starts on a fresh line (a bar writes its line without a newline until it is closed).

    Only bars on the current stderr: a command run in-process by a pipeline (whose stderr is
    redirected) must not close the pipeline's own bars on the real terminal."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        fp = getattr(bar, "fp", None)
        if getattr(fp, "_wrapped", fp) is not sys.stderr:  # tqdm wraps its file in DisableOnWriteError
            continue
        try:
            bar.close()
        except Exception:  # a broken bar must not hide the error being reported
            pass


def flag_names(parser: argparse.ArgumentParser, command: str | None) -> dict[str, str]:
    """Parameter (argparse destination) -> its ``--flag`` in a sub-command, so that a library
    :class:`~flatlab.errors.ConfigError` about ``quant_start`` reads ``--quant-start``."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is None or command not in sub.choices:
        return {}
    names: dict[str, str] = {}
    for action in sub.choices[command]._actions:
        longs = [o for o in action.option_strings if o.startswith("--") and action.help != argparse.SUPPRESS]
        if longs and action.dest not in names:
            names[action.dest] = longs[0]
    return names


def error_line(message: str) -> str:
    """The one line a user error prints: ``flatlab: error: MESSAGE`` with whitespace collapsed."""
    return "flatlab: error: " + " ".join(str(message).split()) + "\n"


def _os_error_message(exc: OSError) -> str:
    from flatlab.io import os_error_reason

    return f"cannot access {exc.filename}: {os_error_reason(exc)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except ConfigError as exc:
        close_progress_bars()
        sys.stderr.write(error_line(str(exc.renamed(flag_names(parser, args.command)))))
        return 2
    except FlatlabError as exc:
        close_progress_bars()
        sys.stderr.write(error_line(str(exc)))
        return 2
    except KeyboardInterrupt:
        close_progress_bars()
        sys.stderr.write("flatlab: interrupted; rerun the same command to continue where it stopped\n")
        return 130
    except BrokenPipeError:
        # Output piped into a closed reader (e.g. `| head`): not an error of the computation.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a path the user gave: a bug, keep the traceback
        close_progress_bars()
        sys.stderr.write(error_line(_os_error_message(exc)))
        return 2
    return int(result or 0)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
