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
    info.update(quantization_info(ckpt, model))
    if not ckpt.w0:  # a packed export without --with-init
        info["fp32_param_bytes"] = info["fp32_bytes"]
    return info


def quantization_info(ckpt: Any, model: Any) -> dict[str, Any]:
    """Bits, packed vs FP32 size and per-layer distinct weight values of a (quantized) checkpoint.

    ``fp32_bytes`` is the FP32 size of the unquantized architecture's parameters and buffers;
    ``packed_bytes`` stores each quantized weight at b bits and every other tensor (classifier,
    BatchNorm, biases, scales) at full size; ``size_ratio`` = packed / FP32, and
    ``expected_size_ratio`` the same with quantized weights at exactly b/32 (no byte rounding).
    ``layers`` lists, per quantized layer, ``max_distinct_per_channel`` (<= ``limit`` = 2^b).
    """
    from flatlab.quant.packing import layer_stats, size_report

    sizes = size_report(model)
    return {
        "act_bits": ckpt.meta.get("act_bits"),
        "quantized": ckpt.is_quantized,
        "packed_file": bool(ckpt.extra.get("packed")),
        "fp32_bytes": sizes["fp32_bytes"],
        "packed_bytes": sizes["packed_bytes"],
        "size_ratio": sizes["size_ratio"],
        "expected_size_ratio": sizes["expected_ratio"],
        "quant": ckpt.meta.get("quant"),
        "layers": layer_stats(model),
    }
