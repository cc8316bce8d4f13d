"""Describe a checkpoint: provenance, architecture, parameter count and size."""

from __future__ import annotations

import os
from typing import Any

from flatlab.checkpoint import load_checkpoint
from flatlab.models import num_parameters


def checkpoint_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready description of a checkpoint (the ``flatlab info`` payload)."""
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    model = ckpt.build_model("cpu")
    fp32_bytes = sum(t.numel() * 4 for t in ckpt.w0.values() if t.is_floating_point())
    info: dict[str, Any] = {
        "checkpoint": str(ckpt.path),
        "dataset": meta["dataset"],
        "domains": meta["domains"],
        "test_envs": meta["test_envs"],
        "test_env_names": meta.get("test_env_names", [meta["domains"][e] for e in meta["test_envs"]]),
        "model": meta["model"],
        "model_options": meta["model_options"],
        "algorithm": meta["algorithm"],
        "bits": meta.get("bits"),
        "seed": meta["seed"],
        "trial_seed": meta["trial_seed"],
        "step": meta["step"],
        "steps": meta.get("steps"),
        "num_params": num_parameters(model),
        "train_size": meta.get("train_size"),
        "size_bytes": ckpt.path.stat().st_size if ckpt.path else None,
        "fp32_param_bytes": fp32_bytes,
        "hparams": meta.get("hparams"),
        "accuracies": meta.get("accuracies"),
        "flatlab_version": meta.get("flatlab_version"),
        "torch_version": meta.get("torch_version"),
    }
    return info
