"""The noise search of Jiang et al. (2019): the largest sigma whose expected accuracy drop is the target.

For a model with weights w and training accuracy a(w), sigma* solves

    D(sigma) = a(w) - E_{u ~ N(0, sigma^2 I)} [a(w + u)] = d     (d = target drop, default 0.1)

where sigma is the noise **standard deviation** (the widely used reference code passes sigma^2
to ``torch.normal`` as the standard deviation; flatlab does not). The magnitude-aware variant
draws u_i ~ N(0, sigma'^2 w_i^2 + eps^2). The expectation is a Monte Carlo mean over K weight
samples; the search is a bisection on [0, sigma_max] that stops once |D - d| < tol.

Two savings over the reference procedure (fresh noise at every step, K full passes per step,
up to depth x K = 150 passes), neither of which changes what the estimator means:

* **Common random numbers.** The K draws z_1..z_K ~ N(0, I) are fixed once (seeded) and
  reused at every step, u_k = sigma z_k (or sigma-dependent magnitude scaling of z_k). D(sigma)
  is then one fixed, nearly monotone function of sigma, so the bisection does not chase Monte
  Carlo noise from step to step.
* **Deciding early.** A step only needs to know whether D is above d + tol, below d - tol or
  within. After evaluating part of the data for some of the samples, the number of correct
  predictions still to come is bounded (0 .. samples left), which brackets the K-sample mean:

      D in [a - (C + R) / (m K), a - C / (m K)],  C = correct so far, R = predictions still to come.

  The step ends as soon as that bracket lies entirely on one side (or inside the tolerance
  band). The decision is the one the full evaluation would make, exactly; only the passes differ.

A "pass" is one weight sample evaluated over the whole data; a partial pass counts as its
fraction of the samples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from flatlab.errors import FlatlabError
from flatlab.sharpness.perturb import Batch, NoiseBank, check_batches, count_correct, num_classes_of

ABOVE, BELOW, WITHIN = "above", "below", "within"

SIGMA_IS_STD_NOTE = ("sigma is the standard deviation of the Gaussian weight noise (the common reference "
                     "code passes sigma^2 to torch.normal as the standard deviation; flatlab does not)")


def check_target_drop(target_drop: float, tolerance: float) -> None:
    """FlatlabError unless 0 < target_drop < 1 and 0 < tolerance < target_drop."""
    if not (isinstance(target_drop, (int, float)) and 0.0 < float(target_drop) < 1.0):
        raise FlatlabError(f"the target accuracy drop must lie in (0, 1), got {target_drop} (e.g. --target-drop 0.1)")
    if not 0.0 < float(tolerance) < float(target_drop):
        raise FlatlabError(f"the drop tolerance must lie in (0, target drop = {target_drop}), got {tolerance}")


def check_room_for_drop(base_accuracy: float, num_classes: int, target_drop: float) -> None:
    """FlatlabError if the accuracy cannot fall by ``target_drop`` before reaching chance."""
    chance = 1.0 / num_classes
    if base_accuracy - chance < target_drop:
        raise FlatlabError(
            f"the training accuracy {base_accuracy:.4f} is within {target_drop} of chance ({chance:.4f} for "
            f"{num_classes} classes): noise cannot lower it by the target drop; train the model further or "
            f"pass a smaller --target-drop"
        )


@dataclass
class Probe:
    """One step of a search: the decision at a radius and the bracket on the mean drop."""

    radius: float
    decision: str | None = None
    drop_low: float = -math.inf
    drop_high: float = math.inf
    passes: float = 0.0
    complete: bool = False
    sample_drops: list[float] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    remaining: list[int] = field(default_factory=list)
    next_sample: int = 0
    next_batch: int = 0
    extra: Any = None

    @property
    def drop(self) -> float:
        """The K-sample mean drop if fully evaluated, else the middle of the bracket."""
        if self.complete:
            return float(sum(self.sample_drops) / len(self.sample_drops))
        return 0.5 * (self.drop_low + self.drop_high)

    @property
    def drop_stderr(self) -> float:
        """Monte Carlo standard error of the mean drop (NaN unless complete with K >= 2)."""
        k = len(self.sample_drops)
        if not self.complete or k < 2:
            return float("nan")
        mean = sum(self.sample_drops) / k
        var = sum((d - mean) ** 2 for d in self.sample_drops) / (k - 1)
        return math.sqrt(var / k)


class DropTest:
    """Evaluates the mean accuracy drop of K perturbed models sample by sample, batch by batch,
    and stops as soon as the bracket on the mean decides ABOVE / BELOW / WITHIN.

    Args:
        model: the model whose parameters ``apply_sample(k)`` overwrites.
        batches: the data, (x, y) pairs on the model's device.
        base_correct: correct predictions of the unperturbed model on ``batches``.
        target_drop, tolerance: WITHIN means |D - target| < tolerance.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch], base_correct: int, target_drop: float,
                 tolerance: float) -> None:
        self.model = model
        self.batches = list(batches)
        self.n = check_batches(self.batches)
        self.base_correct = int(base_correct)
        self.target = float(target_drop)
        self.tol = float(tolerance)

    def _bracket(self, correct: list[int], remaining: list[int]) -> tuple[float, float]:
        k = len(correct)
        total = self.n * k
        base = self.base_correct / self.n
        return base - (sum(correct) + sum(remaining)) / total, base - sum(correct) / total

    def decide(self, low: float, high: float) -> str | None:
        if low >= self.target + self.tol:
            return ABOVE
        if high <= self.target - self.tol:
            return BELOW
        if low > self.target - self.tol and high < self.target + self.tol:
            return WITHIN
        return None

    def start(self, radius: float, count: int) -> Probe:
        """A fresh, unevaluated probe of ``count`` samples at ``radius``."""
        return Probe(radius, correct=[0] * count, remaining=[self.n] * count)

    @torch.no_grad()
    def run(self, probe: Probe, apply_sample: Callable[[int], None], finish: bool = False,
            early_stop: bool = True) -> Probe:
        """Continue evaluating ``probe``; stop once decided (unless ``finish`` or not ``early_stop``).

        A probe stopped early can be run again with ``finish=True``: it resumes where it stopped.
        """
        correct, remaining = probe.correct, probe.remaining
        seen = 0
        stop = False
        while probe.next_sample < len(correct) and not stop:
            k = probe.next_sample
            apply_sample(k)
            while probe.next_batch < len(self.batches):
                x, y = self.batches[probe.next_batch]
                correct[k] += int((self.model(x).argmax(1) == y).sum())
                remaining[k] -= len(y)
                seen += len(y)
                probe.next_batch += 1
                if probe.decision is None:
                    probe.decision = self.decide(*self._bracket(correct, remaining))
                if early_stop and not finish and probe.decision is not None:
                    stop = True
                    break
            if probe.next_batch == len(self.batches):
                probe.next_sample += 1
                probe.next_batch = 0
        probe.drop_low, probe.drop_high = self._bracket(correct, remaining)
        probe.passes += seen / self.n
        probe.complete = all(r == 0 for r in remaining)
        if probe.complete:
            probe.sample_drops = [(self.base_correct - c) / self.n for c in correct]
        return probe


