r"""Loss and error barriers on the straight line between two models (linear mode connectivity).

For two models with weights :math:`w_1, w_2` of one architecture and a data split with mean loss
:math:`L`, the line between them is :math:`w(\alpha) = (1 - \alpha) w_1 + \alpha w_2`,
:math:`\alpha \in [0, 1]`, and the **loss barrier** (Frankle et al., ICML 2020, "Linear mode
connectivity and the lottery ticket hypothesis") is the largest excess of the loss over the
straight line between the endpoint losses:

.. math::

    g(\alpha) = L(w(\alpha)) - \big[(1 - \alpha) L(w_1) + \alpha L(w_2)\big], \qquad
    B = \max_{\alpha \in [0, 1]} g(\alpha),

evaluated on a grid :math:`0 = \alpha_0 < \alpha_1 < \dots < \alpha_{m-1} = 1` (default 21
evenly spaced points). Because the grid holds both ends, where :math:`g = 0` exactly,
:math:`B \ge 0`; :math:`B = 0` means the models are linearly connected on that split (a convex
loss along the line gives :math:`g \le 0` everywhere). The **error barrier** is the same formula on
the error :math:`E = 1 - \text{accuracy}`, the form Frankle et al. report. Both are reported with
the grid point :math:`\alpha^*` where the maximum is attained.

Loss and accuracy at a point are those of :class:`flatlab.surface.evaluate.PointEvaluator`:
:math:`L = \sum_B \text{loss\_fn}(f(x_B), y_B)\,|B|/N` (a mean-reduction loss, batches weighted by
their size), accuracy :math:`\#\{\arg\max f(x) = y\}/N`, the model in eval mode.

**Standard error.** :math:`g(\alpha)` is a sample mean over the split's :math:`N` samples of the
per-sample gaps :math:`g_i(\alpha) = \ell_i(w(\alpha)) - [(1 - \alpha)\ell_i(w_1) + \alpha
\ell_i(w_2)]` (paired: the same samples at the three weights), so its standard error is
:math:`\mathrm{se}(\alpha) = s_g(\alpha)/\sqrt N` with :math:`s_g` the sample standard deviation of
the :math:`g_i(\alpha)`. The barrier's stderr is :math:`\mathrm{se}(\alpha^*)`, conditional on the
grid point (the selection of the maximum adds an upward bias it does not cover). For the error
barrier :math:`\ell_i` is the 0/1 error. Per-sample losses come from ``loss_fn`` applied to one
sample at a time (``torch.vmap``), so the stderr assumes the loss is a mean of per-sample terms.

**BatchNorm** (``bn``):

* ``"interpolate"``: running means and variances are interpolated like the weights (every
  floating-point tensor of the model moves on the line, as in :mod:`flatlab.surface.interpolate`).
* ``"reestimate"``: at every grid point (ends included) each BatchNorm layer's running statistics
  are reset and re-estimated on training batches, in train mode with ``momentum=None``, PyTorch's
  cumulative average: after batches :math:`b = 1..T`,

  .. math:: \hat\mu = \frac1T \sum_{b=1}^T \bar x_b, \qquad
            \hat\sigma^2 = \frac1T \sum_{b=1}^T s_b^2,

  with :math:`\bar x_b` and :math:`s_b^2` the batch's per-channel mean and unbiased variance, as
  SWA's ``bn_update`` does (``torch.optim.swa_utils.update_bn``). Why it matters: the activations
  of an interpolated network do not have the interpolated statistics. Averaging two networks
  whose hidden units are not aligned shrinks the variance of their hidden activations ("variance
  collapse"), so eval-mode BatchNorm normalizes with the wrong mean and variance and the measured
  barrier is inflated by that mismatch rather than by the loss geometry. Jordan et al. (ICLR 2023,
  "REPAIR: REnormalizing Permuted Activations for Interpolation Repair") show that re-estimating
  the statistics of the interpolated network removes most of the barrier of BatchNorm networks.
  Only the BatchNorm layers switch to train mode while the statistics are collected (dropout, if
  any, stays off, so the statistics are those of the function that is evaluated); the first
  ``bn_num_batches`` batches are used (all by default).

The two models must have the same parameter and floating-point buffer names, shapes and dtypes;
quantized models (flatlab LSQ layers) enter with their effective de-quantized weights (the
deployed model, as the surface code's interpolation does), so an FP and a quantized model of one
architecture share a line. Neither input model is modified.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatlab.errors import FlatlabError
from flatlab.quant.prepare import effective_model, is_quantized
from flatlab.surface.evaluate import model_tensors
from flatlab.surface.interpolate import state_tensors

Batch = tuple[Tensor, Tensor]
Batches = Sequence[Batch]
LossFn = Callable[[Tensor, Tensor], Tensor]

#: BatchNorm handling on the line (see the module docstring).
BN_MODES = ("interpolate", "reestimate")
#: Default number of grid points on [0, 1], both ends included.
DEFAULT_NUM_POINTS = 21


@dataclass(frozen=True)
class BarrierConfig:
    """Settings of a barrier measurement, validated at construction.

    Attributes:
        num_points: evenly spaced grid points on :math:`[0, 1]`, both ends included (>= 2); used
            when ``alphas`` is not given.
        alphas: an explicit grid instead: strictly increasing, starting at 0 and ending at 1.
        bn: ``"interpolate"`` (BatchNorm statistics interpolated like the weights) or
            ``"reestimate"`` (reset and re-estimated on training batches at every point).
        bn_num_batches: how many re-estimation batches to use (the first ones); ``None`` = all.
        device: where the models are evaluated.
    """

    num_points: int = DEFAULT_NUM_POINTS
    alphas: tuple[float, ...] | None = None
    bn: str = "interpolate"
    bn_num_batches: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.num_points, bool) or not isinstance(self.num_points, int) or self.num_points < 2:
            raise FlatlabError(f"num_points must be an integer of at least 2 (both ends), got {self.num_points!r}")
        if self.alphas is not None:
            try:
                grid = tuple(float(a) for a in self.alphas)
            except (TypeError, ValueError):
                raise FlatlabError(f"alphas must be a sequence of numbers, got {self.alphas!r}") from None
            if len(grid) < 2 or grid[0] != 0.0 or grid[-1] != 1.0:
                raise FlatlabError(f"alphas must start at 0 and end at 1 (the two models), got {list(grid)}")
            if any(not math.isfinite(a) for a in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
                raise FlatlabError(f"alphas must be strictly increasing, got {list(grid)}")
            object.__setattr__(self, "alphas", grid)
        if self.bn not in BN_MODES:
            raise FlatlabError(f"bn must be one of {', '.join(BN_MODES)}, got {self.bn!r}")
        if self.bn_num_batches is not None and (isinstance(self.bn_num_batches, bool)
                                                or not isinstance(self.bn_num_batches, int)
                                                or self.bn_num_batches < 1):
            raise FlatlabError(f"bn_num_batches must be a positive integer or None (all), got {self.bn_num_batches!r}")
        if not isinstance(self.device, str) or not self.device:
            raise FlatlabError(f"device must be a device name such as 'cpu', got {self.device!r}")

    @property
    def grid(self) -> np.ndarray:
        """The :math:`\\alpha` grid (float64), both ends included."""
        if self.alphas is not None:
            return np.asarray(self.alphas, dtype=np.float64)
        return np.linspace(0.0, 1.0, self.num_points)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready settings."""
        out = asdict(self)
        out["alphas"] = None if self.alphas is None else list(self.alphas)
        return out


