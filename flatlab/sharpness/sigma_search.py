"""The noise search of Jiang et al. (2019): the largest sigma whose expected accuracy drop is the
target, with a confidence interval.

For a model with weights w and training accuracy a(w), sigma* solves

    D(sigma) = a(w) - E_{u ~ N(0, sigma^2 I)} [a(w + u)] = d     (d = target drop, default 0.1)

where sigma is the noise **standard deviation** (the widely used reference code passes sigma^2
to ``torch.normal`` as the standard deviation; flatlab does not). The magnitude-aware variant
draws u_i ~ N(0, sigma'^2 w_i^2 + eps^2). The plain and the magnitude-aware searches draw their
noise from different streams (:data:`PLAIN_STREAM`, :data:`MAGNITUDE_STREAM`), so their Monte
Carlo errors are independent.

Shared by both searches below:

* **Common random numbers.** Noise draw k, z_k ~ N(0, I), is fixed (seeded by stream and index)
  and reused at every probe, u_k = sigma z_k (or the magnitude scaling of z_k). The Monte Carlo
  drop is then one fixed, smooth, nearly monotone function of sigma, close to a power law
  D ~ c sigma^p below saturation, so its root can be interpolated.
* **Interpolated probes** (:func:`interpolate_radius`, :func:`next_radius`). Probes are placed
  by a safeguarded root finder on log D against log sigma: regula falsi (Illinois) on the
  bracket [largest sigma below, smallest sigma above], with a Brent-style fallback to the
  geometric midpoint when the bracket does not halve in two steps, and log-log extrapolation
  with a clamped step while only one side is known.

**The adaptive search** (default, :class:`DrawTest`). A probe adds draws until it is decided.
Each draw u is evaluated on one seeded slice of about ``draw_examples`` training examples and
gives Y_u = (J / n) x (slice's drop count). Y_u is an unbiased estimate of the full-data drop
under that noise, and its mean D_U = mean_u Y_u is an unbiased estimate of D(sigma), with
standard error SE = s_Y / sqrt(U) (floored, see :class:`DrawTest`). A probe is decided:

* precisely, once SE <= tol / 2: WITHIN iff |D_U - d| <= min(tol, max(t SE, tol / 4)), else
  ABOVE / BELOW;
* statistically, earlier, if |D_U - d| >= t_z SE (the z = 3 tail of Student's t). This only
  steers the search: such a bracket end is settled (continued to precision) once the bracket is
  narrower than 0.25 in log sigma, or before the search stops;
* or by the cap of ``max_samples`` draws, with a note.

Probes are looked at on a geometric schedule (x1.2), not after every draw. The answer gets a
partner probe on the same draws near it, for the local slope p of the drop curve (the secant,
:func:`paired_log_slope`). The interval on sigma (:func:`radius_interval`) is then

    [ sigma ((d - t SE) / D)^(1/p),  sigma ((d + t SE) / D)^(1/p) ],

every s whose drop interval D(s) +- t SE contains d under the local power law, with t the 97.5%
Student-t quantile at U - 1 degrees of freedom. To first order this is the delta method: the
standard error of sigma* is SE sigma / (p D). Since the answer has |D - d| <= t SE, the interval
contains the reported sigma.

**The fixed-draw search** (``fixed_draws=True``, flatlab 0.2's, :class:`ChunkedDropTest`). K
draws over the whole data at every probe. A probe evaluates all K samples on one chunk of the
data (chunks in a seeded random order) before the next chunk, and stops as soon as one of these
holds:

* the exact bounds on the K-sample mean decide (the predictions still to come are 0 .. all
  correct):

      D_K in [a - (C + R) / (m K), a - C / (m K)],  C = correct so far, R = still to come;

* the chunks seen put the mean outside the band with z = 3 standard errors to spare:
  |mean - d| >= tol + z SE. This only steers; a bracket end decided this way is resumed to the
  end before the search stops on it.

The returned sigma's drop is the exact K-sample mean, within tol of d. That holds for those K
draws only: its standard error sd / sqrt(K) is typically larger than tol, and the interval the
search reports (the same inversion, with the slope to the nearest other probe clamped to
[1, 6]) says so.

A "pass" is one noise draw evaluated over the whole data; a draw on a slice, or a partial pass,
counts as its share.
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
from flatlab.outputs import OutputFn, model_device, prepare_batches, with_output_fn
from flatlab.sharpness.perturb import (
    Batch,
    NoiseBank,
    check_batches,
    count_correct,
    noise_seed,
    num_classes_of,
)

ABOVE, BELOW, WITHIN = "above", "below", "within"

#: Level of the interval reported on sigma (two-sided).
CONFIDENCE = 0.95
#: The standard normal quantile of that level, z = Phi^-1(0.975).
Z_CONFIDENCE = 1.959963984540054
#: Noise streams: the plain and the magnitude-aware searches draw independent noise, so their
#: Monte Carlo errors do not move together (draw k of one stream is unrelated to draw k of the other).
PLAIN_STREAM = "sigma-search"
MAGNITUDE_STREAM = "magnitude-search"
#: The adaptive search needs this many draws before a probe's standard error is trusted.
MIN_ADAPTIVE_DRAWS = 10
#: The adaptive search settles a statistically decided bracket end once the bracket is this
#: narrow in log sigma (about the band's width for a drop curve of slope 1-2).
SETTLE_WIDTH = 0.25


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t with ``dof`` degrees of freedom (the normal one for dof > 10^6)."""
    from scipy import stats

    return float(stats.t.ppf(p, dof)) if dof < 10 ** 6 else float(stats.norm.ppf(p))

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
    #: The confidence interval on the radius (NaN where the search gives none, e.g. alpha').
    radius_ci_low: float = math.nan
    radius_ci_high: float = math.nan
    #: Its level, the quantile it used (Student's t with draws - 1 degrees of freedom), how it was made.
    confidence: float = CONFIDENCE
    ci_quantile: float = math.nan
    ci_method: str = ""
    #: The local slope p = d log D / d log radius the interval uses, and where its partner probe lay.
    slope: float = math.nan
    slope_radius: float = math.nan
    #: Noise draws behind the answer's drop, the examples each draw is evaluated on, the cap.
    draws: int = 0
    draw_examples: int = 0
    max_samples: int = 0
    #: The adaptive search (draws added until the drop's standard error <= tolerance / 2).
    adaptive: bool = False
    #: The cap on draws stopped a probe before its standard error reached tolerance / 2.
    capped: bool = False
    #: Why the result is less than it should be (cap, not converged, no interval); "" if nothing.
    note: str = ""

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
                       settle_width: float = 0.0) -> tuple[NoiseProbe, bool, list[NoiseProbe]]:
    """The safeguarded interpolating search for the radius where the drop enters the tolerance band.

    ``evaluate(radius)`` returns a decided probe, ``settle(probe)`` evaluates it to the end and
    decides it exactly. At most ``depth`` probes are placed; the bracket also counts as closed
    once narrower than ``radius_max / 2^depth`` (the bisection's resolution). A bracket end
    decided statistically is settled before the search gives up on it, and (``settle_width`` >
    0) as soon as the two-sided bracket is narrower than ``settle_width`` in log radius: a wrong
    statistical decision then costs one settled probe instead of the remaining depth.

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
        if settle_width > 0 and low is not None and high is not None and math.log(upper / lower) < settle_width:
            pending = [p for p in (low, high) if p.statistical]
            if pending:
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


# --- the adaptive search ------------------------------------------------------------------------

@dataclass
class DrawProbe:
    """A probe of the adaptive search: the drops of noise draws u = 0, 1, ... at one radius.

    ``values[u]`` is draw u's accuracy drop on its slice of the data, scaled to an unbiased
    estimate of the drop over all the data (see :class:`DrawTest`); the probe's drop is their
    mean. ``decision`` is ABOVE / BELOW / WITHIN the band once decided: ``statistical`` if by the
    z test before the standard error reached its target, ``precise`` once it did, ``capped`` if
    the cap on draws decided it.
    """

    radius: float
    values: list[float] = field(default_factory=list)
    decision: str | None = None
    statistical: bool = False
    precise: bool = False
    capped: bool = False
    stderr: float = math.nan
    passes: float = 0.0
    total: float = 0.0
    next_look: int = 0

    @property
    def draws(self) -> int:
        return len(self.values)

    @property
    def estimate(self) -> float:
        """The mean drop over the draws so far (NaN before the first)."""
        return self.total / len(self.values) if self.values else math.nan

    drop = estimate

    @property
    def complete(self) -> bool:
        """Decided by precision or by the cap (not only by the z test)."""
        return self.precise or self.capped

    @property
    def drop_stderr(self) -> float:
        return self.stderr


class DrawTest:
    """Evaluates the mean accuracy drop at a radius from noise draws, each on a slice of the data,
    and adds draws until the drop is decided.

    The data are shuffled once (seeded) and cut into J = max(1, floor(n / draw_examples)) slices
    of nearly equal size (``draw_examples`` = 0: one slice, all the data). Draw u (noise z_u,
    seeded, the same at every radius: common random numbers) is evaluated on slice j(u) =
    order[u mod J] (a seeded order: every J consecutive draws cover the data once) and gives

        Y_u = (J / n) * sum_{i in slice j(u)} (c_i(w) - c_i(w + u_u)),   c_i = 1[example i correct],

    an unbiased estimate of the drop over all n examples for that noise (E over a uniformly
    chosen slice of (J / n) * slice total = the total / n). The probe's drop is
    D_U = mean_u Y_u, an unbiased estimate of D(sigma) = a(w) - E_z a(w + u), with standard error

        SE = max(s_Y, s_floor) / sqrt(U),   s_floor^2 = max(|D_U| (1 - |D_U|) (1 - c / n) / c, 1 / c^2),

    s_Y the sample standard deviation of the Y_u (c = the slice size). The floor is the binomial
    variance of a slice mean, a lower bound of Var(Y) (a slice of c examples of which a share
    |D| flips), so a few similar first draws cannot look certain; 1 / c^2 is one flipped example.
    Treating the draws as independent overstates the error slightly: the cyclic slice order
    stratifies the data (conservative).

    A probe is looked at after ``min_draws`` draws and then on a geometric schedule (x1.2, or
    sooner where U (SE / target)^2 predicts the target SE), and stops adding draws as soon as

    * SE <= ``target_stderr``: decided precisely, WITHIN iff |D_U - d| <= band with
      band = min(tol, max(t SE, tol / 4)), t the 97.5% quantile of Student's t at U - 1 degrees
      of freedom (the target lies inside the drop's 95% interval, so the interval on sigma
      contains the probe), else ABOVE / BELOW;
    * |D_U - d| >= t' SE, t' the quantile of Student's t with the tail of ``z_score`` (3):
      decided statistically (steers the search; a bracket end decided this way is settled, i.e.
      continued to precision, before the search relies on it);
    * U = ``max_draws``: decided by the band with the SE it has (``capped``).

    Why slices: a draw's drop varies between draws (sd about 0.06 on a digits CNN at a 0.1
    drop) far more than between slices of one draw (a slice of 128 adds 0.13 / 128 to the
    variance), so a draw on 128 examples buys about as much precision as a draw on all 1,200
    at a tenth of the forward passes.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch], *, target_drop: float, tolerance: float,
                 target_stderr: float, min_draws: int, max_draws: int, draw_examples: int, seed: int, stream: str,
                 z_score: float = 3.0) -> None:
        self.model = model
        self.n = check_batches(batches)
        self.target = float(target_drop)
        self.tol = float(tolerance)
        self.target_stderr = float(target_stderr)
        self.min_draws = int(min_draws)
        self.max_draws = int(max_draws)
        self.z = float(z_score)
        piece = max(len(y) for _, y in batches)
        x_all = torch.cat([x for x, _ in batches])
        y_all = torch.cat([y for _, y in batches])
        gen = torch.Generator().manual_seed(noise_seed(seed, stream + "/draw-data", 0))
        perm = torch.randperm(self.n, generator=gen).to(y_all.device)
        count = 1 if draw_examples <= 0 or draw_examples >= self.n else self.n // int(draw_examples)
        self.slices: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
        self.slice_sizes: list[int] = []
        self.slice_base: list[int] = []
        with torch.no_grad():
            for index in torch.tensor_split(perm, count):
                xs, ys = x_all[index], y_all[index]
                parts = []
                for start in range(0, len(ys), piece):
                    xp, yp = xs[start:start + piece], ys[start:start + piece]
                    parts.append((xp, yp, model(xp).argmax(1) == yp))
                self.slices.append(parts)
                self.slice_sizes.append(len(ys))
                self.slice_base.append(sum(int(p[2].sum()) for p in parts))
        self.base_correct = sum(self.slice_base)
        self.count = count
        self.slice_examples = min(self.slice_sizes)
        gen = torch.Generator().manual_seed(noise_seed(seed, stream + "/draw-order", 0))
        self.order = torch.randperm(count, generator=gen).tolist()

    def start(self, radius: float) -> DrawProbe:
        return DrawProbe(radius)

    def stderr_of(self, probe: DrawProbe) -> float:
        """SE of the probe's mean drop, with the binomial floor (see the class docstring)."""
        u = probe.draws
        if u < 2:
            return math.inf
        mean = probe.total / u
        var = sum((v - mean) ** 2 for v in probe.values) / (u - 1)
        c = self.slice_examples
        m = min(abs(mean), 1.0)
        floor = max(m * (1.0 - m) * max(0.0, 1.0 - c / self.n) / c, 1.0 / c ** 2)
        return math.sqrt(max(var, floor) / u)

    def band_decision(self, mean: float, se: float, draws: int) -> str:
        """WITHIN iff |mean - d| <= min(tol, max(t SE, tol / 4)), t the 97.5% Student-t quantile."""
        band = min(self.tol, max(t_quantile(0.975, draws - 1) * se, self.tol / 4.0))
        if abs(mean - self.target) <= band:
            return WITHIN
        return ABOVE if mean > self.target else BELOW

    @torch.no_grad()
    def add_draw(self, probe: DrawProbe, apply_draw: Callable[[int], None]) -> None:
        """Evaluate the probe's next draw on its slice."""
        u = probe.draws
        j = self.order[u % self.count]
        apply_draw(u)
        correct = 0
        for x, y, _ in self.slices[j]:
            correct += int((self.model(x).argmax(1) == y).sum())
        value = self.count * (self.slice_base[j] - correct) / self.n
        probe.values.append(value)
        probe.total += value
        probe.passes += self.slice_sizes[j] / self.n

    def run(self, probe: DrawProbe, apply_draw: Callable[[int], None], settle: bool = False) -> DrawProbe:
        """Add draws until the probe is decided (``settle``: until precise or capped).

        The probe is looked at after ``min_draws`` draws and then at a geometric schedule (each
        look 1.2 times the last, or sooner where the standard error predicts the target is
        reached: U (SE / target)^2 draws), not after every draw: fewer looks, fewer wrong
        statistical decisions (a z test repeated at every draw crosses its boundary by chance
        far more often than once in 1 / p(z) looks).
        """
        if probe.next_look == 0:
            probe.next_look = self.min_draws
        tail = 0.5 * math.erfc(self.z / math.sqrt(2.0)) if math.isfinite(self.z) else 0.0  # P(Z > z)
        while not (probe.complete or (probe.decision is not None and not settle)):
            if probe.draws >= self.max_draws:
                probe.stderr = self.stderr_of(probe)
                probe.decision = self.band_decision(probe.estimate, probe.stderr, probe.draws)
                probe.capped, probe.statistical = True, False
                break
            self.add_draw(probe, apply_draw)
            if probe.draws < probe.next_look and probe.draws < self.max_draws:
                continue
            se = probe.stderr = self.stderr_of(probe)
            mean, u = probe.estimate, probe.draws
            if se <= self.target_stderr:
                probe.decision = self.band_decision(mean, se, u)
                probe.precise, probe.statistical = True, False
                break
            if (probe.decision is None and not settle and tail > 0
                    and abs(mean - self.target) >= t_quantile(1.0 - tail, u - 1) * se):
                probe.decision = ABOVE if mean > self.target else BELOW
                probe.statistical = True
            needed = math.ceil(u * (se / self.target_stderr) ** 2)
            probe.next_look = min(max(u + 1, min(math.ceil(1.2 * u), needed)), self.max_draws)
        return probe

    @torch.no_grad()
    def extend(self, probe: DrawProbe, apply_draw: Callable[[int], None], draws: int) -> DrawProbe:
        """Add draws (without changing the decision) until the probe has ``draws`` of them."""
        while probe.draws < draws:
            self.add_draw(probe, apply_draw)
        probe.stderr = self.stderr_of(probe)
        return probe


