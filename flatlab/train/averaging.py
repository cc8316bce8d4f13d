"""Weight averaging: SWA (Izmailov et al. 2018) and SWAD (Cha et al. 2021), alone or after QAT.

* ``swa``: the running mean of the weights after every step from ``swa_start`` (default: half
  the steps, or the QAT switch when ``--bits`` is given, whichever is later).
* ``swad``: dense averaging inside SWAD's "loss valley". The weights of every step between two
  evaluations form a segment average; the mean source out-loss at the segment's end is its
  validation loss. SWAD's LossValley rule (n_converge 3, n_tolerance 6, tolerance ratio 0.3):
  averaging starts at the first segment of the window whose minimum comes first (convergence),
  with threshold = mean loss of that window x 1.3, and stops when the smallest loss of the next
  n_tolerance segments exceeds the threshold (the valley is "dead").

The average of floating-point parameters (latent weights and LSQ scales for a QAT model) becomes
the final model; BatchNorm statistics are then recomputed over ``bn_update_steps`` fresh training
minibatches, as SWAD does.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from flatlab.errors import ConfigError, FlatlabError
from flatlab.train.algorithms import Minibatches, register_algorithm
from flatlab.train.optional_qat import OptionalQAT


def _float_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, batches: Minibatches) -> None:
    """Reset BatchNorm running statistics and re-estimate them as a cumulative average."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    was_training = model.training
    model.train()
    for m in bns:  # frozen-BN models (ResNets) still need their statistics re-estimated here
        m.train()
    for x, _ in batches:
        model(x)
    for m in bns:
        m.momentum = saved[m]
    model.train(was_training)


class _AveragingBase(OptionalQAT):
    hparam_defaults: ClassVar[dict[str, Any]] = {**OptionalQAT.hparam_defaults, "bn_update_steps": 50}

    @classmethod
    def validate_hparams(cls, hparams: dict[str, Any], total_steps: int) -> None:
        super().validate_hparams(hparams, total_steps)
        if int(hparams["bn_update_steps"]) < 0:
            raise ConfigError("bn_update_steps", "must be >= 0")

    def averaging_allowed(self, step: int) -> bool:
        return not self.uses_quantization or self.quantized

    def _finish(self, avg: dict[str, torch.Tensor], train_batches) -> nn.Module:
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(avg[n])
        if int(self.hparams["bn_update_steps"]) > 0:
            recompute_bn_statistics(model, train_batches(int(self.hparams["bn_update_steps"])))
        return model.eval()


@register_algorithm
class SWA(_AveragingBase):
    """Stochastic weight averaging of every step after ``swa_start``."""

    name = "swa"
    hparam_defaults: ClassVar[dict[str, Any]] = {**_AveragingBase.hparam_defaults, "swa_start": None}

    def __init__(self, model: nn.Module, hparams: dict[str, Any], total_steps: int,
                 generator: torch.Generator) -> None:
        super().__init__(model, hparams, total_steps, generator)
        start = hparams["swa_start"]
        default = total_steps // 2
        if self.uses_quantization:
            default = max(default, self.quant_start)
        self.swa_start = default if start is None else int(start)
        self.avg: dict[str, torch.Tensor] | None = None
        self.count = 0

    def update(self, minibatches: Minibatches, step: int) -> dict[str, Any]:
        stats = super().update(minibatches, step)
        if step >= self.swa_start and self.averaging_allowed(step):
            current = _float_params(self.model)
            if self.avg is None:
                self.avg = {n: t.clone() for n, t in current.items()}
            else:
                for n, t in current.items():
                    self.avg[n].mul_(self.count / (self.count + 1)).add_(t / (self.count + 1))
            self.count += 1
        return stats

    def after_evaluation(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"swa_count": self.count}

    def final_model(self, train_batches) -> nn.Module | None:
        if self.avg is None:
            raise ConfigError("swa_start", f"({self.swa_start}) is beyond the last step: swa averaged no step")
        return self._finish(self.avg, train_batches)

    def after_training_meta(self) -> dict[str, Any]:
        return {"averaged_steps": self.count, "swa_start": self.swa_start}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "swa": {"avg": self.avg, "count": self.count}}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        super().load_state_dict(state, step)
        self.avg, self.count = state["swa"]["avg"], int(state["swa"]["count"])


