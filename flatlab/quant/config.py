"""The quantization configuration, validated when it is built and stored in checkpoints.

Defaults follow QT-DoG (docs/measures.md section 1): weights only, one LSQ scale per output channel,
every ``nn.Conv2d`` and ``nn.Linear`` quantized except the final classifier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from flatlab.errors import ConfigError, FlatlabError

#: Bit-widths LSQ supports here (2-bit is the lowest QT-DoG reports; 8 fits a uint8 code).
MIN_BITS = 2
MAX_BITS = 8
GRAD_SCALE_N = ("channel", "tensor")


@dataclass(frozen=True)
class QuantConfig:
    """What gets quantized and how.

    Attributes:
        bits: weight bit-width b; signed codes in [-2^(b-1), 2^(b-1) - 1].
        per_channel: one scale per output channel (True, QT-DoG) or one per tensor.
        grad_scale_n: N in the LSQ scale-gradient factor g = 1/sqrt(N * Qp): ``"channel"`` = the
            number of elements one scale serves (flatlab's reading of LSQ), ``"tensor"`` = the
            whole weight tensor's element count (what QT-DoG's released code does per channel).
        act_bits: if set, the input of every quantized layer is LSQ-quantized at this many bits
            (unsigned after a ReLU, signed when the first batch holds negative values).
        keep_first_fp: leave the first conv/linear layer (in module order) in full precision.
        quantize_classifier: quantize the layer named ``classifier_name`` too.
        classifier_name: qualified module name of the final classifier (``classifier`` in every
            flatlab model; ``fc`` in a torchvision ResNet).
    """

    bits: int = 8
    per_channel: bool = True
    grad_scale_n: str = "channel"
    act_bits: int | None = None
    keep_first_fp: bool = False
    quantize_classifier: bool = False
    classifier_name: str = "classifier"

    def __post_init__(self) -> None:
        for name in ("bits", "act_bits"):
            value = getattr(self, name)
            if value is None and name == "act_bits":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    object.__setattr__(self, name, int(value))
                    value = int(value)
                else:
                    raise ConfigError(name, f"must be an integer from {MIN_BITS} to {MAX_BITS}, got {value!r}")
            if not MIN_BITS <= value <= MAX_BITS:
                raise ConfigError(name, f"must be from {MIN_BITS} to {MAX_BITS}, got {value}")
        if self.grad_scale_n not in GRAD_SCALE_N:
            raise ConfigError("grad_scale_n", f"must be one of {', '.join(GRAD_SCALE_N)}, got {self.grad_scale_n!r}")
        for name in ("per_channel", "keep_first_fp", "quantize_classifier"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.classifier_name, str) or not self.classifier_name:
            raise FlatlabError(f"classifier_name must be a module name, got {self.classifier_name!r}")

    @property
    def qn(self) -> int:
        """Magnitude of the most negative weight code, 2^(b-1)."""
        return 2 ** (self.bits - 1)

    @property
    def qp(self) -> int:
        """Largest weight code, 2^(b-1) - 1."""
        return 2 ** (self.bits - 1) - 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (stored as ``meta["quant"]`` in checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(data, dict):
            raise FlatlabError(f"a quantization config must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FlatlabError(f"unknown quantization option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)