def paired_log_slope(a: DrawProbe, b: DrawProbe) -> tuple[float, float]:
    """(p, se of p): the slope d log D / d log radius between two probes over their common draws.

    With common random numbers the two drops share draws 0..k-1 (k = the smaller count), so
    p = (log mean_a - log mean_b) / (log r_a - log r_b) is the secant slope of one fixed curve;
    its standard error (delta method over the paired draws) is
    sd(Y_a,u / mean_a - Y_b,u / mean_b) / sqrt(k) / |log r_a - log r_b|.
    """
    k = min(a.draws, b.draws)
    if k < 2 or a.radius == b.radius:
        return math.nan, math.nan
    ya, yb = a.values[:k], b.values[:k]
    ma, mb = sum(ya) / k, sum(yb) / k
    if ma <= 0 or mb <= 0:
        return math.nan, math.nan
    dx = math.log(a.radius) - math.log(b.radius)
    resid = [u / ma - v / mb for u, v in zip(ya, yb)]
    mr = sum(resid) / k
    var = sum((r - mr) ** 2 for r in resid) / (k - 1)
    return (math.log(ma) - math.log(mb)) / dx, math.sqrt(var / k) / abs(dx)


def radius_interval(radius: float, drop: float, stderr: float, slope: float, target: float,
                    z: float = Z_CONFIDENCE) -> tuple[float, float]:
    """The confidence interval on the radius r* with D(r*) = target, by inverting the drop's interval.

    Near the probe r the measured drop curve follows a local power law, D(s) = D(r) (s / r)^p
    (p = ``slope``), with the standard error SE of D(r) taken as constant over the interval. The
    interval is every s whose drop interval D(s) +- z SE contains the target:

        [ r ((target - z SE) / D)^(1/p),  r ((target + z SE) / D)^(1/p) ]

    (lower end 0 if target <= z SE). It contains r iff |D - target| <= z SE. To first order it is
    the delta method's interval: r* - r = (target - D) / D'(r) with D'(r) = p D / r, so the
    standard error of r* is SE r / (p D).
    """
    if not (math.isfinite(slope) and slope > 0 and math.isfinite(stderr) and drop > 0):
        return math.nan, math.nan
    low = radius * ((target - z * stderr) / drop) ** (1.0 / slope) if target > z * stderr else 0.0
    high = radius * ((target + z * stderr) / drop) ** (1.0 / slope)
    return low, high


