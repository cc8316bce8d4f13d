"""Ensembles of checkpoints (EoQ: an ensemble of quantized models, QT-DoG).

The prediction is the argmax of the mean of the members' logits (docs/measures.md 1, EoQ); the
ensemble is evaluated on every domain with the same keys as ``flatlab evaluate``. Members must
share the data set, test domain(s) and in/out split, or ``id_acc`` would partly be measured on
some member's training data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flatlab.checkpoint import Checkpoint, load_checkpoint
from flatlab.errors import ConfigError, FlatlabError
from flatlab.evaluate import evaluate_models
from flatlab.io import atomic_write_text, dumps_json, sha256_file
from flatlab.quant.packing import size_report

ENSEMBLE_FORMAT = "flatlab-ensemble"

#: meta keys that must agree across members, and what a mismatch means for the user.
_MUST_MATCH: list[tuple[str, str]] = [
    ("dataset", "mix data sets"),
    ("dataset_options", "mix data-set options (e.g. --resolution)"),
    ("domains", "mix domain lists"),
    ("test_envs", "mix test domains"),
    ("num_classes", "mix numbers of classes"),
    ("data_hash", "were trained on different data files"),
    ("trial_seed", "use different in/out splits (trial_seed): train them with the same --trial-seed"),
    ("holdout_fraction", "use different --holdout-fraction values"),
]


def load_members(paths: Sequence[str | os.PathLike[str]]) -> list[Checkpoint]:
    """Load ensemble members and check that they can be averaged and evaluated together.

    Raises:
        FlatlabError: no member, a checkpoint given twice, or members that mix data sets, test
            domains or splits.
    """
    if not paths:
        raise FlatlabError("an ensemble needs at least one checkpoint")
    members = [load_checkpoint(p) for p in paths]
    digests: dict[str, Path | None] = {}
    for ckpt in members:
        digest = sha256_file(ckpt.path) if ckpt.path else ""
        if digest in digests:
            raise FlatlabError(f"{ckpt.path} is the same checkpoint as {digests[digest]}: give each member once")
        digests[digest] = ckpt.path
    first = members[0]
    for ckpt in members[1:]:
        for key, problem in _MUST_MATCH:
            a, b = first.meta.get(key), ckpt.meta.get(key)
            if a != b:
                raise FlatlabError(f"ensemble members {problem}: {first.path} has {key}={a!r}, "
                                   f"{ckpt.path} has {key}={b!r}")
    return members


def ensemble_id(digests: Sequence[str]) -> str:
    """Stable id of an ensemble: 16 hex of the SHA-256 of its members' sorted SHA-256s."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16]


def evaluate_ensemble(members: Sequence[Checkpoint], device: torch.device | str = "cpu", batch_size: int = 512,
                      data_dir: str | None = None) -> dict[str, Any]:
    """Evaluate the logit-averaged ensemble of ``members`` on every domain.

    Returns:
        ``evaluate_models``' keys (``id_acc``, ``ood_acc``, ``env{i}_in_acc``, ...) plus
        ``members`` (path, sha256, algorithm, bits, seed, its own recorded accuracies and storage
        size), ``num_members``, ``total_size_bytes`` (sum of the members' storage: packed size for
        quantized members, FP32 for the others), ``fp32_model_bytes`` (one FP32 model of the first
        member's architecture), ``size_x_fp32`` = total / that (EoQ with 5 7-bit members: ~1.1) and
        ``environment`` (:func:`flatlab.environment.environment`: threads, versions, device, CPU).
    """
    models = [ckpt.build_model(device) for ckpt in members]
    metrics = evaluate_models(models, members[0].splits(data_dir), batch_size, device)
    rows = []
    for ckpt, model in zip(members, models):
        sizes = size_report(model)
        acc = ckpt.meta.get("accuracies") or {}
        rows.append({"checkpoint": str(ckpt.path), "sha256": sha256_file(ckpt.path) if ckpt.path else None,
                     "algorithm": ckpt.meta.get("algorithm"), "model": ckpt.meta.get("model"),
                     "bits": ckpt.meta.get("bits"), "act_bits": ckpt.meta.get("act_bits"),
                     "seed": ckpt.meta.get("seed"), "step": ckpt.meta.get("step"),
                     "id_acc": acc.get("id_acc"), "ood_acc": acc.get("ood_acc"),
                     "size_bytes": sizes["packed_bytes"], "fp32_bytes": sizes["fp32_bytes"]})
    total = sum(r["size_bytes"] for r in rows)
    fp32_one = rows[0]["fp32_bytes"]
    from flatlab.environment import environment

    return {**metrics, "dataset": members[0].meta["dataset"], "test_envs": members[0].meta["test_envs"],
            "members": rows, "num_members": len(rows), "ensemble_id": ensemble_id([r["sha256"] or "" for r in rows]),
            "total_size_bytes": total, "fp32_model_bytes": fp32_one, "size_x_fp32": total / fp32_one,
            "environment": environment(device)}


