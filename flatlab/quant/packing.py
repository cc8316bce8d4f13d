"""Integer export: b-bit packing of LSQ weight codes, the packed file format, and sizes.

A packed file is a ``dict`` that ``torch.load(weights_only=True)`` reads::

    {
      "format": "flatlab-packed", "format_version": 1,
      "meta": {... the checkpoint's meta ..., "export": {source, source_sha256, packed_bytes, ...}},
      "layers": {layer_name: {"codes": uint8[ceil(numel * bits / 8)], "bits": b,
                              "shape": [C, ...], "numel": n,
                              "weight_key": "weight", "scale_key": "weight_scale"}},
      "state_dict": {every other tensor in full precision: weight_scale, biases, BatchNorm,
                     the FP classifier, activation scales},
      "w0": {...}   # optional (``flatlab export --with-init``): initial FP weights
    }

``weight_key``/``scale_key`` name the layer's quantized weight and its scale (``in_proj_weight`` and
``in_proj_weight_scale`` for attention; absent in files of flatlab 0.2 and earlier, which only had
``weight``/``weight_scale``). Codes ``c = round(clip(w/s, -Qn, Qp))`` are stored offset to unsigned ``c + Qn`` in [0, 2^b - 1],
least significant bit first, consecutive in one byte stream per layer. Loading unpacks them and
puts ``c * s`` back as the latent weight: the fake quantizer maps it to exactly ``c * s`` again
(|c*s/s - c| is a rounding error far below 1/2), so the rebuilt model gives bit-identical logits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatlab.errors import FlatlabError
from flatlab.quant.config import MAX_BITS, MIN_BITS
from flatlab.quant.prepare import quantized_layers

PACKED_FORMAT = "flatlab-packed"
PACKED_FORMAT_VERSION = 1

#: Tensors that exist only in the quantized model (not in the FP architecture).
QUANTIZER_SUFFIXES = (".weight_scale", ".in_proj_weight_scale", ".act_scale", ".act_initialized", ".act_signed")

#: (weight_key, scale_key) pairs a packed layer entry may name: conv/linear, attention in_proj.
WEIGHT_KEYS = {"weight": "weight_scale", "in_proj_weight": "in_proj_weight_scale"}

_CHUNK = 1 << 20  # elements per packing chunk (a multiple of 8 keeps byte alignment for any b)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes at ``bits`` bits, packed back to back."""
    return math.ceil(numel * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes in [-2^(b-1), 2^(b-1) - 1] into a uint8 stream of b bits each (LSB first).

    Raises:
        FlatlabError: a code outside the b-bit signed range.
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise FlatlabError(f"cannot pack at {bits} bits: use {MIN_BITS} to {MAX_BITS}")
    flat = codes.detach().reshape(-1).to(torch.int64).cpu() + 2 ** (bits - 1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 2**bits - 1):
        raise FlatlabError(f"codes outside the {bits}-bit signed range [{-(2 ** (bits - 1))}, {2 ** (bits - 1) - 1}]")
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = (2 ** torch.arange(8, dtype=torch.int64))
    out = []
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        stream = ((chunk.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, torch.zeros(pad, dtype=torch.uint8)])
        out.append((stream.reshape(-1, 8).to(torch.int64) * weights).sum(1).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int, what: str = "codes") -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int64 signed codes, ``numel`` of them.

    Raises:
        FlatlabError: wrong dtype, a stream whose length does not match ``numel`` codes of ``bits``
            bits, or set padding bits (codes that do not fit their stated bit-width).
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise FlatlabError(f"{what}: bit-width {bits!r} is not {MIN_BITS} to {MAX_BITS}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise FlatlabError(f"{what}: codes must be a 1-D uint8 tensor of packed {bits}-bit values")
    need = packed_nbytes(numel, bits)
    if packed.numel() != need:
        raise FlatlabError(f"{what}: {packed.numel()} bytes of codes for {numel} weights, but {bits}-bit codes "
                           f"take {need} bytes: the codes do not fit their {bits} bits (corrupt or edited file)")
    if bits == 8:
        return packed.to(torch.int64) - 128
    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)
    if int(stream[numel * bits:].sum()) != 0:
        raise FlatlabError(f"{what}: data beyond the last {bits}-bit code: the codes do not fit their {bits} bits")
    values = (stream[:numel * bits].reshape(numel, bits) << torch.arange(bits)).sum(1)
    return values - 2 ** (bits - 1)


def _is_quantizer_entry(key: str) -> bool:
    return key.endswith(QUANTIZER_SUFFIXES)


def _tensor_bytes(t: torch.Tensor, fp32: bool = True) -> int:
    """Bytes of a tensor, floating tensors counted at FP32."""
    return t.numel() * 4 if (fp32 and t.is_floating_point()) else t.numel() * t.element_size()


def size_report(model: nn.Module) -> dict[str, Any]:
    """Storage of ``model`` packed vs the FP32 size of the same architecture's parameters and buffers.

    ``fp32_bytes``: every parameter and buffer of the unquantized architecture, floats at 4 bytes.
    ``packed_bytes``: quantized weights at ceil(n b / 8) bytes per layer, every other tensor
    (biases, BatchNorm, the FP classifier, the scales) at full size.
    ``expected_ratio``: the same with quantized weights at exactly b/32 of their FP32 size.
    For an FP model, packed = FP32 and the ratios are 1.
    """
    layers = quantized_layers(model)
    qweights = {f"{name}.{layer.weight_attr}": layer for name, layer in layers.items()}
    fp32 = packed = 0
    expected = 0.0
    quantized_params = scale_params = 0
    for key, t in model.state_dict().items():
        if _is_quantizer_entry(key):
            nbytes = _tensor_bytes(t)
            packed += nbytes
            expected += nbytes
            scale_params += t.numel() if t.is_floating_point() else 0
            continue
        nbytes = _tensor_bytes(t)
        fp32 += nbytes
        if key in qweights:
            bits = qweights[key].bits
            packed += packed_nbytes(t.numel(), bits)
            expected += nbytes * bits / 32
            quantized_params += t.numel()
        else:
            packed += nbytes
            expected += nbytes
    return {"fp32_bytes": fp32, "packed_bytes": packed, "size_ratio": packed / fp32 if fp32 else float("nan"),
            "expected_ratio": expected / fp32 if fp32 else float("nan"),
            "quantized_weights": quantized_params, "scale_params": scale_params}


def layer_stats(model: nn.Module) -> list[dict[str, Any]]:
    """Per quantized layer: bits, shape, and the number of distinct weight values per output channel.

    ``layer`` is the module name (as in :func:`quantized_layers`), ``weight`` the quantized
    parameter's name (``<attention>.in_proj_weight`` for an attention's input projection, whose
    3E output channels are the rows of W_q, W_k and W_v). ``max_distinct_per_channel`` (max over
    channels of the distinct de-quantized values) is at most ``limit`` = 2^b.
    """
    rows = []
    for name, layer in quantized_layers(model).items():
        codes = layer.weight_codes().reshape(layer.weight.shape[0], -1)
        distinct = [int(torch.unique(row).numel()) for row in codes]
        scale = layer.weight_scale.detach()
        rows.append({"layer": name, "weight": f"{name}.{layer.weight_attr}", "type": type(layer).__name__,
                     "bits": layer.bits,
                     "shape": list(layer.weight.shape), "per_channel": layer.per_channel,
                     "max_distinct_per_channel": max(distinct), "mean_distinct_per_channel": sum(distinct) / len(distinct),
                     "limit": 2**layer.bits, "scale_min": float(scale.min()), "scale_max": float(scale.max()),
                     "act_bits": layer.act_bits})
    return rows


def pack_model_state(model: nn.Module) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Split a quantized model's state into packed layer codes and the remaining FP tensors."""
    layers: dict[str, dict[str, Any]] = {}
    weights = set()
    for name, layer in quantized_layers(model).items():
        codes = layer.weight_codes()
        layers[name] = {"codes": pack_codes(codes, layer.bits), "bits": int(layer.bits),
                        "shape": list(codes.shape), "numel": int(codes.numel()),
                        "weight_key": layer.weight_attr, "scale_key": layer.scale_attr}
        weights.add(f"{name}.{layer.weight_attr}")
    rest = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in weights}
    return layers, rest