@dataclass(frozen=True)
class LineProfile:
    """Loss and accuracy along the line on one split, and the barriers they give.

    Arrays are indexed like :attr:`BarrierResult.alphas`. ``*_gaps`` are :math:`g(\\alpha)`
    (loss) and the same on the error :math:`1 - \\text{accuracy}`; ``*_gap_stderrs`` their
    paired standard errors (module docstring). Accuracy-based fields are NaN when the targets
    are not integer class labels (e.g. a regression loss).
    """

    losses: np.ndarray
    accuracies: np.ndarray
    loss_gaps: np.ndarray
    loss_gap_stderrs: np.ndarray
    error_gaps: np.ndarray
    error_gap_stderrs: np.ndarray
    loss_barrier: float
    loss_barrier_alpha: float
    loss_barrier_stderr: float
    error_barrier: float
    error_barrier_alpha: float
    error_barrier_stderr: float
    endpoint_losses: tuple[float, float]
    endpoint_accuracies: tuple[float, float]
    num_samples: int


@dataclass(frozen=True)
class BarrierResult:
    """The line between two models on every split.

    Attributes:
        alphas: the grid, 0 (model 1) to 1 (model 2).
        splits: per split name, its :class:`LineProfile`.
        bn: the BatchNorm mode used.
        bn_layers: BatchNorm layers whose statistics were re-estimated at each point (0 for
            ``"interpolate"``, or for a model without BatchNorm).
        bn_batches: batches each re-estimation used (0 for ``"interpolate"``).
        config: the settings.
    """

    alphas: np.ndarray
    splits: dict[str, LineProfile]
    bn: str
    bn_layers: int
    bn_batches: int
    config: BarrierConfig

    @property
    def loss_barriers(self) -> dict[str, float]:
        """Loss barrier per split."""
        return {name: p.loss_barrier for name, p in self.splits.items()}

    @property
    def error_barriers(self) -> dict[str, float]:
        """Error (1 - accuracy) barrier per split."""
        return {name: p.error_barrier for name, p in self.splits.items()}


