"""Fast evaluation of the loss surface at grid points.

One model, weights written in place: for a point with coordinates ``(a, b)`` every perturbed
tensor ``t`` of the model becomes ``t <- w + a d1 + b d2`` (a copy and two fused adds per tensor,
no model copy), then the prepared batches (tensors made once, already on the device) go through
the model in eval mode. The per-point cost is one forward pass over the data plus ``O(#weights)``
for the write: the limit a surface tool can reach without batching.

Optionally several grid points go through the model in one pass (``points_per_pass > 1``,
``torch.func.functional_call`` + ``vmap`` over stacked weights). That only pays where the
forward pass is too small to use the hardware (small MLPs, GPUs); on CPU, vmapped convolutions are
slower per point than plain ones, so the default is 1 (see ``benchmarks/bench_surface.py``).

Per point and split the evaluator returns the mean loss ``sum_B loss_fn(f(x_B), y_B) |B| / N``
(``loss_fn`` reduces by the mean, so batches are weighted by their size) and the accuracy
``#{argmax f(x) = y} / N``, with ``f(x)`` the model's output after ``output_fn``. Accuracy is
defined for a classifier only (outputs ``(B, C)``, ``C >= 2``, integer targets:
:func:`flatlab.outputs.is_classification`); for any other model (a regressor) the accuracies
are NaN and the surface holds the loss alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatlab.errors import FlatlabError
from flatlab.outputs import OutputFn, as_tensor_output, correct_count, is_classification
from flatlab.surface.directions import Direction

Batches = list[tuple[Tensor, Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]

#: Order of the four numbers computed at each point.
VALUE_NAMES = ("train_loss", "train_acc", "test_loss", "test_acc")


@dataclass
class SurfaceProblem:
    """Everything needed to evaluate surface points; picklable, so workers can rebuild it.

    Attributes:
        model: the model; its current values of the perturbed tensors are the origin ``w``
            unless ``base`` is given. Evaluated in eval mode.
        source: batches of the training (``source``) split: ``train_loss``, ``train_acc``.
        target: batches of the target split (``test_loss``, ``test_acc``); ``None`` gives NaN.
        directions: one (1D / line) or two (2D / plane) directions; names of parameters or
            floating-point buffers of ``model`` (interpolation moves BatchNorm statistics too).
        base: the origin ``w`` per perturbed tensor (default: the model's current values).
        loss_fn: ``loss_fn(logits, y)`` with mean reduction.
        output_fn: maps the model's output to the tensor ``loss_fn`` takes (None: as is); a
            lambda cannot go to worker processes (pickling): use a module-level function there.
        device: where the evaluation runs.
        points_per_pass: grid points per forward pass (``vmap``); 1 = plain forward passes.
    """

    model: nn.Module
    source: Batches
    target: Batches | None
    directions: list[Direction]
    base: dict[str, Tensor] | None = None
    loss_fn: LossFn = F.cross_entropy
    device: str = "cpu"
    points_per_pass: int = 1
    extra: dict = field(default_factory=dict)
    output_fn: OutputFn | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.directions) <= 2:
            raise FlatlabError(f"a surface needs one or two directions, got {len(self.directions)}")
        names = list(self.directions[0])
        for d in self.directions[1:]:
            if list(d) != names:
                raise FlatlabError("the directions name different tensors")
        if self.points_per_pass < 1:
            raise FlatlabError(f"points per pass must be at least 1, got {self.points_per_pass}")
        if not self.source:
            raise FlatlabError("the source data are empty")


def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and floating-point buffers of a model, by name."""
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if b.is_floating_point()})
    return tensors


