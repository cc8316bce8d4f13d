"""Training algorithms, looked up by name (DomainBed style).

An :class:`Algorithm` owns the model and its optimizer; the trainer hands it one minibatch per
source domain per step. Subclasses add their own hyperparameters in ``hparam_defaults``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flatlab.errors import FlatlabError

Minibatches = list[tuple[torch.Tensor, torch.Tensor]]


class Algorithm:
    """Empirical risk minimisation with Adam: the base every algorithm extends.

    Args:
        model: the network (full precision, freshly initialised).
        hparams: resolved hyperparameters (``lr``, ``batch_size``, ``weight_decay`` + own keys).
        total_steps: the run's number of steps (schedules such as QAT's start use it).
        generator: the run's random generator for algorithm noise (saved and restored on resume).
    """

    name: ClassVar[str] = "erm"
    hparam_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module, hparams: dict[str, Any], total_steps: int,
                 generator: torch.Generator) -> None:
        self.model = model
        self.hparams = hparams
        self.total_steps = total_steps
        self.generator = generator
        self.optimizer = self.make_optimizer()

    @classmethod
    def validate_hparams(cls, hparams: dict[str, Any], total_steps: int) -> None:
        """Raise FlatlabError for out-of-range algorithm hyperparameters."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        """One optimisation step on the concatenated per-domain minibatches. ``step`` counts from 1."""
        x = torch.cat([b[0] for b in minibatches])
        y = torch.cat([b[1] for b in minibatches])
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}

    def before_step(self, step: int) -> None:
        """Hook called before update ``step`` (schedules, e.g. the QAT switch)."""

    def selectable(self, step: int) -> bool:
        """Whether an evaluation at ``step`` may be chosen as the final model."""
        return True

    def after_evaluation(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Hook called after each evaluation with its metrics (``val_loss`` = mean source
        out-loss among them); returns extra JSON-ready keys for that results.jsonl line."""
        return {}

    def final_model(self, train_batches: Callable[[int], Minibatches]) -> nn.Module | None:
        """The model to save at the end instead of the validation-selected one (weight
        averaging), or None. ``train_batches(n)`` draws n training minibatch lists."""
        return None

    def checkpoint_meta(self) -> dict[str, Any]:
        """Metadata describing the deployed model (bits, quantization config)."""
        return {"bits": None, "quant": None}

    def after_training_meta(self) -> dict[str, Any]:
        """Extra checkpoint metadata for a :meth:`final_model` (e.g. the averaged steps)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class ERM(Algorithm):
    """Plain empirical risk minimisation over the pooled source domains."""

    name = "erm"


ALGORITHMS: dict[str, type[Algorithm]] = {"erm": ERM}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator adding an algorithm to the registry under ``cls.name``."""
    ALGORITHMS[cls.name] = cls
    return cls


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise FlatlabError(f"unknown algorithm {name!r}: choose one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]
