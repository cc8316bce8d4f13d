"""Loss and accuracy of a model (or a logit-averaged ensemble) on every domain's splits.

Keys follow DomainBed (``env{i}_in_acc``, ``env{i}_out_acc``) plus the README's summary numbers:
``id_acc`` = accuracy over the pooled ``source-out`` samples, ``ood_acc`` = accuracy over every
sample of the test domain(s), and ``source_acc`` over the pooled ``source`` (training) samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flatlab.data import DomainSplits
from flatlab.data.base import SplitPart
from flatlab.errors import FlatlabError


def check_batch_size(batch_size: object, name: str = "batch_size") -> int:
    """``batch_size`` if it is a positive integer.

    Raises:
        FlatlabError: otherwise (0 would never end a pass; a negative size gives empty passes
            whose accuracy is NaN).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FlatlabError(f"{name} must be a positive integer, got {batch_size!r}")
    return batch_size


@torch.no_grad()
def _loss_correct(models: Sequence[nn.Module], splits: DomainSplits, part: SplitPart, batch_size: int,
                  device: torch.device | str) -> tuple[float, int, int]:
    """Summed cross-entropy, number correct and count on one part (ensemble = mean of logits)."""
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in splits.iter_batches([part], batch_size):
        x, y = x.to(device), y.to(device)
        logits = models[0](x)
        for m in models[1:]:
            logits = logits + m(x)
        logits = logits / len(models)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    return loss_sum, correct, count


def evaluate_models(models: nn.Module | Sequence[nn.Module], splits: DomainSplits, batch_size: int = 512,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """Evaluate one model, or an ensemble whose prediction is the mean of its members' logits.

    Returns:
        A flat dict: ``env{i}_{in,out}_{acc,loss}`` for every domain, ``id_acc``/``id_loss``
        (pooled source-out), ``ood_acc``/``ood_loss`` (pooled target), ``source_acc``/``source_loss``
        (pooled source in-splits), ``val_acc`` (mean of the source out-accuracies: DomainBed's
        training-domain validation), and ``domains`` with per-domain in/out/all accuracies.

    Raises:
        FlatlabError: ``batch_size`` is not a positive integer, or no model is given.
    """
    check_batch_size(batch_size)
    members = [models] if isinstance(models, nn.Module) else list(models)
    if not members:
        raise FlatlabError("an evaluation needs at least one model")
    was_training = [m.training for m in members]
    for m in members:
        m.eval()
    ds = splits.dataset
    out: dict[str, Any] = {}
    per: dict[str, dict[str, float]] = {}
    totals = {"in": [], "out": []}  # (env, loss_sum, correct, count)
    for env in range(len(ds.domains)):
        row: dict[str, float] = {}
        for which, idx in (("in", splits.in_idx[env]), ("out", splits.out_idx[env])):
            loss_sum, correct, count = _loss_correct(members, splits, SplitPart(env, idx), batch_size, device)
            acc = correct / count if count else float("nan")
            loss = loss_sum / count if count else float("nan")
            out[f"env{env}_{which}_acc"] = acc
            out[f"env{env}_{which}_loss"] = loss
            row[f"{which}_acc"] = acc
            totals[which].append((env, loss_sum, correct, count))
        n_all = sum(t[3] for w in totals.values() for t in w if t[0] == env)
        c_all = sum(t[2] for w in totals.values() for t in w if t[0] == env)
        row["acc"] = c_all / n_all if n_all else float("nan")
        per[ds.domains[env]] = row

    def pooled(which: Sequence[str], envs: Sequence[int]) -> tuple[float, float]:
        rows = [t for w in which for t in totals[w] if t[0] in envs]
        n = sum(t[3] for t in rows)
        if n == 0:
            return float("nan"), float("nan")
        return sum(t[2] for t in rows) / n, sum(t[1] for t in rows) / n

    out["id_acc"], out["id_loss"] = pooled(["out"], splits.source_envs)
    out["ood_acc"], out["ood_loss"] = pooled(["in", "out"], splits.test_envs)
    out["source_acc"], out["source_loss"] = pooled(["in"], splits.source_envs)
    out["val_acc"] = float(np.mean([out[f"env{e}_out_acc"] for e in splits.source_envs]))
    out["domains"] = per
    for m, flag in zip(members, was_training):
        m.train(flag)
    return out
