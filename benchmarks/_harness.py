"""What the benchmarks here share: interleaved timing, the environment line, the markdown table.

The benchmarks are run as scripts (``python benchmarks/bench_x.py``, see README.md), which puts
benchmarks/ first on ``sys.path``; they import this module as a sibling, ``from _harness import ...``
(the leading underscore keeps it from reading as a benchmark of its own).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch


def elapsed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``."""
    # CUDA kernels run asynchronously: without a sync the clock would stop before the work does.
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(fns: Mapping[str, Callable[[], object]], rounds: int,
                        progress: str | None = None) -> dict[str, float]:
    """Median wall seconds of each function, by label, over ``rounds`` rounds.

    Each function is called once first, untimed (warm-up: lazy initialisation, caches). Then every
    round calls every function once, in order, so a busy spell of the machine slows all of them
    alike and their ratios stay fair; the median drops the rounds it disturbed most. ``progress``
    names the case in the lines printed to stderr while it runs.
    """
    for label, fn in fns.items():
        if progress is not None:
            print(f"[{progress}] warm-up: {label} ...", file=sys.stderr, flush=True)
        fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    for r in range(rounds):
        if progress is not None:
            print(f"[{progress}] round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for label, fn in fns.items():
            times[label].append(elapsed(fn))
    return {label: statistics.median(t) for label, t in times.items()}


def environment(device: str | torch.device = "cpu") -> str:
    """What a timing depends on besides the code: torch version, CPU threads, device."""
    dev = torch.device(device)
    where = f"CUDA ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else dev.type.upper()
    return f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {where}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """The results as a markdown table, the form README.md quotes them in."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
