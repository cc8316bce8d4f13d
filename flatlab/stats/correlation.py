r"""Rank correlations between a measure and a target over runs, with bootstrap intervals.

**Kendall's tau-b** (``scipy.stats.kendalltau``) over n runs with signs
:math:`s^x_{ij} = \operatorname{sign}(x_i - x_j)`, :math:`s^y_{ij}` likewise:

.. math::  \tau_b = \frac{\sum_{i<j} s^x_{ij} s^y_{ij}}
           {\sqrt{\sum_{i<j} (s^x_{ij})^2 \; \sum_{i<j} (s^y_{ij})^2}}
           = \frac{n_c - n_d}{\sqrt{(n_0 - n_1)(n_0 - n_2)}},

and **Spearman's rho** (``scipy.stats.spearmanr``): the Pearson correlation of the average ranks.
p-values are scipy's two-sided ones (Kendall: exact null distribution for small n without ties,
else the normal approximation with tie correction; Spearman: the t approximation).

**Bootstrap CI** (percentile, :mod:`flatlab.stats.bootstrap`): runs resampled with replacement
within each test domain, the statistic recomputed on every resample. scipy's kendalltau loops in
Python over resamples (0.25 ms each), so tau-b is computed here for all resamples at once from the
resample counts :math:`w_i` (how often run i was drawn): a pair of draws of the same run is tied
in x and y and adds nothing, so

.. math::  \tau_b^* = \frac{w^\top (S^x \circ S^y) w}{\sqrt{(w^\top |S^x| w)(w^\top |S^y| w)}},

which is tau-b of the resampled runs exactly. Spearman's resamples are ranked with
``scipy.stats.rankdata(axis=1)``. A resample whose statistic is undefined (a constant resampled
x or y) is left out and counted in the note; with more than half undefined there is no interval.
With n < 5 runs no p-value or interval is computed ("n too small"); the statistic is still
reported. Runs where x or y is NaN are dropped (pairwise).

The pooled correlation mixes test domains: a measure can correlate with OOD accuracy across
domains only because both track domain difficulty. The granulated tau holds the domain fixed.

**Granulated tau** (Jiang et al. 2019, "Fantastic generalization measures"). Hyperparameter
axes :math:`i = 1..k` (e.g. algorithm, bits, seed) with one value per run. For each axis i that
takes more than one value, the cells :math:`\theta_{-i}` are the groups of runs sharing the test
domain and the values of every other axis, and

.. math::  \psi_i = \frac{1}{|\mathcal C_i|} \sum_{c \in \mathcal C_i} \tau_b\big(x_c, y_c\big),
           \qquad \Psi = \frac{1}{|\{i : \psi_i \text{ defined}\}|} \sum_{i:\ \psi_i\ \text{defined}} \psi_i,

where :math:`\mathcal C_i` are the cells with at least two runs holding distinct values of axis i
whose tau is defined (not constant in x or y). This is exactly ``flatlab.report.granulated_tau``.
Its bootstrap (:func:`granulated_tau_with_ci`) resamples runs within test domains and recomputes
:math:`\Psi` with the counts formula per cell (a cell's resampled runs are the draws of its own
runs; it counts when two drawn runs differ in axis i), percentile interval.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt
from scipy import stats

from flatlab.stats._common import (
    MIN_RELIABLE_N,
    Strata,
    as_labels,
    as_vector,
    bootstrap_indices,
    check_choice,
    check_seed,
    dropped_note,
    join_notes,
    kept,
    resample_counts,
    small_sample_note,
)
from flatlab.stats.bootstrap import check_interval_args, percentile_interval
from flatlab.stats.estimate import IntervalEstimate

CorrelationMethod = Literal["kendall", "spearman"]

#: Default bootstrap resamples for correlations.
DEFAULT_RESAMPLES = 4999

Labels = Sequence[Hashable] | npt.ArrayLike | None


@dataclass(frozen=True, kw_only=True)
class CorrelationResult(IntervalEstimate):
    """A rank correlation over runs with its p-value and a percentile bootstrap CI
    (:class:`~flatlab.stats.estimate.IntervalEstimate`; NaN for n < 5 or when undefined;
    small_sample: fewer than 5 runs in a test domain or overall).

    Attributes:
        statistic: Kendall's tau-b or Spearman's rho (NaN if undefined: n < 2 or constant input).
        p_value: scipy's two-sided p-value (NaN for n < 5 or undefined statistic).
        n: runs with finite x and y.
        method: "kendall" or "spearman".
        n_resamples: resamples drawn (0 when none).
    """

    estimate_of: ClassVar[str] = "statistic"

    statistic: float
    p_value: float
    n: int
    method: str
    n_resamples: int


@dataclass(frozen=True)
class AxisTau:
    """psi_i of one axis: the mean tau over its defined cells (NaN when none), and how many."""

    axis: str
    tau: float
    cells: int


@dataclass(frozen=True)
class GranulatedTau:
    """Jiang et al.'s granulated tau Psi, its per-axis psi_i (varying axes only) and the runs used."""

    psi: float
    axes: tuple[AxisTau, ...]
    varying_axes: tuple[str, ...]
    n: int

    def tau_of(self, axis: str) -> AxisTau:
        for a in self.axes:
            if a.axis == axis:
                return a
        raise KeyError(f"axis {axis!r} does not vary (varying: {', '.join(self.varying_axes) or 'none'})")