def _adaptive_search(work: nn.Module, batches: Sequence[Batch], apply_at: Callable[[float], Callable[[int], None]],
                     *, target_drop: float, tolerance: float, mc_samples: int, max_samples: int, draw_examples: int,
                     depth: int, sigma_max: float, seed: int, stream: str, z_score: float,
                     initial_sigma: float | None) -> tuple[DrawTest, DrawProbe, bool, list[DrawProbe], DrawProbe | None]:
    """The interpolating search on adaptive probes; then the slope partner of the answer."""
    test = DrawTest(work, batches, target_drop=target_drop, tolerance=tolerance, target_stderr=tolerance / 2.0,
                    min_draws=max(int(mc_samples), MIN_ADAPTIVE_DRAWS), max_draws=int(max_samples),
                    draw_examples=int(draw_examples), seed=seed, stream=stream, z_score=z_score)

    def evaluate(radius: float) -> DrawProbe:
        return test.run(test.start(radius), apply_at(radius))

    def settle(probe: DrawProbe) -> DrawProbe:
        return test.run(probe, apply_at(probe.radius), settle=True)

    answer, converged, probes = interpolate_radius(evaluate, settle, float(target_drop), float(sigma_max), int(depth),
                                                   initial_sigma, settle_width=SETTLE_WIDTH)  # type: ignore[arg-type]
    partner = _slope_partner(test, answer, probes, apply_at, float(target_drop), float(sigma_max))
    return test, answer, converged, probes, partner


