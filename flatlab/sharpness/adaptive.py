r"""Adaptive and standard sharpness at a fixed radius, worst case and average case.

Andriushchenko et al. (ICML 2023, "A modern look at the relationship between sharpness and
generalization") after Kwon et al. (ICML 2021, ASAM); docs/measures.md section 8.

Definitions
-----------
For the perturbed parameters :math:`w` (all trainable parameters, or all but the normalization
layers'), a scaling vector :math:`c` and a radius :math:`\rho`:

* scaling ``"adaptive"``: :math:`c = |w|` elementwise; ``"standard"``: :math:`c = 1`;
* the data set (the given batches, in order) is cut into consecutive subsets :math:`S` of
  :math:`m` samples (m-sharpness); ``m = None`` is one subset, the whole set (plain sharpness).
  Samples left over when :math:`m` does not divide :math:`N` are left out (a smaller subset
  would have a different, larger m-sharpness) and reported in ``samples_left_out``;
* :math:`L_S(w)` is the mean loss over the samples of :math:`S`.

Worst case:

.. math::

    S_{\max} = \frac{1}{|\mathcal S|} \sum_{S} \Big[ \max_{\|\delta / c\|_p \le \rho}
               L_S(w + \delta) \Big] - L_S(w), \qquad p \in \{2, \infty\}.

Average case (Gaussian for :math:`p = 2`, the definition of docs/measures.md 8; uniform in the box
for :math:`p = \infty`, what the authors' ``avg_linf`` code draws):

.. math::

    S_{\mathrm{avg}} = \frac{1}{|\mathcal S|} \sum_{S} \mathbb E_{\delta}
               \big[L_S(w + \delta)\big] - L_S(w), \qquad
    \delta = \rho\, c \odot z, \quad
    z \sim \mathcal N(0, I)\ (p = 2), \quad z \sim \mathcal U[-1, 1]^n\ (p = \infty).

For a quadratic :math:`L = \tfrac12 (w - w^*)^\top A (w - w^*)` at its minimum, with
:math:`C = \operatorname{diag}(c)`: the :math:`L_2` worst case is
:math:`\rho^2 \lambda_{\max}(C A C) / 2`, the :math:`L_\infty` worst case the maximum of the
quadratic over the box's vertices, the Gaussian average :math:`\rho^2 \operatorname{tr}(C A C)/2`
and the uniform average :math:`\rho^2 \operatorname{tr}(C A C)/6` (the tests check all four).

The maximisation: Auto-PGD in the scaled coordinates
----------------------------------------------------
flatlab writes :math:`\delta = c \odot u` and maximises over :math:`\|u\|_p \le \rho`. This is
an exact reparametrisation of the set :math:`\|\delta / c\|_p \le \rho` (coordinates with
:math:`c_i = 0`, i.e. :math:`w_i = 0` under adaptive scaling, cannot move and are held at 0),
and in :math:`u` the projection is exact and closed-form: a rescale
:math:`u \leftarrow u \min(1, \rho / \|u\|_2)` for :math:`p = 2`, a clip to :math:`[-\rho, \rho]`
for :math:`p = \infty`. (The authors' code projects :math:`\delta` onto the ellipsoid by a
bisection on a Lagrange multiplier, which is only approximate.) The gradient in :math:`u` is
:math:`g_u = c \odot \nabla_w L`, and the step is the steepest-ascent direction of the ball:

.. math::

    p = \infty: \ u \mathrel{+}= \eta \operatorname{sign}(g_u) \quad(\delta\text{-step }
    \eta\, c \odot \operatorname{sign}\nabla_w L),\qquad
    p = 2: \ u \mathrel{+}= \eta\, g_u / \|g_u\|_2 \quad(\delta\text{-step }
    \eta\, c \odot g_u / \|g_u\|_2),

i.e. sign-gradient or normalized-gradient steps scaled by :math:`c`. For :math:`p = \infty` this
is the authors' step; for :math:`p = 2` they normalise :math:`\nabla_w L` rather than
:math:`g_u`. flatlab's choice makes the whole ascent path invariant to the ReLU rescaling
symmetry (scaling a layer by :math:`a` and the next by :math:`1/a` maps :math:`c \to T c`,
:math:`\nabla_w L \to T^{-1} \nabla_w L`, so :math:`g_u` is unchanged): adaptive worst-case
values of equivalent networks agree to round-off, not just to the ascent's tolerance.

Auto-PGD (Croce and Hein 2020, as the authors use it): initial step :math:`\eta = 2\rho`
(``initial_step`` times :math:`\rho`); the first step is plain projected ascent
:math:`u_1 = P(u_0 + \eta\, d(u_0))`, later steps add momentum :math:`\alpha` (0.75):

.. math::

    z_{k+1} = P(u_k + \eta\, d(u_k)), \qquad
    u_{k+1} = P\big(u_k + \alpha (z_{k+1} - u_k) + (1 - \alpha)(u_k - u_{k-1})\big).

At the checkpoints :math:`w_j = \lceil p_j K \rceil` of a budget of :math:`K` steps,
:math:`p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + \max(p_j - p_{j-1} - 0.03, 0.06)`, the step is
halved and the iterate restarted from the best point found when fewer than 75% of the steps
since the last checkpoint improved the best loss, or when neither the step nor the best loss
changed since the last checkpoint (``schedule="constant"`` keeps :math:`\eta` fixed). The start
is a uniformly random point of the ball (``random_start``; a zero start has no ascent direction
at an exact critical point) and ``restarts`` further runs start from fresh random points. The
value kept per subset is the best loss seen over all runs, floored at :math:`L_S(w)`
(:math:`\delta = 0` is feasible), so the estimate is monotone in the budget and never negative;
it is a lower bound on the true maximum.

Budgets: the authors' function defaults to 200 Auto-PGD steps with one run; their published
evaluation scripts run 20 steps, one run, no random start, on 1,024 training points with
``m = 128`` (``m = 16, 32, 64`` in the m ablation). flatlab's default is 20 steps, one run, with
a random start.

Standard errors
---------------
* Average case: the draws are independent across subsets (seeded per subset and draw). For
  one subset (``m = None``) the standard error is that of the mean over draws; with antithetic
  pairs (:math:`z, -z`, both with the right law) the unit is the pair mean, which cancels the
  gradient term exactly. With several subsets it is :math:`s / \sqrt{|\mathcal S|}`, :math:`s`
  the standard deviation of the per-subset means: the two-stage estimator's standard error
  (it covers the draws and the spread of the subsets, i.e. the error of the mean m-sharpness
  of the distribution the subsets are drawn from). ``per_batch_stderr`` holds the per-subset
  draw errors.
* Worst case: the maximisation is deterministic given the seed, so the only sampling error is
  over subsets: :math:`s / \sqrt{|\mathcal S|}` over the per-subset values, NaN for one subset.
  ``restart_spread`` (mean over subsets of max - min over runs) shows how far the runs
  disagree, i.e. how unconverged the ascent is.

Costs are counted in passes over the measured samples (one forward pass over all :math:`N`
used samples is 1.0 ``forward_passes``).

Nothing here is in a library the project uses: torch.optim has no projected ascent, and
adversarial-attack packages implement Auto-PGD over inputs, not weights, hence this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatlab.checks import coerce_int_fields, is_int
from flatlab.curvature.params import select_parameters
from flatlab.errors import FlatlabError
from flatlab.outputs import (
    OutputFn,
    as_tensor_output,
    model_device,
    prepare_batches,
    with_output_fn,
)
from flatlab.sharpness.perturb import Batch, LossFn, noise_seed

SHARPNESS_KINDS = ("worst", "average")
SCALINGS = ("adaptive", "standard")
PERTURBED_PARAMS = ("all", "no-bn")
STEP_SCHEDULES = ("apgd", "constant")

#: Auto-PGD's first checkpoint (fraction of the budget) and the smallest checkpoint spacing.
APGD_FIRST_CHECKPOINT = 0.22
APGD_MIN_SPACING = 0.06
APGD_SPACING_DECREASE = 0.03
#: Factor applied to the step at a checkpoint where progress stalled.
APGD_STEP_DECAY = 0.5


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise FlatlabError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise FlatlabError(f"{name} must be positive, got {value}")
    return float(value)


def _normalize_p(value: Any) -> float:
    """2 or math.inf from 2, 2.0, "2", inf, "inf"; FlatlabError otherwise."""
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in ("2", "2.0", "l2"):
        return 2.0
    if text in ("inf", "infinity", "linf"):
        return math.inf
    if not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)):
        if float(value) == 2.0:
            return 2.0
        if float(value) == math.inf:
            return math.inf
    raise FlatlabError(f"p must be 2 or inf, got {value!r}" if text is not None else f"p must be 2 or inf, got {value}")


@dataclass(frozen=True)
class AdaptiveSharpnessConfig:
    r"""Settings of adaptive / standard sharpness at a fixed radius (validated on construction).

    Attributes:
        rho: radius :math:`\rho > 0` of :math:`\|\delta / c\|_p \le \rho` (worst case) or the
            noise scale :math:`\delta = \rho\, c \odot z` (average case). No default: its scale
            depends on ``scaling`` and ``p`` (the authors' ResNet-18 grids: adaptive
            :math:`L_\infty` worst case 0.001-0.008, standard :math:`L_2` worst case 0.25-2,
            adaptive :math:`L_2` average 0.05-0.4).
        kind: ``"worst"`` (:math:`S_{\max}`) or ``"average"`` (:math:`S_{\mathrm{avg}}`).
        scaling: ``"adaptive"`` (:math:`c = |w|`) or ``"standard"`` (:math:`c = 1`).
        p: 2 or ``math.inf`` (strings ``"2"`` / ``"inf"`` accepted). Worst case: the norm of the
            set; average case: Gaussian (2, the definition of docs/measures.md 8, hence the
            default) or uniform-in-the-box (inf) noise. The authors find the adaptive
            :math:`L_\infty` worst case with small m the most informative variant in several
            settings: ``p=math.inf, m=...`` selects it.
        m: samples per subset over which each maximum (or expectation) is taken, ``None`` =
            the whole set.
        steps: Auto-PGD steps per run (worst case; the authors' function defaults to 200,
            their scripts use 20).
        restarts: extra runs from fresh random starts (worst case); 0 = one run.
        random_start: start each run at a uniformly random point of the ball instead of 0.
        initial_step: the first step size as a multiple of :math:`\rho` (Auto-PGD: 2).
        momentum: :math:`\alpha` of Auto-PGD's update (0.75; 1 = no momentum).
        improvement_ratio: a checkpoint halves the step when fewer than this share of the
            steps since the last checkpoint improved the best loss (0.75).
        schedule: ``"apgd"`` (halve at checkpoints, restart from the best point) or
            ``"constant"``.
        samples: noise draws per subset (average case); rounded up to even when
            ``antithetic``.
        antithetic: draw noise in pairs :math:`(z, -z)` (average case).
        params: which parameters are perturbed: ``"all"`` trainable parameters or ``"no-bn"``
            (all but normalization layers'); quantizer scales never.
        seed: seeds the random starts and the noise.
    """

    rho: float
    kind: str = "worst"
    scaling: str = "adaptive"
    p: float = 2.0
    m: int | None = None
    steps: int = 20
    restarts: int = 0
    random_start: bool = True
    initial_step: float = 2.0
    momentum: float = 0.75
    improvement_ratio: float = 0.75
    schedule: str = "apgd"
    samples: int = 20
    antithetic: bool = True
    params: str = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", _positive_float("rho", self.rho))
        if self.kind not in SHARPNESS_KINDS:
            raise FlatlabError(f"kind must be one of {', '.join(SHARPNESS_KINDS)}, got {self.kind!r}")
        if self.scaling not in SCALINGS:
            raise FlatlabError(f"scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        object.__setattr__(self, "p", _normalize_p(self.p))
        if self.m is not None:
            if not is_int(self.m) or self.m < 1:
                raise FlatlabError(f"m must be a positive number of samples or None (the whole set), got {self.m!r}")
            object.__setattr__(self, "m", int(self.m))
        coerce_int_fields(self, (("steps", 1), ("restarts", 0), ("samples", 2), ("seed", 0)))
        for name in ("random_start", "antithetic"):
            if not isinstance(getattr(self, name), bool):
                raise FlatlabError(f"{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "initial_step", _positive_float("initial_step", self.initial_step))
        for name in ("momentum", "improvement_ratio"):
            value = _positive_float(name, getattr(self, name))
            if value > 1:
                raise FlatlabError(f"{name} must be in (0, 1], got {value}")
            object.__setattr__(self, name, value)
        if self.schedule not in STEP_SCHEDULES:
            raise FlatlabError(f"schedule must be one of {', '.join(STEP_SCHEDULES)}, got {self.schedule!r}")
        if self.params not in PERTURBED_PARAMS:
            raise FlatlabError(f"params must be one of {', '.join(PERTURBED_PARAMS)}, got {self.params!r}")
        if self.antithetic and self.samples < 4:
            raise FlatlabError(f"samples must be at least 4 with antithetic pairs (two pairs give a standard "
                               f"error), got {self.samples}")
        if self.restarts > 0 and not self.random_start:
            raise FlatlabError(f"restarts = {self.restarts} needs random_start = true: "
                               "runs from the same zero start are identical")

    @property
    def runs(self) -> int:
        """Ascent runs per subset (worst case): 1 + restarts."""
        return 1 + self.restarts

    @property
    def draws(self) -> int:
        """Independent noise draws per subset (average case): pairs when antithetic."""
        return (self.samples + 1) // 2 if self.antithetic else self.samples

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready settings (p as 2 or ``"inf"``)."""
        out = asdict(self)
        out["p"] = "inf" if math.isinf(self.p) else 2
        return out


@dataclass(frozen=True)
class AdaptiveSharpnessResult:
    r"""One sharpness value with its standard error, the per-subset values and every setting.

    Attributes:
        value: :math:`S_{\max}` or :math:`S_{\mathrm{avg}}` (larger = sharper).
        stderr: its standard error (see the module docstring); NaN for a worst case on one subset.
        stderr_over: what the standard error is taken over: ``"batches"`` (subsets),
            ``"draws"`` (average case on one subset) or ``"none"``.
        per_batch: per-subset values (max or mean loss minus :math:`L_S(w)`).
        per_batch_stderr: per-subset Monte Carlo standard errors (average case), else empty.
        per_batch_base_loss: :math:`L_S(w)` per subset.
        run_values: per subset, the value each ascent run reached (worst case), else empty.
        restart_spread: mean over subsets of (max - min) over runs; 0 with one run.
        step_halvings: Auto-PGD step reductions over all subsets and runs (worst case).
        base_loss: mean over subsets of :math:`L_S(w)`.
        perturbed_loss: ``base_loss + value``.
        num_batches: number of subsets :math:`|\mathcal S|`.
        m: samples per subset (``None`` = the whole set).
        num_samples: samples used; ``samples_left_out``: the remainder of :math:`N / m`.
        num_parameters: perturbed scalar parameters.
        forward_passes, backward_passes: cost in passes over the used samples.
        config: every setting.
    """

    value: float
    stderr: float
    stderr_over: str
    per_batch: tuple[float, ...]
    per_batch_stderr: tuple[float, ...]
    per_batch_base_loss: tuple[float, ...]
    run_values: tuple[tuple[float, ...], ...]
    restart_spread: float
    step_halvings: int
    base_loss: float
    perturbed_loss: float
    num_batches: int
    m: int | None
    num_samples: int
    samples_left_out: int
    num_parameters: int
    forward_passes: float
    backward_passes: float
    config: AdaptiveSharpnessConfig = field(repr=False)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def scaling(self) -> str:
        return self.config.scaling

    @property
    def p(self) -> float:
        return self.config.p

    @property
    def rho(self) -> float:
        return self.config.rho

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: every field, the settings under ``config``."""
        out = {k: v for k, v in asdict(self).items() if k != "config"}
        out["per_batch"] = list(self.per_batch)
        out["per_batch_stderr"] = list(self.per_batch_stderr)
        out["per_batch_base_loss"] = list(self.per_batch_base_loss)
        out["run_values"] = [list(r) for r in self.run_values]
        out["config"] = self.config.to_dict()
        return out


# -- data: consecutive subsets of m samples --------------------------------------------------------
def _batch_len(y: Any) -> int:
    return int(y.shape[0]) if isinstance(y, Tensor) and y.dim() > 0 else len(y)


def partition_batches(batches: Sequence[Batch], m: int | None) -> tuple[list[list[Batch]], int]:
    """The subsets :math:`S` as lists of (x, y) pieces, and the number of samples left out.

    ``m = None``: one subset holding the batches as given. Otherwise consecutive runs of ``m``
    samples in batch order; pieces are slices (views) of the given batches, so no piece is
    larger than a given batch. The last ``N mod m`` samples are left out.
    """
    sizes = [_batch_len(y) for _, y in batches]
    total = sum(sizes)
    if total == 0:
        raise FlatlabError("no samples to measure on: the batch list is empty")
    if m is None:
        return [[b for b, n in zip(batches, sizes) if n > 0]], 0
    if m > total:
        raise FlatlabError(f"m must be at most the number of samples ({total}), got {m}")
    subsets: list[list[Batch]] = []
    current: list[Batch] = []
    filled = 0
    for (x, y), n in zip(batches, sizes):
        start = 0
        while start < n and len(subsets) < total // m:
            take = min(m - filled, n - start)
            current.append((x[start:start + take], y[start:start + take]))
            filled += take
            start += take
            if filled == m:
                subsets.append(current)
                current, filled = [], 0
    return subsets, total - m * len(subsets)


# -- the perturbed model ---------------------------------------------------------------------------
class _Perturbation:
    """Sets w = w0 + c * u on the selected parameters and evaluates the loss (and gradient) of a
    subset, counting samples forwarded and backpropagated."""

    def __init__(self, model: nn.Module, params: list[Tensor], scale: list[Tensor] | None,
                 loss_fn: LossFn) -> None:
        self.model = model
        self.params = params
        self.base = [p.detach().clone() for p in params]
        self.scale = scale
        self.loss_fn = loss_fn
        self.forward_samples = 0
        self.backward_samples = 0

    def apply(self, u: Sequence[Tensor] | None, sign: float = 1.0) -> None:
        with torch.no_grad():
            for i, (p, b) in enumerate(zip(self.params, self.base)):
                if u is None:
                    p.copy_(b)
                elif self.scale is None:
                    torch.add(b, u[i], alpha=sign, out=p)
                else:
                    torch.addcmul(b, self.scale[i], u[i], value=sign, out=p)

    def restore(self) -> None:
        self.apply(None)

    def loss(self, subset: Sequence[Batch]) -> float:
        size = sum(_batch_len(y) for _, y in subset)
        total = 0.0
        with torch.no_grad():
            for x, y in subset:
                total += float(self.loss_fn(as_tensor_output(self.model(x), None), y)) * _batch_len(y)
        self.forward_samples += size
        return total / size

    def loss_and_u_gradient(self, subset: Sequence[Batch]) -> tuple[float, list[Tensor]]:
        """:math:`L_S` and :math:`g_u = c \\odot \\nabla_w L_S` at the current point."""
        size = sum(_batch_len(y) for _, y in subset)
        total = 0.0
        grads = [torch.zeros_like(p) for p in self.params]
        for x, y in subset:
            with torch.enable_grad():
                loss = self.loss_fn(as_tensor_output(self.model(x), None), y)
                parts = torch.autograd.grad(loss, self.params, allow_unused=True)
            weight = _batch_len(y) / size
            total += float(loss.detach()) * weight
            for g, part in zip(grads, parts):
                if part is not None:
                    g.add_(part, alpha=weight)
        if self.scale is not None:
            for g, c in zip(grads, self.scale):
                g.mul_(c)
        self.forward_samples += size
        self.backward_samples += size
        return total, grads


def _generators(like: Sequence[Tensor], seed: int) -> Callable[[Tensor], torch.Generator]:
    gens: dict[torch.device, torch.Generator] = {}

    def get(t: Tensor) -> torch.Generator:
        gen = gens.get(t.device)
        if gen is None:
            gen = torch.Generator(device=t.device)
            gen.manual_seed(seed)
            gens[t.device] = gen
        return gen

    return get


def _noise(like: Sequence[Tensor], seed: int, p: float) -> list[Tensor]:
    """Seeded N(0, I) (p = 2) or U[-1, 1] (p = inf) tensors shaped like ``like``."""
    gen = _generators(like, seed)
    if math.isinf(p):
        return [torch.rand(t.shape, generator=gen(t), device=t.device, dtype=t.dtype).mul_(2).sub_(1) for t in like]
    return [torch.randn(t.shape, generator=gen(t), device=t.device, dtype=t.dtype) for t in like]


def _norm2(tensors: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def _random_start(like: Sequence[Tensor], mask: list[Tensor] | None, rho: float, p: float, seed: int) -> list[Tensor]:
    """A uniformly random point of {||u||_p <= rho} over the free coordinates (mask = c > 0)."""
    u = _noise(like, seed, p)
    if mask is not None:
        u = [t * k for t, k in zip(u, mask)]
    if math.isinf(p):
        return [t.mul_(rho) for t in u]
    free = sum(int(k.sum()) for k in mask) if mask is not None else sum(t.numel() for t in like)
    norm = _norm2(u)
    if free == 0 or norm == 0:
        return [torch.zeros_like(t) for t in like]
    # Uniform in the n-ball: a uniform direction times rho * U^(1/n), U from its own stream.
    radius = rho * float(np.random.default_rng(seed).random()) ** (1.0 / free)
    return [t.mul_(radius / norm) for t in u]


def _project(u: list[Tensor], rho: float, p: float) -> list[Tensor]:
    if math.isinf(p):
        for t in u:
            t.clamp_(-rho, rho)
        return u
    norm = _norm2(u)
    if norm > rho:
        for t in u:
            t.mul_(rho / norm)
    return u


def _ascent_direction(g: Sequence[Tensor], p: float) -> list[Tensor]:
    if math.isinf(p):
        return [torch.sign(t) for t in g]
    norm = _norm2(g)
    if norm == 0:
        return [torch.zeros_like(t) for t in g]
    return [t / norm for t in g]


def apgd_checkpoints(steps: int) -> list[int]:
    r"""Auto-PGD's checkpoints :math:`\lceil p_j K \rceil \le K` (step counts, 1-based) for
    :math:`K` = ``steps``: :math:`p_1 = 0.22`, :math:`p_{j+1} = p_j + \max(p_j - p_{j-1} - 0.03, 0.06)`."""
    fractions = [0.0, APGD_FIRST_CHECKPOINT]
    while fractions[-1] < 1.0:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - APGD_SPACING_DECREASE, APGD_MIN_SPACING))
    points = []
    for f in fractions[1:]:
        k = math.ceil(f * steps - 1e-9)  # 0.7 * 20 is 14.000000000000002 in floating point
        if 1 <= k <= steps and (not points or k > points[-1]):
            points.append(k)
    return points


def _ascent_run(pert: _Perturbation, subset: Sequence[Batch], config: AdaptiveSharpnessConfig,
                mask: list[Tensor] | None, start_seed: int) -> tuple[float, int]:
    """One Auto-PGD run on one subset: (best loss seen, number of step halvings)."""
    rho, p, alpha = config.rho, config.p, config.momentum
    like = pert.base
    if config.random_start:
        u = _random_start(like, mask, rho, p, start_seed)
    else:
        u = [torch.zeros_like(t) for t in like]
    pert.apply(u)
    loss, g = pert.loss_and_u_gradient(subset)
    best_loss, best_u, best_g = loss, [t.clone() for t in u], g
    u_prev = [t.clone() for t in u]
    eta = config.initial_step * rho
    checkpoints = set(apgd_checkpoints(config.steps)) if config.schedule == "apgd" else set()
    improved, last_checkpoint = 0, 0
    eta_at_checkpoint, best_at_checkpoint = eta, best_loss
    halvings = 0
    for k in range(1, config.steps + 1):
        direction = _ascent_direction(g, p)
        z = _project([t + eta * d for t, d in zip(u, direction)], rho, p)
        if k == 1:
            u_new = z
        else:
            u_new = _project([t + alpha * (zt - t) + (1 - alpha) * (t - tp) for t, zt, tp in zip(u, z, u_prev)],
                             rho, p)
        u_prev, u = u, u_new
        pert.apply(u)
        last = k == config.steps
        if last:
            loss, g = pert.loss(subset), []  # the final point needs no gradient
        else:
            loss, g = pert.loss_and_u_gradient(subset)
        if loss > best_loss:
            best_loss, best_u, best_g = loss, [t.clone() for t in u], g
            improved += 1
        if k in checkpoints and not last:
            stalled = (improved < config.improvement_ratio * (k - last_checkpoint)
                       or (eta == eta_at_checkpoint and best_loss == best_at_checkpoint))
            eta_at_checkpoint, best_at_checkpoint, last_checkpoint, improved = eta, best_loss, k, 0
            if stalled:
                eta *= APGD_STEP_DECAY
                halvings += 1
                u = [t.clone() for t in best_u]
                u_prev = [t.clone() for t in best_u]
                g = best_g
    return best_loss, halvings


def _stderr(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else float("nan")


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(mod, mod.training) for mod in model.modules()]


def adaptive_sharpness(model: nn.Module, batches: Sequence[Batch], config: AdaptiveSharpnessConfig, *,
                       loss_fn: LossFn = F.cross_entropy,
                       output_fn: OutputFn | None = None) -> AdaptiveSharpnessResult:
    r"""Adaptive or standard sharpness at radius :math:`\rho` (worst or average case, see the
    module docstring) of ``model`` on ``batches``.

    Args:
        model: any ``nn.Module``; evaluated in eval mode. It is perturbed in place; its
            parameters and every module's train/eval mode are restored on return, also when an
            error interrupts the computation. Gradients (``.grad``) are not touched.
        batches: ``(x, y)`` batches of the measurement set (e.g. the training set), in the
            order the m-subsets are cut from: a list or a DataLoader (read once), moved batch by
            batch to the model's device.
        config: the settings (:class:`AdaptiveSharpnessConfig`).
        loss_fn: ``loss_fn(outputs, y)`` with mean reduction (default cross-entropy); only the
            loss enters, so any model (a regressor too) can be measured.
        output_fn: maps the model's output to the tensor ``loss_fn`` takes (default: as is).

    Returns:
        An :class:`AdaptiveSharpnessResult`.

    Raises:
        FlatlabError: no samples, m larger than the set, or no parameter to perturb.
    """
    if not isinstance(config, AdaptiveSharpnessConfig):
        raise FlatlabError(f"config must be an AdaptiveSharpnessConfig, got {type(config).__name__}")
    batches = prepare_batches(batches, model_device(model), name="batches")
    subsets, left_out = partition_batches(batches, config.m)
    selected = select_parameters(model, config.params)
    params = [p for _, p in selected]
    scale = [p.detach().abs().clone() for p in params] if config.scaling == "adaptive" else None
    mask = [(c > 0).to(c.dtype) for c in scale] if scale is not None else None
    modes = _module_modes(model)
    pert = _Perturbation(with_output_fn(model, output_fn), params, scale, loss_fn)
    num_used = sum(_batch_len(y) for s in subsets for _, y in s)
    try:
        model.eval()
        base_losses = [pert.loss(s) for s in subsets]
        if config.kind == "worst":
            per_batch, per_stderr, runs, spread, halvings = _worst(pert, subsets, base_losses, config, mask)
        else:
            per_batch, per_stderr, runs, spread, halvings = _average(pert, subsets, base_losses, config)
    finally:
        pert.restore()
        for mod, training in modes:
            mod.training = training
    if len(subsets) > 1:
        stderr, over = _stderr(per_batch), "batches"
    elif config.kind == "average":
        stderr, over = per_stderr[0], "draws"
    else:
        stderr, over = float("nan"), "none"
    value = float(np.mean(per_batch))
    base = float(np.mean(base_losses))
    return AdaptiveSharpnessResult(
        value=value, stderr=stderr, stderr_over=over, per_batch=tuple(per_batch),
        per_batch_stderr=tuple(per_stderr), per_batch_base_loss=tuple(base_losses),
        run_values=tuple(tuple(r) for r in runs), restart_spread=spread, step_halvings=halvings,
        base_loss=base, perturbed_loss=base + value, num_batches=len(subsets), m=config.m,
        num_samples=num_used, samples_left_out=left_out, num_parameters=int(sum(p.numel() for p in params)),
        forward_passes=pert.forward_samples / num_used, backward_passes=pert.backward_samples / num_used,
        config=config,
    )


def _worst(pert: _Perturbation, subsets: list[list[Batch]], base_losses: list[float],
           config: AdaptiveSharpnessConfig, mask: list[Tensor] | None
           ) -> tuple[list[float], list[float], list[list[float]], float, int]:
    per_batch, runs, spreads, halvings = [], [], [], 0
    for j, (subset, base) in enumerate(zip(subsets, base_losses)):
        values = []
        for r in range(config.runs):
            seed = noise_seed(config.seed, "adaptive-sharpness/start", j * config.runs + r)
            best, h = _ascent_run(pert, subset, config, mask, seed)
            halvings += h
            values.append(max(best, base) - base)  # delta = 0 is feasible: never below L_S(w)
        runs.append(values)
        spreads.append(max(values) - min(values))
        per_batch.append(max(values))
    return per_batch, [], runs, float(np.mean(spreads)), halvings


def _average(pert: _Perturbation, subsets: list[list[Batch]], base_losses: list[float],
             config: AdaptiveSharpnessConfig) -> tuple[list[float], list[float], list[list[float]], float, int]:
    signs = (1.0, -1.0) if config.antithetic else (1.0,)
    per_batch, per_stderr = [], []
    for j, (subset, base) in enumerate(zip(subsets, base_losses)):
        draws = []
        for k in range(config.draws):
            z = _noise(pert.base, noise_seed(config.seed, "adaptive-sharpness/average", j * config.draws + k), config.p)
            for t in z:
                t.mul_(config.rho)
            losses = []
            for sign in signs:
                pert.apply(z, sign)
                losses.append(pert.loss(subset))
            draws.append(sum(losses) / len(losses) - base)
        per_batch.append(float(np.mean(draws)))
        per_stderr.append(_stderr(draws))
    return per_batch, per_stderr, [], 0.0, 0


__all__ = [
    "PERTURBED_PARAMS",
    "SCALINGS",
    "SHARPNESS_KINDS",
    "STEP_SCHEDULES",
    "AdaptiveSharpnessConfig",
    "AdaptiveSharpnessResult",
    "adaptive_sharpness",
    "apgd_checkpoints",
    "partition_batches",
]