@dataclass(frozen=True, kw_only=True)
class GranulatedTauCI(IntervalEstimate):
    """Granulated tau with a percentile bootstrap CI over runs (resampled within test domains):
    the fields of :class:`GranulatedTau`, the resamples drawn, and the interval
    (:class:`~flatlab.stats.estimate.IntervalEstimate`)."""

    estimate_of: ClassVar[str] = "psi"

    psi: float
    axes: tuple[AxisTau, ...]
    varying_axes: tuple[str, ...]
    n: int
    n_resamples: int


# --- shared pieces -----------------------------------------------------------------------------

def _finite_rows(x: npt.ArrayLike, y: npt.ArrayLike, labels: Labels, name_x: str = "x",
                 name_y: str = "y") -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                                             npt.NDArray[np.bool_], list[Hashable] | None]:
    xv, yv = as_vector(x, name_x), as_vector(y, name_y)
    if len(xv) != len(yv):
        raise ValueError(f"{name_x} and {name_y} must have the same length, got {len(xv)} and {len(yv)}")
    lab = as_labels(labels, len(xv), "strata")
    keep = ~(np.isnan(xv) | np.isnan(yv))
    lab = kept(lab, keep)
    return xv[keep], yv[keep], keep, lab


def _scipy_correlation(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], method: str) -> tuple[float, float]:
    """(statistic, p) from scipy; NaN for fewer than 2 runs or a constant vector."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.kendalltau(x, y) if method == "kendall" else stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def _signs(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.sign(v[:, None] - v[None, :])


def weighted_tau_b(counts: npt.NDArray[np.float64], sx: npt.NDArray[np.float64],
                   sy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """tau-b of each resample from its counts (module docstring); NaN where undefined."""
    num = np.einsum("bi,bi->b", counts @ (sx * sy), counts)
    dx = np.einsum("bi,bi->b", counts @ np.abs(sx), counts)
    dy = np.einsum("bi,bi->b", counts @ np.abs(sy), counts)
    den = dx * dy
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1.0)), np.nan)


def rowwise_spearman(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Spearman's rho of each row pair (x[b], y[b]) of two (B, n) arrays; NaN where a row is constant."""
    rx, ry = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt(np.sum(rx * rx, axis=1) * np.sum(ry * ry, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, np.sum(rx * ry, axis=1) / np.where(den > 0, den, 1.0), np.nan)


def _interval_of(theta: npt.NDArray[np.float64], confidence: float) -> tuple[float, float, str | None]:
    """Percentile interval over the defined resamples; none if more than half are undefined."""
    defined = theta[np.isfinite(theta)]
    undefined = len(theta) - len(defined)
    if undefined * 2 > len(theta):
        return math.nan, math.nan, (f"{undefined} of {len(theta)} resamples had an undefined statistic: "
                                    "no interval")
    lo, hi = percentile_interval(defined, confidence)
    note = (f"{undefined} of {len(theta)} resamples had an undefined statistic and were left out"
            if undefined else None)
    return lo, hi, note


# --- correlation with a CI ---------------------------------------------------------------------

def correlation_with_ci(x: npt.ArrayLike, y: npt.ArrayLike, *, method: CorrelationMethod = "kendall",
                        strata: Labels = None, confidence: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES,
                        seed: int = 0) -> CorrelationResult:
    r"""Kendall's tau-b or Spearman's rho of x against y, scipy's p-value, stratified bootstrap CI.

    Args:
        x, y: one value per run (a run with NaN in either is dropped).
        method: "kendall" (tau-b) or "spearman".
        strata: the test domain of every run, or None; runs are resampled within test domains.
        confidence: coverage of the percentile interval, in (0, 1).
        n_resamples: bootstrap resamples, >= 100.
        seed: seed of the resampling Generator.

    Raises:
        ValueError: a bad argument (named), x and y of different lengths.
    """
    check_choice(method, "method", ("kendall", "spearman"))
    check_interval_args(confidence, "percentile", n_resamples)
    rng = check_seed(seed)
    xv, yv, keep, labels = _finite_rows(x, y, strata)
    n = len(xv)
    dropped = dropped_note(int(np.count_nonzero(~keep)), "run(s)")
    statistic, p = _scipy_correlation(xv, yv, method)
    n_strata = len(Strata.of(labels, n).labels) if n else 0

    def result(p_value: float, lo: float, hi: float, resamples: int, small: bool, *notes: str | None
               ) -> CorrelationResult:
        return CorrelationResult(statistic=statistic, p_value=p_value, ci_low=lo, ci_high=hi, n=n, method=method,
                                 confidence=float(confidence), n_resamples=resamples, n_strata=n_strata,
                                 small_sample=small, note=join_notes(*notes, dropped))

    if n < MIN_RELIABLE_N:
        return result(math.nan, math.nan, math.nan, 0, True,
                      f"n too small ({n} runs, fewer than {MIN_RELIABLE_N}): no p-value or interval")
    if math.isnan(statistic):
        which = "x" if np.ptp(xv) == 0 else "y"
        return result(math.nan, math.nan, math.nan, 0, False, f"{which} is constant: the correlation is undefined")
    cells = Strata.of(labels, n)
    theta = np.concatenate(list(_resampled_correlations(xv, yv, cells, method, n_resamples, rng)))
    lo, hi, note = _interval_of(theta, confidence)
    small = small_sample_note(cells, unit="runs")
    return result(p, lo, hi, int(n_resamples), small is not None, note, small)


def _resampled_correlations(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], cells: Strata, method: str,
                            n_resamples: int, rng: np.random.Generator):
    if method == "kendall":
        sx, sy = _signs(x), _signs(y)
        for idx in bootstrap_indices(cells, n_resamples, rng):
            yield weighted_tau_b(resample_counts(idx, cells.n), sx, sy)
    else:
        for idx in bootstrap_indices(cells, n_resamples, rng):
            yield rowwise_spearman(x[idx], y[idx])


