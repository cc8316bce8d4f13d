"""Training: the DomainBed-style loop, the algorithm registry and hyperparameter defaults."""

from flatlab.train import (  # noqa: F401  (register sam, sagm, gaqat, noise, swa, swad)
           averaging,
           gaqat,
           noise,
           qat,  # noqa: F401  (registers the 'qat' algorithm)
           sam,
)
from flatlab.train.algorithms import ALGORITHMS, Algorithm, get_algorithm, register_algorithm
from flatlab.train.trainer import (
    ChanceCheck,
    TrainConfig,
    TrainResult,
    chance_level,
    resolve_device,
    seed_everything,
    train,
)

__all__ = ["ALGORITHMS", "Algorithm", "ChanceCheck", "TrainConfig", "TrainResult", "chance_level", "get_algorithm",
           "register_algorithm", "resolve_device", "seed_everything", "train"]
