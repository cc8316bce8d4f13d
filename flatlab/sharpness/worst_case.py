"""Worst-case sharpness (Jiang et al. 2019) and Keskar's epsilon-sharpness (docs/measures.md 4.4-4.5).

Worst case: alpha' is the largest radius such that the *largest* training-accuracy drop over
perturbations in a box stays at most the target d (0.1):

    plain:           |u_i| <= alpha'
    magnitude-aware: |u_i| <= alpha' (|w_i| + eps),  eps = 1e-3

found by bisection on [0, alpha_max] with projected sign-gradient ascent on the cross-entropy
inside (the maximum over the box is approximated by the ascent's end point, so alpha' is an upper
estimate of the true worst-case radius). The bound

    worst-case-orig = ||w||^2 log(2 omega) / (4 alpha'^2) + log(m / alpha') + 10
    worst-case-init = ||w - w0||^2 log(2 omega) / (4 alpha'^2) + log(m / alpha') + 10

takes alpha' inside the log (the sources' argument is illegible; flatlab uses alpha' and says so).
The magnitude-aware variant reports alpha' and 1 / alpha'^2 only. All on the BatchNorm-folded
model, perturbing every parameter.

No Monte Carlo noise enters alpha': the ascent starts at u = 0 (no random start), takes its
batches in a fixed order, and every probe's drop is counted over all the data. alpha' is
therefore a deterministic function of the model, the data and the settings (the same inputs
give the same bits), reported without a standard error or interval. What it does carry is
deterministic error: the bisection's resolution (the answer is some alpha with |drop - d| <
tol, or the bracket's end after ``depth`` steps) and the ascent's shortfall from the true
maximum over the box (alpha' over-estimates the true worst-case radius). Neither shrinks with
more samples, so the adaptive treatment of sigma (draws until the standard error is small) has
nothing to act on here; the plain and magnitude-aware searches share no random numbers.

Keskar et al. (2017): with the training loss L and a box |delta_i| <= eps (|w_i| + 1),

    epsilon-sharpness = 100 * max_delta (L(w + delta) - L(w)) / (1 + L(w)),

the maximum again approximated by projected sign-gradient ascent (delta = 0 is in the box, so
the value is at least 0).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatlab.errors import FlatlabError
from flatlab.outputs import (
    OutputFn,
    as_tensor_output,
    model_device,
    prepare_batches,
    with_output_fn,
)
from flatlab.sharpness.magnitude import MAGNITUDE_EPS
from flatlab.sharpness.pacbayes import FoldedPair
from flatlab.sharpness.perturb import (
    Batch,
    LossFn,
    check_batches,
    count_correct,
    mean_loss,
    num_classes_of,
)
from flatlab.sharpness.sigma_search import (
    DropTest,
    Probe,
    SearchResult,
    bisect_radius,
    check_room_for_drop,
    check_target_drop,
)

KESKAR_EPS = 1e-3


def _ascent_copy(model: nn.Module, batches: Sequence[Batch], output_fn: OutputFn | None
                 ) -> tuple[list[Batch], nn.Module, list[nn.Parameter]]:
    """What a gradient ascent on the weights works on: the batches on the model's device, an
    eval-mode copy of the model (the caller's is never modified) whose every parameter requires
    grad, read through ``output_fn``, and those parameters (the copy is perturbed through them)."""
    batches = prepare_batches(batches, model_device(model), name="batches")
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(True)
    params = list(work.parameters())
    return batches, with_output_fn(work, output_fn), params


def box_ascent(model: nn.Module, params: Sequence[Tensor], base: Sequence[Tensor], radius: Sequence[Tensor],
               batches: Sequence[Batch], loss_fn: LossFn, steps: int, step_fraction: float | None = None) -> list[Tensor]:
    """Projected sign-gradient ascent of the loss over the box |u| <= radius (elementwise).

    Step t uses batch t mod len(batches); each step moves every coordinate by
    ``step_fraction * radius`` (default 2.5 / steps, Madry et al.) and clips back into the box.
    On return the model holds ``base + u`` and ``u`` is returned.
    """
    step_fraction = 2.5 / max(steps, 1) if step_fraction is None else step_fraction
    u = [torch.zeros_like(b) for b in base]
    for t in range(steps):
        with torch.no_grad():
            for p, b, du in zip(params, base, u):
                p.copy_(b + du)
        x, y = batches[t % len(batches)]
        loss = loss_fn(as_tensor_output(model(x), None), y)
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        with torch.no_grad():
            for du, g, r in zip(u, grads, radius):
                if g is not None:
                    du.add_(step_fraction * r * torch.sign(g))
                    torch.maximum(torch.minimum(du, r), -r, out=du)
    with torch.no_grad():
        for p, b, du in zip(params, base, u):
            p.copy_(b + du)
    return u


def worst_case_alpha(model: nn.Module, batches: Sequence[Batch], *, loss_fn: LossFn = F.cross_entropy,
                     magnitude_eps: float | None = None, target_drop: float = 0.1, tolerance: float = 0.01,
                     depth: int = 15, alpha_max: float = 2.0, ascent_steps: int = 20,
                     early_stop: bool = True, output_fn: OutputFn | None = None) -> SearchResult:
    """The largest box radius alpha' whose ascent-found worst accuracy drop equals ``target_drop``.

    ``batches`` are (x, y) pairs (a list or a DataLoader, moved to the model's device);
    ``output_fn`` maps the model's output to its logits. The model must be a classifier
    (FlatlabError otherwise: alpha' is defined by an accuracy drop).

    Returns:
        A :class:`~flatlab.sharpness.sigma_search.SearchResult` with ``radius`` = alpha'.
        ``passes`` counts evaluation passes plus the ascent's data (one batch per step).
    """
    check_target_drop(target_drop, tolerance)
    if ascent_steps < 1:
        raise FlatlabError(f"the number of gradient-ascent steps must be at least 1, got {ascent_steps}")
    batches, work, params = _ascent_copy(model, batches, output_fn)
    n = check_batches(batches)
    num_classes = num_classes_of(work, batches, "worst_case")
    base_correct, _ = count_correct(work, batches)
    check_room_for_drop(base_correct / n, num_classes, target_drop)
    base = [p.detach().clone() for p in params]
    ascent_fraction = sum(len(batches[t % len(batches)][1]) for t in range(ascent_steps)) / n
    test = DropTest(work, batches, base_correct, target_drop, tolerance)

    def run_probe(probe: Probe, finish: bool) -> Probe:
        alpha = probe.radius
        if probe.next_sample == 0 and probe.next_batch == 0 and not probe.passes:
            if magnitude_eps is None:
                radius = [torch.full_like(b, alpha) for b in base]
            else:
                radius = [alpha * (b.abs() + magnitude_eps) for b in base]
            probe.extra = box_ascent(work, params, base, radius, batches, loss_fn, ascent_steps)
            probe.passes += ascent_fraction

        def apply(_k: int) -> None:
            with torch.no_grad():
                for p, b, du in zip(params, base, probe.extra):
                    p.copy_(b + du)

        return test.run(probe, apply, finish=finish, early_stop=early_stop)

    probe, converged, history = bisect_radius(lambda r: test.start(r, 1), run_probe, alpha_max, depth)
    return SearchResult(
        radius=probe.radius, drop=probe.drop, drop_stderr=float("nan"), drop_low=probe.drop_low,
        drop_high=probe.drop_high, base_accuracy=base_correct / n, target_drop=float(target_drop),
        tolerance=float(tolerance), converged=converged, passes=float(sum(p.passes for p in history)),
        steps=len(history), depth=int(depth), radius_max=float(alpha_max), samples=1, num_classes=num_classes,
        n=n, history=[{"radius": p.radius, "decision": p.decision, "drop_low": p.drop_low,
                       "drop_high": p.drop_high, "passes": p.passes} for p in history],
    )


def worst_case_bound(norm_sq: float, alpha: float, omega: int, m: int) -> float:
    """||r||^2 log(2 omega) / (4 alpha^2) + log(m / alpha) + 10."""
    return norm_sq * math.log(2 * omega) / (4.0 * alpha ** 2) + math.log(m / alpha) + 10.0


def keskar_sharpness(model: nn.Module, batches: Sequence[Batch], *, loss_fn: LossFn = F.cross_entropy,
                     eps: float = KESKAR_EPS, ascent_steps: int = 20,
                     output_fn: OutputFn | None = None) -> dict[str, Any]:
    """Keskar's epsilon-sharpness, 100 max_delta (L(w+delta) - L(w)) / (1 + L(w)), |delta_i| <= eps(|w_i|+1).

    ``model`` is not modified; it may be any model (the loss alone enters), its output mapped by
    ``output_fn``; ``batches`` a list or a DataLoader. Returns ``value``, ``epsilon``, ``loss``, ``perturbed_loss``, ``ascent_steps``.
    """
    if not eps > 0:
        raise FlatlabError(f"Keskar's epsilon must be positive, got {eps}")
    batches, work, params = _ascent_copy(model, batches, output_fn)
    base = [p.detach().clone() for p in params]
    loss = mean_loss(work, batches, loss_fn)
    radius = [eps * (b.abs() + 1.0) for b in base]
    box_ascent(work, params, base, radius, batches, loss_fn, ascent_steps)
    perturbed = mean_loss(work, batches, loss_fn)
    # delta = 0 lies in the box, so the maximum is at least 0.
    value = 100.0 * max(perturbed - loss, 0.0) / (1.0 + loss)
    return {"value": value, "epsilon": eps, "loss": loss, "perturbed_loss": max(perturbed, loss),
            "ascent_steps": ascent_steps}


def worst_case_sharpness(model: nn.Module, batches: Sequence[Batch], initial_model: nn.Module | None = None, *,
                         m: int | None = None, loss_fn: LossFn = F.cross_entropy, target_drop: float = 0.1,
                         tolerance: float = 0.01, depth: int = 15, alpha_max: float = 2.0, ascent_steps: int = 20,
                         magnitude_eps: float = MAGNITUDE_EPS, keskar_eps: float = KESKAR_EPS,
                         fold_bn: bool = True, early_stop: bool = True,
                         output_fn: OutputFn | None = None) -> dict[str, Any]:
    """alpha' (plain and magnitude-aware), the worst-case bounds, 1/alpha'^2 and Keskar's sharpness.

    ``batches``: (x, y) pairs, a list or a DataLoader (moved to the model's device); ``output_fn``
    maps the model's output to its logits. FlatlabError for a model without accuracy (regression):
    alpha' is defined by an accuracy drop.

    Returns:
        ``alpha``, ``orig``, ``init``, ``inv_alpha_sq``, ``magnitude_alpha``,
        ``magnitude_inv_alpha_sq``, ``keskar`` (and its epsilon and losses) and every input.
    """
    batches = prepare_batches(batches, model_device(model), name="batches")
    # Refuse a model without accuracy before the BatchNorm fold and the searches.
    num_classes_of(with_output_fn(model, output_fn), batches, "worst_case")
    pair = FoldedPair(model, initial_model, fold_bn)
    n = check_batches(batches)
    m = int(m if m is not None else n)
    common = {"loss_fn": loss_fn, "output_fn": output_fn, "target_drop": target_drop, "tolerance": tolerance, "depth": depth,
              "alpha_max": alpha_max, "ascent_steps": ascent_steps, "early_stop": early_stop}
    plain = worst_case_alpha(pair.model, batches, **common)
    mag = worst_case_alpha(pair.model, batches, magnitude_eps=magnitude_eps, **common)
    keskar = keskar_sharpness(pair.model, batches, loss_fn=loss_fn, eps=keskar_eps, ascent_steps=ascent_steps,
                              output_fn=output_fn)
    alpha = plain.radius
    return {
        "alpha": alpha,
        "orig": worst_case_bound(pair.weight_norm_sq, alpha, pair.omega, m),
        "init": worst_case_bound(pair.dist_init_sq, alpha, pair.omega, m) if pair.dist_init_sq is not None else None,
        "inv_alpha_sq": 1.0 / alpha ** 2,
        "magnitude_alpha": mag.radius,
        "magnitude_inv_alpha_sq": 1.0 / mag.radius ** 2,
        "magnitude_epsilon": magnitude_eps,
        "keskar": keskar["value"],
        "keskar_epsilon": keskar_eps,
        "keskar_loss": keskar["loss"],
        "keskar_perturbed_loss": keskar["perturbed_loss"],
        "m": m,
        **pair.inputs(),
        "target_drop": target_drop,
        "tolerance": tolerance,
        "train_accuracy": plain.base_accuracy,
        "drop_at_alpha": plain.drop,
        "magnitude_drop_at_alpha": mag.drop,
        "converged": plain.converged,
        "magnitude_converged": mag.converged,
        "passes": plain.passes,
        "magnitude_passes": mag.passes,
        "depth": depth,
        "alpha_max": alpha_max,
        "ascent_steps": ascent_steps,
        "n_eval": n,
        "alpha_note": ("alpha' is the half-width of the box |u_i| <= alpha' (magnitude-aware: alpha' (|w_i| + eps)); "
                       "the maximum over the box is approximated by projected sign-gradient ascent; the bound's "
                       "log term uses log(m / alpha')"),
    }


__all__ = ["KESKAR_EPS", "box_ascent", "keskar_sharpness", "worst_case_alpha", "worst_case_bound",
           "worst_case_sharpness"]
