"""Local flatness sampling: antithetic pairs (+Delta, -Delta) vs independent directions at equal cost.

F_gamma = E L(w + Delta) - L(w), Delta uniform on the sphere of radius gamma. Split the loss at
a direction into its even and odd parts, E(Delta) = (L(w + Delta) + L(w - Delta)) / 2 and
O(Delta) = (L(w + Delta) - L(w - Delta)) / 2 (E[E O] = 0 by symmetry). With N loss evaluations:

    independent directions:  Var = (Var E + Var O) / N          (each evaluation is E + O)
    antithetic pairs:        Var = Var E / (N / 2) = 2 Var E / N (the pair mean is E)

so pairs reduce the variance iff Var O > Var E: the odd part (for small gamma the gradient term
g . Delta) must dominate the even part's spread. The script draws M directions, evaluates each
with both signs on the source (training) split and the target domain, and reports per radius
Var E, Var O, the standard error each sampling gives at N = 100 evaluations (the plug-in
formula flatlab reports: sd / sqrt(count)), their ratio, and the two estimates of F_gamma.

Run:  python benchmarks/bench_local_flatness.py [--directions 200] [--radii 0.02,0.05,0.1]
It trains the demo's CNN (width 16, 1,500 ERM steps, lr 2e-3, test domain 0) and the test
suite's (width 8, 400 steps, lr 3e-3) first.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _harness import environment, markdown_table

from flatlab.checkpoint import load_checkpoint
from flatlab.sharpness.perturb import mean_loss, noise_seed, seeded_normal


def _train(out: Path, width: int, steps: int, lr: float) -> Path:
    from flatlab.train import TrainConfig, train

    train(TrainConfig(out=str(out), quiet=True, steps=steps, eval_every=100, model="cnn",
                      model_options={"width": width}, seed=0, hparam_flags={"lr": lr}))
    return out


@torch.no_grad()
def signed_losses(model: torch.nn.Module, batches: list, gammas: list[float], directions: int,
                  seed: int) -> dict[float, np.ndarray]:
    """{gamma: array (directions, 2)} of L(w + gamma d) and L(w - gamma d), d uniform on the unit sphere."""
    params = list(model.parameters())
    base = [p.detach().clone() for p in params]
    out = {g: np.zeros((directions, 2)) for g in gammas}
    for k in range(directions):
        z = seeded_normal(base, noise_seed(seed, "bench-local-flatness", k))
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in z))
        for g in gammas:
            for j, sign in enumerate((1.0, -1.0)):
                for p, b, t in zip(params, base, z):
                    p.copy_(b + (sign * g / norm) * t)
                out[g][k, j] = mean_loss(model, batches, F.cross_entropy)
    for p, b in zip(params, base):
        p.copy_(b)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directions", type=int, default=200)
    parser.add_argument("--radii", default="0.02,0.05,0.1")
    parser.add_argument("--evaluations", type=int, default=100, help="N, the evaluation count compared")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    radii = [float(r) for r in args.radii.split(",")]
    n_eval = args.evaluations
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, width, steps, lr in (("demo CNN (w 16, 1500 steps)", 16, 1500, 2e-3),
                                        ("test CNN (w 8, 400 steps)", 8, 400, 3e-3)):
            ckpt = load_checkpoint(_train(Path(tmp) / f"w{width}", width, steps, lr) / "model.pt")
            torch.manual_seed(0)
            model = ckpt.build_model("cpu", effective=True).eval()
            splits = ckpt.splits()
            wnorm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))
            for split in ("source", "target"):
                batches = splits.split_batches(split, 256, None, 0, torch.device("cpu"))
                base_loss = mean_loss(model, batches, F.cross_entropy)
                losses = signed_losses(model, batches, [r * wnorm for r in radii], args.directions, 0)
                for r in radii:
                    pm = losses[r * wnorm]
                    even, odd = pm.mean(1), (pm[:, 0] - pm[:, 1]) / 2
                    var_e, var_o = float(even.var(ddof=1)), float(odd.var(ddof=1))
                    se_ind = math.sqrt(float(pm[:, 0].var(ddof=1)) / n_eval)
                    se_anti = math.sqrt(var_e / (n_eval / 2))
                    rows.append([label, split, f"{r:g}", f"{float(even.mean()) - base_loss:.4f}",
                                 f"{float(pm[:, 0].mean()) - base_loss:.4f}", f"{var_e:.3g}", f"{var_o:.3g}",
                                 f"{se_ind:.4f}", f"{se_anti:.4f}", f"{se_anti / se_ind:.2f}",
                                 f"{float(np.corrcoef(pm[:, 0], pm[:, 1])[0, 1]):.2f}"])
                    print(" | ".join(rows[-1]), flush=True)
    header = ["model", "split", "radius (x ||w||)", "F (pairs)", "F (+ only)", "Var E", "Var O",
              f"stderr, {n_eval} independent", f"stderr, {n_eval // 2} pairs", "pairs / independent",
              "corr(L+, L-)"]
    print(f"\n{args.directions} directions, both signs, per radius and split; stderr at N = {n_eval} evaluations; "
          f"{environment()}\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
