"""One training step of every algorithm against ERM, side by side in one run.

Usage: python benchmarks/bench_algorithms.py [--repeats 15] [--model cnn] [--width 32]

Each algorithm is built on the same initial model and a fixed set of minibatches (5 source
domains x 32 images at 16x16); the algorithms take turns step by step (so all see the same machine
load), and after a few warm-up steps the wall time of ``update`` is recorded for ``--repeats``
steps; the median is reported with its ratio to ERM's median. QAT variants are measured after the
quantization switch. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flatlab.models import build_model
from flatlab.train import get_algorithm
from flatlab.train.hparams import resolve_hparams

CASES = [
    ("erm", {}),
    ("qat", {"bits": 4, "quant_start": 0}),
    ("sam", {}),
    ("sagm", {}),
    ("sam", {"bits": 4, "quant_start": 0}),
    ("gaqat", {"bits": 4}),
    ("noise", {"bits": 4, "quant_start": 0}),
    ("swa", {"swa_start": 0}),
    ("swad", {}),
]


def build(name: str, flags: dict, model_name: str, width: int, total: int):
    torch.manual_seed(0)
    model = build_model(model_name, (1, 16, 16), 10, width=width)
    cls = get_algorithm(name)
    hparams = resolve_hparams("rotated-digits", cls.hparam_defaults, None, flags)
    cls.validate_hparams(hparams, total)
    return cls(model, hparams, total, torch.Generator().manual_seed(0))


def time_interleaved(model_name: str, width: int, repeats: int, warmup: int = 3) -> list[list[float]]:
    """Per case, the step times; the cases take turns every step so all see the same machine."""
    total = warmup + repeats + 1
    algos = [build(name, flags, model_name, width, total) for name, flags in CASES]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(5)]
    times: list[list[float]] = [[] for _ in CASES]
    for step in range(1, total):
        for i, algo in enumerate(algos):
            algo.before_step(step)
            start = time.perf_counter()
            algo.update(batches, step)
            if step > warmup:
                times[i].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args()
    times = time_interleaved(args.model, args.width, args.repeats)
    results = [(name, flags, statistics.median(t)) for (name, flags), t in zip(CASES, times)]
    base = results[0][2]
    print("| algorithm | options | median step (ms) | vs ERM |\n|---|---|---|---|")
    for name, flags, med in results:
        opts = ", ".join(f"{k}={v}" for k, v in flags.items()) or "-"
        print(f"| {name} | {opts} | {med * 1e3:.2f} | {med / base:.2f}x |")
    print(f"\n{args.model} width {args.width}, 5 domains x 32 images 16x16, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} steps")


if __name__ == "__main__":
    main()
