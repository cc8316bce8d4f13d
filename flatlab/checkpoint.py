"""The checkpoint format every command reads.

A checkpoint is a ``dict`` of tensors and plain metadata that ``torch.load(weights_only=True)``
reads without running any code::

    {
      "format": "flatlab-checkpoint", "format_version": 1,
      "meta": {dataset, dataset_options, domains, test_envs, model, model_options,
               algorithm, hparams, bits, quant, seed, trial_seed, step, ...},
      "state_dict": {name: tensor},   # the selected model (latent weights + scales if quantized)
      "w0": {name: tensor},           # the full-precision weights at step 0
    }

It is written atomically (temp file + rename) and never unpickled with ``weights_only=False``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatlab import __version__
from flatlab.checkpoint_format import FORMAT, FORMAT_VERSION, safe_torch_load
from flatlab.data import DomainSplits, MultiDomainDataset, build_dataset
from flatlab.errors import FlatlabError
from flatlab.io import atomic_write_bytes
from flatlab.models import build_model


@dataclass
class Checkpoint:
    """A loaded checkpoint: metadata, the selected weights and the initial weights."""

    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    w0: dict[str, torch.Tensor]
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_quantized(self) -> bool:
        return bool(self.meta.get("quant"))

    def build_model(self, device: torch.device | str = "cpu", effective: bool = False) -> nn.Module:
        """Rebuild the model (quantized if the checkpoint is), load the weights, eval mode.

        Args:
            device: where the model goes.
            effective: for a quantized checkpoint, return instead the full-precision architecture
                holding the de-quantized ("effective", deployed) weights, with the same parameter
                names as the unquantized model. No effect on a full-precision checkpoint.
        """
        model = build_model_from_meta(self.meta)
        load_weights(model, self.state_dict, self.meta, self.path)
        if effective and self.is_quantized:
            from flatlab.quant import effective_model

            model = effective_model(model)
        return model.to(device).eval()

    def build_initial_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The full-precision model at step 0 (weights ``w0``)."""
        model = build_model(self.meta["model"], self.meta["input_shape"], self.meta["num_classes"],
                            **self.meta["model_options"])
        load_weights(model, self.w0, self.meta, self.path)
        return model.to(device).eval()

    def dataset(self, data_dir: str | None = None) -> MultiDomainDataset:
        """Rebuild the data set, checking a folder data set against the stored file-list hash."""
        meta = self.meta
        directory = data_dir or meta.get("data_dir")
        dataset = build_dataset(meta["dataset"], data_dir=directory, **meta.get("dataset_options", {}))
        stored = meta.get("data_hash")
        if stored is not None:
            found = dataset.fingerprint()
            if found != stored:
                raise FlatlabError(
                    f"the data in {directory} differ from the data this checkpoint was trained on "
                    f"(file-list hash {str(found)[:12]} != {str(stored)[:12]}): pass --data-dir with the original tree"
                )
        if list(dataset.domains) != list(meta["domains"]):
            raise FlatlabError(f"the data set's domains {dataset.domains} differ from the checkpoint's {meta['domains']}")
        return dataset

    def splits(self, data_dir: str | None = None) -> DomainSplits:
        """The exact splits the checkpoint was trained and selected on."""
        return DomainSplits(self.dataset(data_dir), self.meta["test_envs"], self.meta["trial_seed"],
                            self.meta.get("holdout_fraction", 0.2))


def build_model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """An untrained model with the architecture a checkpoint describes (quantized if it is)."""
    model = build_model(meta["model"], meta["input_shape"], meta["num_classes"], **meta["model_options"])
    if meta.get("quant"):
        from flatlab.quant import QuantConfig, quantize_model

        model = quantize_model(model, QuantConfig.from_dict(meta["quant"]))
    return model


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
                 path: Path | None = None) -> None:
    """``load_state_dict(strict=True)`` with a readable error for weights of another architecture."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        where = f" in {path}" if path else ""
        raise FlatlabError(
            f"the weights{where} do not fit model {meta.get('model')} {meta.get('model_options')}: "
            f"{detail[:200]}"
        ) from None


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory. Saving to a path would store the (random) temporary file name
    inside the archive; in memory the same content always gives the same bytes and sha256."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, w0: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file + rename)."""
    full_meta = dict(meta)
    full_meta.setdefault("flatlab_version", __version__)
    full_meta.setdefault("torch_version", str(torch.__version__))
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": full_meta,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "w0": {k: v.detach().cpu().clone() for k, v in w0.items()},
    }
    atomic_write_bytes(path, torch_bytes(payload))


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a flatlab checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        FlatlabError: missing, truncated, malicious or non-flatlab file.
    """
    p = Path(path)
    if p.is_dir() and (p / "model.pt").exists():
        p = p / "model.pt"
    payload = safe_torch_load(p)
    if isinstance(payload, dict) and payload.get("format") == "flatlab-packed":
        # `flatlab export` output: integer codes + scales, unpacked to an ordinary checkpoint.
        from flatlab.quant.packing import unpack_payload

        payload = unpack_payload(payload, p)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FlatlabError(f"{p} is not a flatlab checkpoint (made by `flatlab train`; "
                           "a plain state_dict cannot say which data and model it belongs to)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FlatlabError(f"{p} has checkpoint format {version}; this flatlab reads up to {FORMAT_VERSION}: upgrade flatlab")
    for key in ("meta", "state_dict", "w0"):
        if key not in payload:
            raise FlatlabError(f"{p} is an incomplete flatlab checkpoint (no {key!r})")
    extra = {k: v for k, v in payload.items() if k not in ("format", "format_version", "meta", "state_dict", "w0")}
    return Checkpoint(meta=payload["meta"], state_dict=payload["state_dict"], w0=payload["w0"], path=p, extra=extra)


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "build_model_from_meta",
    "load_checkpoint",
    "load_weights",
    "safe_torch_load",
    "save_checkpoint",
    "__version__",
]
