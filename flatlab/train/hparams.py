"""Hyperparameter defaults per data set and algorithm, and their validation.

Precedence (highest first): explicit flags (``--lr`` ...), ``--hparams JSON``, the algorithm's
defaults, the data set's defaults. Every key is checked: an unknown key is an error, not a typo
that silently does nothing.

Defaults:

=================  ======  ==========  ============  =====  ========================================
data set           lr      batch size  weight decay  model  source
=================  ======  ==========  ============  =====  ========================================
rotated-digits     1e-3    32/domain   0             cnn    DomainBed's RotatedMNIST (lr 1e-3)
image folders      5e-5    32/domain   0             resnet50 QT-DoG / SWAD protocol (Adam)
=================  ======  ==========  ============  =====  ========================================
"""

from __future__ import annotations

import math
from typing import Any

from flatlab.errors import FlatlabError

#: Keys every algorithm understands.
BASE_HPARAMS: dict[str, Any] = {"lr": 1e-3, "batch_size": 32, "weight_decay": 0.0}

#: Data-set specific overrides of BASE_HPARAMS (DomainBed image data sets share one entry).
DATASET_HPARAMS: dict[str, dict[str, Any]] = {
    "rotated-digits": {"lr": 1e-3, "batch_size": 32, "weight_decay": 0.0},
}
IMAGE_DATASET_HPARAMS: dict[str, Any] = {"lr": 5e-5, "batch_size": 32, "weight_decay": 0.0}

#: Default model per data set.
DATASET_MODELS: dict[str, str] = {"rotated-digits": "cnn"}
IMAGE_DATASET_MODEL = "resnet50"

#: Default number of steps per data set (QT-DoG: 5,000; DomainNet 15,000).
DATASET_STEPS: dict[str, int] = {"rotated-digits": 1500, "DomainNet": 15000}
IMAGE_DATASET_STEPS = 5000


def dataset_defaults(dataset: str) -> dict[str, Any]:
    return dict(DATASET_HPARAMS.get(dataset, IMAGE_DATASET_HPARAMS))


def default_model(dataset: str) -> str:
    return DATASET_MODELS.get(dataset, IMAGE_DATASET_MODEL)


def default_steps(dataset: str) -> int:
    return DATASET_STEPS.get(dataset, IMAGE_DATASET_STEPS)


_TRUE_FALSE = ("true", "false", "1", "0", "yes", "no")


def check_hparam_type(key: str, value: Any, default: Any) -> Any:
    """Check that ``value`` has the type of hyperparameter ``key``'s default; return it normalised.

    Types follow the default: a float default takes any finite real number (returned as float);
    an int default an integer (an integral float such as ``32.0`` from JSON is accepted); a bool
    default true/false (also the strings ``true``/``false``/``1``/``0``/``yes``/``no``, as flags
    give them; the algorithm normalises those); a string default a string; a ``None`` default
    (an optional number such as ``act_bits`` or ``swa_start``) ``None`` or a finite number.

    Raises:
        FlatlabError: ``lr must be a number, got 'x'`` and the like.
    """
    if value is None:
        return None
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in _TRUE_FALSE) \
                or (is_number and value in (0, 1)):
            return value
        raise FlatlabError(f"{key} must be true or false, got {value!r}")
    if isinstance(default, float) or default is None:
        if not is_number or not math.isfinite(float(value)):
            raise FlatlabError(f"{key} must be a finite number, got {value!r}")
        return float(value) if isinstance(default, float) else value
    if isinstance(default, int):
        if is_number and float(value).is_integer():
            return int(value)
        raise FlatlabError(f"{key} must be an integer, got {value!r}")
    if isinstance(default, str):
        if not isinstance(value, str):
            raise FlatlabError(f"{key} must be a string, got {value!r}")
        return value
    return value


def resolve_hparams(dataset: str, algorithm_defaults: dict[str, Any], from_json: dict[str, Any] | None,
                    from_flags: dict[str, Any]) -> dict[str, Any]:
    """Merge the layers of hyperparameters and validate keys, types (:func:`check_hparam_type`)
    and basic ranges (lr > 0, batch size >= 1, weight decay >= 0)."""
    hparams = dict(BASE_HPARAMS)
    hparams.update(dataset_defaults(dataset))
    hparams.update(algorithm_defaults)
    defaults = dict(hparams)
    allowed = set(hparams)
    for source, layer in (("--hparams", from_json or {}), ("flags", from_flags)):
        for key, value in layer.items():
            if value is None:
                continue
            if key not in allowed:
                raise FlatlabError(f"unknown hyperparameter {key!r} in {source} (known: {', '.join(sorted(allowed))})")
            hparams[key] = check_hparam_type(key, value, defaults[key])
    if not float(hparams["lr"]) > 0:
        raise FlatlabError(f"lr must be positive, got {hparams['lr']}")
    if int(hparams["batch_size"]) < 1:
        raise FlatlabError(f"batch size must be at least 1, got {hparams['batch_size']}")
    if float(hparams["weight_decay"]) < 0:
        raise FlatlabError(f"weight decay must be >= 0, got {hparams['weight_decay']}")
    hparams["lr"] = float(hparams["lr"])
    hparams["batch_size"] = int(hparams["batch_size"])
    hparams["weight_decay"] = float(hparams["weight_decay"])
    return hparams
