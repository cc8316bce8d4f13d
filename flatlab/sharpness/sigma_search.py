"""The noise search of Jiang et al. (2019): the largest sigma whose expected accuracy drop is the target.

For a model with weights w and training accuracy a(w), sigma* solves

    D(sigma) = a(w) - E_{u ~ N(0, sigma^2 I)} [a(w + u)] = d     (d = target drop, default 0.1)

where sigma is the noise **standard deviation** (the widely used reference code passes sigma^2
to ``torch.normal`` as the standard deviation; flatlab does not). The magnitude-aware variant
draws u_i ~ N(0, sigma'^2 w_i^2 + eps^2). The expectation is a Monte Carlo mean over K weight
samples, D_K(sigma); the search returns a sigma with |D_K(sigma) - d| < tol, evaluated on the
K samples over the whole data (``converged``), within the bracket [0, sigma_max].

The reference procedure bisects [0, sigma_max] with fresh noise at every step and K full passes
per step (up to depth x K = 150 passes). flatlab finds a sigma of the same definition with far
fewer passes:

* **Common random numbers.** The K draws z_1..z_K ~ N(0, I) are fixed once (seeded) and
  reused at every step, u_k = sigma z_k (or sigma-dependent magnitude scaling of z_k). D_K is
  then one fixed, smooth, nearly monotone function of sigma, close to a power law
  D_K ~ c sigma^p below saturation, so its root can be interpolated.
* **Interpolated probes.** Probes are placed by a safeguarded root finder on log D_K against
  log sigma (regula falsi on the bracket [largest sigma below, smallest sigma above], Brent-style
  fallback to the geometric midpoint when the bracket does not halve in two steps; log-log
  extrapolation with a clamped step while only one side is known). A probe near the answer
  usually lands in the band at once; the bisection needs 2-4 near-answer steps.
* **Deciding early, chunk by chunk.** A probe evaluates all K samples on one chunk of the data
  (chunks visited in a seeded random order) before the next chunk, so a partial probe already
  estimates the K-sample mean. It stops as soon as either
  - the exact bounds on the mean decide (the predictions still to come are 0 .. all correct):

        D_K in [a - (C + R) / (m K), a - C / (m K)],  C = correct so far, R = still to come;

  - or the chunks seen put the mean outside the band with z = 3 standard errors to spare
    (per-example mean drops over the chunks seen, finite-population corrected):
    |mean - d| >= tol + z SE. Such a statistical decision only steers where the next probe
    goes; if the bracket closes on a statistically decided end, that probe is resumed to the
    end and re-decided exactly.

  A probe whose estimate stays near the band is evaluated in full, so the returned sigma's
  drop is always the exact K-sample mean over the whole data, never an estimate.

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
from flatlab.sharpness.perturb import (
    Batch,
    NoiseBank,
    check_batches,
    noise_seed,
    num_classes_of,
)

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


@dataclass
class NoiseProbe(Probe):
    """A probe of the interpolating sigma search, evaluated chunk-major.

    ``decision`` is what the search acts on: ``exact`` says it is certain (bounds, or the whole
    data evaluated), ``statistical`` that it came from the z test on the chunks seen so far.
    ``estimate`` is the drop the search interpolates with: the mean drop over the (chunk, sample)
    units evaluated when the probe was decided (the exact K-sample mean once complete).
    """

    unit: int = 0
    exact: bool = False
    statistical: bool = False
    estimate: float = math.nan
    seen_drop: int = 0
    seen_predictions: int = 0
    chunk_examples: int = 0
    chunk_drop_sum: float = 0.0
    chunk_drop_sumsq: float = 0.0


class ChunkedDropTest:
    """Evaluates the K-sample mean accuracy drop chunk by chunk: all K samples on one chunk of the
    data, then the next chunk (chunks in a seeded random order), stopping once the mean is decided.

    The data are cut into chunks of about ``max(chunk_examples, n / max_chunks)`` examples (batches
    larger than that are split into views, smaller ones grouped), so a probe can stop after a
    small fraction of a pass and its partial mean is an estimate of the K-sample mean over all
    the data. Exact decisions use the bounds of :class:`DropTest`; statistical ones (only after
    a whole chunk, and only with ``z_score`` finite) need |mean - d| >= tol + z_score * SE, SE the
    finite-population standard error of the per-example mean drops seen.

    Args:
        model: the model whose parameters ``apply_sample(k)`` overwrites; unperturbed when this is built.
        batches: the data, (x, y) pairs on the model's device.
        target_drop, tolerance: WITHIN means |D - target| < tolerance.
        samples: K, the number of weight samples per probe.
        seed, stream: seed the order in which chunks are visited.
        z_score: standard errors of margin for a statistical decision (``math.inf``: exact only).
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch], target_drop: float, tolerance: float,
                 samples: int, seed: int, stream: str, z_score: float = 3.0, chunk_examples: int = 32,
                 max_chunks: int = 32, min_examples: int = 20) -> None:
        self.model = model
        self.n = check_batches(batches)
        self.samples = int(samples)
        self.target = float(target_drop)
        self.tol = float(tolerance)
        self.z = float(z_score)
        self.min_examples = int(min_examples)
        size = max(int(chunk_examples), math.ceil(self.n / max_chunks))
        pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for x, y in batches:
                parts = math.ceil(len(y) / size)
                for xs, ys in zip(torch.tensor_split(x, parts), torch.tensor_split(y, parts)):
                    if len(ys):
                        pieces.append((xs, ys, model(xs).argmax(1) == ys))
        chunks: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
        current: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        count = 0
        for piece in pieces:
            current.append(piece)
            count += len(piece[1])
            if count >= 0.75 * size:
                chunks.append(current)
                current, count = [], 0
        if current:
            if chunks and count < 0.5 * size:
                chunks[-1].extend(current)
            else:
                chunks.append(current)
        self.chunks = chunks
        self.chunk_sizes = [sum(len(p[1]) for p in chunk) for chunk in chunks]
        self.chunk_base = [sum(int(p[2].sum()) for p in chunk) for chunk in chunks]
        self.base_correct = sum(self.chunk_base)
        gen = torch.Generator().manual_seed(noise_seed(seed, stream + "/chunk-order", 0))
        self.order = torch.randperm(len(chunks), generator=gen).tolist()

    def start(self, radius: float) -> NoiseProbe:
        """A fresh, unevaluated probe at ``radius``."""
        return NoiseProbe(radius, correct=[0] * self.samples, remaining=[self.n] * self.samples)

    def bracket(self, probe: Probe) -> tuple[float, float]:
        """Exact bounds on the K-sample mean drop given the predictions evaluated so far."""
        total = self.n * len(probe.correct)
        base = self.base_correct / self.n
        return base - (sum(probe.correct) + sum(probe.remaining)) / total, base - sum(probe.correct) / total

    #: ABOVE / BELOW / WITHIN if the drop bracket [low, high] decides, else None (as DropTest).
    decide = DropTest.decide

    def _statistical(self, probe: NoiseProbe) -> str | None:
        seen = probe.chunk_examples
        if not math.isfinite(self.z) or seen < self.min_examples or seen >= self.n:
            return None
        mean = probe.chunk_drop_sum / seen
        # The variance floor (one example flipping in every sample) keeps a clean first chunk from
        # looking certain.
        var = max((probe.chunk_drop_sumsq - seen * mean * mean) / (seen - 1), 1.0 / seen)
        se = math.sqrt(var / seen * (1.0 - seen / self.n))
        if mean - self.target >= self.tol + self.z * se:
            return ABOVE
        if self.target - mean >= self.tol + self.z * se:
            return BELOW
        return None

    @torch.no_grad()
    def run(self, probe: NoiseProbe, apply_sample: Callable[[int], None], full: bool = False) -> NoiseProbe:
        """Continue evaluating ``probe`` until it is decided (or, with ``full``, to the end).

        The first decision is kept (``full`` only spends the remaining passes); a probe stopped
        early resumes where it stopped.
        """
        k_total = self.samples
        units = len(self.chunks) * k_total
        while probe.unit < units and (full or probe.decision is None):
            position, k = divmod(probe.unit, k_total)
            j = self.order[position]
            chunk = self.chunks[j]
            if k == 0:
                probe.extra = [torch.zeros(len(y), dtype=torch.int32, device=y.device) for _, y, _ in chunk]
            apply_sample(k)
            correct = 0
            for counts, (x, y, _) in zip(probe.extra, chunk):
                hit = self.model(x).argmax(1) == y
                counts += hit.to(torch.int32)
                correct += int(hit.sum())
            size = self.chunk_sizes[j]
            probe.correct[k] += correct
            probe.remaining[k] -= size
            probe.seen_drop += self.chunk_base[j] - correct
            probe.seen_predictions += size
            probe.passes += size / self.n
            probe.unit += 1
            chunk_done = k == k_total - 1
            if chunk_done:
                for counts, (_, _, base) in zip(probe.extra, chunk):
                    drops = base.double() - counts.double() / k_total
                    probe.chunk_drop_sum += float(drops.sum())
                    probe.chunk_drop_sumsq += float((drops * drops).sum())
                probe.chunk_examples += size
                probe.extra = None
            if probe.decision is None:
                decision = self.decide(*self.bracket(probe))
                if decision is not None:
                    probe.decision, probe.exact = decision, True
                elif chunk_done:
                    decision = self._statistical(probe)
                    if decision is not None:
                        probe.decision, probe.statistical = decision, True
                if probe.decision is not None:
                    probe.estimate = probe.seen_drop / probe.seen_predictions
        probe.drop_low, probe.drop_high = self.bracket(probe)
        probe.complete = probe.unit == units
        if probe.complete:
            probe.sample_drops = [(self.base_correct - c) / self.n for c in probe.correct]
        return probe

    def settle(self, probe: NoiseProbe, apply_sample: Callable[[int], None]) -> NoiseProbe:
        """Evaluate ``probe`` to the end and replace its decision by the exact one."""
        probe = self.run(probe, apply_sample, full=True)
        probe.decision = self.decide(probe.drop_low, probe.drop_high)
        probe.exact, probe.statistical = True, False
        probe.estimate = probe.drop
        return probe