class PointEvaluator:
    """Evaluates grid points of a :class:`SurfaceProblem` on one model, in place.

    Use as a context manager, or call :meth:`restore` at the end: the model's perturbed tensors
    are then written back to the origin.
    """

    def __init__(self, problem: SurfaceProblem) -> None:
        self.problem = problem
        device = torch.device(problem.device)
        self.model = problem.model.to(device).eval()
        tensors = model_tensors(self.model)
        names = list(problem.directions[0])
        missing = [n for n in names if n not in tensors]
        if missing:
            raise FlatlabError(f"the model has no tensor(s) {', '.join(missing[:5])} named by the directions")
        self.names = names
        self.tensors = {n: tensors[n] for n in names}
        base = problem.base if problem.base is not None else {n: t.detach() for n, t in self.tensors.items()}
        self.base = {n: base[n].detach().to(device=device, dtype=self.tensors[n].dtype).clone() for n in names}
        self.directions = [{n: d[n].detach().to(device=device, dtype=self.tensors[n].dtype) for n in names}
                           for d in problem.directions]
        # Only tensors some direction moves are rewritten per point.
        self.moving = [n for n in names if any(bool(d[n].any()) for d in self.directions)]
        self.source = [(x.to(device), y.to(device)) for x, y in problem.source]
        self.target = None if problem.target is None else [(x.to(device), y.to(device)) for x, y in problem.target]
        self.loss_fn = problem.loss_fn
        self.output_fn = problem.output_fn
        self.points_per_pass = problem.points_per_pass

    def __enter__(self) -> PointEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    @torch.no_grad()
    def restore(self) -> None:
        """Write the origin back into the model."""
        for n in self.names:
            self.tensors[n].copy_(self.base[n])

    @torch.no_grad()
    def set_point(self, coords: Sequence[float]) -> None:
        """Write ``w + sum_k coords[k] d_k`` into the model's tensors."""
        for n in self.moving:
            t = self.tensors[n]
            t.copy_(self.base[n])
            for c, d in zip(coords, self.directions):
                if c != 0.0:
                    t.add_(d[n], alpha=float(c))

    @torch.no_grad()
    def _loss_acc(self, batches: Batches) -> tuple[float, float]:
        loss_sum = torch.zeros((), dtype=torch.float64, device=batches[0][0].device)
        correct = torch.zeros((), dtype=torch.int64, device=batches[0][0].device)
        count = 0
        labelled = True  # accuracy is defined (a classifier) on every batch
        for x, y in batches:
            logits = as_tensor_output(self.model(x), self.output_fn)
            loss_sum += self.loss_fn(logits, y).double() * len(y)
            if labelled and is_classification(logits, y):
                correct += correct_count(logits, y)
            else:
                labelled = False
            count += len(y)
        return float(loss_sum) / count, int(correct) / count if labelled else float("nan")

    def evaluate(self, coords: Sequence[float]) -> tuple[float, float, float, float]:
        """(train_loss, train_acc, test_loss, test_acc) at one point."""
        self.set_point(coords)
        train = self._loss_acc(self.source)
        test = self._loss_acc(self.target) if self.target else (float("nan"), float("nan"))
        return train[0], train[1], test[0], test[1]

    def evaluate_many(self, points: Sequence[Sequence[float]]) -> list[tuple[float, float, float, float]]:
        """Evaluate several points, ``points_per_pass`` at a time."""
        k = self.points_per_pass
        if k == 1:
            return [self.evaluate(p) for p in points]
        out: list[tuple[float, float, float, float]] = []
        for start in range(0, len(points), k):
            out.extend(self._evaluate_vmapped(points[start:start + k]))
        return out

    @torch.no_grad()
    def _evaluate_vmapped(self, points: Sequence[Sequence[float]]) -> list[tuple[float, float, float, float]]:
        from torch.func import functional_call, vmap

        self.restore()
        device = self.base[self.names[0]].device
        coords = torch.tensor([list(p) for p in points], dtype=torch.float64, device=device)
        stacked: dict[str, Tensor] = {}
        for n in self.moving:
            base = self.base[n]
            w = base.unsqueeze(0).expand((len(points),) + tuple(base.shape)).clone()
            for j, d in enumerate(self.directions):
                c = coords[:, j].to(base.dtype).reshape((-1,) + (1,) * base.dim())
                w += c * d[n].unsqueeze(0)
            stacked[n] = w
        model, loss_fn, output_fn = self.model, self.loss_fn, self.output_fn
        labelled = {"all": True}  # set while tracing: shapes and dtypes are known there

        def one(params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            logits = as_tensor_output(functional_call(model, params, (x,)), output_fn)
            if is_classification(logits, y):
                hits = correct_count(logits, y)
            else:
                labelled["all"] = False
                hits = torch.zeros((), dtype=torch.int64, device=logits.device)
            return loss_fn(logits, y).double() * len(y), hits

        batched = vmap(one, in_dims=(0, None, None))

        def run(batches: Batches | None) -> tuple[list[float], list[float]]:
            if not batches:
                nan = [float("nan")] * len(points)
                return nan, nan
            labelled["all"] = True
            loss_sum = torch.zeros(len(points), dtype=torch.float64, device=device)
            correct = torch.zeros(len(points), dtype=torch.int64, device=device)
            count = 0
            for x, y in batches:
                ls, cs = batched(stacked, x, y)
                loss_sum += ls
                correct += cs
                count += len(y)
            acc = (correct.double() / count).tolist() if labelled["all"] else [float("nan")] * len(points)
            return (loss_sum / count).tolist(), acc

        tl, ta = run(self.source)
        vl, va = run(self.target)
        return list(zip(tl, ta, vl, va))
