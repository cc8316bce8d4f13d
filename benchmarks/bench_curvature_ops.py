"""Curvature operators benchmark: one GGN, empirical-Fisher and Hessian product against one
gradient; SLQ, Hutch++ and Hutchinson per product against top-k Lanczos and PyHessian's trace.

Part 1 (``--models cnn,resnet``): for flatlab's digits CNN (width 32, trained 200 steps, 600
training samples in batches of 256, as in bench_curvature.py) and a torchvision ResNet-18 with
random weights (10 classes, ``--resnet-samples`` random 3x``--resolution``^2 images, one batch),
in eval mode and float32, the time of one full-data product of every curvature by each method
divided by one full-data gradient. Every product and the gradient are timed interleaved (each
round runs every one once, so all see the same machine load); medians of ``--rounds`` rounds,
after one warm-up product each (which also builds the caches).

Part 2 (``--no-solvers`` skips it): on the same ResNet-18, the seconds per product of SLQ
(``slq_density``, ``--slq-steps`` steps, one run), Hutch++ and Hutchinson (``--trace-products``
products) against flatlab's top-5 Lanczos (default rtol 1e-3) and PyHessian 0.1's ``trace()``
(its defaults, maxIter 100, tol 1e-3), for the Hessian (and for the GGN, flatlab only: PyHessian
has no GGN). The seconds spent inside flatlab's products are added up in the same run, so the
share of the time that is products is measured whatever the machine load. PyHessian's
``density()`` is called once with 2 Lanczos steps to show that it fails on current PyTorch.

Usage::

    python benchmarks/bench_curvature_ops.py [--threads 1] [--rounds 5] [--models cnn,resnet]
        [--resnet-samples 16] [--resolution 32] [--slq-steps 30] [--trace-products 30] [--no-solvers] [--no-products]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from _harness import environment, interleaved_medians, markdown_table
from torch import nn

from flatlab.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_top_eigenvalues,
    slq_density,
)
from flatlab.curvature.power_iteration import _PyHessianRun, _quiet, pyhessian_trace


def random_resnet18_case(samples: int, resolution: int) -> tuple[str, nn.Module, list]:
    """torchvision ResNet-18, random weights (seed 0), 10 classes, random images, eval mode."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(samples, 3, resolution, resolution)
    y = torch.randint(0, 10, (samples,))
    return f"ResNet-18 random ({samples} x 3x{resolution}x{resolution})", model, [(x, y)]


def product_methods(model: nn.Module, batches: list) -> dict[str, tuple[str, Callable[[torch.Tensor], object]]]:
    """label -> (curvature, one product), every operator built (not yet warmed up)."""
    ops = {
        "double backward, cached graph (default)": HessianOperator(model, batches),
        "double backward, recomputed graph": HessianOperator(model, batches, graph_cache_bytes=0),
        "forward-over-reverse (torch.func)": HessianOperator(model, batches, method="forward-over-reverse"),
        "double-vjp, cached graphs (default)": GGNOperator(model, batches),
        "double-vjp, recomputed graphs": GGNOperator(model, batches, cache_bytes=0),
        "forward-mode (dual numbers)": GGNOperator(model, batches, method="forward-mode"),
        "per-sample gradients cached (default when they fit)": EmpiricalFisherOperator(model, batches),
        "vmap per-sample gradients, recomputed": EmpiricalFisherOperator(model, batches, cache_bytes=0),
    }
    return {label: (op.kind, op.product) for label, op in ops.items()}


COST_HEADER = ["model", "curvature", "method", "one product (ms)", "one gradient (ms)", "product / gradient"]


def bench_products(name: str, model: nn.Module, batches: list, rounds: int, rows: list) -> None:
    gradient_op = HessianOperator(model, batches, graph_cache_bytes=0)
    v = torch.randn(gradient_op.dim, generator=torch.Generator().manual_seed(0))
    methods = product_methods(model, batches)
    products: dict[str, Callable[[], object]] = {
        label: lambda product=product: product(v) for label, (_, product) in methods.items()}
    medians = interleaved_medians({**products, "gradient": gradient_op.gradient}, rounds, progress=name)
    t_grad = medians["gradient"]
    for label, (kind, _) in methods.items():
        seconds = medians[label]
        rows.append([name, kind, label, f"{seconds * 1000:.1f}", f"{t_grad * 1000:.1f}", f"{seconds / t_grad:.2f}"])


