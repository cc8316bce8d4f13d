r"""Report and figure columns of loss barriers (Frankle et al. 2020) stored in results files.

A barrier needs two checkpoints, so it is not a one-checkpoint measure: its runner
(:func:`flatlab.surface.barrier_runner.run_barrier`, ``flatlab barrier CKPT1 CKPT2``, a study's
``[[barriers]]``) stores it under the run of the first model, and the pairwise matrix of an
ensemble's members (:func:`~flatlab.surface.barrier_runner.run_member_barriers`) under the
ensemble's run. This module declares the columns the report and the figures read from those
groups (a :class:`~flatlab.measures.base.ColumnSource`).

On the line :math:`w(\alpha) = (1 - \alpha) w_1 + \alpha w_2` and a split with mean loss
:math:`L`,

.. math::

    B = \max_{\alpha \in \text{grid}} \; L(w(\alpha)) - \big[(1 - \alpha) L(w_1) + \alpha L(w_2)\big]
    \;\ge 0,

and the error barrier is the same on :math:`1 - \text{accuracy}`; the standard error is the
paired one of the per-sample gaps at the maximising grid point (:mod:`flatlab.surface.barrier`).
Larger = higher barrier = the two minima are less linearly connected.

Layout of ``/runs/<run_id>/barriers/<name>``:

* ``kind = "line"`` (two models): ``alphas``; per split a sub-group ``<split>/`` with
  ``losses``, ``accuracies``, ``loss_gaps``, ``loss_gap_stderrs``, ``error_gaps``,
  ``error_gap_stderrs``; attributes ``loss_barrier_<split>``, ``loss_barrier_<split>_stderr``,
  ``loss_barrier_<split>_alpha`` (and ``error_barrier_...``), ``splits``, both models
  (``model1_*``, ``model2_*``: checkpoint, sha256, run id, label), every setting and its
  ``settings_fingerprint``.
* ``kind = "pairwise"`` (an ensemble's members): ``labels``, ``pairs`` (P x 2 indices ``i < j``),
  ``alphas``; per split ``<split>/loss_barriers``, ``loss_barrier_stderrs``, ``error_barriers``,
  ``error_barrier_stderrs`` (m x m, symmetric, zero diagonal) and ``pair_losses`` (P x points);
  attributes ``loss_barrier_<split>`` = the mean over the P pairs and ``..._stderr`` = the mean of
  the pairs' standard errors, an upper bound on the mean's standard error (the pairs share the
  samples, so their errors are correlated; :math:`\mathrm{sd}(\frac1P\sum_p X_p) \le \frac1P
  \sum_p \mathrm{sd}(X_p)`), plus ``members`` (checkpoints, sha256, labels).

Columns: ``barrier_<loss|error>_<split>@<name>``, one per stored barrier and split, e.g.
``barrier_loss_target@fp-qat4``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from flatlab.measures.columns import Column, ColumnSource, Estimate, scalar

GROUP = "barriers"
#: Column names: barrier_<loss|error>_<split>@<name>.
NAME_PATTERN = re.compile(r"^barrier_(loss|error)_(source|source-out|target)@([A-Za-z0-9_-]+)$")
#: The splits a barrier may be measured on (a checkpoint's splits).
BARRIER_SPLITS = ("source", "source-out", "target")


def column_name(quantity: str, split: str, name: str) -> str:
    """``barrier_<quantity>_<split>@<name>``."""
    return f"barrier_{quantity}_{split}@{name}"


def barrier_groups(run: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The stored barrier groups of a run (name -> node), as read by ``read_results``."""
    node = run.get(GROUP)
    if not isinstance(node, Mapping):
        return {}
    return {name: child for name, child in node.items() if name != "attrs" and isinstance(child, Mapping)}


def read_barriers(run: Mapping[str, Any]) -> dict[str, Estimate]:
    """``{barrier_<loss|error>_<split>@<name>: B +- stderr}`` for every stored barrier."""
    out: dict[str, Estimate] = {}
    for name, node in barrier_groups(run).items():
        attrs = node.get("attrs", {})
        splits = attrs.get("splits") or [s for s in BARRIER_SPLITS if f"loss_barrier_{s}" in attrs]
        for split in splits:
            for quantity in ("loss", "error"):
                value = scalar(attrs.get(f"{quantity}_barrier_{split}"))
                if math.isnan(value):
                    continue
                se = scalar(attrs.get(f"{quantity}_barrier_{split}_stderr"))
                out[column_name(quantity, split, name)] = Estimate(value, se if math.isfinite(se) else None)
    return out


def _describe(m: re.Match[str]) -> str:
    what = "loss" if m.group(1) == "loss" else "error (1 - accuracy)"
    return (f"{what} barrier on the {m.group(2)} split of the line between the two models of barrier "
            f"{m.group(3)!r} (max excess over the chord; a pairwise one: mean over the members' pairs)")


def _label(m: re.Match[str]) -> str:
    unit = " (nats)" if m.group(1) == "loss" else ""
    return f"{m.group(1)} barrier on {m.group(2)}, {m.group(3)}{unit}"


def _order(m: re.Match[str]) -> tuple[str, int, int]:
    return (m.group(3), 0 if m.group(1) == "loss" else 1, BARRIER_SPLITS.index(m.group(2)))


COLUMNS = ColumnSource(
    "barriers", GROUP,
    (Column("barrier_<loss|error>_<split>@<name>", "loss or error barrier", "", "loss or error barrier between two models",
            pattern=NAME_PATTERN, describe_match=_describe, label_match=_label, order_match=_order),),
    read_barriers, summary="loss/error barriers between two checkpoints (flatlab barrier, [[barriers]] in a study)")

__all__ = ["BARRIER_SPLITS", "COLUMNS", "GROUP", "NAME_PATTERN", "barrier_groups", "column_name", "read_barriers"]
