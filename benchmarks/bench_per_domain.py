"""Per-domain curvature benchmark: its cost against the whole-source Hessian's top-k and trace.

On flatlab's digits CNN (width 16, 14,458 parameters: three conv-BatchNorm-ReLU blocks; trained
200 steps on rotated digits, test domain 0), eval mode, float32, this times side by side in one run (interleaved: every repeat runs each method
once, so all see the same machine load):

* ``whole source``: the Hessian of the pooled source split (N samples: the five source domains'
  in-splits, ``N / 5`` each), its top-k eigenvalues by flatlab's early-stopping Lanczos (rtol
  1e-3) and its trace by Hutch++ (``--trace-products``);
* ``per domain, sources``: :func:`flatlab.curvature.per_domain.per_domain_curvature` on the same
  five domains taken alone (``N / 5`` samples each; the same N samples in all), top-k and trace
  per domain, plus the 5 x 5 eigenspace overlap matrix;
* ``per domain, sources + target``: the same with the target domain added (what ``flatlab
  sharpness --per-domain`` computes), ``N / 5`` target samples.

For each: median wall time and process CPU time (less sensitive to other processes' load),
Hessian-vector products, and the CPU time per product-sample (CPU time / sum over operators of
products x samples), whose ratio to the whole-source one is the overhead of measuring the
domains one by one (per-operator setup, smaller batches, the overlap). The order of the methods
rotates from repeat to repeat; one untimed warm-up call of each comes first (the very first call
was 5-20x slower than the later ones). Prints a
markdown table. Usage::

    python benchmarks/bench_per_domain.py [--repeats 5] [--threads 2] [--samples-per-domain 100]
        [--top-k 3] [--trace-products 20] [--width 16] [--checkpoint model.pt]

Progress (each repeat's times) goes to stderr as it happens; the table to stdout at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def digits_cnn(width: int, checkpoint: str | None = None) -> Any:
    """flatlab's digits CNN trained 200 steps (or a given checkpoint); the loaded checkpoint."""
    from flatlab.checkpoint import load_checkpoint
    from flatlab.train import TrainConfig, train

    if checkpoint is None:
        out = Path(tempfile.mkdtemp(prefix="bench-perdomain-")) / "cnn"
        train(TrainConfig(out=str(out), quiet=True, steps=200, eval_every=200, model="cnn",
                          model_options={"width": width}, seed=0))
        checkpoint = str(out / "model.pt")
        print(f"trained {checkpoint}", file=sys.stderr, flush=True)
    return load_checkpoint(checkpoint)


def whole_source(model: Any, batches: list, k: int, trace_products: int) -> dict[str, Any]:
    from flatlab.curvature import HessianOperator, lanczos_top_eigenvalues
    from flatlab.curvature.trace import estimate_trace

    op = HessianOperator(model, batches)
    eig = lanczos_top_eigenvalues(op, k, rtol=1e-3, seed=0)
    trace = estimate_trace(op, trace_products, "hutch++", 0)
    samples = sum(len(y) for _, y in batches)
    return {"products": eig.products + trace.products, "product_samples": (eig.products + trace.products) * samples,
            "top": float(eig.eigenvalues[0]), "trace": trace.trace}


def per_domain(model: Any, domains: dict[str, list], k: int, trace_products: int) -> dict[str, Any]:
    from flatlab.curvature.per_domain import PerDomainCurvatureConfig, per_domain_curvature

    res = per_domain_curvature(model, domains, config=PerDomainCurvatureConfig(k=k, trace_products=trace_products))
    products = res.eigen_products + res.trace_products
    return {"products": int(products.sum()), "product_samples": int((products * res.num_samples).sum()),
            "top": float(res.eigenvalues[:, 0].max()), "trace": float(res.traces.mean())}


def main(argv: list[str] | None = None) -> None:
    from flatlab.curvature.per_domain import domain_batches

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples-per-domain", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--trace-products", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--checkpoint", default=None, help="measure this checkpoint instead of training one")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = digits_cnn(args.width, args.checkpoint)
    model = ckpt.build_model("cpu", effective=True)
    splits = ckpt.splits()
    n = args.samples_per_domain
    domains = domain_batches(splits, batch_size=256, max_samples=n, seed=0)
    target = {splits.dataset.domains[e] for e in splits.test_envs}
    sources = {name: b for name, b in domains.items() if name not in target}
    pooled = [batch for b in sources.values() for batch in b]  # the same samples, pooled
    cases = {
        "whole source (pooled)": lambda: whole_source(model, pooled, args.top_k, args.trace_products),
        f"per domain, {len(sources)} sources": lambda: per_domain(model, sources, args.top_k, args.trace_products),
        f"per domain, {len(sources)} sources + target": lambda: per_domain(model, domains, args.top_k,
                                                                            args.trace_products),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    info: dict[str, dict[str, Any]] = {}
    names = list(cases)
    for name in names:  # warm-up, untimed: the first call pays for one-time set-up (allocator, kernels)
        cases[name]()
    for repeat in range(args.repeats):
        # rotate the order each repeat, so no method always runs first (or last) under a drifting load
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            info[name] = cases[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(f"repeat {repeat + 1}: {name}: {times[name][-1]:.2f} s wall, {cpu[name][-1]:.2f} s CPU, "
                  f"{info[name]['products']} HVPs", file=sys.stderr, flush=True)
    params = sum(p.numel() for p in model.parameters())
    base = statistics.median(times["whole source (pooled)"])
    print(f"digits CNN, {params:,} parameters, {n} samples per domain, top-{args.top_k} (rtol 1e-3) + Hutch++ trace "
          f"({args.trace_products} products), {args.threads} threads, torch {torch.__version__}, "
          f"medians of {args.repeats} interleaved repeats\n")
    base_cpu = statistics.median(cpu["whole source (pooled)"])
    print("| method | samples | HVPs | HVP x samples | wall s (median) | vs whole source | CPU s (median) | "
          "vs whole source | CPU us per HVP-sample | vs whole source |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in cases:
        t, c = statistics.median(times[name]), statistics.median(cpu[name])
        samples = sum(len(y) for _, y in pooled) if name.startswith("whole") else \
            n * (len(sources) + (1 if "target" in name else 0))
        work = info[name]["product_samples"]
        per = c / work
        print(f"| {name} | {samples} | {info[name]['products']} | {work:,} | {t:.2f} | {t / base:.2f}x | {c:.2f} | "
              f"{c / base_cpu:.2f}x | {per * 1e6:.1f} | {per / (base_cpu / info[names[0]]['product_samples']):.2f}x |")
    print(f"\nwhole-source top eigenvalue {info['whole source (pooled)']['top']:.4g}, trace "
          f"{info['whole source (pooled)']['trace']:.4g}; largest per-domain top eigenvalue "
          f"{info[list(cases)[2]]['top']:.4g}")


if __name__ == "__main__":
    main()