def pyhessian_density_failure(op: HessianOperator) -> str:
    """What PyHessian's density() does on this PyTorch (2 Lanczos steps, one run)."""
    try:
        with _quiet():
            run = _PyHessianRun(op.model, op.data, op.loss_fn)
            run.hessian.density(iter=2, n_v=1)
    except Exception as exc:  # the point is to report whatever it raises
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return "ran"


class TimedProducts:
    """Wraps an operator's ``product`` to add up the seconds spent inside products, so the solver's
    own work is total time minus product time, measured in the same run (robust to machine load)."""

    def __init__(self, op: HessianOperator | GGNOperator) -> None:
        self.seconds = 0.0
        inner = op.product

        def product(v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            start = time.perf_counter()
            result = inner(v, out)
            self.seconds += time.perf_counter() - start
            return result

        op.product = product  # type: ignore[method-assign]  # solvers call op.product


def bench_solvers(name: str, model: nn.Module, batches: list, slq_steps: int, trace_products: int,
                  rows: list) -> str:
    kinds = {"hessian": lambda: HessianOperator(model, batches), "ggn": lambda: GGNOperator(model, batches)}
    for kind, build in kinds.items():
        op = build()
        op.product(torch.randn(op.dim, generator=torch.Generator().manual_seed(1)))  # warm-up, builds the cache
        timer = TimedProducts(op)
        runs: dict[str, Callable[[], int]] = {
            "flatlab top-5 Lanczos (rtol 1e-3)": lambda op=op: lanczos_top_eigenvalues(op, k=5).products,
            f"flatlab SLQ ({slq_steps} steps)": lambda op=op: slq_density(op, num_steps=slq_steps).products,
            f"flatlab Hutch++ ({trace_products} products)": lambda op=op: hutchpp_trace(op, trace_products).products,
            f"flatlab Hutchinson ({trace_products} products)":
                lambda op=op: hutchinson_trace(op, trace_products).products,
        }
        if kind == "hessian":
            runs["PyHessian trace() (maxIter 100, tol 1e-3)"] = lambda op=op: pyhessian_trace(op).products
        for label, run in runs.items():
            print(f"[{name}] {kind}: {label} ...", file=sys.stderr, flush=True)
            timer.seconds = 0.0
            start = time.perf_counter()
            products = run()
            seconds = time.perf_counter() - start
            inside = timer.seconds
            own = "-" if label.startswith("PyHessian") else f"{inside / products:.3f}"
            share = "-" if label.startswith("PyHessian") else f"{inside / seconds:.0%}"
            rows.append([name, kind, label, str(products), f"{seconds:.2f}", f"{seconds / products:.3f}", own, share])
            print(f"    {products} products, {seconds:.1f} s", file=sys.stderr, flush=True)
    return pyhessian_density_failure(HessianOperator(model, batches))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians are reported)")
    parser.add_argument("--models", default="cnn,resnet", help="comma-separated subset of cnn,resnet")
    parser.add_argument("--resnet-samples", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32, help="ResNet-18 image side")
    parser.add_argument("--slq-steps", type=int, default=30)
    parser.add_argument("--trace-products", type=int, default=30)
    parser.add_argument("--no-solvers", action="store_true", help="skip part 2 (SLQ, Hutch++ on ResNet-18)")
    parser.add_argument("--no-products", action="store_true", help="skip part 1 (product / gradient costs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cost_rows: list[list[str]] = []
    solver_rows: list[list[str]] = []
    density_note = ""
    resnet = random_resnet18_case(args.resnet_samples, args.resolution)
    for model_name in [] if args.no_products else args.models.split(","):
        if model_name == "cnn":
            from bench_curvature import digits_cnn_case

            case = digits_cnn_case()
        else:
            case = resnet
        bench_products(*case, args.rounds, cost_rows)
        print(markdown_table(COST_HEADER, cost_rows), file=sys.stderr, flush=True)
    if not args.no_solvers:
        density_note = bench_solvers(*resnet, args.slq_steps, args.trace_products, solver_rows)
    print(f"{environment()}, float32, eval mode; medians of {args.rounds} "
          "interleaved rounds.\n")
    print(markdown_table(COST_HEADER, cost_rows))
    if solver_rows:
        print()
        print(markdown_table(["model", "curvature", "solver", "products", "time (s)", "s per product",
                              "s per product inside products", "share of time in products"], solver_rows))
        print(f"\nPyHessian density() (2 Lanczos steps): {density_note}")
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
