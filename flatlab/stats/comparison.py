r"""Comparing two variants: paired (same seed and test domain) and unpaired.

**Paired.** Runs :math:`a_i, b_i` matched on (seed, test domain); :math:`d_i = a_i - b_i`.
Reported: the mean difference :math:`\bar d` (pooled over test domains, i.e. stratum means
weighted by their numbers of pairs), :math:`s_d` (ddof 1), the stratified bootstrap CI of
:math:`\bar d` (pairs resampled with replacement within each test domain; BCa or percentile,
:mod:`flatlab.stats.bootstrap`) and the two-sided sign-flip p-value
(:func:`flatlab.stats.permutation.sign_flip_test`: exact for n <= ``exact_max_n``, Monte Carlo
beyond). Test domains only shape the bootstrap; the sign flips act on each pair alone, which is
valid within strata too. A pair with a NaN on either side is dropped (pairwise deletion), and
the note says how many.

**Unpaired.** Groups :math:`a` (:math:`n_a` runs) and :math:`b` (:math:`n_b` runs), not matched.
Unstratified: :math:`T = \bar a - \bar b`. With test domains (``strata_a``, ``strata_b``, which
must hold the same domains): :math:`T = \sum_h w_h (\bar a_h - \bar b_h)` with
:math:`w_h = (n_{a,h} + n_{b,h}) / (n_a + n_b)`, which equals :math:`\bar a - \bar b` whenever
both groups spread their runs over the domains in the same proportions, and otherwise keeps a
difference in domain mix from posing as an effect. CI: bootstrap resampling each group
independently within each test domain (BCa with the stratified jackknife acceleration over the
(group, domain) cells, or percentile). p: two-sided permutation test of the group labels
(within test domains when given), :func:`flatlab.stats.permutation.two_sample_permutation_test`.
NaN values are dropped from their group.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from flatlab.stats._common import (
    Strata,
    as_labels,
    as_vector,
    check_int,
    check_seed,
    dropped_note,
    join_notes,
    kept,
    small_sample_note,
)
from flatlab.stats.bootstrap import (
    DEFAULT_RESAMPLES,
    Interval,
    IntervalMethod,
    check_interval_args,
    linear_bootstrap_interval,
    single_cell_note,
)
from flatlab.stats.estimate import IntervalEstimate
from flatlab.stats.permutation import (
    DEFAULT_PERMUTATIONS,
    MAX_EXACT_SIGN_FLIP,
    sign_flip_test,
    stratum_weights,
    two_sample_permutation_test,
)

Labels = Sequence[Hashable] | npt.ArrayLike | None


@dataclass(frozen=True, kw_only=True)
class Comparison(IntervalEstimate):
    """A - B with its bootstrap CI (:class:`~flatlab.stats.estimate.IntervalEstimate`) and a
    permutation test (paired or unpaired).

    Attributes:
        mean_diff: the estimated difference A - B (see the subclasses).
        method: interval computed ("bca", "percentile", "none").
        p_value: two-sided permutation p-value.
        test: name of the test ("sign-flip permutation", ...).
        exact: True if all sign patterns / relabelings were enumerated, False for Monte Carlo.
        n_permutations: patterns enumerated or drawn.
    """

    estimate_of: ClassVar[str] = "mean_diff"

    mean_diff: float
    method: str
    p_value: float
    test: str
    exact: bool
    n_permutations: int


@dataclass(frozen=True, kw_only=True)
class PairedComparison(Comparison):
    """A - B on runs matched by (seed, test domain): mean_diff is the mean of d = a - b over the
    pairs, the CI a stratified bootstrap, the test a sign flip; small_sample: a test domain has
    fewer than 5 pairs.

    Attributes:
        sd_diff: sample sd of d (ddof 1; NaN for one pair).
        n: number of complete pairs.
    """

    sd_diff: float
    n: int


@dataclass(frozen=True, kw_only=True)
class UnpairedComparison(Comparison):
    """A - B on two independent groups of runs: mean_diff is T, the (stratum-weighted)
    difference of means (module docstring), the test permutes the group labels; small_sample: a
    (group, test domain) cell has fewer than 5 runs.

    Attributes:
        mean_a, mean_b: the groups' pooled means.
        sd_a, sd_b: the groups' sample sds (ddof 1; NaN for one run).
        n_a, n_b: runs per group.
    """

    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float
    n_a: int
    n_b: int

    @property
    def sd_pooled(self) -> float:
        r"""Pooled sd :math:`\sqrt{((n_a-1)s_a^2 + (n_b-1)s_b^2)/(n_a+n_b-2)}` (groups of one count 0)."""
        parts = [(n - 1) * s ** 2 for n, s in ((self.n_a, self.sd_a), (self.n_b, self.sd_b)) if n > 1]
        dof = self.n_a + self.n_b - 2
        return math.sqrt(sum(parts) / dof) if dof > 0 else math.nan


def paired_comparison(a: npt.ArrayLike, b: npt.ArrayLike, strata: Labels = None, *,
                      confidence: float = 0.95, method: IntervalMethod = "bca",
                      n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, exact_max_n: int = 16,
                      n_permutations: int = DEFAULT_PERMUTATIONS) -> PairedComparison:
    r"""Paired comparison of A and B: mean of d = a - b, its CI and the sign-flip p-value.

    Args:
        a, b: one value per pair, matched by position (same seed and test domain); NaN on either
            side drops the pair.
        strata: test domain of every pair (hashable labels) or None.
        confidence: coverage of the CI, in (0, 1).
        method: "bca" (default) or "percentile".
        n_resamples: bootstrap resamples (>= 100).
        seed: seeds both the bootstrap and the Monte Carlo sign patterns.
        exact_max_n: enumerate all 2^n sign patterns when n <= exact_max_n (<= 24).
        n_permutations: random sign patterns beyond that.

    Raises:
        ValueError: a bad argument (named), a and b of different lengths, no complete pair.
    """
    check_interval_args(confidence, method, n_resamples)
    check_int(exact_max_n, "exact_max_n", 0, MAX_EXACT_SIGN_FLIP)
    check_int(n_permutations, "n_permutations", 1)
    rng = check_seed(seed)
    x, y = as_vector(a, "a"), as_vector(b, "b")
    if len(x) != len(y):
        raise ValueError(f"a and b must be matched pairs of equal length, got {len(x)} and {len(y)}")
    labels = as_labels(strata, len(x), "strata")
    keep = ~(np.isnan(x) | np.isnan(y))
    d = (x - y)[keep]
    labels = kept(labels, keep)
    if len(d) == 0:
        raise ValueError("a and b have no pair where both values are finite")
    cells = Strata.of(labels, len(d))
    n = len(d)
    test = sign_flip_test(d, exact_max_n=exact_max_n, n_permutations=n_permutations, seed=seed)
    if n == 1:
        interval = Interval(math.nan, math.nan, "none", "a single pair: no interval")
    else:
        interval = linear_bootstrap_interval(
            d, cells, cells.sizes / n, confidence=confidence, method=method, n_resamples=n_resamples, rng=rng,
            single_note="every test domain has a single pair: nothing to resample within a test domain, no interval",
            constant_note=("all differences equal: zero-width interval" if np.ptp(d) == 0 else
                           "differences are constant within every test domain: zero-width interval"))
    small = small_sample_note(cells, unit="pairs")
    return PairedComparison(
        mean_diff=float(np.mean(d)), sd_diff=float(np.std(d, ddof=1)) if n > 1 else math.nan, n=n,
        n_strata=len(cells.labels), ci_low=interval.low, ci_high=interval.high, confidence=float(confidence),
        method=interval.method, p_value=test.p_value, test=test.test, exact=test.exact,
        n_permutations=test.n_permutations, small_sample=small is not None,
        note=join_notes(interval.note, small, single_cell_note(cells, "pair"),
                        dropped_note(int(np.count_nonzero(~keep)), "pair(s)")))


def unpaired_comparison(a: npt.ArrayLike, b: npt.ArrayLike, strata_a: Labels = None, strata_b: Labels = None, *,
                        confidence: float = 0.95, method: IntervalMethod = "bca",
                        n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                        n_permutations: int = DEFAULT_PERMUTATIONS) -> UnpairedComparison:
    r"""Unpaired comparison of groups A and B: difference of means, bootstrap CI, permutation p.

    Args:
        a, b: the groups' values (NaN dropped).
        strata_a, strata_b: test domain of every value of a and of b (both or neither; the same
            set of domains in both groups).
        confidence, method, n_resamples, seed: as in :func:`paired_comparison`.
        n_permutations: relabelings: all of them are enumerated when there are at most this many,
            else this many are drawn.

    Raises:
        ValueError: a bad argument (named), an empty group, strata given for one group only or
            holding different test domains.
    """
    check_interval_args(confidence, method, n_resamples)
    check_int(n_permutations, "n_permutations", 1)
    rng = check_seed(seed)
    x, y = as_vector(a, "a"), as_vector(b, "b")
    if (strata_a is None) != (strata_b is None):
        raise ValueError("strata_a and strata_b must be given together (or neither)")
    la, lb = as_labels(strata_a, len(x), "strata_a"), as_labels(strata_b, len(y), "strata_b")
    keep_a, keep_b = ~np.isnan(x), ~np.isnan(y)
    x, y = x[keep_a], y[keep_b]
    la, lb = kept(la, keep_a), kept(lb, keep_b)
    for name, v in (("a", x), ("b", y)):
        if len(v) == 0:
            raise ValueError(f"{name} holds no finite value")
    sa, sb = Strata.of(la, len(x)), Strata.of(lb, len(y))
    if la is not None:
        only_a, only_b = set(sa.labels) - set(sb.labels), set(sb.labels) - set(sa.labels)
        if only_a or only_b:
            raise ValueError("strata_a and strata_b must hold the same test domains; "
                             f"only in a: {sorted(map(str, only_a))}, only in b: {sorted(map(str, only_b))}")
    # Cells (group, test domain): resampled independently; T = sum_c W_c mean_c with W = +-w_h.
    weights = stratum_weights(sa, sb) if la is not None else {None: 1.0}
    values = np.concatenate([x, y])
    members = [m for m in sa.members] + [m + len(x) for m in sb.members]
    cell_weights = np.asarray([weights[lab] for lab in sa.labels] + [-weights[lab] for lab in sb.labels])
    cells = Strata(labels=tuple(("a", lab) for lab in sa.labels) + tuple(("b", lab) for lab in sb.labels),
                   members=tuple(members), n=len(values))
    test = two_sample_permutation_test(x, y, la, lb, n_permutations=n_permutations, seed=seed)
    interval = linear_bootstrap_interval(
        values, cells, cell_weights, confidence=confidence, method=method, n_resamples=n_resamples, rng=rng,
        single_note="each group has a single run in every test domain: nothing to resample, no interval",
        constant_note="values are constant within each group and test domain: zero-width interval")
    notes_small = [small_sample_note(s, unit="runs", where=f" in group {g}") for g, s in (("a", sa), ("b", sb))]
    dropped = int(np.count_nonzero(~keep_a) + np.count_nonzero(~keep_b))
    return UnpairedComparison(
        mean_diff=float(sum(w * values[m].mean() for m, w in zip(cells.members, cell_weights))),
        mean_a=float(x.mean()), mean_b=float(y.mean()),
        sd_a=float(np.std(x, ddof=1)) if len(x) > 1 else math.nan,
        sd_b=float(np.std(y, ddof=1)) if len(y) > 1 else math.nan,
        n_a=len(x), n_b=len(y), n_strata=len(sa.labels), ci_low=interval.low, ci_high=interval.high,
        confidence=float(confidence), method=interval.method, p_value=test.p_value, test=test.test,
        exact=test.exact, n_permutations=test.n_permutations, small_sample=any(notes_small),
        note=join_notes(interval.note, *notes_small, single_cell_note(cells, "run"), dropped_note(dropped, "value(s)")))
