"""Sigma search: flatlab's fixed-draw search (common random numbers, interpolated probes, early decisions) vs the reference.

This measures ``sigma_search(..., fixed_draws=True)``, the search of flatlab 0.2 (K draws, each
over the whole data). The default adaptive search (draws until the drop's standard error is at
most tolerance / 2, with an interval on sigma) is measured in bench_sigma_search.py.

The reference procedure (Jiang et al. 2019's public code, re-implemented plainly here): bisection
on [0, 2], depth 15, 10 Monte Carlo samples per step, fresh noise at every step, each sample a
full pass over the training set, stop once |drop - 0.1| < 0.01. flatlab's search uses the same
bracket [0, 2], at most 15 probes, the same K and tolerance, and returns a sigma whose exact
K-sample mean drop over the whole training set is within the tolerance. Both use sigma as the
standard deviation (the reference code passes sigma^2; that changes the number found, not the work).
"CRN, full passes" is flatlab's search with every probe evaluated in full (early_stop=False):
the same probes and answer, so the gap to "flatlab passes" is what the early decisions save.

Run:  python benchmarks/bench_bounds.py [--checkpoint RUN_OR_PT] [--seeds 5]
Without --checkpoint it trains the digits CNN of the test suite (width 8, 400 steps) first.
Prints a markdown table: median passes and wall time over seeds, and flatlab / reference ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _harness import environment, markdown_table

from flatlab.checkpoint import load_checkpoint
from flatlab.sharpness import fold_batchnorm, sigma_search
from flatlab.sharpness.perturb import count_correct


def reference_sigma_search(model, batches, seed, magnitude_eps=None, depth=15, mc_samples=10, target=0.1, tol=0.01):
    """The reference procedure: fresh noise per step and sample, K full passes per step."""
    correct, n = count_correct(model, batches)
    base = correct / n
    lower, upper = 0.0, 2.0
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(10348628753 + seed)
    passes, sigma, converged = 0, 1.0, False
    for _ in range(depth):
        sigma = (lower + upper) / 2
        accuracies = []
        for _ in range(mc_samples):
            noisy = copy.deepcopy(model)
            with torch.no_grad():
                for p in noisy.parameters():
                    std = sigma if magnitude_eps is None else torch.sqrt(sigma**2 * p**2 + magnitude_eps**2)
                    p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * std)
            accuracies.append(count_correct(noisy, batches)[0] / n)
            passes += 1
        drop = abs(float(np.mean(accuracies)) - base)
        if abs(drop - target) < tol:
            converged = True
            break
        if drop > target:
            upper = sigma
        else:
            lower = sigma
    return sigma, passes, converged


def _train_default(out: Path) -> Path:
    from flatlab.train import TrainConfig, train

    train(TrainConfig(out=str(out), quiet=True, steps=400, eval_every=100, model="cnn", model_options={"width": 8},
                      seed=0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or _train_default(Path(tmp) / "erm-cnn")
        ckpt = load_checkpoint(path)
        model, _ = fold_batchnorm(ckpt.build_model(args.device, effective=True))
        batches = ckpt.splits().split_batches("source", args.batch_size, device=args.device)
    rows = []
    for label, eps in (("plain sigma", None), ("magnitude sigma'", 1e-3)):
        stats: dict[str, list] = {k: [] for k in ("ref_p", "ref_t", "ref_c", "ref_s", "crn_p", "crn_t", "fl_p", "fl_t",
                                                  "fl_c", "fl_s")}
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            s, p, c = reference_sigma_search(model, batches, seed, eps)
            stats["ref_t"].append(time.perf_counter() - t0)
            stats["ref_p"].append(p)
            stats["ref_c"].append(c)
            stats["ref_s"].append(s)
            t0 = time.perf_counter()
            full = sigma_search(model, batches, magnitude_eps=eps, seed=seed, early_stop=False, fixed_draws=True)
            stats["crn_t"].append(time.perf_counter() - t0)
            stats["crn_p"].append(full.passes)
            t0 = time.perf_counter()
            res = sigma_search(model, batches, magnitude_eps=eps, seed=seed, fixed_draws=True)
            stats["fl_t"].append(time.perf_counter() - t0)
            stats["fl_p"].append(res.passes)
            stats["fl_c"].append(res.converged)
            stats["fl_s"].append(res.radius)
            assert res.radius == full.radius  # early decisions change the passes, not the answer
            assert abs(res.drop - 0.1) < 0.01 or not res.converged
        med = {k: statistics.median(v) for k, v in stats.items() if k[-1] in "pts"}
        rows.append([label, f"{med['ref_p']:.0f}", f"{med['ref_t']:.1f}", f"{sum(stats['ref_c'])}/{args.seeds}",
                     f"{med['crn_p']:.0f}", f"{med['fl_p']:.1f}", f"{med['fl_t']:.1f}",
                     f"{sum(stats['fl_c'])}/{args.seeds}", f"{med['fl_p'] / med['ref_p']:.2f}",
                     f"{med['fl_t'] / med['ref_t']:.2f}", f"{med['ref_s']:.4g} / {med['fl_s']:.4g}"])
    header = ["search", "reference passes", "reference s", "ref converged", "CRN, full passes", "flatlab passes",
              "flatlab s", "flatlab converged", "passes ratio", "time ratio", "median sigma ref / flatlab"]
    print(f"digits CNN (width 8), m = {sum(len(y) for _, y in batches)}, K = 10, depth 15, tol 0.01, "
          f"{args.seeds} seeds, medians; {environment(args.device)}\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
