"""Library side of ``flatlab export``: checkpoint -> packed file, verified on reload."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from flatlab.errors import FlatlabError
from flatlab.io import atomic_write_bytes, sha256_file
from flatlab.quant.packing import build_packed_payload, size_report
from flatlab.quant.prepare import effective_model, quantized_layers


def export_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                      with_init: bool = False) -> dict[str, Any]:
    """Write ``checkpoint`` as a packed file at ``out`` (temp + rename) and check it reloads exactly.

    Returns:
        A JSON-ready report: sizes (file, packed tensors, FP32 model), ratios, and ``verified``
        (the reloaded model's de-quantized weights equal the checkpoint's bit for bit).

    Raises:
        FlatlabError: a full-precision checkpoint, an output path that is the input, or one that
            cannot be written (checked before anything is computed).
    """
    from flatlab.checkpoint import load_checkpoint, torch_bytes
    from flatlab.io import check_writable

    ckpt = load_checkpoint(checkpoint)
    if not ckpt.is_quantized:
        raise FlatlabError(f"{ckpt.path} is a full-precision checkpoint (algorithm {ckpt.meta.get('algorithm')}): "
                           "only quantized checkpoints have integer codes to export; train with --algorithm qat --bits B")
    out_path = Path(out)
    if out_path.exists() and ckpt.path is not None and out_path.resolve() == ckpt.path.resolve():
        raise FlatlabError(f"--out {out_path} is the checkpoint itself: choose another file name")
    if out_path.is_dir():
        raise FlatlabError(f"--out {out_path} is a folder: give a file name, e.g. {out_path / 'model.packed.pt'}")
    check_writable(out_path, "file")
    model = ckpt.build_model("cpu")
    info = {"source": str(ckpt.path), "source_sha256": sha256_file(ckpt.path) if ckpt.path else None}
    payload = build_packed_payload(model, ckpt.meta, ckpt.w0 if with_init else None, info)
    atomic_write_bytes(out_path, torch_bytes(payload))

    reloaded = load_checkpoint(out_path).build_model("cpu")
    original_eff = effective_model(model).state_dict()
    reloaded_eff = effective_model(reloaded).state_dict()
    verified = original_eff.keys() == reloaded_eff.keys() and all(
        torch.equal(v, reloaded_eff[k]) for k, v in original_eff.items())
    sizes = size_report(model)
    return {"checkpoint": str(ckpt.path), "out": str(out_path), "bits": ckpt.meta["quant"]["bits"],
            "layers_packed": len(quantized_layers(model)), "file_bytes": out_path.stat().st_size,
            "packed_bytes": sizes["packed_bytes"], "fp32_bytes": sizes["fp32_bytes"],
            "size_ratio": sizes["size_ratio"], "expected_size_ratio": sizes["expected_ratio"],
            "with_init": with_init, "verified": verified}