def _slope_partner(test: DrawTest, answer: DrawProbe, probes: list[DrawProbe],
                   apply_at: Callable[[float], Callable[[int], None]], target: float,
                   radius_max: float) -> DrawProbe | None:
    """A probe on the answer's draws at a nearby radius, for the local slope of the drop curve.

    Prefers an existing probe within a factor 1.5 on the side where the target lies (so the
    secant spans the root), then one on the other side; otherwise a new probe at
    answer * e^{+-0.1}. The partner is extended to the answer's number of draws, so the slope is
    the secant of the very curve D_U whose interval is inverted.
    """
    if not answer.estimate > 0:
        return None
    up = answer.estimate < target
    near = [p for p in probes if p is not answer and p.radius != answer.radius and p.draws > 0
            and abs(math.log(p.radius / answer.radius)) <= math.log(1.5)]
    same_side = [p for p in near if (p.radius > answer.radius) == up]
    pool = same_side or near
    if pool:
        partner = min(pool, key=lambda p: abs(math.log(p.radius / answer.radius)))
    else:
        radius = answer.radius * math.exp(0.1 if up else -0.1)
        if radius >= radius_max:
            radius = answer.radius * math.exp(-0.1)
        partner = test.start(radius)
        probes.append(partner)
    return test.extend(partner, apply_at(partner.radius), answer.draws)


