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
from flatlab.checks import is_int
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


def check_meta(meta: Any, path: str | os.PathLike[str] | None = None) -> None:
    """Check that a checkpoint's metadata holds what rebuilding its model and splits needs.

    Required: ``dataset`` (str), ``domains`` (non-empty list of names), ``test_envs`` (list of
    domain indices, each in ``0 .. len(domains) - 1``), ``model`` (str), ``model_options``
    (dict), ``input_shape`` (list of positive integers), ``num_classes`` (integer >= 2),
    ``trial_seed`` (integer); optional ``holdout_fraction`` in (0, 1), ``step`` (integer) and
    ``quant`` (dict or None).

    Raises:
        FlatlabError: naming the first missing or malformed key.
    """
    where = f"{path}" if path is not None else "the checkpoint"
    if not isinstance(meta, dict):
        raise FlatlabError(f"{where} is a damaged flatlab checkpoint: its metadata is a {type(meta).__name__}, "
                           "not a dict (rewrite it with flatlab train)")
    checks: list[tuple[str, Any, str]] = [
        ("dataset", lambda v: isinstance(v, str) and v != "", "a data set name"),
        ("domains", lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(d, str) for d in v),
         "a non-empty list of domain names"),
        ("test_envs", lambda v: isinstance(v, list) and all(is_int(e) for e in v), "a list of domain indices"),
        ("model", lambda v: isinstance(v, str) and v != "", "a model name"),
        ("model_options", lambda v: isinstance(v, dict), "a dict"),
        ("input_shape", lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(is_int(d) and d > 0 for d in v),
         "a list of positive integers"),
        ("num_classes", lambda v: is_int(v) and v >= 2, "an integer >= 2"),
        ("trial_seed", is_int, "an integer"),
    ]
    for key, ok, expected in checks:
        if key not in meta:
            raise FlatlabError(f"{where} is an incomplete flatlab checkpoint: its metadata has no {key!r} "
                               "(it was not written by flatlab train, or was edited)")
        if not ok(meta[key]):
            raise FlatlabError(f"{where} is a damaged flatlab checkpoint: metadata {key!r} must be {expected}, "
                               f"got {meta[key]!r:.80}")
    n = len(meta["domains"])
    bad = [e for e in meta["test_envs"] if not 0 <= e < n]
    if bad:
        raise FlatlabError(f"{where} is a damaged flatlab checkpoint: test domain index {bad[0]} is outside "
                           f"0..{n - 1} (its data set has {n} domains)")
    if "holdout_fraction" in meta:
        h = meta["holdout_fraction"]
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0.0 < h < 1.0:
            raise FlatlabError(f"{where} is a damaged flatlab checkpoint: holdout_fraction must lie in (0, 1), got {h!r}")
    if "step" in meta and not is_int(meta["step"]):
        raise FlatlabError(f"{where} is a damaged flatlab checkpoint: step must be an integer, got {meta['step']!r}")
    if meta.get("quant") is not None and not isinstance(meta["quant"], dict):
        raise FlatlabError(f"{where} is a damaged flatlab checkpoint: quant must be a dict, got {meta['quant']!r:.80}")


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a flatlab checkpoint with ``torch.load(weights_only=True)``.

    The metadata is checked (:func:`check_meta`) and ``state_dict``/``w0`` must be dicts of
    tensors, so a damaged file fails here with one line, not later inside a model builder.

    Raises:
        FlatlabError: missing, truncated, malicious, non-flatlab or damaged file.
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
    check_meta(payload["meta"], p)
    for key in ("state_dict", "w0"):
        tensors = payload[key]
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            raise FlatlabError(f"{p} is a damaged flatlab checkpoint: its {key!r} is not a dict of named tensors")
    extra = {k: v for k, v in payload.items() if k not in ("format", "format_version", "meta", "state_dict", "w0")}
    return Checkpoint(meta=payload["meta"], state_dict=payload["state_dict"], w0=payload["w0"], path=p, extra=extra)


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "build_model_from_meta",
    "check_meta",
    "load_checkpoint",
    "load_weights",
    "safe_torch_load",
    "save_checkpoint",
    "__version__",
]