def _bracket_probes(probes: Sequence[NoiseProbe]) -> tuple[NoiseProbe | None, NoiseProbe | None]:
    """(largest probe decided BELOW, smallest probe decided ABOVE beyond it): a sign-change bracket."""
    below = [p for p in probes if p.decision == BELOW]
    low = max(below, key=lambda p: p.radius) if below else None
    floor = low.radius if low is not None else 0.0
    above = [p for p in probes if p.decision == ABOVE and p.radius > floor]
    high = min(above, key=lambda p: p.radius) if above else None
    return low, high


def _log_slope(a: NoiseProbe, b: NoiseProbe | None, floor: float, default: float = 1.0) -> float:
    """d log D / d log sigma between two probes, clamped to [1, 6] (``default`` without a pair)."""
    if b is None or a.radius == b.radius:
        return default
    slope = (math.log(max(a.estimate, floor)) - math.log(max(b.estimate, floor))) / (math.log(a.radius)
                                                                                      - math.log(b.radius))
    return min(max(slope, 1.0), 6.0)


def next_radius(probes: Sequence[NoiseProbe], target: float, radius_max: float, widths: list[float],
                initial_radius: float | None = None) -> float:
    """Where the interpolating search probes next (see the module docstring).

    ``widths`` collects the log-widths of the two-sided brackets seen so far (for the Brent-style
    fallback to the geometric midpoint); it is appended to.
    """
    if not probes:
        if initial_radius is not None and 0.0 < initial_radius < radius_max:
            return float(initial_radius)
        return 0.5 * radius_max
    floor = target / 20.0
    low, high = _bracket_probes(probes)
    log_target = math.log(target)

    def log_drop(p: NoiseProbe) -> float:
        return math.log(max(p.estimate, floor))

    if low is None:
        # Only probes above the band: step down along a power law through the nearest two.
        assert high is not None
        beyond = [p for p in probes if p.decision == ABOVE and p.radius > high.radius]
        slope = _log_slope(high, min(beyond, key=lambda p: p.radius) if beyond else None, floor)
        step = min(max((log_drop(high) - log_target) / slope, math.log(1.2)), math.log(16.0))
        return high.radius * math.exp(-step)
    if high is None:
        # Only probes below the band (and the unevaluated sigma_max above): step up, at most halfway.
        under = [p for p in probes if p.decision == BELOW and p.radius < low.radius]
        slope = _log_slope(low, max(under, key=lambda p: p.radius) if under else None, floor)
        step = min(max((log_target - log_drop(low)) / slope, math.log(1.2)), math.log(16.0))
        return min(low.radius * math.exp(step), 0.5 * (low.radius + radius_max))
    x_low, x_high = math.log(low.radius), math.log(high.radius)
    width = x_high - x_low
    widths.append(width)
    middle = 0.5 * (x_low + x_high)
    if len(widths) >= 3 and width > 0.5 * widths[-3]:
        return math.exp(middle)  # interpolation stalls: bisect (in log sigma)
    y_low, y_high = log_drop(low), log_drop(high)
    # Illinois: after c >= 2 probes in a row on the same side, the kept end's gap to the target is
    # divided by 2^(c-1), so a curved drop curve cannot pin regula falsi to one end.
    run = 0
    while run < len(probes) and probes[-1 - run].decision == probes[-1].decision:
        run += 1
    if run >= 2 and probes[-1].decision == ABOVE:
        y_low = log_target - (log_target - y_low) / 2.0 ** (run - 1)
    elif run >= 2 and probes[-1].decision == BELOW:
        y_high = log_target + (y_high - log_target) / 2.0 ** (run - 1)
    x = x_low + (log_target - y_low) * width / (y_high - y_low) if y_high > y_low else middle
    return math.exp(min(max(x, x_low + 0.05 * width), x_high - 0.05 * width))