def sigma_search(model: nn.Module, batches: Sequence[Batch], *, target_drop: float = 0.1, tolerance: float = 0.01,
                 mc_samples: int = 10, depth: int = 15, sigma_max: float = 2.0, magnitude_eps: float | None = None,
                 seed: int = 0, early_stop: bool = True, z_score: float = 3.0, initial_sigma: float | None = None,
                 stream: str | None = None, fixed_draws: bool = False, max_samples: int = 1000,
                 draw_examples: int = 128, output_fn: OutputFn | None = None,
                 measure: str = "the noise search") -> SearchResult:
    """The largest noise standard deviation sigma with mean training-accuracy drop = ``target_drop``,
    with a 95% confidence interval.

    Noise goes on every parameter: u_i = sigma z_i (plain) or u_i = sqrt(sigma^2 w_i^2 + eps^2) z_i
    (magnitude-aware, ``magnitude_eps`` = eps), z ~ N(0, I) fixed per draw (common random numbers).

    **Adaptive** (default): every probe adds draws (each on a slice of ``draw_examples`` training
    examples, :class:`DrawTest`) until it is decided; near the answer that means until the
    drop's standard error is at most ``tolerance / 2`` (or ``max_samples`` draws, noted). The
    returned sigma is a probe whose drop D satisfies |D - d| <= min(tol, max(1.96 SE, tol / 4))
    (``converged``). The interval on sigma inverts the drop's interval D +- 1.96 SE through the
    local power law D(s) = D(sigma) (s / sigma)^p (:func:`radius_interval`; the delta method),
    with p the secant slope between the answer and a partner probe on the same draws
    (:func:`paired_log_slope`).

    **Fixed draws** (``fixed_draws=True``, flatlab 0.2's search): K = ``mc_samples`` draws, each
    over all the data, probes decided chunk by chunk (:class:`ChunkedDropTest`); the returned
    sigma's drop is the exact K-draw mean, within ``tolerance`` of the target for those K draws
    only: its standard error (sd / sqrt(K)) is typically larger than the tolerance. Its interval
    uses the same inversion with the slope between the answer and the nearest other probe,
    clamped to [1, 6].

    Args:
        model: any classifier (argmax of the logits is the prediction); it is not modified.
        batches: training data, (x, y) pairs: a list or a DataLoader, moved to the model's device.
        target_drop: d in (0, 1).
        tolerance: the band |D(sigma) - d| < tolerance; the adaptive search's standard-error
            target is tolerance / 2.
        mc_samples: draws a probe takes before its first decision (adaptive: at least 10); with
            ``fixed_draws`` the K draws of every probe.
        depth: maximum number of probes (sigma values tried).
        sigma_max: right end of the initial bracket [0, sigma_max].
        magnitude_eps: None for plain noise, eps for the magnitude-aware noise.
        seed: seeds the noise draws and the data order.
        early_stop: fixed draws only: decide each probe as soon as it can (False: every probe
            evaluated in full, for measuring what the early decisions save).
        z_score: standard errors of margin for a statistical early decision (``math.inf``: none).
        initial_sigma: where to probe first (default: the root mean square of the parameters for
            plain noise, capped at sigma_max / 2; sigma_max / 2 for sigma').
        stream: the noise stream (default :data:`PLAIN_STREAM` or :data:`MAGNITUDE_STREAM`:
            the two searches draw independent noise).
        fixed_draws: the non-adaptive search.
        max_samples: adaptive: the cap on draws per probe.
        draw_examples: adaptive: training examples each draw is evaluated on (0: all).
        output_fn: maps the model's output to its logits (default: the output as is).
        measure: names the measure in the refusal of a model without accuracy.

    Returns:
        A :class:`SearchResult` whose ``radius`` is sigma (or sigma').

    Raises:
        FlatlabError: target outside (0, 1); accuracy already within the target of chance; bad counts;
            a model without accuracy (not a classifier).
    """
    check_target_drop(target_drop, tolerance)
    if mc_samples < 1:
        raise FlatlabError(f"the number of Monte Carlo samples must be at least 1, got {mc_samples}")
    if not z_score > 0:
        raise FlatlabError(f"the z score of the early decisions must be positive, got {z_score}")
    if not fixed_draws and max_samples < max(int(mc_samples), MIN_ADAPTIVE_DRAWS):
        raise FlatlabError(f"the cap on noise draws must be at least max(mc_samples, {MIN_ADAPTIVE_DRAWS}) = "
                           f"{max(int(mc_samples), MIN_ADAPTIVE_DRAWS)}, got {max_samples}")
    if draw_examples < 0:
        raise FlatlabError(f"the examples per noise draw must be 0 (all) or positive, got {draw_examples}")
    if stream is None:
        stream = PLAIN_STREAM if magnitude_eps is None else MAGNITUDE_STREAM
    batches = prepare_batches(batches, model_device(model), name="batches")
    work = copy.deepcopy(model).eval()
    params = [p for p in work.parameters()]
    # The noise goes on work's parameters; every accuracy is read through output_fn.
    work = with_output_fn(work, output_fn)
    n = check_batches(batches)
    num_classes = num_classes_of(work, batches, measure)
    base = [p.detach().clone() for p in params]
    if initial_sigma is None and magnitude_eps is None:
        # Plain sigma scales with the weights (a bias-free ReLU net scaled by c has sigma scaled by c),
        # so start at their root mean square: the whole search path then scales along.
        total = sum(float(w.double().pow(2).sum()) for w in base)
        initial_sigma = min(math.sqrt(total / max(1, sum(w.numel() for w in base))), 0.5 * sigma_max)
    noise = NoiseBank(base, int(mc_samples) if fixed_draws else int(max_samples), seed, stream)

    def applier(radius: float) -> Callable[[int], None]:
        @torch.no_grad()
        def apply(k: int) -> None:
            for p, w, z in zip(params, base, noise.draw(k)):
                if magnitude_eps is None:
                    p.copy_(w + radius * z)
                else:
                    p.copy_(w + torch.sqrt(radius ** 2 * w * w + magnitude_eps ** 2) * z)

        return apply

    if fixed_draws:
        return _fixed_draws_search(work, batches, applier, n=n, num_classes=num_classes, target_drop=target_drop,
                                   tolerance=tolerance, mc_samples=mc_samples, depth=depth, sigma_max=sigma_max,
                                   seed=seed, stream=stream, early_stop=early_stop, z_score=z_score,
                                   initial_sigma=initial_sigma)

    correct, _ = count_correct(work, batches)
    check_room_for_drop(correct / n, num_classes, target_drop)
    test, answer, converged, probes, partner = _adaptive_search(
        work, batches, applier, target_drop=target_drop, tolerance=tolerance, mc_samples=mc_samples,
        max_samples=max_samples, draw_examples=draw_examples, depth=depth, sigma_max=sigma_max, seed=seed,
        stream=stream, z_score=z_score, initial_sigma=initial_sigma)
    slope, _ = paired_log_slope(answer, partner) if partner is not None else (math.nan, math.nan)
    quantile = t_quantile(0.5 + CONFIDENCE / 2, answer.draws - 1)
    low, high = radius_interval(answer.radius, answer.estimate, answer.stderr, slope, float(target_drop), quantile)
    notes = []
    if any(p.capped for p in probes):
        capped = [p for p in probes if p.capped]
        notes.append(f"the cap of {max_samples} noise draws stopped {len(capped)} probe(s) before the drop's standard "
                     f"error reached {tolerance / 2:g} (at sigma = {answer.radius:.4g}: {answer.stderr:.3g}); raise "
                     f"--max-mc-samples for the stated precision")
    if not converged:
        notes.append(f"the search did not reach the band |drop - {target_drop:g}| <= tolerance within {depth} probes: "
                     f"sigma is the closest probe")
    if not math.isfinite(low):
        notes.append("no interval: the drop does not increase with sigma around the answer")
    return SearchResult(
        radius=answer.radius, drop=answer.estimate, drop_stderr=answer.stderr,
        drop_low=answer.estimate - quantile * answer.stderr, drop_high=answer.estimate + quantile * answer.stderr,
        base_accuracy=test.base_correct / n, target_drop=float(target_drop), tolerance=float(tolerance),
        converged=converged, passes=float(sum(p.passes for p in probes)), steps=len(probes), depth=int(depth),
        radius_max=float(sigma_max), samples=int(mc_samples), num_classes=num_classes, n=n,
        history=[{"radius": p.radius, "decision": p.decision, "draws": p.draws, "estimate": p.estimate,
                  "stderr": p.stderr, "precise": p.precise, "capped": p.capped, "passes": p.passes} for p in probes],
        radius_ci_low=low, radius_ci_high=high, confidence=CONFIDENCE, ci_quantile=quantile,
        ci_method=("delta method: the drop's interval D +- t SE inverted through the local power law "
                   "D(s) = D(sigma) (s / sigma)^p, p the secant slope to a partner probe on the same noise draws"),
        slope=slope, slope_radius=partner.radius if partner is not None else math.nan, draws=answer.draws,
        draw_examples=test.slice_examples, max_samples=int(max_samples), adaptive=True, capped=answer.capped,
        note="; ".join(notes),
    )


