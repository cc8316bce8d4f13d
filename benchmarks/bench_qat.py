"""One training step, QAT (LSQ fake quantization) vs full precision, side by side.

For each model the FP and the QAT copy start from the same weights and see the same random batch;
their steps are timed alternately (FP, QAT, FP, QAT, ...) so drifts in machine load hit both, and
the medians are compared. A step = zero_grad, forward, cross-entropy, backward, Adam step. On CPU
the thread's CPU time is recorded too: with one thread it excludes the time other processes take
the core, so its ratio is the steadier figure on a loaded machine.

    python benchmarks/bench_qat.py [--repeats 30] [--device cpu|cuda] [--bits 8]

Target: QAT step time <= 1.25x FP. Prints a markdown table (medians, ratios).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flatlab.models import build_model, num_parameters
from flatlab.quant import QuantConfig, quantize_model, quantized_layers

TARGET = 1.25


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.thread_time() - c0


def bench(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: QuantConfig,
          repeats: int, warmup: int, device: torch.device) -> dict:
    fp = model.to(device).train()
    qat = quantize_model(copy.deepcopy(fp), config).train()
    steps = {"fp": _step_fn(fp, x, y), "qat": _step_fn(qat, x, y)}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {"fp": [], "qat": []}
    cpu: dict[str, list[float]] = {"fp": [], "qat": []}
    for _ in range(repeats):
        for key, fn in steps.items():
            wall, cpu_s = _timed(fn, device)
            times[key].append(wall)
            cpu[key].append(cpu_s)
    fp_ms = statistics.median(times["fp"]) * 1e3
    qat_ms = statistics.median(times["qat"]) * 1e3
    return {"model": name, "params": num_parameters(fp), "qlayers": len(quantized_layers(qat)),
            "input": "x".join(str(s) for s in x.shape), "fp_ms": fp_ms, "qat_ms": qat_ms, "ratio": qat_ms / fp_ms,
            "fp_iqr": _iqr(times["fp"]) * 1e3, "qat_iqr": _iqr(times["qat"]) * 1e3,
            "cpu_ratio": statistics.median(cpu["qat"]) / statistics.median(cpu["fp"]) if device.type == "cpu" else None}


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--resnet-resolutions", default="32,64",
                        help="comma-separated input sides for ResNet-18 (default 32,64)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = QuantConfig(bits=args.bits)
    torch.manual_seed(0)
    rows = []
    # Digits CNN as flatlab trains it: width 16, 5 source domains x 32 samples of 1x16x16.
    x = torch.randn(160, 1, 16, 16, device=device)
    y = torch.randint(0, 10, (160,), device=device)
    rows.append(bench("digits CNN (width 16)", build_model("cnn", (1, 16, 16), 10), x, y, config,
                      args.repeats, args.warmup, device))
    # ResNet-18 (flatlab's torchvision wrapper, BatchNorm frozen as in QT-DoG) at small resolution.
    for side in (int(v) for v in args.resnet_resolutions.split(",") if v.strip()):
        x = torch.randn(args.resnet_batch, 3, side, side, device=device)
        y = torch.randint(0, 10, (args.resnet_batch,), device=device)
        rows.append(bench(f"ResNet-18 ({side}x{side})", build_model("resnet18", (3, side, side), 10), x, y, config,
                          args.repeats, args.warmup, device))
    print(f"QAT vs FP, one training step (Adam), {args.bits}-bit per-channel LSQ weights, device {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating repeats, torch {torch.__version__}\n")
    print("| model | params | quantized layers | batch | FP step (ms) | QAT step (ms) | QAT / FP (wall) "
          "| QAT / FP (CPU time) | target <= 1.25 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = "yes" if r["ratio"] <= TARGET else "no"
        cpu_ratio = "n/a" if r["cpu_ratio"] is None else f"{r['cpu_ratio']:.2f}x"
        print(f"| {r['model']} | {r['params']:,} | {r['qlayers']} | {r['input']} | {r['fp_ms']:.2f} (IQR {r['fp_iqr']:.2f}) "
              f"| {r['qat_ms']:.2f} (IQR {r['qat_iqr']:.2f}) | {r['ratio']:.2f}x | {cpu_ratio} | {ok} |")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
