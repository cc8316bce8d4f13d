"""Curvature benchmark: flatlab's Lanczos vs PyHessian's power iteration, and the cost of one HVP.

For the digits CNN (flatlab's SmallCNN, trained briefly on rotated digits) and a torchvision
ResNet-18 (reduced data: a few digits upsampled to 3x16x16, BatchNorm statistics from a few
training steps), in eval mode and float32, this measures side by side in one run:

* top-1 and top-5 Hessian eigenvalues by flatlab (the default early-stopping Lanczos at rtol 1e-3,
  1e-2 and 1e-1, and ARPACK, scipy eigsh which="LA", tol 1e-4) and by PyHessian 0.1 (power iteration
  with deflation, tol 1e-3): Hessian-vector products used, wall time, and the largest relative
  error against a converged float64 reference (ARPACK, tol 1e-9);
* the time of one full-data HVP by each method (double backward with the cached gradient graph,
  double backward recomputing it, forward-over-reverse) divided by one full-data gradient
  (medians of 9 interleaved rounds).

Prints a markdown table (medians over --repeats seeds) and ratios. Usage::

    python benchmarks/bench_curvature.py [--repeats 3] [--threads 2] [--models cnn,resnet] [--top-k 1,5]
        [--rtol 1e-3,1e-2,1e-1] [--no-hvp-cost]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _harness import environment, interleaved_medians, markdown_table
from torch import nn

from flatlab.curvature import HessianOperator, lanczos_top_eigenvalues
from flatlab.curvature.lanczos import DEFAULT_RTOL
from flatlab.curvature.power_iteration import pyhessian_top_eigenvalues


def digits_cnn_case(quiet: bool = True) -> tuple[str, nn.Module, list]:
    """flatlab's digits CNN (width 16), trained 200 steps; its whole training split."""
    from flatlab.checkpoint import load_checkpoint
    from flatlab.train import TrainConfig, train

    out = Path(tempfile.mkdtemp(prefix="bench-curv-")) / "cnn"
    train(TrainConfig(out=str(out), quiet=quiet, steps=200, eval_every=200, model="cnn", seed=0))
    ckpt = load_checkpoint(out)
    batches = ckpt.splits().split_batches("source", batch_size=256, max_samples=600, seed=0)
    return "digits CNN (600 samples)", ckpt.build_model("cpu"), batches


def resnet18_case(samples: int = 32) -> tuple[str, nn.Module, list]:
    """torchvision ResNet-18 (10 classes) on digits upsampled to 3x16x16; BatchNorm statistics from
    20 SGD steps in train mode; measured in eval mode."""
    import torchvision

    from flatlab.data import DomainSplits, RotatedDigits

    torch.manual_seed(0)
    splits = DomainSplits(RotatedDigits(resolution=16), [0], 0)
    x, y = splits.split_batches("source", batch_size=10**6, max_samples=256, seed=0)[0]
    x = x.repeat(1, 3, 1, 1)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(20):
        idx = torch.arange(step * 64, step * 64 + 64) % len(y)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    return f"ResNet-18 ({samples} samples, 16x16)", model, [(x[:samples], y[:samples])]


COST_ROUNDS = 9


def reference_eigenvalues(model: nn.Module, batches: list, k: int) -> np.ndarray:
    """Converged top-k in float64 (the same weights, cast)."""
    model64 = copy.deepcopy(model).double().eval()
    data64 = [(x.double(), y) for x, y in batches]
    op = HessianOperator(model64, data64)
    result = lanczos_top_eigenvalues(op, k=k, tol=1e-9, ncv=max(2 * k + 1, 20), method="arpack")
    return result.eigenvalues


def relative_error(found: np.ndarray, reference: np.ndarray) -> float:
    found = np.sort(np.asarray(found))[::-1]
    return float(np.max(np.abs(found - reference[: len(found)]) / np.abs(reference[: len(found)])))


PYHESSIAN = "PyHessian (tol 1e-3)"
ROW_HEADER = ["model", "k", "solver", "HVPs", "HVPs PyHessian / HVPs", "time (s)", "speed-up vs PyHessian",
              "rel. error"]
Solver = Callable[[HessianOperator, int, int], object]


def solvers(rtols: tuple[float, ...]) -> dict[str, Solver]:
    """The solvers compared, by label: flatlab's early-stopping Lanczos at each rtol (the first is
    the library default when it is 1e-3), flatlab's ARPACK, PyHessian."""
    out: dict[str, Solver] = {}
    for rtol in rtols:
        label = f"flatlab Lanczos (rtol {rtol:g}{', default' if rtol == DEFAULT_RTOL else ''})"
        out[label] = lambda op, k, seed, rtol=rtol: lanczos_top_eigenvalues(op, k=k, seed=seed, rtol=rtol)
    out["flatlab ARPACK (tol 1e-4)"] = lambda op, k, seed: lanczos_top_eigenvalues(op, k=k, tol=1e-4, seed=seed,
                                                                                   method="arpack")
    out[PYHESSIAN] = lambda op, k, seed: pyhessian_top_eigenvalues(op, k=k, seed=seed, residuals=False)
    return out