def _fixed_draws_search(work: nn.Module, batches: Sequence[Batch], applier: Callable[[float], Callable[[int], None]],
                        *, n: int, num_classes: int, target_drop: float, tolerance: float, mc_samples: int, depth: int,
                        sigma_max: float, seed: int, stream: str, early_stop: bool, z_score: float,
                        initial_sigma: float | None) -> SearchResult:
    """flatlab 0.2's search: K fixed draws over all the data, probes decided chunk by chunk."""
    test = ChunkedDropTest(work, batches, target_drop, tolerance, mc_samples, seed, stream, z_score=z_score)
    check_room_for_drop(test.base_correct / n, num_classes, target_drop)

    def evaluate(radius: float) -> NoiseProbe:
        return test.run(test.start(radius), applier(radius), full=not early_stop)

    def settle(probe: NoiseProbe) -> NoiseProbe:
        return test.settle(probe, applier(probe.radius))

    probe, converged, history = interpolate_radius(evaluate, settle, float(target_drop), float(sigma_max),
                                                   int(depth), initial_sigma)
    others = [p for p in history if p is not probe and p.radius != probe.radius and math.isfinite(p.estimate)]
    nearest = min(others, key=lambda p: abs(math.log(p.radius / probe.radius))) if others else None
    slope = _log_slope(probe, nearest, target_drop / 20.0, default=math.nan) if nearest is not None else math.nan
    quantile = t_quantile(0.5 + CONFIDENCE / 2, int(mc_samples) - 1) if mc_samples > 1 else math.nan
    low, high = radius_interval(probe.radius, probe.drop, probe.drop_stderr, slope, float(target_drop), quantile)
    return SearchResult(
        radius=probe.radius, drop=probe.drop, drop_stderr=probe.drop_stderr, drop_low=probe.drop_low,
        drop_high=probe.drop_high, base_accuracy=test.base_correct / n, target_drop=float(target_drop),
        tolerance=float(tolerance), converged=converged, passes=float(sum(p.passes for p in history)),
        steps=len(history), depth=int(depth), radius_max=float(sigma_max), samples=int(mc_samples),
        num_classes=num_classes, n=n,
        history=[{"radius": p.radius, "decision": p.decision, "exact": p.exact, "estimate": p.estimate,
                  "drop_low": p.drop_low, "drop_high": p.drop_high, "passes": p.passes} for p in history],
        radius_ci_low=low, radius_ci_high=high, confidence=CONFIDENCE, ci_quantile=quantile,
        ci_method=("fixed draws: the K-draw drop's interval D +- t SE inverted through the local power law, "
                   "slope between the answer and the nearest other probe, clamped to [1, 6]"),
        slope=slope, slope_radius=nearest.radius if nearest is not None else math.nan, draws=int(mc_samples),
        draw_examples=n, max_samples=int(mc_samples), adaptive=False, capped=False,
        note="" if converged else (f"the search did not reach the band |drop - {target_drop:g}| < tolerance within "
                                   f"{depth} probes: sigma is the closest probe"),
    )


__all__ = [
    "ABOVE",
    "BELOW",
    "CONFIDENCE",
    "MAGNITUDE_STREAM",
    "PLAIN_STREAM",
    "SIGMA_IS_STD_NOTE",
    "WITHIN",
    "ChunkedDropTest",
    "DrawProbe",
    "DrawTest",
    "DropTest",
    "NoiseProbe",
    "Probe",
    "SearchResult",
    "bisect_radius",
    "check_room_for_drop",
    "check_target_drop",
    "interpolate_radius",
    "next_radius",
    "paired_log_slope",
    "radius_interval",
    "sigma_search",
]
