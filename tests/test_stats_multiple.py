"""flatlab.stats.multiple.holm against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from flatlab.stats import holm


def test_holm_hand_example() -> None:
    # m = 5, input order:        0.01   0.04   0.03   0.005  0.20
    # sorted: p_(1..5) = 0.005 (x5 = 0.025), 0.01 (x4 = 0.04), 0.03 (x3 = 0.09), 0.04 (x2 = 0.08 -> max 0.09),
    #                    0.20 (x1 = 0.20)
    p = [0.01, 0.04, 0.03, 0.005, 0.20]
    np.testing.assert_allclose(holm(p), [0.04, 0.09, 0.09, 0.025, 0.20], rtol=1e-12)


def test_holm_caps_at_one_and_keeps_monotone() -> None:
    # sorted 0.3 (x3 = 0.9), 0.4 (x2 = 0.8 -> 0.9), 0.6 (x1 = 0.6 -> 0.9)
    np.testing.assert_allclose(holm([0.6, 0.3, 0.4]), [0.9, 0.9, 0.9], rtol=1e-12)
    # 0.5 x 2 = 1.0, 0.7 x 1 = 0.7 -> 1.0 (running max), capped at 1
    np.testing.assert_allclose(holm([0.7, 0.5]), [1.0, 1.0])
    np.testing.assert_allclose(holm([0.02]), [0.02])


def test_holm_nan_passes_through_and_does_not_count() -> None:
    # m = 3 finite: 0.01 x3 = 0.03, 0.02 x2 = 0.04, 0.04 x1 = 0.04
    out = holm([0.02, np.nan, 0.01, 0.04, np.nan])
    np.testing.assert_allclose(out, [0.04, np.nan, 0.03, 0.04, np.nan], rtol=1e-12)
    assert np.isnan(holm([np.nan, np.nan])).all()
    assert holm([]).shape == (0,)


def test_holm_ties() -> None:
    # two equal smallest p: 0.01 x3 = 0.03, 0.01 x2 = 0.02 -> 0.03, 0.5 x1 -> 0.5
    np.testing.assert_allclose(holm([0.01, 0.5, 0.01]), [0.03, 0.5, 0.03], rtol=1e-12)


@pytest.mark.parametrize("bad, match", [([0.1, 1.2], r"pvalues must lie in \[0, 1\], got 1.2"),
                                        ([-0.1], r"pvalues must lie in \[0, 1\]"),
                                        ([[0.1]], "pvalues must be 1-D"),
                                        (["a"], "pvalues must be a 1-D sequence of numbers")])
def test_holm_bad_input(bad, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        holm(bad)
