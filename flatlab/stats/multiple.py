r"""Multiple comparisons: Holm-Bonferroni adjusted p-values.

For m p-values sorted ascending, :math:`p_{(1)} \le \dots \le p_{(m)}`, Holm's step-down
adjusted p-values are

.. math::  \tilde p_{(k)} = \max_{j \le k} \min\big(1, (m - j + 1)\, p_{(j)}\big),

returned in the input order; rejecting every hypothesis with :math:`\tilde p < \alpha` controls
the family-wise error rate at :math:`\alpha` under any dependence (Holm 1979). scipy has no Holm
(``scipy.stats.false_discovery_control`` is Benjamini-Hochberg / -Yekutieli, which control the
false discovery rate instead), hence the few lines below. Ties keep their input order in the sort,
which does not change the adjusted values.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from flatlab.stats._common import as_vector


def holm(pvalues: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    NaN p-values (tests that could not be run) are passed through as NaN and do not count in m.

    Raises:
        ValueError: pvalues is not 1-D, or holds a value outside [0, 1] or an infinity.
    """
    p = as_vector(pvalues, "pvalues")
    finite = ~np.isnan(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        bad = p[finite][(p[finite] < 0) | (p[finite] > 1)][0]
        raise ValueError(f"pvalues must lie in [0, 1], got {bad}")
    out = np.full_like(p, np.nan)
    defined = np.flatnonzero(finite)
    m = len(defined)
    if m == 0:
        return out
    order = defined[np.argsort(p[defined], kind="stable")]
    factors = m - np.arange(m)  # (m - j + 1) for j = 1..m
    adjusted = np.maximum.accumulate(np.minimum(1.0, factors * p[order]))
    out[order] = adjusted
    return out
