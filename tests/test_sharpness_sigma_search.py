"""The fixed-draw sigma search (``fixed_draws=True``, flatlab 0.2's) against an exhaustive
evaluation of the same noise draws. The adaptive search is tested in test_sharpness_precision.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_sharpness_bounds import linear_problem

from flatlab.sharpness import sigma_search
from flatlab.sharpness.perturb import NoiseBank
from flatlab.sharpness.sigma_search import MAGNITUDE_STREAM, PLAIN_STREAM

K = 10


def exhaustive_drops(model, batches, sigmas, seed: int, magnitude_eps: float | None = None) -> np.ndarray:
    """D_K(sigma) on every sigma: K full passes each, with the search's own seeded draws."""
    params = list(model.parameters())
    base = [p.detach().clone() for p in params]
    bank = NoiseBank(base, K, seed, PLAIN_STREAM if magnitude_eps is None else MAGNITUDE_STREAM)
    n = sum(len(y) for _, y in batches)
    with torch.no_grad():
        base_correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
        drops = []
        for sigma in sigmas:
            correct = 0
            for k in range(K):
                for p, w, z in zip(params, base, bank.draw(k)):
                    std = sigma if magnitude_eps is None else torch.sqrt(sigma**2 * w * w + magnitude_eps**2)
                    p.copy_(w + std * z)
                correct += sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
            drops.append((K * base_correct - correct) / (K * n))
        for p, w in zip(params, base):
            p.copy_(w)
    return np.array(drops)


@pytest.mark.parametrize("magnitude_eps", [None, 1e-3])
@pytest.mark.parametrize("seed", [0, 3])
def test_search_answer_matches_the_exhaustive_evaluation(seed, magnitude_eps):
    model, _, _, _, batches = linear_problem(seed=seed)
    target, tol = 0.1, 0.01
    res = sigma_search(model, batches, mc_samples=K, seed=seed, magnitude_eps=magnitude_eps, fixed_draws=True)
    assert res.converged
    # The reported drop is the exact K-sample mean at the returned sigma, within the band.
    (drop_at_answer,) = exhaustive_drops(model, batches, [res.radius], seed, magnitude_eps)
    assert res.drop == pytest.approx(drop_at_answer, abs=1e-12)
    assert abs(drop_at_answer - target) < tol
    # The exhaustive answer on a fine grid: the in-band sigmas form one interval (the drop curve
    # crosses the band once), and the search's sigma lies in it, up to one grid step.
    grid = np.geomspace(res.radius / 3, res.radius * 3, 241)
    drops = exhaustive_drops(model, batches, grid, seed, magnitude_eps)
    band = np.flatnonzero(np.abs(drops - target) < tol)
    assert band.size and np.all(np.diff(band) == 1)
    assert np.all(drops[: band[0]] <= target - tol) and np.all(drops[band[-1] + 1:] >= target + tol)
    step = grid[1] / grid[0]
    assert grid[band[0]] / step <= res.radius <= grid[band[-1]] * step
    # Whatever the early decisions, the answer is the one of the same search evaluated in full.
    full = sigma_search(model, batches, mc_samples=K, seed=seed, magnitude_eps=magnitude_eps, early_stop=False,
                        fixed_draws=True)
    assert full.radius == res.radius and full.drop == res.drop
    assert res.passes < full.passes


def test_wrong_statistical_decisions_are_caught_and_the_answer_stays_exact():
    """With z = 0.05 the early statistical decisions are often wrong; settling the bracket ends
    that decided them must still bring the search to a sigma inside the band."""
    model, _, _, _, batches = linear_problem(seed=1)
    reckless = sigma_search(model, batches, mc_samples=K, seed=2, z_score=0.05, fixed_draws=True)
    exact_only = sigma_search(model, batches, mc_samples=K, seed=2, z_score=math.inf, fixed_draws=True)
    for res in (reckless, exact_only):
        assert res.converged
        (drop,) = exhaustive_drops(model, batches, [res.radius], 2)
        assert res.drop == pytest.approx(drop, abs=1e-12)
        assert abs(drop - 0.1) < 0.01
    assert all(h["exact"] for h in exact_only.history)


@pytest.mark.parametrize("fixed_draws", [True, False])
def test_same_seed_same_search(fixed_draws):
    model, _, _, _, batches = linear_problem(seed=5)
    a = sigma_search(model, batches, mc_samples=6, seed=9, fixed_draws=fixed_draws)
    b = sigma_search(model, batches, mc_samples=6, seed=9, fixed_draws=fixed_draws)
    assert a.as_dict() == b.as_dict()