@dataclass
class SearchResult:
    """Outcome of a radius search (sigma for noise, alpha for the worst case)."""

    radius: float
    drop: float
    drop_stderr: float
    drop_low: float
    drop_high: float
    base_accuracy: float
    target_drop: float
    tolerance: float
    converged: bool
    passes: float
    steps: int
    depth: int
    radius_max: float
    samples: int
    num_classes: int
    n: int
    history: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bisect_radius(start_probe: Callable[[float], Probe], run_probe: Callable[[Probe, bool], Probe],
                  radius_max: float, depth: int) -> tuple[Probe, bool, list[Probe]]:
    """Bisection on [0, radius_max] for the radius where the drop enters the tolerance band.

    ``start_probe(radius)`` makes a probe, ``run_probe(probe, finish)`` evaluates it until it is
    decided (or in full). Returns (last probe, converged, all probes). The last probe is
    finished, so its drop is the full K-sample mean and its standard error is known.
    """
    if depth < 1:
        raise FlatlabError(f"the bisection depth must be at least 1, got {depth}")
    if not radius_max > 0:
        raise FlatlabError(f"the search range must be positive, got {radius_max}")
    lower, upper = 0.0, float(radius_max)
    history: list[Probe] = []
    probe: Probe | None = None
    converged = False
    for step in range(depth):
        radius = 0.5 * (lower + upper)
        last_step = step == depth - 1
        probe = run_probe(start_probe(radius), last_step)
        history.append(probe)
        if probe.decision == WITHIN:
            converged = True
            break
        if probe.decision == ABOVE:
            upper = radius
        else:
            lower = radius
    assert probe is not None
    if not probe.complete:
        probe = run_probe(probe, True)
    return probe, converged, history