@register_algorithm
class SWAD(_AveragingBase):
    """SWAD: dense weight averaging inside the validation-loss valley."""

    name = "swad"
    hparam_defaults: ClassVar[dict[str, Any]] = {**_AveragingBase.hparam_defaults, "n_converge": 3,
                                                 "n_tolerance": 6, "tolerance_ratio": 0.3}

    def __init__(self, model: nn.Module, hparams: dict[str, Any], total_steps: int,
                 generator: torch.Generator) -> None:
        super().__init__(model, hparams, total_steps, generator)
        self.segment: dict[str, torch.Tensor] | None = None
        self.segment_count = 0
        self.segment_start: int | None = None
        #: Finished segments: {"avg", "count", "start", "end", "loss"} (only the window SWAD needs).
        self.queue: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None  # {"sum": {...}, "segments": int, "start", "end"}
        self.converge_step: int | None = None
        self.threshold: float | None = None
        self.dead = False

    def update(self, minibatches: Minibatches, step: int) -> dict[str, Any]:
        stats = super().update(minibatches, step)
        if self.averaging_allowed(step):
            current = _float_params(self.model)
            if self.segment is None:
                self.segment = {n: t.clone() for n, t in current.items()}
                self.segment_count, self.segment_start = 1, step
            else:
                k = self.segment_count
                for n, t in current.items():
                    self.segment[n].mul_(k / (k + 1)).add_(t / (k + 1))
                self.segment_count += 1
        return stats

    def _add_to_final(self, seg: dict[str, Any]) -> None:
        if self.final is None:
            self.final = {"sum": {n: t.clone() for n, t in seg["avg"].items()}, "segments": 1,
                          "start": seg["start"], "end": seg["end"]}
        else:
            for n, t in seg["avg"].items():
                self.final["sum"][n].add_(t)
            self.final["segments"] += 1
            self.final["end"] = seg["end"]

    def after_evaluation(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        n_conv, n_tol = int(self.hparams["n_converge"]), int(self.hparams["n_tolerance"])
        if self.segment is not None and not self.dead:
            self.queue.append({"avg": self.segment, "count": self.segment_count, "start": self.segment_start,
                               "end": step, "loss": float(metrics["val_loss"])})
            self.queue = self.queue[-max(n_conv, n_tol):]
            if self.converge_step is None:
                window = self.queue[-n_conv:]
                if len(window) == n_conv and min(range(n_conv), key=lambda i: window[i]["loss"]) == 0:
                    self.converge_step = window[0]["end"]
                    self.threshold = sum(s["loss"] for s in window) / n_conv * (1 + float(self.hparams["tolerance_ratio"]))
                    self._add_to_final(window[0])
                    self.queue = window[1:]
            else:
                # Valley: add the oldest pending segment while the smoothed loss stays under the threshold.
                while len(self.queue) >= n_tol:
                    if min(s["loss"] for s in self.queue) > self.threshold:
                        self.dead = True
                        break
                    self._add_to_final(self.queue.pop(0))
        self.segment, self.segment_count, self.segment_start = None, 0, None
        return {"swad_converge_step": self.converge_step, "swad_dead": self.dead,
                "swad_segments": 0 if self.final is None else self.final["segments"]}

    def final_model(self, train_batches) -> nn.Module | None:
        if self.converge_step is None or self.final is None:
            # SWAD's own fallback: the last segment's average when the loss never converged.
            if not self.queue:
                raise FlatlabError("swad averaged nothing: train longer or evaluate more often (eval_every)")
            return self._finish(self.queue[-1]["avg"], train_batches)
        if not self.dead:
            while self.queue and min(s["loss"] for s in self.queue) <= self.threshold:
                self._add_to_final(self.queue.pop(0))
        avg = {n: t / self.final["segments"] for n, t in self.final["sum"].items()}
        return self._finish(avg, train_batches)

    def after_training_meta(self) -> dict[str, Any]:
        info = {"swad_converge_step": self.converge_step, "swad_dead": self.dead}
        if self.final is not None:
            info.update(swad_start=self.final["start"], swad_end=self.final["end"], swad_segments=self.final["segments"])
        return info

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "swad": {
            "segment": self.segment, "segment_count": self.segment_count, "segment_start": self.segment_start,
            "queue": self.queue, "final": self.final, "converge_step": self.converge_step,
            "threshold": self.threshold, "dead": self.dead}}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        super().load_state_dict(state, step)
        s = state["swad"]
        self.segment, self.segment_count, self.segment_start = s["segment"], s["segment_count"], s["segment_start"]
        self.queue, self.final = s["queue"], s["final"]
        self.converge_step, self.threshold, self.dead = s["converge_step"], s["threshold"], s["dead"]
