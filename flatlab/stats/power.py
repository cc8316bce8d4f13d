r"""Power and the number of seeds a comparison needs.

**Difference from zero (direction claims).** Paired: n pairs with differences
:math:`d_i \sim N(\delta, \sigma^2)`, one-sample t-test of :math:`H_0: \delta = 0`, statistic
:math:`t = \bar d / (s_d/\sqrt n)` with :math:`\nu = n - 1` degrees of freedom and
noncentrality :math:`\lambda = \delta\sqrt n / \sigma`. Unpaired: two groups of n runs each,
common sd :math:`\sigma`, two-sample (pooled-variance) t-test, :math:`\nu = 2n - 2`,
:math:`\lambda = \delta / (\sigma\sqrt{2/n})`. Exactly (T ~ noncentral t, ``scipy.stats.nct``):

.. math::  \text{power}_{two-sided}(n) = P(T > t_{1-\alpha/2,\nu}) + P(T < -t_{1-\alpha/2,\nu}),
           \qquad \text{power}_{one-sided}(n) = P(T > t_{1-\alpha,\nu}),

with :math:`|\delta|` in :math:`\lambda`: the one-sided test is in the direction of the effect. :func:`seeds_needed` is the smallest
:math:`n \ge 2` with power >= the target, found by bisection on [2, max_n] (power increases with
n; TOST's power can dip over the first few n, but only at powers far below any useful target). The familiar normal
approximation, which the exact n exceeds by about 1 or 2 at small n (the t's heavier tails), is

.. math::  n \approx \Big(\frac{(z_{1-\alpha/2} + z_{1-\beta})\,\sigma}{\delta}\Big)^2
           \quad\text{(paired; twice that per group when unpaired)}.

The report's paired p-value comes from the sign-flip permutation test, not the t-test. On normal
differences the two agree closely: the permutation test is the t-test's conditional
(distribution-free) version, their rejection regions coincide asymptotically and its Pitman
efficiency relative to the t-test is 1 (Hoeffding 1952; Lehmann & Romano, Testing Statistical
Hypotheses, sec. 17.2), so the t-test's exact power is the number to plan with; at very small n
the permutation test is a little less powerful because its p-values are discrete (its smallest
two-sided p is :math:`2^{1-n}`).

**Margins (at-least-as-good and equivalence claims).** With margin :math:`\Delta > 0` and the same
t statistics: "at least" (:math:`H_0: \delta \le -\Delta`) is the one-sided test of
:math:`\delta + \Delta`, power :math:`P(T' > t_{1-\alpha,\nu})` with :math:`T'` noncentral t of
noncentrality :math:`(\delta + \Delta)/\text{se}_1` (se_1 = :math:`\sigma/\sqrt n` paired,
:math:`\sigma\sqrt{2/n}` unpaired); "at most" mirrors it with :math:`\Delta - \delta`.
Equivalence is TOST (both one-sided tests at level :math:`\alpha`, i.e. the
:math:`1 - 2\alpha` CI inside :math:`(-\Delta, \Delta)`); both tests share s, so its exact power is
the one-dimensional integral over :math:`q = \nu s^2/\sigma^2 \sim \chi^2_\nu`

.. math::  \text{power} = \int_0^{q_{max}} \Big[\Phi\big(k(\Delta-\delta)/\sigma - t\sqrt{q/\nu}\big)
           - \Phi\big(-k(\Delta+\delta)/\sigma + t\sqrt{q/\nu}\big)\Big]\, f_{\chi^2_\nu}(q)\, dq,

:math:`k = \sqrt n` (paired) or :math:`\sqrt{n/2}` (unpaired), :math:`t = t_{1-\alpha,\nu}`,
:math:`q_{max} = \nu\,(k\Delta/(\sigma t))^2` (beyond it the acceptance interval is empty).

**Correlations.** Runs needed for the two-sided test of no correlation to have the target power
at a true Kendall tau or Spearman rho r, by the Fisher z approximation
:math:`\operatorname{atanh}(\hat r) \approx N(\operatorname{atanh} r, v/(n - c))`, with the
variance factor :math:`v_0` under the null (where the critical value comes from) and
:math:`v_1` under the alternative:

.. math::  n = c + \Big(\frac{z_{1-\alpha/2}\sqrt{v_0} + z_{1-\beta}\sqrt{v_1}}{\operatorname{atanh}|r|}\Big)^2,

Kendall: c = 4, :math:`v_0 = v_1 = 0.437` (Fieller, Hartley & Pearson 1957; the exact null
variance of tau, 2(2n+5)/(9n(n-1)), is 0.444/n to first order); Spearman: c = 3, :math:`v_0 = 1`
(the null variance of rho is 1/(n-1)), :math:`v_1 = 1 + r^2/2` (Bonett & Wright 2000); rounded
up, at least 5 (below that flatlab reports no p-value).

**Edge cases.** effect = 0: no n gives more power than :math:`\alpha`; the functions return None,
meaning "no effect to detect". sd = 0 (every run gives the same difference): the minimum n, 2.
None is also returned when not even ``max_n`` reaches the power (the effect is too small to
settle with any practical number of seeds), and for a margin claim whose assumed effect lies on
the wrong side of the margin (more seeds would only contradict it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
from scipy import special, stats

from flatlab.stats._common import check_choice, check_int, check_open_unit, check_real

MarginKind = Literal["at_least", "at_most", "equivalent"]
MARGIN_KINDS: tuple[str, ...] = ("at_least", "at_most", "equivalent")

#: Fewest seeds (per group) a t-test can use.
MIN_SEEDS = 2


def _dof_and_scale(n: int, paired: bool) -> tuple[int, float]:
    """Degrees of freedom and k such that the mean difference has sd sigma / k."""
    return (n - 1, math.sqrt(n)) if paired else (2 * n - 2, math.sqrt(n / 2))


def power_at(n: int, effect: float, sd: float, alpha: float = 0.05, *, paired: bool = True,
             two_sided: bool = True) -> float:
    r"""Exact power of the t-test of no difference at true effect ``effect`` (module docstring).

    Args:
        n: pairs (paired) or runs per group (unpaired), >= 2.
        effect: true mean difference delta.
        sd: sd of the paired differences (paired) or of one run (unpaired), >= 0.
        alpha: level of the test.
        paired: one-sample t on the differences (True) or two-sample t on two groups of n.
        two_sided: two-sided test (True) or one-sided in the direction of the effect.
    """
    check_int(n, "n", MIN_SEEDS)
    effect = check_real(effect, "effect")
    sd = check_real(sd, "sd", nonnegative=True)
    alpha = check_open_unit(alpha, "alpha")
    if effect == 0:
        return alpha
    if sd == 0:
        return 1.0
    dof, k = _dof_and_scale(n, paired)
    lam = abs(effect) * k / sd
    if two_sided:
        crit = float(stats.t.ppf(1 - alpha / 2, dof))
        return _nct_sf(crit, dof, lam) + _nct_lower_tail(-crit, dof, lam)
    return _nct_sf(float(stats.t.ppf(1 - alpha, dof)), dof, lam)


def _nct_sf(x: float, dof: int, lam: float) -> float:
    value = float(stats.nct.sf(x, dof, lam))
    if math.isnan(value):
        raise ArithmeticError(f"noncentral t tail undefined at x={x}, dof={dof}, nc={lam}")
    return value


def _nct_lower_tail(x: float, dof: int, lam: float) -> float:
    """P(T <= x) for x < 0 <= lam, as P(T' >= -x) with T' of noncentrality -lam (symmetry).

    scipy's nct.cdf returns NaN for some far-tail arguments where the mirrored sf does not; a NaN
    left is replaced by 0 only when the bound P(T <= x) <= P(T < 0) = Phi(-lam) makes it negligible.
    """
    value = float(stats.nct.sf(-x, dof, -lam))
    if math.isnan(value):
        if stats.norm.cdf(-lam) < 1e-9:
            return 0.0
        raise ArithmeticError(f"noncentral t tail undefined at x={x}, dof={dof}, nc={lam}")
    return value


def margin_power_at(n: int, effect: float, sd: float, margin: float, *, kind: MarginKind,
                    alpha: float = 0.05, paired: bool = True) -> float:
    r"""Exact power of the margin test of ``kind`` (one-sided shifted t, or TOST; module docstring).

    Args:
        n: pairs or runs per group, >= 2.
        effect: assumed true difference delta (A - B).
        sd: sd of the differences (paired) or of one run (unpaired).
        margin: Delta > 0.
        kind: "at_least" (delta > -Delta), "at_most" (delta < Delta) or "equivalent" (|delta| < Delta).
        alpha: level of each one-sided test.
        paired: paired or two groups of n.
    """
    check_int(n, "n", MIN_SEEDS)
    effect = check_real(effect, "effect")
    sd = check_real(sd, "sd", nonnegative=True)
    margin = check_real(margin, "margin", positive=True)
    check_choice(kind, "kind", MARGIN_KINDS)
    alpha = check_open_unit(alpha, "alpha")
    dof, k = _dof_and_scale(n, paired)
    crit = float(stats.t.ppf(1 - alpha, dof))
    if kind in ("at_least", "at_most"):
        shift = effect + margin if kind == "at_least" else margin - effect
        if sd == 0:
            return 1.0 if shift > 0 else 0.0
        return _nct_sf(crit, dof, shift * k / sd)
    if sd == 0:
        return 1.0 if abs(effect) < margin else 0.0
    return _tost_power(k * (margin - effect) / sd, k * (margin + effect) / sd, crit, dof)


#: Gauss-Legendre nodes for the TOST integral (the integrand is smooth on the integration range).
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(256)


def _tost_power(upper: float, lower: float, crit: float, dof: int) -> float:
    """E_U[(Phi(upper - crit U) - Phi(-lower + crit U))^+], U = sqrt(chi2_dof / dof).

    The module docstring's integral in u = sqrt(q / dof) (no singularity at 0 for dof = 1),
    over the chi bulk (outside it lies < 2e-14 of the mass) cut at u* = (upper + lower) / (2 crit),
    where the acceptance interval becomes empty: the integrand is smooth there, so a 256-point
    Gauss-Legendre rule is exact to ~1e-12. (Adaptive quad over [0, q_max] misses the narrow
    peak of the chi-square density when q_max >> dof.)
    """
    u_lo = math.sqrt(float(stats.chi2.ppf(1e-14, dof)) / dof)
    u_hi = min(math.sqrt(float(stats.chi2.isf(1e-14, dof)) / dof), (upper + lower) / (2 * crit))
    if u_hi <= u_lo:
        return 0.0
    u = 0.5 * (u_hi - u_lo) * _GL_NODES + 0.5 * (u_hi + u_lo)
    q = dof * u * u
    log_chi2 = (dof / 2 - 1) * np.log(q) - q / 2 - (dof / 2) * math.log(2) - special.gammaln(dof / 2)
    density = 2 * dof * u * np.exp(log_chi2)
    bracket = np.clip(special.ndtr(upper - crit * u) - special.ndtr(-lower + crit * u), 0.0, None)
    value = 0.5 * (u_hi - u_lo) * float(np.sum(_GL_WEIGHTS * bracket * density))
    return float(min(1.0, max(0.0, value)))


def _smallest_n(power_of: Callable[[int], float], target: float, max_n: int) -> int | None:
    """Smallest n in [2, max_n] with power_of(n) >= target, power increasing in n; None if none."""
    if power_of(MIN_SEEDS) >= target:
        return MIN_SEEDS
    if power_of(max_n) < target:
        return None
    lo, hi = MIN_SEEDS, max_n  # power(lo) < target <= power(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if power_of(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def _check_plan(alpha: float, power: float, max_n: int) -> tuple[float, float, int]:
    return (check_open_unit(alpha, "alpha"), check_open_unit(power, "power"),
            check_int(max_n, "max_n", MIN_SEEDS))


def seeds_needed(effect: float, sd: float, *, alpha: float = 0.05, power: float = 0.8, paired: bool = True,
                 two_sided: bool = True, max_n: int = 10_000) -> int | None:
    r"""Smallest n (pairs, or runs per group when unpaired) at which the t-test has ``power``.

    Exact, with the noncentral t (module docstring); the normal approximation
    :math:`n \approx ((z_{1-\alpha/2} + z_{1-\beta})\sigma/\delta)^2` is a little smaller.

    Returns:
        n >= 2; 2 when sd = 0 and effect != 0; None when effect = 0 ("no effect to detect") or
        when even ``max_n`` does not reach the power.
    """
    effect = check_real(effect, "effect")
    sd = check_real(sd, "sd", nonnegative=True)
    alpha, power, max_n = _check_plan(alpha, power, max_n)
    if effect == 0:
        return None
    if sd == 0:
        return MIN_SEEDS
    return _smallest_n(lambda n: power_at(n, effect, sd, alpha, paired=paired, two_sided=two_sided), power, max_n)


def margin_seeds_needed(effect: float, sd: float, margin: float, *, kind: MarginKind, alpha: float = 0.05,
                        power: float = 0.8, paired: bool = True, max_n: int = 10_000) -> int | None:
    """Smallest n at which the margin test of ``kind`` (at level alpha) has ``power``.

    Returns:
        n >= 2, or None when the assumed effect is on the wrong side of the margin (at_least:
        effect <= -margin; at_most: effect >= margin; equivalent: |effect| >= margin), where more
        seeds would not support the claim, or when max_n does not reach the power.
    """
    effect = check_real(effect, "effect")
    sd = check_real(sd, "sd", nonnegative=True)
    margin = check_real(margin, "margin", positive=True)
    check_choice(kind, "kind", MARGIN_KINDS)
    alpha, power, max_n = _check_plan(alpha, power, max_n)
    reachable = {"at_least": effect > -margin, "at_most": effect < margin,
                 "equivalent": abs(effect) < margin}[kind]
    if not reachable:
        return None
    if sd == 0:
        return MIN_SEEDS
    return _smallest_n(lambda n: margin_power_at(n, effect, sd, margin, kind=kind, alpha=alpha, paired=paired),
                       power, max_n)


def correlation_runs_needed(statistic: float, *, method: Literal["kendall", "spearman"] = "kendall",
                            alpha: float = 0.05, power: float = 0.8, max_n: int = 10_000) -> int | None:
    r"""Runs needed for the two-sided test of no correlation at true tau / rho (Fisher z; module docstring).

    Returns:
        n >= 5, or None for statistic 0 ("no effect to detect") or when n would exceed max_n.
    """
    r = check_real(statistic, "statistic")
    if abs(r) > 1:
        raise ValueError(f"statistic must be in [-1, 1], got {statistic!r}")
    check_choice(method, "method", ("kendall", "spearman"))
    alpha, power, max_n = _check_plan(alpha, power, max_n)
    if r == 0:
        return None
    offset, var_null, var_alt = (4.0, 0.437, 0.437) if method == "kendall" else (3.0, 1.0, 1.0 + r * r / 2)
    z = stats.norm.ppf(1 - alpha / 2) * math.sqrt(var_null) + stats.norm.ppf(power) * math.sqrt(var_alt)
    n = 5 if abs(r) == 1 else max(5, math.ceil(offset + (z / math.atanh(abs(r))) ** 2))
    return n if n <= max_n else None
