r"""Permutation tests: the sign-flip test of paired differences and the two-sample label test.

**Sign-flip test** (paired; docs/measures.md 9). For differences :math:`d_1..d_n` (variant A minus
variant B on the same seed and test domain), under :math:`H_0` each :math:`d_i` is symmetric
about 0, so its sign is exchangeable. With :math:`S(\varepsilon) = |\sum_i \varepsilon_i d_i|`,

.. math::  p = \frac{\#\{\varepsilon \in \{\pm1\}^n : S(\varepsilon) \ge S(\mathbf 1) - \tau\}}{2^n},
           \qquad \tau = 10^{-9} \sum_i |d_i|,

the share of the :math:`2^n` sign patterns whose absolute mean is at least the observed one
(two-sided; :math:`\tau` makes patterns that tie the observed value up to rounding count as ties).
It is enumerated exactly for :math:`n \le` ``exact_max_n`` (only the :math:`2^{n-1}` patterns with
:math:`\varepsilon_1 = +1` are needed: S is invariant under flipping every sign); beyond, N random
patterns give the Monte Carlo p-value :math:`(\#\{S \ge S_{obs} - \tau\} + 1)/(N + 1)`, which is
valid (never below the exact p in expectation). The flip of pair i is a transformation of that
pair alone, so the test is also valid when pairs come from different test domains (strata): the
null distribution is the same whether or not the flips are grouped by stratum.

**Two-sample (unpaired) test.** Values :math:`a_1..a_{n_a}`, :math:`b_1..b_{n_b}`; statistic
:math:`|T|`, T = difference of means (with strata, the stratum-weighted difference
:math:`T = \sum_h w_h (\bar a_h - \bar b_h)`, :math:`w_h = (n_{a,h} + n_{b,h}) / (n_a + n_b)`).
Under :math:`H_0` the group labels are exchangeable (within each stratum when strata are given),
and p = the share of relabelings with :math:`|T^\pi| \ge |T_{obs}|` (same tolerance idea).
Unstratified, this is :func:`scipy.stats.permutation_test` with statistic |T| and
``alternative="greater"``; it enumerates all :math:`\binom{n_a+n_b}{n_a}` relabelings when there
are at most ``n_permutations`` of them and otherwise uses the (count + 1)/(N + 1) Monte Carlo
p-value. scipy permutes labels across the whole sample and cannot keep strata apart, so the
stratified test is written here: exact over the product of the per-stratum relabelings
:math:`\prod_h \binom{n_{a,h}+n_{b,h}}{n_{a,h}}` when that is at most ``n_permutations``, Monte
Carlo otherwise, with T additive over strata so each stratum's contributions are computed once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats

from flatlab.stats._common import BLOCK_ELEMENTS, Strata, as_labels, check_int

#: Largest n the exact sign-flip enumeration accepts (2^23 patterns, enumerated in blocks).
MAX_EXACT_SIGN_FLIP = 24

#: Default number of random sign patterns / relabelings for Monte Carlo p-values.
DEFAULT_PERMUTATIONS = 100_000

#: Relative tolerance for ties with the observed statistic.
TIE_RTOL = 1e-9


@dataclass(frozen=True)
class PermutationTest:
    """A permutation p-value.

    Attributes:
        statistic: the observed test statistic (signed mean difference).
        p_value: two-sided p-value.
        exact: True if every sign pattern / relabeling was enumerated, False for Monte Carlo.
        n_permutations: patterns enumerated (exact) or drawn (Monte Carlo).
        test: the test's name.
    """

    statistic: float
    p_value: float
    exact: bool
    n_permutations: int
    test: str


def sign_flip_test(differences: npt.ArrayLike, *, exact_max_n: int = 16,
                   n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> PermutationTest:
    r"""Two-sided sign-flip permutation test of mean(d) = 0 (formula in the module docstring).

    Args:
        differences: the paired differences d_i (finite; drop missing pairs first).
        exact_max_n: enumerate all sign patterns when n <= exact_max_n (at most 24).
        n_permutations: random sign patterns for the Monte Carlo p-value when n > exact_max_n.
        seed: seed of the Generator drawing the patterns.
    """
    check_int(exact_max_n, "exact_max_n", 0, MAX_EXACT_SIGN_FLIP)
    check_int(n_permutations, "n_permutations", 1)
    check_int(seed, "seed", 0)
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0 or not np.all(np.isfinite(d)):
        raise ValueError("differences must be a non-empty 1-D array of finite numbers")
    n = len(d)
    observed = float(np.sum(d))
    threshold = abs(observed) - TIE_RTOL * float(np.sum(np.abs(d)))
    name = "sign-flip permutation"
    if n <= exact_max_n:
        # Patterns with eps_1 = +1: bit k of the pattern index sets the sign of d_{k+1}.
        total = 1 << (n - 1)
        bits = np.arange(n - 1, dtype=np.int64)
        block = max(1, BLOCK_ELEMENTS // n)
        count = 0
        for start in range(0, total, block):
            codes = np.arange(start, min(start + block, total), dtype=np.int64)
            signs = 1.0 - 2.0 * ((codes[:, None] >> bits) & 1)
            sums = d[0] + signs @ d[1:]
            count += int(np.count_nonzero(np.abs(sums) >= threshold))
        return PermutationTest(observed / n, count / total, True, 2 * total, name)
    rng = np.random.default_rng(seed)
    block = max(1, BLOCK_ELEMENTS // n)
    count = 0
    for start in range(0, n_permutations, block):
        b = min(block, n_permutations - start)
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(b, n))
        count += int(np.count_nonzero(np.abs(signs @ d) >= threshold))
    return PermutationTest(observed / n, (count + 1) / (n_permutations + 1), False, int(n_permutations), name)


def two_sample_permutation_test(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64],
                                strata_a: Sequence[Hashable] | None = None,
                                strata_b: Sequence[Hashable] | None = None, *,
                                n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> PermutationTest:
    r"""Two-sided two-sample permutation test of equal means (module docstring), within strata if given.

    ``a`` and ``b`` must be finite 1-D arrays; with strata, both label lists must be given and
    hold the same set of labels.
    """
    check_int(n_permutations, "n_permutations", 1)
    check_int(seed, "seed", 0)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    for name, v in (("a", a), ("b", b)):
        if v.ndim != 1 or len(v) == 0 or not np.all(np.isfinite(v)):
            raise ValueError(f"{name} must be a non-empty 1-D array of finite numbers")
    if (strata_a is None) != (strata_b is None):
        raise ValueError("strata_a and strata_b must be given together (or neither)")
    if strata_a is None or strata_b is None:
        if min(len(a), len(b)) >= 2:
            return _scipy_two_sample(a, b, n_permutations, seed)
        # scipy refuses a group of one; the within-stratum test with one stratum is the same test
        res = _stratified_two_sample(a, b, [0] * len(a), [0] * len(b), n_permutations, seed)
        return PermutationTest(res.statistic, res.p_value, res.exact, res.n_permutations, "two-sample permutation")
    la, lb = as_labels(strata_a, len(a), "strata_a"), as_labels(strata_b, len(b), "strata_b")
    assert la is not None and lb is not None
    if set(la) != set(lb):
        raise ValueError("strata_a and strata_b must hold the same test domains")
    return _stratified_two_sample(a, b, la, lb, n_permutations, seed)


def stratum_weights(sa: Strata, sb: Strata) -> dict[Hashable, float]:
    """w_h = (n_{a,h} + n_{b,h}) / (n_a + n_b) per stratum label."""
    total = sa.n + sb.n
    size_b = dict(zip(sb.labels, sb.sizes))
    return {label: (int(size) + int(size_b[label])) / total for label, size in zip(sa.labels, sa.sizes)}


def _scipy_two_sample(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64],
                      n_permutations: int, seed: int) -> PermutationTest:
    def abs_diff(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], axis: int = -1) -> npt.NDArray[np.float64]:
        return np.abs(np.mean(x, axis=axis) - np.mean(y, axis=axis))

    relabelings = math.comb(len(a) + len(b), len(a))
    res = stats.permutation_test((a, b), abs_diff, permutation_type="independent", vectorized=True,
                                 n_resamples=n_permutations, alternative="greater",
                                 rng=np.random.default_rng(seed))
    exact = relabelings <= n_permutations
    return PermutationTest(float(np.mean(a) - np.mean(b)), float(res.pvalue), exact,
                           relabelings if exact else int(n_permutations), "two-sample permutation")


def _stratified_two_sample(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64],
                           strata_a: Sequence[Hashable], strata_b: Sequence[Hashable],
                           n_permutations: int, seed: int) -> PermutationTest:
    sa, sb = Strata.of(list(strata_a), len(a)), Strata.of(list(strata_b), len(b))
    weights = stratum_weights(sa, sb)
    members_b = dict(zip(sb.labels, sb.members))
    # Per stratum: pooled values, group-a size and weight; T = sum_h w_h (mean_a,h - mean_b,h).
    parts = []
    for label, ma in zip(sa.labels, sa.members):
        pooled = np.concatenate([a[ma], b[members_b[label]]])
        parts.append((pooled, len(ma), weights[label]))
    observed = sum(w * (p[:k].mean() - p[k:].mean()) for p, k, w in parts)
    scale = sum(w * np.abs(p).mean() for p, k, w in parts)
    threshold = abs(observed) - TIE_RTOL * 2 * scale
    relabelings = math.prod(math.comb(len(p), k) for p, k, _ in parts)
    name = "stratified two-sample permutation"
    if relabelings <= n_permutations:
        total = np.zeros(1)
        for pooled, k, w in parts:  # all relabelings of this stratum, added to every partial sum
            chosen = np.asarray(list(itertools.combinations(range(len(pooled)), k)), dtype=np.intp)
            sum_a = pooled[chosen].sum(axis=1)
            contrib = w * (sum_a / k - (pooled.sum() - sum_a) / (len(pooled) - k))
            total = (total[:, None] + contrib[None, :]).ravel()
        count = int(np.count_nonzero(np.abs(total) >= threshold))
        return PermutationTest(float(observed), count / relabelings, True, relabelings, name)
    rng = np.random.default_rng(seed)
    count = 0
    block = max(1, BLOCK_ELEMENTS // max(sa.n + sb.n, 1))
    for start in range(0, n_permutations, block):
        m = min(block, n_permutations - start)
        total = np.zeros(m)
        for pooled, k, w in parts:
            perm = rng.permuted(np.broadcast_to(pooled, (m, len(pooled))), axis=1)
            total += w * (perm[:, :k].mean(axis=1) - perm[:, k:].mean(axis=1))
        count += int(np.count_nonzero(np.abs(total) >= threshold))
    return PermutationTest(float(observed), (count + 1) / (n_permutations + 1), False, int(n_permutations), name)
