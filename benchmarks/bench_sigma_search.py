"""Sigma search precision and cost: flatlab 0.2's fixed-draw search vs the adaptive search, side by side.

For each model, noise kind (plain sigma, magnitude-aware sigma') and seed, one run does

* **fixed draws** (``fixed_draws=True``, the search of flatlab 0.2): K = 10 noise draws per
  probe, each over the whole training set; the answer's K-draw mean drop is within 0.01 of 0.1;
* **adaptive** (the default): draws on slices of 128 examples, added near the answer until the
  drop's standard error is at most 0.005, with a 95% interval on sigma;
* **adaptive, full-pass draws** (``draw_examples=0``): the same search with every draw over the
  whole training set, to show what the slices save;

then re-measures every returned sigma independently: ``--check-draws`` fresh noise draws from
another stream, each over the whole training set (the plain definition of the drop, nothing
shared with the searches but the model and the data). From that drop D_ind it reports
|D_ind - 0.1|, whether it is within the tolerance 0.01 (fixed draws' claim), and the sigma the
re-measurement implies, sigma (0.1 / D_ind)^(1/p) with p the adaptive search's local slope, and
whether that lies inside the adaptive search's interval (its claim).

Cost is counted in passes (one draw over the whole training set = 1 pass; a draw on a slice
counts its share) and in seconds (CPU, the thread count given), methods interleaved per seed.

Run:  python benchmarks/bench_sigma_search.py [--seeds 5] [--check-draws 200] [--threads 1]
It trains two small models first (the test suite's digits CNN, width 8, 400 ERM steps at lr
3e-3, and its MLP, width 8, depth 1 on 8x8 digits).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _harness import environment, markdown_table

from flatlab.checkpoint import load_checkpoint
from flatlab.sharpness import fold_batchnorm, sigma_search
from flatlab.sharpness.perturb import count_correct, noise_seed, seeded_normal

TARGET, TOL = 0.1, 0.01


def _train(out: Path, kind: str) -> Path:
    from flatlab.train import TrainConfig, train

    if kind == "cnn":
        train(TrainConfig(out=str(out), quiet=True, steps=400, eval_every=100, model="cnn",
                          model_options={"width": 8}, seed=0, hparam_flags={"lr": 3e-3}))
    else:
        train(TrainConfig(out=str(out), quiet=True, steps=200, eval_every=100, model="mlp",
                          model_options={"width": 8, "depth": 1}, dataset_options={"resolution": 8}, seed=0))
    return out


@torch.no_grad()
def independent_drop(model: torch.nn.Module, batches: list, sigma: float, eps: float | None, draws: int,
                     seed: int) -> tuple[float, float]:
    """(mean drop, its standard error) from fresh full-pass draws of an unrelated stream."""
    correct0, n = count_correct(model, batches)
    params = list(model.parameters())
    base = [p.detach().clone() for p in params]
    drops = []
    for k in range(draws):
        for p, w, z in zip(params, base, seeded_normal(base, noise_seed(seed, "benchmark-independent", k))):
            std = sigma if eps is None else torch.sqrt(sigma ** 2 * w * w + eps ** 2)
            p.copy_(w + std * z)
        drops.append((correct0 - count_correct(model, batches)[0]) / n)
    for p, w in zip(params, base):
        p.copy_(w)
    mean = sum(drops) / draws
    var = sum((d - mean) ** 2 for d in drops) / (draws - 1)
    return mean, math.sqrt(var / draws)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--check-draws", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods: list[tuple[str, dict[str, Any]]] = [
        ("fixed draws (0.2), K = 10", {"fixed_draws": True}),
        ("adaptive, 128 examples per draw (default)", {}),
        ("adaptive, full-pass draws", {"draw_examples": 0}),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, label in (("cnn", "digits CNN (w 8, 3,738 params)"), ("mlp", "digits MLP (w 8, 602 params)")):
            ckpt = load_checkpoint(_train(Path(tmp) / kind, kind) / "model.pt")
            torch.manual_seed(0)
            model, _ = fold_batchnorm(ckpt.build_model("cpu", effective=True))
            batches = ckpt.splits().split_batches("source", 256, None, 0, torch.device("cpu"))
            n = sum(len(y) for _, y in batches)
            for noise, eps in (("sigma", None), ("sigma'", 1e-3)):
                stats: dict[str, dict[str, list]] = {m: {k: [] for k in ("passes", "seconds", "sigma", "err", "in_tol",
                                                                         "in_ci", "half", "draws", "se")}
                                                     for m, _ in methods}
                for seed in range(args.seeds):
                    results = {}
                    for name, kwargs in methods:
                        t0 = time.perf_counter()
                        res = sigma_search(model, batches, magnitude_eps=eps, seed=seed, **kwargs)
                        results[name] = (res, time.perf_counter() - t0)
                    slope = results[methods[1][0]][0].slope
                    for name, (res, seconds) in results.items():
                        d_ind, _se_ind = independent_drop(model, batches, res.radius, eps, args.check_draws,
                                                          1000 + seed)
                        implied = res.radius * (TARGET / d_ind) ** (1.0 / slope)
                        s = stats[name]
                        s["passes"].append(res.passes)
                        s["seconds"].append(seconds)
                        s["sigma"].append(res.radius)
                        s["err"].append(abs(d_ind - TARGET))
                        s["in_tol"].append(abs(d_ind - TARGET) < TOL)
                        s["in_ci"].append(res.radius_ci_low <= implied <= res.radius_ci_high)
                        s["half"].append((res.radius_ci_high - res.radius_ci_low) / 2 / res.radius)
                        s["draws"].append(res.draws)
                        s["se"].append(res.drop_stderr)
                for name, _ in methods:
                    s = stats[name]
                    med = {k: statistics.median(v) for k, v in s.items() if k not in ("in_tol", "in_ci")}
                    rows.append([label, noise, name, f"{med['passes']:.1f}", f"{med['seconds']:.2f}",
                                 f"{med['draws']:.0f}", f"{med['se']:.4f}", f"{med['err']:.4f}",
                                 f"{sum(s['in_tol'])}/{args.seeds}", f"{sum(s['in_ci'])}/{args.seeds}",
                                 f"{100 * med['half']:.1f}%"])
                base = statistics.median(stats[methods[0][0]]["passes"])
                for name, _ in methods[1:]:
                    ratio = statistics.median(stats[name]["passes"]) / base
                    print(f"{label} {noise}: {name}: {ratio:.1f}x the fixed-draw passes", flush=True)
            print(f"{label}: m = {n}", flush=True)
    header = ["model", "noise", "search", "passes", "seconds", "draws at sigma", "drop stderr",
              "|D_ind - 0.1|", "D_ind within 0.01", "implied sigma in 95% CI", "CI half-width"]
    print(f"\n{args.seeds} seeds, medians; independent check: {args.check_draws} full-pass draws per sigma; "
          f"{environment()}\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
