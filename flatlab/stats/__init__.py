"""Statistics for deciding claims on a study: seeds are replicates, test domains are strata.

Every formula is stated in its module's docstring and in ``docs/statistics.md``:

* :mod:`flatlab.stats.bootstrap` -- :func:`summarize_group`: mean, sd, stderr and a stratified
  bootstrap CI (BCa by default, or percentile) of one variant's mean over seeds;
* :mod:`flatlab.stats.comparison` -- :func:`paired_comparison` (d = A - B on matched seeds and
  test domains: bootstrap CI and exact sign-flip p) and :func:`unpaired_comparison`;
* :mod:`flatlab.stats.permutation` -- the permutation tests themselves;
* :mod:`flatlab.stats.multiple` -- :func:`holm` adjusted p-values;
* :mod:`flatlab.stats.power` -- exact t / TOST power and the seeds a comparison needs;
* :mod:`flatlab.stats.correlation` -- Kendall / Spearman with CIs, Jiang et al.'s granulated tau;
* :mod:`flatlab.stats.verdict` -- :func:`decide`: supported / contradicted / inconclusive.

Inputs are plain arrays: one value per run, stratum labels (test domains), and for paired
comparisons two arrays matched position by position on (seed, test domain). NaN marks a missing
value and is dropped (pairwise for paired data and correlations); results say so in ``note``.
Everything random is drawn from ``numpy.random.default_rng(seed)``: same inputs, same numbers.
"""

from __future__ import annotations

from flatlab.stats.bootstrap import GroupSummary, summarize_group
from flatlab.stats.comparison import (
    PairedComparison,
    UnpairedComparison,
    paired_comparison,
    unpaired_comparison,
)
from flatlab.stats.correlation import (
    AxisTau,
    CorrelationResult,
    GranulatedTau,
    GranulatedTauCI,
    correlation_with_ci,
    granulated_tau,
    granulated_tau_with_ci,
)
from flatlab.stats.multiple import holm
from flatlab.stats.permutation import PermutationTest, sign_flip_test, two_sample_permutation_test
from flatlab.stats.power import (
    correlation_runs_needed,
    margin_power_at,
    margin_seeds_needed,
    power_at,
    seeds_needed,
)
from flatlab.stats.verdict import Verdict, confidence_for, decide

__all__ = [
    "AxisTau",
    "CorrelationResult",
    "GranulatedTau",
    "GranulatedTauCI",
    "GroupSummary",
    "PairedComparison",
    "PermutationTest",
    "UnpairedComparison",
    "Verdict",
    "confidence_for",
    "correlation_runs_needed",
    "correlation_with_ci",
    "decide",
    "granulated_tau",
    "granulated_tau_with_ci",
    "holm",
    "margin_power_at",
    "margin_seeds_needed",
    "paired_comparison",
    "power_at",
    "seeds_needed",
    "sign_flip_test",
    "summarize_group",
    "two_sample_permutation_test",
    "unpaired_comparison",
]