def sigma_search(model: nn.Module, batches: Sequence[Batch], *, target_drop: float = 0.1, tolerance: float = 0.01,
                 mc_samples: int = 10, depth: int = 15, sigma_max: float = 2.0, magnitude_eps: float | None = None,
                 seed: int = 0, early_stop: bool = True, stream: str = "sigma-search") -> SearchResult:
    """The largest noise standard deviation sigma with mean training-accuracy drop = ``target_drop``.

    Noise goes on every parameter: u_i = sigma z_i (plain) or u_i = sqrt(sigma^2 w_i^2 + eps^2) z_i
    (magnitude-aware, ``magnitude_eps`` = eps), with z ~ N(0, I) fixed per Monte Carlo sample.

    Args:
        model: any classifier (argmax of the logits is the prediction); it is not modified.
        batches: training data, (x, y) on the model's device.
        target_drop: d in (0, 1).
        tolerance: stop once |D(sigma) - d| < tolerance.
        mc_samples: K weight samples per sigma.
        depth: maximum bisection steps.
        sigma_max: right end of the initial bracket [0, sigma_max].
        magnitude_eps: None for plain noise, eps for the magnitude-aware noise.
        seed: seeds the K noise draws.
        early_stop: decide each step as soon as the bracket allows (False: K full passes per step).

    Returns:
        A :class:`SearchResult` whose ``radius`` is sigma (or sigma').

    Raises:
        FlatlabError: target outside (0, 1); accuracy already within the target of chance.
    """
    check_target_drop(target_drop, tolerance)
    if mc_samples < 1:
        raise FlatlabError(f"the number of Monte Carlo samples must be at least 1, got {mc_samples}")
    work = copy.deepcopy(model).eval()
    n = check_batches(batches)
    num_classes = num_classes_of(work, batches)
    base_correct, _ = count_correct(work, batches)
    check_room_for_drop(base_correct / n, num_classes, target_drop)

    params = [p for p in work.parameters()]
    base = [p.detach().clone() for p in params]
    noise = NoiseBank(base, mc_samples, seed, stream)
    test = DropTest(work, batches, base_correct, target_drop, tolerance)

    def run_probe(probe: Probe, finish: bool) -> Probe:
        radius = probe.radius

        @torch.no_grad()
        def apply(k: int) -> None:
            for p, w, z in zip(params, base, noise.draw(k)):
                if magnitude_eps is None:
                    p.copy_(w + radius * z)
                else:
                    p.copy_(w + torch.sqrt(radius ** 2 * w * w + magnitude_eps ** 2) * z)

        return test.run(probe, apply, finish=finish, early_stop=early_stop)

    probe, converged, history = bisect_radius(lambda r: test.start(r, mc_samples), run_probe, sigma_max, depth)
    return SearchResult(
        radius=probe.radius, drop=probe.drop, drop_stderr=probe.drop_stderr, drop_low=probe.drop_low,
        drop_high=probe.drop_high, base_accuracy=base_correct / n, target_drop=float(target_drop),
        tolerance=float(tolerance), converged=converged, passes=float(sum(p.passes for p in history)),
        steps=len(history), depth=int(depth), radius_max=float(sigma_max), samples=int(mc_samples),
        num_classes=num_classes, n=n,
        history=[{"radius": p.radius, "decision": p.decision, "drop_low": p.drop_low, "drop_high": p.drop_high,
                  "passes": p.passes} for p in history],
    )


__all__ = [
    "ABOVE",
    "BELOW",
    "SIGMA_IS_STD_NOTE",
    "WITHIN",
    "DropTest",
    "Probe",
    "SearchResult",
    "bisect_radius",
    "check_room_for_drop",
    "check_target_drop",
    "sigma_search",
]
