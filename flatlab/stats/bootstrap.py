r"""Stratified bootstrap: a variant's mean over seeds with a confidence interval.

Seeds are the unit of replication and test domains are strata (docs/measures.md 9). For values
:math:`x_{hj}` (stratum h = test domain, j = 1..n_h, N = sum_h n_h) the statistic is the pooled
mean, i.e. the stratum means weighted by the stratum sizes:

.. math::  \hat\theta = \frac1N \sum_h \sum_j x_{hj} = \sum_h \frac{n_h}{N}\, \bar x_h .

**Resampling.** One bootstrap resample draws n_h values with replacement *within each stratum h*
(so the weights n_h / N stay fixed) and recomputes :math:`\theta^*`; B resamples give
:math:`\theta^*_1..\theta^*_B`. ``scipy.stats.bootstrap`` resamples a whole sample (or paired
samples) and cannot keep strata apart, hence this module; it draws all resample indices of a block
as one integer array (no Python loop over resamples).

**Percentile interval** at confidence :math:`1-\alpha`: the :math:`\alpha/2` and
:math:`1-\alpha/2` quantiles of the :math:`\theta^*` (numpy's linear interpolation).

**BCa interval** (Efron 1987; Davison & Hinkley 1997, sec. 5.3), the default: the quantiles at

.. math::  \alpha_{1,2} = \Phi\!\left(z_0 + \frac{z_0 + z_{\alpha/2,\,1-\alpha/2}}
           {1 - a\,(z_0 + z_{\alpha/2,\,1-\alpha/2})}\right),

with bias correction :math:`z_0 = \Phi^{-1}\big((\#\{\theta^*_b < \hat\theta\} + \tfrac12
\#\{\theta^*_b = \hat\theta\}) / B\big)` (ties, common with discrete accuracies, count half) and
the acceleration from the stratified jackknife influence values. For a statistic that is linear in
the stratum means, :math:`T = \sum_c W_c \bar x_c` (c = resampling cell: a test domain, or a
(group, test domain) pair for two groups), deleting :math:`x_{cj}` with the weights held fixed
gives the jackknife influence value :math:`l_{cj} = (n_c - 1)(\hat T - \hat T_{-cj}) =
W_c (x_{cj} - \bar x_c)` exactly, and

.. math::  a = \frac{1}{6}\,
           \frac{\sum_c n_c^{-3} \sum_j l_{cj}^3}{\big(\sum_c n_c^{-2} \sum_j l_{cj}^2\big)^{3/2}},

i.e. one sixth of the skewness of the linear approximation of :math:`T^*` under stratified
resampling. With one stratum this is the usual jackknife acceleration
:math:`\sum_j (\bar\theta_{(\cdot)} - \theta_{(j)})^3 / (6 [\sum_j (\bar\theta_{(\cdot)} -
\theta_{(j)})^2]^{3/2})` that ``scipy.stats.bootstrap`` uses. When BCa is undefined (every
:math:`\theta^*` on one side of :math:`\hat\theta`, or :math:`1 - a(z_0+z) \le 0`) the percentile
interval is returned and ``method`` says so.

**Small samples and degenerate data.** With fewer than 5 seeds in a test domain the interval is
still computed but flagged (``small_sample``, ``note``): bootstrap intervals of a mean are too
narrow by about :math:`\sqrt{(n-1)/n}` and ignore the t-distribution's tails, so they under-cover
badly at small n. n = 1: no interval (NaN). A stratum with one value adds no resampling variance
(noted); if every stratum has one value there is no interval. Values constant within every
stratum (in particular all equal) give a zero-width interval at the mean, with a note. NaN values
are dropped (with their stratum labels) and counted in the note.

sd is the sample standard deviation (ddof 1) of all values and stderr = sd / sqrt(n), the plain
(unstratified) standard error.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt
from scipy import stats

from flatlab.stats._common import (
    Strata,
    as_labels,
    as_vector,
    bootstrap_indices,
    check_choice,
    check_int,
    check_open_unit,
    check_seed,
    dropped_note,
    join_notes,
    kept,
    small_sample_note,
)
from flatlab.stats.estimate import IntervalEstimate

IntervalMethod = Literal["bca", "percentile"]
METHODS: tuple[str, ...] = ("bca", "percentile")

#: Default number of bootstrap resamples (a mean's resamples are cheap).
DEFAULT_RESAMPLES = 9999


@dataclass(frozen=True, kw_only=True)
class GroupSummary(IntervalEstimate):
    """One variant's values over seeds: mean, spread and a stratified bootstrap CI of the mean
    (:class:`~flatlab.stats.estimate.IntervalEstimate`).

    Attributes:
        mean: pooled mean over all runs (= stratum means weighted by stratum sizes).
        sd: sample standard deviation, ddof 1 (NaN for n = 1).
        stderr: sd / sqrt(n) (NaN for n = 1).
        n: number of (finite) values.
        method: the interval actually computed ("bca" or "percentile"; "none" when NaN).
        n_resamples: bootstrap resamples drawn.
    """

    estimate_of: ClassVar[str] = "mean"

    mean: float
    sd: float
    stderr: float
    n: int
    method: str
    n_resamples: int


@dataclass(frozen=True)
class Interval:
    """A bootstrap interval: bounds, the method actually used and what to know about it."""

    low: float
    high: float
    method: str
    note: str | None = None


def check_interval_args(confidence: float, method: str, n_resamples: int) -> None:
    check_open_unit(confidence, "confidence")
    check_choice(method, "method", METHODS)
    check_int(n_resamples, "n_resamples", 100)


def percentile_interval(theta_star: npt.NDArray[np.float64], confidence: float) -> tuple[float, float]:
    """The (1-alpha)/2-tail quantiles of a bootstrap distribution (numpy's linear interpolation)."""
    alpha = 1.0 - confidence
    lo, hi = np.quantile(theta_star, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def linear_acceleration(values: npt.NDArray[np.float64], cells: Strata,
                        cell_weights: npt.NDArray[np.float64]) -> float:
    """BCa acceleration of T = sum_c W_c mean(x_c) under resampling within cells (module docstring).

    Returns NaN when T has no resampling variance (every cell constant or of size 1).
    """
    num = 0.0
    den = 0.0
    for members, weight in zip(cells.members, cell_weights):
        x = values[members]
        n_c = len(x)
        influence = weight * (x - x.mean())
        num += float(np.sum(influence ** 3)) / n_c ** 3
        den += float(np.sum(influence ** 2)) / n_c ** 2
    if den <= 0.0:
        return math.nan
    return num / (6.0 * den ** 1.5)


def linear_bootstrap_interval(values: npt.NDArray[np.float64], cells: Strata,
                              cell_weights: npt.NDArray[np.float64], *, confidence: float, method: str,
                              n_resamples: int, rng: np.random.Generator,
                              single_note: str, constant_note: str) -> Interval:
    """Bootstrap CI of T = sum_c W_c mean(x_c), resampling within every cell c (percentile or BCa).

    ``single_note`` is the note when every cell holds one value (no interval); ``constant_note``
    when no cell varies (zero-width interval at T).
    """
    sizes = cells.sizes
    coef = np.empty(cells.n, dtype=np.float64)
    for members, weight in zip(cells.members, cell_weights):
        coef[members] = weight / len(members)
    estimate = float(values @ coef)
    if sizes.max() < 2:
        return Interval(math.nan, math.nan, "none", single_note)
    if all(np.ptp(values[m]) == 0 for m in cells.members):
        return Interval(estimate, estimate, method, constant_note)
    theta = np.concatenate([values[idx] @ coef for idx in bootstrap_indices(cells, n_resamples, rng)])
    if method == "percentile":
        return Interval(*percentile_interval(theta, confidence), "percentile")
    # Ties with the estimate: resample sums are computed in another order, so allow rounding error.
    tol = 1e-12 * max(1.0, float(np.max(np.abs(values))))
    below = np.count_nonzero(theta < estimate - tol)
    ties = np.count_nonzero(np.abs(theta - estimate) <= tol)
    share_below = (below + 0.5 * ties) / len(theta)
    fallback = "BCa undefined ({}): percentile interval"
    if not 0.0 < share_below < 1.0:
        return Interval(*percentile_interval(theta, confidence), "percentile",
                        fallback.format("every bootstrap mean lies on one side of the estimate"))
    z0 = float(stats.norm.ppf(share_below))
    accel = linear_acceleration(values, cells, cell_weights)
    alpha = 1.0 - confidence
    z = stats.norm.ppf([alpha / 2, 1 - alpha / 2])
    denom = 1.0 - accel * (z0 + z)
    if not np.all(denom > 0):
        return Interval(*percentile_interval(theta, confidence), "percentile",
                        fallback.format(f"acceleration {accel:.3g} too large"))
    levels = stats.norm.cdf(z0 + (z0 + z) / denom)
    lo, hi = np.quantile(theta, levels)
    return Interval(float(lo), float(hi), "bca")


def summarize_group(values: npt.ArrayLike, strata: Sequence[Hashable] | npt.ArrayLike | None = None, *,
                    confidence: float = 0.95, method: IntervalMethod = "bca",
                    n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> GroupSummary:
    r"""Mean, sd, stderr and a stratified bootstrap CI of the mean of one variant's runs.

    The statistic is the pooled mean :math:`\bar x = N^{-1}\sum_{h,j} x_{hj}`; the bootstrap
    resamples seeds with replacement within each test domain (``strata``) and the interval is BCa
    (default) or percentile, as defined in :mod:`flatlab.stats.bootstrap`.

    Args:
        values: one value per run (NaN = missing, dropped with its label).
        strata: the test domain of every run (any hashable labels), or None for one stratum.
        confidence: nominal coverage of the interval, in (0, 1).
        method: "bca" (bias-corrected and accelerated, stratified jackknife acceleration) or
            "percentile".
        n_resamples: bootstrap resamples, >= 100.
        seed: seed of the numpy Generator that draws the resamples.

    Raises:
        ValueError: a bad argument (named), or no finite value.
    """
    check_interval_args(confidence, method, n_resamples)
    rng = check_seed(seed)
    x = as_vector(values, "values")
    labels = as_labels(strata, len(x), "strata")
    keep = ~np.isnan(x)
    n_dropped = int(np.count_nonzero(~keep))
    x = x[keep]
    labels = kept(labels, keep)
    if len(x) == 0:
        raise ValueError("values holds no finite value")
    cells = Strata.of(labels, len(x))
    n = len(x)
    sd = float(np.std(x, ddof=1)) if n > 1 else math.nan
    note_small = small_sample_note(cells)
    if n == 1:
        interval = Interval(math.nan, math.nan, "none", "a single seed: no interval")
    else:
        weights = cells.sizes / n
        interval = linear_bootstrap_interval(
            x, cells, weights, confidence=confidence, method=method, n_resamples=n_resamples, rng=rng,
            single_note="every test domain has a single seed: nothing to resample within a test domain, no interval",
            constant_note=_constant_note(x, cells))
    return GroupSummary(
        mean=float(np.mean(x)), sd=sd, stderr=sd / math.sqrt(n) if n > 1 else math.nan, n=n,
        n_strata=len(cells.labels), ci_low=interval.low, ci_high=interval.high, confidence=float(confidence),
        method=interval.method, n_resamples=int(n_resamples), small_sample=note_small is not None,
        note=join_notes(interval.note, note_small, single_cell_note(cells), dropped_note(n_dropped, "value(s)")))


def _constant_note(x: npt.NDArray[np.float64], cells: Strata) -> str:
    if np.ptp(x) == 0:
        return "all values equal: zero-width interval"
    return "values are constant within every test domain: zero-width interval"


def single_cell_note(cells: Strata, unit: str = "seed") -> str | None:
    """Note the resampling cells whose single value adds no resampling variance (when others do).

    Cell labels are test domains, or (group, test domain) pairs for two groups (group alone when
    unstratified).
    """
    sizes = cells.sizes
    if len(sizes) < 2 or sizes.max() < 2 or sizes.min() > 1:
        return None
    single = [_cell_name(lab) for lab, s in zip(cells.labels, sizes) if s == 1]
    return f"{', '.join(single)}: a single {unit}, which adds no resampling variance"


def _cell_name(label: Hashable) -> str:
    if isinstance(label, tuple):
        group, domain = label
        return f"group {group}" if domain is None else f"group {group} in test domain {domain}"
    return f"test domain {label}"