def interpolate_radius(evaluate: Callable[[float], NoiseProbe], settle: Callable[[NoiseProbe], NoiseProbe],
                       target: float, radius_max: float, depth: int, initial_radius: float | None = None,
                       ) -> tuple[NoiseProbe, bool, list[NoiseProbe]]:
    """The safeguarded interpolating search for the radius where the drop enters the tolerance band.

    ``evaluate(radius)`` returns a decided probe, ``settle(probe)`` evaluates it to the end and
    decides it exactly. At most ``depth`` probes are placed; the bracket also counts as closed
    once narrower than ``radius_max / 2^depth`` (the bisection's resolution). A bracket end
    decided statistically is settled before the search gives up on it.

    Returns:
        (answer, converged, probes): the answer is complete (its drop the exact K-sample mean);
        converged iff it lies within the band.
    """
    if depth < 1:
        raise FlatlabError(f"the search depth must be at least 1, got {depth}")
    if not radius_max > 0:
        raise FlatlabError(f"the search range must be positive, got {radius_max}")
    resolution = radius_max * 2.0 ** -depth
    probes: list[NoiseProbe] = []
    widths: list[float] = []
    answer: NoiseProbe | None = None
    while answer is None:
        low, high = _bracket_probes(probes)
        lower = low.radius if low is not None else 0.0
        upper = high.radius if high is not None else radius_max
        if len(probes) >= depth or (probes and upper - lower <= resolution):
            pending = [p for p in (low, high) if p is not None and p.statistical]
            if not pending:
                break
            if settle(pending[0]).decision == WITHIN:
                answer = pending[0]
            continue
        probe = evaluate(next_radius(probes, target, radius_max, widths, initial_radius))
        probes.append(probe)
        if probe.decision == WITHIN:
            answer = probe
    if answer is not None:
        return (answer if answer.complete else settle(answer)), True, probes
    low, high = _bracket_probes(probes)
    ends = [p for p in (low, high) if p is not None] or probes
    answer = settle(min(ends, key=lambda p: abs(p.estimate - target)))
    return answer, answer.decision == WITHIN, probes


