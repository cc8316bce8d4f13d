"""The shape of the package: no import cycles, a library that never runs its CLI, every module
importable on its own.

The import graph is read from the source (every ``import``/``from ... import`` of a flatlab
module, including those inside functions, which hide cycles from a plain import test; not those
under ``if TYPE_CHECKING:``, which never run); its strongly connected components must all be
single modules.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flatlab"
CLI_FILES = {"cli.py", "__main__.py"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the flatlab modules it imports anywhere in its source."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # `if TYPE_CHECKING:` blocks never run: their imports are for type checkers only.
        for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]:
            block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {r for a in node.names if a.name.startswith("flatlab") and (r := _resolve(a.name, mods))}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                if not base.startswith("flatlab"):
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found = _resolve(full, mods) if full in mods else _resolve(base, mods)
                    if found:
                        deps.add(found)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_known_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_flatlab():
    assert cycles(import_graph()) == []


def _is_cli(name: str) -> bool:
    return name in ("flatlab.cli", "flatlab.__main__", "flatlab.commands") or name.startswith("flatlab.commands.")


def test_the_library_never_imports_the_cli():
    for module, deps in import_graph().items():
        if _is_cli(module):
            continue
        assert not [d for d in deps if _is_cli(d)], f"{module} imports the CLI: {sorted(d for d in deps if _is_cli(d))}"


def test_the_library_does_not_drive_commands_in_process():
    pattern = re.compile(r"run_flatlab|redirect_stdout|_option_string_actions|\b_actions\b")
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "commands" or rel.name in CLI_FILES:
            continue
        hits = [i + 1 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if pattern.search(line)]
        assert not hits, f"flatlab/{rel} lines {hits}"


@pytest.mark.parametrize("chunk", range(4))
def test_every_module_imports_in_a_fresh_interpreter(chunk: int):
    names = sorted(n for n in _modules() if n != "flatlab.__main__")  # importing __main__ runs the CLI
    part = names[chunk::4]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code, *part], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