@dataclass(frozen=True)
class PairwiseBarriers:
    """Barriers between every pair of models (e.g. an EoQ ensemble's members).

    Matrices are ``(m, m)`` per split, symmetric, zero on the diagonal: entry ``[i, j]`` (and
    ``[j, i]``) is the barrier on the line from model ``i`` to model ``j``, ``i < j``. The line is
    the same segment either way; on an asymmetric ``alphas`` grid the two directions would sample
    it at different points, and the ``i < j`` direction is the one computed.

    Attributes:
        labels: one name per model.
        loss_barriers, loss_barrier_stderrs, error_barriers, error_barrier_stderrs: per split.
        pairs: the full :class:`BarrierResult` of every pair ``(i, j)``, ``i < j``.
        config: the settings.
    """

    labels: tuple[str, ...]
    loss_barriers: dict[str, np.ndarray]
    loss_barrier_stderrs: dict[str, np.ndarray]
    error_barriers: dict[str, np.ndarray]
    error_barrier_stderrs: dict[str, np.ndarray]
    pairs: dict[tuple[int, int], BarrierResult] = field(repr=False)
    config: BarrierConfig


# -- BatchNorm re-estimation ----------------------------------------------------------------------

def _batchnorms_with_statistics(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None and m.running_var is not None]


@torch.no_grad()
def reestimate_bn_statistics(model: nn.Module, batches: Batches, num_batches: int | None = None) -> int:
    r"""Reset every BatchNorm layer's running statistics and re-estimate them as a cumulative mean.

    With ``momentum=None`` PyTorch keeps the plain average over the batches seen since the reset,
    so after batches :math:`b = 1..T` the running mean is :math:`\frac1T\sum_b \bar x_b` and the
    running variance :math:`\frac1T\sum_b s_b^2` (per channel; :math:`s_b^2` unbiased), each batch
    weighted equally, as ``torch.optim.swa_utils.update_bn`` does. Hand-written rather than
    ``update_bn`` because that puts the whole model in train mode (dropout on); here only the
    BatchNorm layers collect statistics, in train mode, and every module's mode and every
    BatchNorm's momentum are restored afterwards.

    Args:
        model: modified in place (its BatchNorm buffers).
        batches: ``(x, y)`` batches (the labels are unused), on the model's device.
        num_batches: use the first ``num_batches`` batches (``None``: all).

    Returns:
        The number of BatchNorm layers re-estimated (0 when the model has none).

    Raises:
        FlatlabError: no batches to re-estimate on, or a non-positive ``num_batches``.
    """
    if num_batches is not None and num_batches < 1:
        raise FlatlabError(f"bn_num_batches must be positive, got {num_batches}")
    bns = _batchnorms_with_statistics(model)
    if not bns:
        return 0
    used = list(batches) if num_batches is None else list(batches)[:num_batches]
    if not used:
        raise FlatlabError("re-estimating BatchNorm statistics needs at least one batch of training data")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
            m.train()
        for x, _ in used:
            model(x)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return len(bns)