def sigma_search(model: nn.Module, batches: Sequence[Batch], *, target_drop: float = 0.1, tolerance: float = 0.01,
                 mc_samples: int = 10, depth: int = 15, sigma_max: float = 2.0, magnitude_eps: float | None = None,
                 seed: int = 0, early_stop: bool = True, z_score: float = 3.0, initial_sigma: float | None = None,
                 stream: str = "sigma-search") -> SearchResult:
    """The largest noise standard deviation sigma with mean training-accuracy drop = ``target_drop``.

    Noise goes on every parameter: u_i = sigma z_i (plain) or u_i = sqrt(sigma^2 w_i^2 + eps^2) z_i
    (magnitude-aware, ``magnitude_eps`` = eps), with z ~ N(0, I) fixed per Monte Carlo sample.
    The returned sigma has |D_K(sigma) - target_drop| < tolerance (``converged``) with D_K the
    exact K-sample mean drop over all of ``batches``.

    Args:
        model: any classifier (argmax of the logits is the prediction); it is not modified.
        batches: training data, (x, y) on the model's device.
        target_drop: d in (0, 1).
        tolerance: stop once |D(sigma) - d| < tolerance.
        mc_samples: K weight samples per sigma.
        depth: maximum number of probes (sigma values tried).
        sigma_max: right end of the initial bracket [0, sigma_max].
        magnitude_eps: None for plain noise, eps for the magnitude-aware noise.
        seed: seeds the K noise draws and the order of the data chunks.
        early_stop: decide each probe as soon as it can (False: the same search, every probe
            evaluated in full; for measuring what the early decisions save).
        z_score: standard errors of margin for a statistical early decision (``math.inf``: only
            exact ones). Statistical decisions steer the search; they never decide the answer.
        initial_sigma: where to probe first, e.g. a previous answer (default: the root mean square
            of the parameters for plain noise, capped at sigma_max / 2; sigma_max / 2 for sigma').

    Returns:
        A :class:`SearchResult` whose ``radius`` is sigma (or sigma').

    Raises:
        FlatlabError: target outside (0, 1); accuracy already within the target of chance.
    """
    check_target_drop(target_drop, tolerance)
    if mc_samples < 1:
        raise FlatlabError(f"the number of Monte Carlo samples must be at least 1, got {mc_samples}")
    if not z_score > 0:
        raise FlatlabError(f"the z score of the early decisions must be positive, got {z_score}")
    work = copy.deepcopy(model).eval()
    n = check_batches(batches)
    num_classes = num_classes_of(work, batches)
    test = ChunkedDropTest(work, batches, target_drop, tolerance, mc_samples, seed, stream, z_score=z_score)
    check_room_for_drop(test.base_correct / n, num_classes, target_drop)

    params = [p for p in work.parameters()]
    base = [p.detach().clone() for p in params]
    noise = NoiseBank(base, mc_samples, seed, stream)
    if initial_sigma is None and magnitude_eps is None:
        # Plain sigma scales with the weights (a bias-free ReLU net scaled by c has sigma scaled by c),
        # so start at their root mean square: the whole search path then scales along.
        total = sum(float(w.double().pow(2).sum()) for w in base)
        initial_sigma = min(math.sqrt(total / max(1, sum(w.numel() for w in base))), 0.5 * sigma_max)

    def applier(radius: float) -> Callable[[int], None]:
        @torch.no_grad()
        def apply(k: int) -> None:
            for p, w, z in zip(params, base, noise.draw(k)):
                if magnitude_eps is None:
                    p.copy_(w + radius * z)
                else:
                    p.copy_(w + torch.sqrt(radius ** 2 * w * w + magnitude_eps ** 2) * z)

        return apply

    def evaluate(radius: float) -> NoiseProbe:
        return test.run(test.start(radius), applier(radius), full=not early_stop)

    def settle(probe: NoiseProbe) -> NoiseProbe:
        return test.settle(probe, applier(probe.radius))

    probe, converged, history = interpolate_radius(evaluate, settle, float(target_drop), float(sigma_max),
                                                   int(depth), initial_sigma)
    return SearchResult(
        radius=probe.radius, drop=probe.drop, drop_stderr=probe.drop_stderr, drop_low=probe.drop_low,
        drop_high=probe.drop_high, base_accuracy=test.base_correct / n, target_drop=float(target_drop),
        tolerance=float(tolerance), converged=converged, passes=float(sum(p.passes for p in history)),
        steps=len(history), depth=int(depth), radius_max=float(sigma_max), samples=int(mc_samples),
        num_classes=num_classes, n=n,
        history=[{"radius": p.radius, "decision": p.decision, "exact": p.exact, "estimate": p.estimate,
                  "drop_low": p.drop_low, "drop_high": p.drop_high, "passes": p.passes} for p in history],
    )


__all__ = [
    "ABOVE",
    "BELOW",
    "SIGMA_IS_STD_NOTE",
    "WITHIN",
    "ChunkedDropTest",
    "DropTest",
    "NoiseProbe",
    "Probe",
    "SearchResult",
    "bisect_radius",
    "check_room_for_drop",
    "check_target_drop",
    "interpolate_radius",
    "next_radius",
    "sigma_search",
]
