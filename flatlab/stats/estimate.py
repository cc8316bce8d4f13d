"""The interval estimate: what every result of :mod:`flatlab.stats` with a confidence interval
shares (a group's mean, a comparison's difference, a correlation, a granulated tau)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, kw_only=True)
class IntervalEstimate:
    """What every interval estimate of :mod:`flatlab.stats` carries besides its point estimate.

    Attributes:
        ci_low, ci_high: the bootstrap interval of the estimate (NaN when there is none).
        confidence: its nominal coverage.
        n_strata: number of test domains (1 when unstratified).
        small_sample: True when a test domain holds fewer than ``MIN_RELIABLE_N`` values
            (the interval is unreliable).
        note: why the interval is missing, degenerate or unreliable, and what was dropped;
            None when there is nothing to say.
    """

    ci_low: float
    ci_high: float
    confidence: float
    n_strata: int
    small_sample: bool
    note: str | None
    #: The field that holds the point estimate the interval is about (set by each subclass).
    estimate_of: ClassVar[str]

    @property
    def estimate(self) -> float:
        """The point estimate the interval is about."""
        return float(getattr(self, self.estimate_of))


__all__ = ["IntervalEstimate"]