def bench_case(name: str, model: nn.Module, batches: list, repeats: int, rows: list, cost_rows: list,
               ks: tuple[int, ...] = (1, 5), hvp_cost: bool = True, rtols: tuple[float, ...] = (1e-3, 1e-2, 1e-1)) -> None:
    print(f"[{name}] reference ...", file=sys.stderr, flush=True)
    ref = reference_eigenvalues(model, batches, 5)
    if hvp_cost:
        # One HVP relative to one gradient over the same data, timed interleaved with it.
        op_grad = HessianOperator(model, batches, graph_cache_bytes=0)
        v = torch.randn(op_grad.dim, generator=torch.Generator().manual_seed(0))
        methods = {"double backward, cached graph (default)": ("double-backward", None),
                   "double backward, recomputed graph": ("double-backward", 0),
                   "forward-over-reverse (torch.func)": ("forward-over-reverse", 0)}
        ops = {label: HessianOperator(model, batches, method=method, graph_cache_bytes=cache)
               for label, (method, cache) in methods.items()}
        # The warm-up call of each HVP also builds the cached graph where there is one.
        hvps: dict[str, Callable[[], object]] = {label: lambda op=op: op.hvp(v) for label, op in ops.items()}
        medians = interleaved_medians({**hvps, "gradient": op_grad.gradient}, COST_ROUNDS)
        t_grad = medians.pop("gradient")
        for label, seconds in medians.items():
            cost_rows.append([name, label, f"{seconds * 1000:.1f}", f"{t_grad * 1000:.1f}", f"{seconds / t_grad:.2f}"])
    solve = solvers(rtols)
    for k in ks:
        stats: dict[str, dict[str, list[float]]] = {s: {"hvps": [], "time": [], "err": []} for s in solve}
        for seed in range(repeats):
            for solver, run in solve.items():
                print(f"[{name}] top-{k} seed {seed} {solver} ...", file=sys.stderr, flush=True)
                op = HessianOperator(model, batches)
                start = time.perf_counter()
                found = run(op, k, seed)
                stats[solver]["time"].append(time.perf_counter() - start)
                stats[solver]["hvps"].append(found.products)
                stats[solver]["err"].append(relative_error(found.eigenvalues, ref))
                print(f"    {found.products} HVPs, {stats[solver]['time'][-1]:.1f} s, "
                      f"rel. error {stats[solver]['err'][-1]:.1e}", file=sys.stderr, flush=True)
        med = {s: {m: statistics.median(v) for m, v in d.items()} for s, d in stats.items()}
        theirs = med[PYHESSIAN]
        for solver in solve:
            ours = med[solver]
            rows.append([name, f"top-{k}", solver, f"{ours['hvps']:.0f}", f"{theirs['hvps'] / ours['hvps']:.1f}x",
                         f"{ours['time']:.2f}", f"{theirs['time'] / ours['time']:.1f}x", f"{ours['err']:.1e}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="seeds per solver (medians are reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resnet-samples", type=int, default=32)
    parser.add_argument("--models", default="cnn,resnet", help="comma-separated subset of cnn,resnet")
    parser.add_argument("--top-k", default="1,5", help="comma-separated k values")
    parser.add_argument("--no-hvp-cost", action="store_true", help="skip the HVP-vs-gradient cost table")
    parser.add_argument("--rtol", default="1e-3,1e-2,1e-1",
                        help="comma-separated stopping rules of the early-stopping Lanczos, one row each")
    args = parser.parse_args(argv)
    rtols = tuple(float(r) for r in args.rtol.split(","))
    ks = tuple(int(k) for k in args.top_k.split(","))
    cases = {"cnn": digits_cnn_case, "resnet": lambda: resnet18_case(args.resnet_samples)}
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows: list[list[str]] = []
    cost_rows: list[list[str]] = []
    for model_name in args.models.split(","):
        name, model, batches = cases[model_name]()
        before = len(rows)
        bench_case(name, model, batches, args.repeats, rows, cost_rows, ks, not args.no_hvp_cost, rtols)
        print(markdown_table(ROW_HEADER, rows[before:]), file=sys.stderr, flush=True)
    print(f"{environment()}, float32; medians over {args.repeats} seeds; "
          f"relative error = max over the k eigenvalues vs a float64 ARPACK reference (tol 1e-9); "
          f"flatlab early-stopping Lanczos (residuals from the Lanczos relation, no extra HVPs), "
          f"flatlab ARPACK tol 1e-4 (residual checks included in its HVPs), PyHessian tol 1e-3, maxIter 100.\n")
    print(markdown_table(ROW_HEADER, rows))
    if cost_rows:
        print()
        print(markdown_table(["model", "HVP method", "one HVP (ms)", "one gradient (ms)", "HVP / gradient"], cost_rows))
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