# --- granulated tau ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Cell:
    """Runs of one cell theta_{-i}: their positions, axis-i value indicators and sign matrices."""

    members: npt.NDArray[np.intp]
    value_indicator: npt.NDArray[np.float64]  # (k, distinct axis-i values in the cell)
    concordance: npt.NDArray[np.float64]  # S^x o S^y
    ties_free_x: npt.NDArray[np.float64]  # |S^x|
    ties_free_y: npt.NDArray[np.float64]  # |S^y|


@dataclass(frozen=True)
class _Plan:
    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    strata: Strata
    point: GranulatedTau
    cells: dict[str, list[_Cell]]


def _axis_codes(axes: Mapping[str, Sequence[Hashable]], n: int, keep: npt.NDArray[np.bool_]
                ) -> dict[str, npt.NDArray[np.intp]]:
    if not isinstance(axes, Mapping) or not axes:
        raise ValueError("axes must be a non-empty mapping of axis name -> one value per run")
    out: dict[str, npt.NDArray[np.intp]] = {}
    for name, values in axes.items():
        items = values.tolist() if isinstance(values, np.ndarray) else list(values)
        if len(items) != n:
            raise ValueError(f"axes[{name!r}] must have one value per run ({n}), got {len(items)}")
        index: dict[Hashable, int] = {}
        codes = np.empty(n, dtype=np.intp)
        for i, v in enumerate(items):
            if isinstance(v, float) and math.isnan(v):
                raise ValueError(f"axes[{name!r}] has a NaN value at index {i}; use None for 'not applicable'")
            try:
                codes[i] = index.setdefault(v, len(index))
            except TypeError:
                raise ValueError(f"axes[{name!r}] values must be hashable, got {type(v).__name__} at index {i}") from None
        out[str(name)] = codes[keep]
    return out


def _granulated_plan(x: npt.ArrayLike, y: npt.ArrayLike, axes: Mapping[str, Sequence[Hashable]],
                     strata: Labels) -> tuple[_Plan, int]:
    xv, yv, keep, labels = _finite_rows(x, y, strata)
    codes = _axis_codes(axes, len(keep), keep)
    n = len(xv)
    cells_of = Strata.of(labels, n)
    stratum = cells_of.codes()
    varying = tuple(a for a, c in codes.items() if len(np.unique(c)) > 1)
    per_axis: list[AxisTau] = []
    plan_cells: dict[str, list[_Cell]] = {}
    for axis in varying:
        others = [codes[a] for a in codes if a != axis]
        # Cells in order of first appearance (as flatlab.report does), so the mean of the taus is
        # summed in the same order and Psi is bit-identical to the report's.
        index: dict[tuple[int, ...], int] = {}
        cell_of_run = np.asarray([index.setdefault(key, len(index)) for key in zip(stratum.tolist(),
                                                                                   *(o.tolist() for o in others))],
                                 dtype=np.intp)
        taus: list[float] = []
        cells: list[_Cell] = []
        for c in range(len(index)):
            members = np.flatnonzero(cell_of_run == c)
            values, value_code = np.unique(codes[axis][members], return_inverse=True)
            if len(values) < 2:
                continue  # this cell cannot vary axis i, in the data or in any resample
            sx, sy = _signs(xv[members]), _signs(yv[members])
            cells.append(_Cell(members, np.eye(len(values))[value_code.ravel()], sx * sy, np.abs(sx), np.abs(sy)))
            tau, _ = _scipy_correlation(xv[members], yv[members], "kendall")
            if math.isfinite(tau):
                taus.append(tau)
        per_axis.append(AxisTau(axis, float(np.mean(taus)) if taus else math.nan, len(taus)))
        plan_cells[axis] = cells
    defined = [a.tau for a in per_axis if math.isfinite(a.tau)]
    point = GranulatedTau(psi=float(np.mean(defined)) if defined else math.nan, axes=tuple(per_axis),
                          varying_axes=varying, n=n)
    return _Plan(xv, yv, cells_of, point, plan_cells), int(np.count_nonzero(~keep))