# -- the line -------------------------------------------------------------------------------------

def _deployed(model: nn.Module) -> nn.Module:
    """The model as measured: quantized layers replaced by their de-quantized weights."""
    return effective_model(model) if is_quantized(model) else model


def check_same_tensors(first: Mapping[str, Tensor], other: Mapping[str, Tensor], labels: tuple[str, str]) -> None:
    """Refuse two models whose interpolated tensors differ in names, shapes or dtypes.

    Raises:
        FlatlabError: naming the tensors (or the shape / dtype) that differ.
    """
    a, b = labels
    only_first = [n for n in first if n not in other]
    only_other = [n for n in other if n not in first]
    if only_first or only_other:
        parts = []
        if only_first:
            parts.append(f"only {a} has {', '.join(only_first[:3])}" + (" ..." if len(only_first) > 3 else ""))
        if only_other:
            parts.append(f"only {b} has {', '.join(only_other[:3])}" + (" ..." if len(only_other) > 3 else ""))
        raise FlatlabError(f"cannot interpolate {a} and {b}: different architectures ({'; '.join(parts)})")
    for name, t in first.items():
        u = other[name]
        if t.shape != u.shape:
            raise FlatlabError(f"cannot interpolate {a} and {b}: {name} has shape {tuple(t.shape)} in {a} and "
                               f"{tuple(u.shape)} in {b} (different architectures)")
        if t.dtype != u.dtype:
            raise FlatlabError(f"cannot interpolate {a} and {b}: {name} is {t.dtype} in {a} and {u.dtype} in {b}; "
                               "convert both models to one dtype")


class _Line:
    """A working copy of model 1 whose tensors are rewritten in place to any point of the line.

    Points are written with ``torch.lerp`` (``w1 + a (w2 - w1)`` for ``a < 1/2``,
    ``w2 - (1 - a)(w2 - w1)`` above), which is exact at both ends: ``a = 0`` and ``a = 1`` are the
    two models bit for bit. (The surface's :class:`~flatlab.surface.evaluate.PointEvaluator`
    writes ``w1 + a d`` with a stored direction, which misses ``w2`` by rounding at ``a = 1``.)
    """

    def __init__(self, model1: nn.Module, model2: nn.Module, device: torch.device,
                 labels: tuple[str, str] = ("model 1", "model 2")) -> None:
        first, second = _deployed(model1), _deployed(model2)
        w1, w2 = state_tensors(first), state_tensors(second)
        check_same_tensors(w1, w2, labels)
        self.model = copy.deepcopy(first).to(device).eval()
        self.tensors = model_tensors(self.model)
        self.w1 = {n: t.to(device) for n, t in w1.items()}
        self.w2 = {n: w2[n].to(device) for n in w1}

    @torch.no_grad()
    def set_point(self, alpha: float) -> None:
        for n, t in self.tensors.items():
            t.copy_(torch.lerp(self.w1[n], self.w2[n], float(alpha)))