def build_packed_payload(model: nn.Module, meta: dict[str, Any], w0: dict[str, torch.Tensor] | None,
                         export_info: dict[str, Any]) -> dict[str, Any]:
    """The packed-file dict for a quantized ``model`` (see the module docstring)."""
    if not isinstance(model, nn.Module) or not quantized_layers(model):
        raise FlatlabError("the model is full precision: there are no integer codes to export "
                           "(train with --algorithm qat --bits B)")
    layers, rest = pack_model_state(model)
    packed_bytes = sum(int(v["codes"].numel()) for v in layers.values()) + sum(
        _tensor_bytes(t, fp32=False) for t in rest.values())
    full_meta = {**meta, "export": {**export_info, "tensor_bytes": packed_bytes, "has_w0": w0 is not None}}
    payload: dict[str, Any] = {"format": PACKED_FORMAT, "format_version": PACKED_FORMAT_VERSION,
                               "meta": full_meta, "layers": layers, "state_dict": rest}
    if w0 is not None:
        payload["w0"] = {k: v.detach().cpu().clone() for k, v in w0.items()}
    return payload


def unpack_payload(payload: dict[str, Any], path: Path | None = None) -> dict[str, Any]:
    """Turn a packed file's dict into an ordinary checkpoint dict (latent weights = codes * s).

    Raises:
        FlatlabError: a malformed file, or codes that do not fit their bit-width.
    """
    from flatlab.checkpoint_format import FORMAT, FORMAT_VERSION

    where = f"{path}" if path else "the packed file"
    version = payload.get("format_version")
    if not isinstance(version, int) or version > PACKED_FORMAT_VERSION:
        raise FlatlabError(f"{where} has packed format {version}; this flatlab reads up to {PACKED_FORMAT_VERSION}: upgrade flatlab")
    meta, layers, rest = payload.get("meta"), payload.get("layers"), payload.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(layers, dict) or not isinstance(rest, dict):
        raise FlatlabError(f"{where} is an incomplete packed file (needs meta, layers and state_dict)")
    quant = meta.get("quant")
    if not isinstance(quant, dict) or "bits" not in quant:
        raise FlatlabError(f"{where} is a packed file without a quantization config in its metadata")
    bits = quant["bits"]
    state = dict(rest)
    for name, entry in layers.items():
        what = f"{where}, layer {name}"
        if not isinstance(entry, dict) or not {"codes", "bits", "shape", "numel"} <= set(entry):
            raise FlatlabError(f"{what}: needs codes, bits, shape and numel")
        if entry["bits"] != bits:
            raise FlatlabError(f"{what}: codes stored at {entry['bits']} bits but the model is {bits}-bit: "
                               "the codes do not fit the model's bit-width")
        shape = [int(s) for s in entry["shape"]]
        numel = int(entry["numel"])
        if math.prod(shape) != numel:
            raise FlatlabError(f"{what}: shape {shape} does not hold {numel} weights")
        weight_key = entry.get("weight_key", "weight")
        scale_key = entry.get("scale_key", "weight_scale")
        if not isinstance(weight_key, str) or WEIGHT_KEYS.get(weight_key) != scale_key:
            raise FlatlabError(f"{what}: unknown weight/scale names {weight_key!r}/{scale_key!r} "
                               f"(known: {', '.join(f'{w}/{k}' for w, k in WEIGHT_KEYS.items())})")
        scale = state.get(f"{name}.{scale_key}")
        if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
            raise FlatlabError(f"{what}: no floating-point {scale_key} for the codes")
        if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
            raise FlatlabError(f"{what}: the scales must be finite and non-zero")
        codes = unpack_codes(entry["codes"], bits, numel, what).reshape(shape)
        try:
            state[f"{name}.{weight_key}"] = codes.to(scale.dtype) * scale
        except RuntimeError:
            raise FlatlabError(f"{what}: scale of shape {list(scale.shape)} does not fit weights {shape}") from None
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta, "state_dict": state,
            "w0": payload.get("w0", {}), "packed": True}
