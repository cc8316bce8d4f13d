"""Seconds per loss-surface point against the limit: one plain forward pass over the same data.

Side by side in one run, for the digits CNN (the built-in rotated digits, source + target splits)
and torchvision's ResNet-18 (reduced data: random images at a small resolution):

* ``forward``: ``model(x)`` over every batch under ``no_grad`` in eval mode: the limit;
* ``flatlab``: one grid point of :class:`flatlab.surface.evaluate.PointEvaluator` (write the
  weights in place, forward, loss and accuracy on both splits);
* ``flatlab vmap K``: K grid points per forward pass (``--points-per-pass K``), per point.

Medians over repeats; ratios are against ``forward``. Usage::

    python benchmarks/bench_surface.py [--repeats 7] [--device cpu] [--resnet-samples 128]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import numpy as np
import torch
from _harness import elapsed, environment, markdown_table
from torch import nn

from flatlab.surface.directions import normalize_direction, parameter_tensors, random_direction
from flatlab.surface.evaluate import PointEvaluator, SurfaceProblem


def bench(name: str, model: nn.Module, source, target, repeats: int, device: str,
          vmap_sizes: tuple[int, ...]) -> list[list[str]]:
    model = model.to(device).eval()
    src = [(x.to(device), y.to(device)) for x, y in source]
    tgt = [(x.to(device), y.to(device)) for x, y in target]

    @torch.no_grad()
    def forward() -> None:
        for x, _ in src + tgt:
            model(x)

    weights = {n: p.detach().cpu() for n, p in parameter_tensors(model).items()}
    dirs = [normalize_direction(random_direction(weights, 0, i), weights) for i in range(2)]
    n_params = sum(p.numel() for p in model.parameters())
    samples = sum(len(y) for _, y in src + tgt)
    rng = np.random.RandomState(0)
    evaluators = {k: PointEvaluator(SurfaceProblem(model=model, source=src, target=tgt, directions=dirs,
                                                   device=device, points_per_pass=k)) for k in (1, *vmap_sizes)}

    def points(k: int) -> Callable[[], None]:
        return lambda: evaluators[k].evaluate_many([tuple(rng.uniform(-1, 1, 2)) for _ in range(k)])

    methods: dict[str, tuple[Callable[[], None], int]] = {"forward pass (limit)": (forward, 1)}
    for k in evaluators:
        label = "flatlab, 1 point per pass" if k == 1 else f"flatlab vmap, {k} points per pass"
        methods[label] = (points(k), k)
    # Interleaved repeats: every method sees the same machine load (the CPU may be shared).
    times: dict[str, list[float]] = {label: [] for label in methods}
    for label, (fn, _) in list(methods.items()):
        try:
            fn()  # warm-up
        except RuntimeError as exc:  # e.g. out of memory for a large K
            print(f"# {name} {label}: {str(exc).splitlines()[0]}")
            del methods[label], times[label]
    for _ in range(repeats):
        for label, (fn, k) in methods.items():
            times[label].append(elapsed(fn) / k)
    evaluators[1].restore()
    limit = statistics.median(times["forward pass (limit)"])
    rows = []
    for label, ts in times.items():
        sec = statistics.median(ts)
        rows.append([name, f"{n_params:,}", str(samples), device, label, f"{sec * 1e3:.2f}", f"{sec / limit:.2f}x"])
    return rows


def digits_case(batch_size: int):
    from flatlab.data import DomainSplits, RotatedDigits
    from flatlab.models import build_model

    data = RotatedDigits()
    splits = DomainSplits(data, [0], 0)
    source = splits.split_batches("source", batch_size)
    target = splits.split_batches("target", batch_size)
    model = build_model("cnn", tuple(source[0][0].shape[1:]), 10)
    mlp = build_model("mlp", tuple(source[0][0].shape[1:]), 10)
    return model, mlp, source, target


def resnet_case(samples: int, resolution: int, batch_size: int):
    import torchvision

    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 3, resolution, resolution, generator=g)
    y = torch.randint(0, 7, (samples,), generator=g)
    half = samples // 2
    source = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, half, batch_size)]
    target = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(half, samples, batch_size)]
    return torchvision.models.resnet18(num_classes=7), source, target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--resnet-samples", type=int, default=128)
    parser.add_argument("--resnet-resolution", type=int, default=64)
    parser.add_argument("--vmap", default="4,16", help="points per pass to try, comma-separated")
    args = parser.parse_args()
    torch.manual_seed(0)
    sizes = tuple(int(v) for v in args.vmap.split(",") if v)
    rows = []
    cnn, mlp, source, target = digits_case(args.batch_size)
    rows += bench("digits MLP", mlp, source, target, args.repeats, args.device, sizes)
    rows += bench("digits CNN", cnn, source, target, args.repeats, args.device, sizes)
    resnet, rsrc, rtgt = resnet_case(args.resnet_samples, args.resnet_resolution, min(args.batch_size, 64))
    rows += bench(f"ResNet-18 {args.resnet_resolution}px", resnet, rsrc, rtgt, max(3, args.repeats // 2),
                  args.device, sizes[:1])
    header = ["model", "params", "samples", "device", "method", "ms per point (median)", "vs forward"]
    print(markdown_table(header, rows))
    print(f"\n{environment(args.device)}")


if __name__ == "__main__":
    main()