def interpolate_models(model1: nn.Module, model2: nn.Module, alpha: float, *, bn: str = "interpolate",
                       bn_data: Batches | None = None, bn_num_batches: int | None = None,
                       device: str = "cpu") -> nn.Module:
    r"""A new model at :math:`w(\alpha) = (1 - \alpha) w_1 + \alpha w_2` (eval mode).

    Every parameter and floating-point buffer is interpolated; with ``bn="reestimate"`` the
    BatchNorm statistics are then reset and re-estimated on ``bn_data``
    (:func:`reestimate_bn_statistics`). The input models are not modified.

    Raises:
        FlatlabError: different architectures, an unknown ``bn``, or ``bn="reestimate"`` without
            ``bn_data``.
    """
    if bn not in BN_MODES:
        raise FlatlabError(f"bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
    if bn == "reestimate" and bn_data is None:
        raise FlatlabError("bn='reestimate' needs bn_data: training batches to re-estimate the statistics on")
    dev = torch.device(device)
    line = _Line(model1, model2, dev)
    line.set_point(float(alpha))
    if bn == "reestimate":
        assert bn_data is not None
        reestimate_bn_statistics(line.model, _to_device(bn_data, dev), bn_num_batches)
    return line.model.eval()


# -- evaluation -----------------------------------------------------------------------------------

def _to_device(batches: Batches, device: torch.device) -> list[Batch]:
    return [(x.to(device), y.to(device)) for x, y in batches]


def _has_class_labels(logits: Tensor, y: Tensor) -> bool:
    return logits.dim() == 2 and y.dim() == 1 and not y.is_floating_point() and not y.is_complex()


class _PerSampleLoss:
    """``loss_fn`` on one sample at a time: ``torch.vmap`` over the batch, or a loop for a loss
    that vmap cannot transform (decided on the first batch)."""

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn
        self.vectorised: bool | None = None

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        if self.vectorised is not False:
            try:
                out = torch.vmap(lambda o, t: self.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(logits, y)
                if out.shape == (len(y),):
                    self.vectorised = True
                    return out
            except (RuntimeError, NotImplementedError, ValueError):
                pass
            self.vectorised = False
        return torch.stack([self.loss_fn(logits[i:i + 1], y[i:i + 1]).reshape(()) for i in range(len(y))])


@dataclass
class _PointValues:
    loss: float
    accuracy: float
    sample_losses: np.ndarray
    sample_errors: np.ndarray | None


@torch.no_grad()
def _evaluate(model: nn.Module, batches: list[Batch], loss_fn: LossFn, per_sample: _PerSampleLoss) -> _PointValues:
    loss_sum = 0.0
    correct = 0
    count = 0
    losses: list[np.ndarray] = []
    errors: list[np.ndarray] = []
    labelled = True
    for x, y in batches:
        logits = model(x)
        loss_sum += float(loss_fn(logits, y).double()) * len(y)
        losses.append(per_sample(logits, y).double().cpu().numpy())
        if labelled and _has_class_labels(logits, y):
            wrong = (logits.argmax(1) != y).cpu().numpy()
            correct += int(len(y) - wrong.sum())
            errors.append(wrong.astype(np.float64))
        else:
            labelled = False
        count += len(y)
    return _PointValues(loss=loss_sum / count, accuracy=correct / count if labelled else float("nan"),
                        sample_losses=np.concatenate(losses),
                        sample_errors=np.concatenate(errors) if labelled else None)


def _lerp(x0: Any, x1: Any, a: float) -> Any:
    """``(1 - a) x0 + a x1`` in ``torch.lerp``'s form, exact at ``a = 0`` and ``a = 1``."""
    return x0 + a * (x1 - x0) if a < 0.5 else x1 - (1.0 - a) * (x1 - x0)


def _stderr(samples: np.ndarray) -> float:
    return float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")


def _profile(alphas: np.ndarray, points: list[_PointValues]) -> LineProfile:
    first, last = points[0], points[-1]
    losses = np.array([p.loss for p in points])
    accuracies = np.array([p.accuracy for p in points])
    errors = 1.0 - accuracies
    loss_gaps = np.array([p.loss - _lerp(first.loss, last.loss, a) for a, p in zip(alphas, points)])
    error_gaps = np.array([e - _lerp(errors[0], errors[-1], a) for a, e in zip(alphas, errors)])
    loss_se = np.array([_stderr(p.sample_losses - _lerp(first.sample_losses, last.sample_losses, a))
                        for a, p in zip(alphas, points)])
    if first.sample_errors is not None and all(p.sample_errors is not None for p in points):
        error_se = np.array([_stderr(p.sample_errors - _lerp(first.sample_errors, last.sample_errors, a))  # type: ignore[operator]
                             for a, p in zip(alphas, points)])
    else:
        error_se = np.full(len(points), np.nan)
    i = int(np.argmax(loss_gaps))
    labelled = bool(np.all(np.isfinite(accuracies)))
    j = int(np.argmax(error_gaps)) if labelled else 0
    for arr in (losses, accuracies, loss_gaps, error_gaps, loss_se, error_se):
        arr.setflags(write=False)
    return LineProfile(
        losses=losses, accuracies=accuracies, loss_gaps=loss_gaps, loss_gap_stderrs=loss_se,
        error_gaps=error_gaps, error_gap_stderrs=error_se,
        loss_barrier=float(loss_gaps[i]), loss_barrier_alpha=float(alphas[i]), loss_barrier_stderr=float(loss_se[i]),
        error_barrier=float(error_gaps[j]) if labelled else float("nan"),
        error_barrier_alpha=float(alphas[j]) if labelled else float("nan"),
        error_barrier_stderr=float(error_se[j]) if labelled else float("nan"),
        endpoint_losses=(float(losses[0]), float(losses[-1])),
        endpoint_accuracies=(float(accuracies[0]), float(accuracies[-1])),
        num_samples=len(first.sample_losses))


def _check_splits(splits: Mapping[str, Batches]) -> None:
    if not splits:
        raise FlatlabError("splits is empty: pass at least one named list of (x, y) batches")
    for name, batches in splits.items():
        if not batches or sum(len(y) for _, y in batches) == 0:
            raise FlatlabError(f"split {name!r} has no samples")


def _resolve_bn_data(config: BarrierConfig, splits: Mapping[str, Batches], bn_data: Batches | None) -> Batches | None:
    if config.bn != "reestimate":
        return None
    if bn_data is not None:
        if not bn_data:
            raise FlatlabError("bn_data is empty: pass the training batches to re-estimate BatchNorm statistics on")
        return bn_data
    if "source" in splits:
        return splits["source"]
    raise FlatlabError("bn='reestimate' needs bn_data (training batches), or a split named 'source' to use instead")


def loss_barrier(model1: nn.Module, model2: nn.Module, splits: Mapping[str, Batches], *,
                 loss_fn: LossFn | None = None, config: BarrierConfig | None = None,
                 bn_data: Batches | None = None) -> BarrierResult:
    r"""Loss and error barriers on the line :math:`(1 - \alpha) w_1 + \alpha w_2` (module docstring).

    Args:
        model1, model2: two models of one architecture (quantized ones enter with their
            de-quantized weights); neither is modified.
        splits: named lists of ``(x, y)`` batches, e.g. ``{"source": ..., "target": ...}``.
        loss_fn: ``loss_fn(outputs, y)`` with mean reduction (default cross-entropy).
        config: grid, BatchNorm mode and device (default :class:`BarrierConfig`).
        bn_data: training batches for ``bn="reestimate"`` (default: the split named ``source``).

    Returns:
        :class:`BarrierResult`: per split the losses, accuracies, gaps and barriers along the line.

    Raises:
        FlatlabError: different architectures, empty splits, or no data to re-estimate on.
    """
    config = config or BarrierConfig()
    _check_splits(splits)
    reestimate_on = _resolve_bn_data(config, splits, bn_data)
    device = torch.device(config.device)
    line = _Line(model1, model2, device)
    return _run_line(line, splits, loss_fn or F.cross_entropy, config, reestimate_on, device)


def _run_line(line: _Line, splits: Mapping[str, Batches], loss_fn: LossFn, config: BarrierConfig,
              bn_data: Batches | None, device: torch.device) -> BarrierResult:
    alphas = config.grid
    data = {name: _to_device(batches, device) for name, batches in splits.items()}
    bn_batches = None if bn_data is None else _to_device(bn_data, device)
    per_sample = _PerSampleLoss(loss_fn)
    points: dict[str, list[_PointValues]] = {name: [] for name in data}
    bn_layers = 0
    for a in alphas:
        line.set_point(float(a))
        if bn_batches is not None:
            bn_layers = reestimate_bn_statistics(line.model, bn_batches, config.bn_num_batches)
        for name, batches in data.items():
            points[name].append(_evaluate(line.model, batches, loss_fn, per_sample))
    used = 0 if bn_batches is None or bn_layers == 0 else min(len(bn_batches), config.bn_num_batches or len(bn_batches))
    alphas = alphas.copy()
    alphas.setflags(write=False)
    return BarrierResult(alphas=alphas, splits={name: _profile(alphas, pts) for name, pts in points.items()},
                         bn=config.bn, bn_layers=bn_layers, bn_batches=used, config=config)


def pairwise_barriers(models: Sequence[nn.Module], splits: Mapping[str, Batches], *,
                      loss_fn: LossFn | None = None, config: BarrierConfig | None = None,
                      bn_data: Batches | None = None, labels: Sequence[str] | None = None) -> PairwiseBarriers:
    """Barriers between every pair of ``models`` (:func:`loss_barrier` on each line ``i < j``).

    Args:
        models: two or more models of one architecture (e.g. an EoQ ensemble's members).
        splits, loss_fn, config, bn_data: as for :func:`loss_barrier`.
        labels: a name per model (default ``"0"``, ``"1"``, ...).

    Returns:
        :class:`PairwiseBarriers`: symmetric ``(m, m)`` matrices per split, zero diagonal.

    Raises:
        FlatlabError: fewer than two models, labels of the wrong length, different architectures.
    """
    config = config or BarrierConfig()
    if len(models) < 2:
        raise FlatlabError(f"pairwise barriers need at least two models, got {len(models)}")
    names = tuple(str(i) for i in range(len(models))) if labels is None else tuple(str(s) for s in labels)
    if len(names) != len(models):
        raise FlatlabError(f"labels has {len(names)} names for {len(models)} models")
    _check_splits(splits)
    reestimate_on = _resolve_bn_data(config, splits, bn_data)
    # Refuse a mismatched member before any line is computed.
    first = model_tensors(_deployed(models[0]))
    for name, model in zip(names[1:], models[1:]):
        check_same_tensors(first, model_tensors(_deployed(model)), (f"model {names[0]}", f"model {name}"))
    device = torch.device(config.device)
    loss_fn = loss_fn or F.cross_entropy
    m = len(models)
    kinds = ("loss_barrier", "loss_barrier_stderr", "error_barrier", "error_barrier_stderr")
    matrices = {kind: {s: np.zeros((m, m)) for s in splits} for kind in kinds}
    pairs: dict[tuple[int, int], BarrierResult] = {}
    for i in range(m):
        for j in range(i + 1, m):
            line = _Line(models[i], models[j], device, (f"model {names[i]}", f"model {names[j]}"))
            result = _run_line(line, splits, loss_fn, config, reestimate_on, device)
            pairs[(i, j)] = result
            for s, profile in result.splits.items():
                for kind in kinds:
                    matrices[kind][s][i, j] = matrices[kind][s][j, i] = getattr(profile, kind)
    for by_split in matrices.values():
        for arr in by_split.values():
            arr.setflags(write=False)
    return PairwiseBarriers(labels=names, loss_barriers=matrices["loss_barrier"],
                            loss_barrier_stderrs=matrices["loss_barrier_stderr"],
                            error_barriers=matrices["error_barrier"],
                            error_barrier_stderrs=matrices["error_barrier_stderr"], pairs=pairs, config=config)


__all__ = ["BN_MODES", "DEFAULT_NUM_POINTS", "BarrierConfig", "BarrierResult", "LineProfile", "PairwiseBarriers",
           "check_same_tensors", "interpolate_models", "loss_barrier", "pairwise_barriers",
           "reestimate_bn_statistics"]