def granulated_tau(x: npt.ArrayLike, y: npt.ArrayLike, axes: Mapping[str, Sequence[Hashable]],
                   strata: Labels = None) -> GranulatedTau:
    r"""Jiang et al.'s granulated Kendall tau :math:`\Psi` of x against y (module docstring).

    Args:
        x, y: one value per run (runs with NaN in either are dropped).
        axes: axis name -> one value per run (hashable, compared by equality; None allowed, e.g.
            bits None = full precision). The test domain is never an axis: pass it as ``strata``.
        strata: test domain per run (always held fixed within a cell), or None.

    Raises:
        ValueError: a bad argument (named).
    """
    plan, _ = _granulated_plan(x, y, axes, strata)
    return plan.point


def _psi_of_counts(plan: _Plan, counts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Psi of each resample given its counts per run (b, n); NaN where no psi_i is defined."""
    b = counts.shape[0]
    psi_sum = np.zeros(b)
    psi_count = np.zeros(b)
    for cells in plan.cells.values():
        tau_sum = np.zeros(b)
        tau_count = np.zeros(b)
        for cell in cells:
            w = counts[:, cell.members]
            varies = np.count_nonzero((w > 0).astype(np.float64) @ cell.value_indicator, axis=1) >= 2
            num = np.einsum("bi,bi->b", w @ cell.concordance, w)
            den = np.einsum("bi,bi->b", w @ cell.ties_free_x, w) * np.einsum("bi,bi->b", w @ cell.ties_free_y, w)
            ok = varies & (den > 0)
            tau_sum[ok] += num[ok] / np.sqrt(den[ok])
            tau_count += ok
        has = tau_count > 0
        psi_sum[has] += tau_sum[has] / tau_count[has]
        psi_count += has
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(psi_count > 0, psi_sum / np.where(psi_count > 0, psi_count, 1.0), np.nan)


def granulated_tau_with_ci(x: npt.ArrayLike, y: npt.ArrayLike, axes: Mapping[str, Sequence[Hashable]],
                           strata: Labels = None, *, confidence: float = 0.95,
                           n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> GranulatedTauCI:
    r"""Granulated tau :math:`\Psi` with a percentile bootstrap CI (runs resampled within test domains).

    Arguments as :func:`granulated_tau`, plus ``confidence`` (in (0, 1)), ``n_resamples`` (>= 100)
    and ``seed``. With fewer than 5 runs, or :math:`\Psi` undefined, there is no interval.
    """
    check_interval_args(confidence, "percentile", n_resamples)
    rng = check_seed(seed)
    plan, n_dropped = _granulated_plan(x, y, axes, strata)
    point = plan.point
    dropped = dropped_note(n_dropped, "run(s)")

    def result(lo: float, hi: float, resamples: int, small: bool, *notes: str | None) -> GranulatedTauCI:
        return GranulatedTauCI(psi=point.psi, axes=point.axes, varying_axes=point.varying_axes, n=point.n,
                               ci_low=lo, ci_high=hi, confidence=float(confidence), n_resamples=resamples,
                               n_strata=len(plan.strata.labels), small_sample=small, note=join_notes(*notes, dropped))

    if point.n < MIN_RELIABLE_N:
        return result(math.nan, math.nan, 0, True,
                      f"n too small ({point.n} runs, fewer than {MIN_RELIABLE_N}): no interval")
    if math.isnan(point.psi):
        return result(math.nan, math.nan, 0, False, "no cell has a defined tau: the granulated tau is undefined")
    theta = np.concatenate([_psi_of_counts(plan, resample_counts(idx, plan.strata.n))
                            for idx in bootstrap_indices(plan.strata, n_resamples, rng)])
    lo, hi, note = _interval_of(theta, confidence)
    small = small_sample_note(plan.strata, unit="runs")
    return result(lo, hi, int(n_resamples), small is not None, note, small)
