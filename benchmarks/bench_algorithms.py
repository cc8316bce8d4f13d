"""One training step of every algorithm against ERM, side by side in one run.

Usage: python benchmarks/bench_algorithms.py [--repeats 15] [--model cnn] [--width 32]

Each algorithm is built on the same model and a fixed set of minibatches (5 source domains x 32
digits at 16x16); after a few warm-up steps, the wall time of ``update`` is measured over
``--repeats`` steps and the median reported with its ratio to ERM's median. QAT variants are
measured after the quantization switch. Prints a markdown table.
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


def time_steps(name: str, flags: dict, model_name: str, width: int, repeats: int, warmup: int = 3) -> list[float]:
    torch.manual_seed(0)
    model = build_model(model_name, (1, 16, 16), 10, width=width)
    cls = get_algorithm(name)
    hparams = resolve_hparams("rotated-digits", cls.hparam_defaults, None, flags)
    total = warmup + repeats + 1
    cls.validate_hparams(hparams, total)
    algo = cls(model, hparams, total, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(5)]
    times = []
    for step in range(1, total):
        algo.before_step(step)
        start = time.perf_counter()
        algo.update(batches, step)
        if step > warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args()
    results = []
    for name, flags in CASES:
        med = statistics.median(time_steps(name, flags, args.model, args.width, args.repeats))
        results.append((name, flags, med))
    base = results[0][2]
    print(f"| algorithm | options | median step (ms) | vs ERM |\n|---|---|---|---|")
    for name, flags, med in results:
        opts = ", ".join(f"{k}={v}" for k, v in flags.items()) or "-"
        print(f"| {name} | {opts} | {med * 1e3:.2f} | {med / base:.2f}x |")
    print(f"\n{args.model} width {args.width}, 5 domains x 32 images 16x16, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} steps")


if __name__ == "__main__":
    main()