def check_ensemble_outputs(out_dir: str | os.PathLike[str] | None, results_file: str | os.PathLike[str] | None) -> None:
    """Check, before any member is loaded or evaluated, that the outputs can be written: the
    folder of ``ensemble.json`` and the results file (which, if it exists, must be a flatlab
    results file: it is never overwritten by another kind).

    Raises:
        FlatlabError: ``cannot write PATH: REASON``, or a results path holding a foreign file.
    """
    from flatlab.io import check_writable

    if out_dir is not None:
        check_writable(out_dir, "folder")
        check_writable(Path(out_dir) / "ensemble.json", "file")
    if results_file is not None:
        from flatlab.results import check_results_target

        check_results_target(results_file)


def write_ensemble_record(out_dir: str | os.PathLike[str], result: dict[str, Any]) -> Path:
    """Write ``out_dir/ensemble.json`` (members, their SHA-256, metrics) atomically."""
    path = Path(out_dir) / "ensemble.json"
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError("out", f"{out_dir} is a file: give a folder for ensemble.json")
    record = {"format": ENSEMBLE_FORMAT, "format_version": 1, **result}
    atomic_write_text(path, dumps_json(record) + "\n")
    return path


def write_ensemble_results(path: str | os.PathLike[str], members: Sequence[Checkpoint],
                           result: dict[str, Any], provenance: dict[str, Any] | None = None) -> str:
    """Add the ensemble as a run of a results file (the README's results-file schema) so reports list EoQ rows.

    The run id is :func:`ensemble_id`; run attributes are the first member's provenance with
    ``algorithm = "eoq"`` (``"ensemble"`` if a member is full precision), ``members`` (JSON list of
    paths and SHA-256s) and the ensemble's own accuracies. The group ``ensemble`` holds each
    member's recorded id/ood accuracy and size, and the environment record (threads, versions,
    device, CPU: what the rounding depends on) as attributes. ``provenance`` (e.g.
    ``{"command_line": ...}``) is recorded with the run.
    """
    from flatlab import results

    run_attrs = {**results.run_attrs_from_checkpoint(members[0]), **(provenance or {})}
    for key in ("checkpoint", "checkpoint_sha256", "seed", "step", "val_acc", "source_acc"):
        run_attrs.pop(key, None)
    quantized = all(ckpt.is_quantized for ckpt in members)
    bits = {ckpt.meta.get("bits") for ckpt in members}
    domains = members[0].meta["domains"]
    per_domain = {k: v for k, v in result.items() if k.startswith("env") and k.endswith("_acc")}
    run_attrs.update({
        "algorithm": "eoq" if quantized else "ensemble",
        "member_algorithms": sorted({str(ckpt.meta.get("algorithm")) for ckpt in members}),
        "members": [{"checkpoint": r["checkpoint"], "sha256": r["sha256"]} for r in result["members"]],
        "id_acc": result["id_acc"], "ood_acc": result["ood_acc"], "source_acc": result["source_acc"],
        "val_acc": result["val_acc"], "per_domain_accuracies": per_domain, "domains": list(domains),
        "num_members": result["num_members"], "total_size_bytes": result["total_size_bytes"],
        "size_x_fp32": result["size_x_fp32"],
    })
    if len(bits) == 1:
        run_attrs["bits"] = next(iter(bits))
    else:
        run_attrs.pop("bits", None)
    run_attrs = {k: v for k, v in run_attrs.items() if v is not None}
    run_id = result["ensemble_id"]
    nan = float("nan")
    arrays = {
        "member_id_acc": [nan if r["id_acc"] is None else r["id_acc"] for r in result["members"]],
        "member_ood_acc": [nan if r["ood_acc"] is None else r["ood_acc"] for r in result["members"]],
        "member_size_bytes": [r["size_bytes"] for r in result["members"]],
    }
    import numpy as np

    from flatlab.environment import environment

    results.write_group(path, run_id, run_attrs, "ensemble", {k: np.asarray(v) for k, v in arrays.items()},
                        {"algorithm": run_attrs["algorithm"], "members": run_attrs["members"],
                         "combine": "mean of logits", "id_acc": result["id_acc"], "ood_acc": result["ood_acc"],
                         **(result.get("environment") or environment())})
    return run_id
