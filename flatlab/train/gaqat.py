"""GAQAT (Jiang et al. 2024): LSQ quantization + the SAGM objective + scale-gradient freezing.

For the weight scale s_l of quantized layer l the SAGM gradient splits into a task part and a
smoothness part::

    g_task   = dL(w)/ds_l
    g_smooth = d[L(w + e) - L(w)]/ds_l          (second gradient minus the first)
    applied  = 1/2 [dL(w)/ds_l + dL(w + e)/ds_l] = g_task + 1/2 g_smooth

* Conflict (diagnostic): per step and layer, the fraction of channels where g_task and g_smooth
  have opposite signs; logged per layer as the mean over the steps since the last evaluation.
* Disorder: every K steps, per layer, the fraction of the last n steps in which the watched
  gradient (``applied`` by default, or g_task / g_smooth) changed sign from one step to the next,
  averaged over channels.
* Freezing: a layer whose disorder is below tau has one part of its scale gradient zeroed for the
  next K steps: the task part by default (the scale then follows 1/2 g_smooth), or the smoothness
  part (``--freeze-part smooth``: the scale follows g_task), since public accounts differ.

Quantization starts at step 1 by default (``quant_start`` 0: GAQAT trains quantized from the
start) at 4 bits. Every freeze decision goes into results.jsonl.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

import torch
from torch import nn

from flatlab.errors import ConfigError
from flatlab.quant import quantized_layers
from flatlab.train.algorithms import register_algorithm
from flatlab.train.sam import SAGM


def sign_flip_fraction(history: list[torch.Tensor]) -> float:
    """Mean over consecutive pairs and channels of [sign(g_t) != sign(g_{t-1})]."""
    if len(history) < 2:
        return float("nan")
    stacked = torch.stack([torch.sign(h) for h in history])
    return float((stacked[1:] != stacked[:-1]).float().mean())


def conflict_fraction(task: torch.Tensor, smooth: torch.Tensor) -> float:
    """Fraction of channels whose task and smoothness scale gradients point in opposite directions."""
    return float((task * smooth < 0).float().mean())


@register_algorithm
class GAQAT(SAGM):
    """LSQ + SAGM with disorder-driven freezing of one part of the scale gradients."""

    name = "gaqat"
    hparam_defaults: ClassVar[dict[str, Any]] = {
        **SAGM.hparam_defaults, "bits": 4, "quant_start": 0,
        "freeze_interval": 50, "disorder_window": 10, "tau": 0.3,
        "freeze_part": "task", "disorder_watch": "applied",
    }

    @classmethod
    def validate_hparams(cls, hparams: dict[str, Any], total_steps: int) -> None:
        if hparams.get("bits") is None:
            raise ConfigError("bits", "must be given: gaqat quantizes (2..8)")
        super().validate_hparams(hparams, total_steps)
        k, n = int(hparams["freeze_interval"]), int(hparams["disorder_window"])
        if n < 2:
            raise ConfigError("disorder_window", f"(n) must be at least 2 steps, got {n}")
        if k < n:
            raise ConfigError("freeze_interval", f"(K = {k}) must be at least disorder_window (n = {n}): "
                               "the disorder is measured over the last n steps of each K")
        tau = float(hparams["tau"])
        if not 0.0 <= tau <= 1.0:
            raise ConfigError("tau", f"must lie in [0, 1], got {tau}")
        if hparams["freeze_part"] not in ("task", "smooth"):
            raise ConfigError("freeze_part", f"must be task or smooth, got {hparams['freeze_part']!r}")
        if hparams["disorder_watch"] not in ("applied", "task", "smooth"):
            raise ConfigError("disorder_watch", f"must be applied, task or smooth, got {hparams['disorder_watch']!r}")
        hparams.update(freeze_interval=k, disorder_window=n, tau=tau)

    def __init__(self, model: nn.Module, hparams: dict[str, Any], total_steps: int,
                 generator: torch.Generator) -> None:
        super().__init__(model, hparams, total_steps, generator)
        self.history: dict[str, deque[torch.Tensor]] = {}
        self.frozen_until: dict[str, int] = {}
        self.conflict_sum: dict[str, float] = {}
        self.conflict_steps = 0
        self.decisions: list[dict[str, Any]] = []
        #: Per layer (g_task, g_smooth, applied) of the last step, for inspection and tests.
        self.last_scale_parts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def after_gradients(self, first: dict[nn.Parameter, torch.Tensor], second: dict[nn.Parameter, torch.Tensor],
                        step: int) -> None:
        if not self.quantized:
            return
        k, n = self.hparams["freeze_interval"], self.hparams["disorder_window"]
        self.last_scale_parts = {}
        for name, layer in quantized_layers(self.model).items():
            scale = layer.weight_scale
            if scale not in first or scale not in second:
                continue
            task = first[scale].flatten()
            smooth = (second[scale] - first[scale]).flatten()
            applied = task + 0.5 * smooth
            if self.frozen_until.get(name, 0) >= step:
                applied = 0.5 * smooth if self.hparams["freeze_part"] == "task" else task
            scale.grad = applied.view_as(scale).clone()
            self.last_scale_parts[name] = (task, smooth, applied)
            self.conflict_sum[name] = self.conflict_sum.get(name, 0.0) + conflict_fraction(task, smooth)
            watched = {"applied": applied, "task": task, "smooth": smooth}[self.hparams["disorder_watch"]]
            self.history.setdefault(name, deque(maxlen=n)).append(watched.detach().clone())
        self.conflict_steps += 1
        if step % k == 0:
            for name, hist in self.history.items():
                disorder = sign_flip_fraction(list(hist))
                freeze = bool(disorder == disorder and disorder < self.hparams["tau"])
                if freeze:
                    self.frozen_until[name] = step + k
                self.decisions.append({"step": step, "layer": name, "disorder": disorder, "frozen": freeze})

    def after_evaluation(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        steps = max(1, self.conflict_steps)
        row = {"gaqat_conflict": {k: v / steps for k, v in self.conflict_sum.items()},
               "gaqat_decisions": list(self.decisions),
               "gaqat_frozen": sorted(k for k, until in self.frozen_until.items() if until > step)}
        self.conflict_sum, self.conflict_steps, self.decisions = {}, 0, []
        return row

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["gaqat"] = {
            "history": {k: list(v) for k, v in self.history.items()},
            "frozen_until": dict(self.frozen_until),
            "conflict_sum": dict(self.conflict_sum),
            "conflict_steps": self.conflict_steps,
            "decisions": list(self.decisions),
        }
        return state

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        super().load_state_dict(state, step)
        saved = state["gaqat"]
        n = self.hparams["disorder_window"]
        self.history = {k: deque(v, maxlen=n) for k, v in saved["history"].items()}
        self.frozen_until = {k: int(v) for k, v in saved["frozen_until"].items()}
        self.conflict_sum = {k: float(v) for k, v in saved["conflict_sum"].items()}
        self.conflict_steps = int(saved["conflict_steps"])
        self.decisions = list(saved["decisions"])
