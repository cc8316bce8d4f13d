"""Compute a surface: grid points fanned out, finished points journaled, arrays assembled.

Orientation (docs/measures.md 6): a 2D surface has arrays of shape ``(len(y), len(x))`` with
``Z[j, i] = f(x[i], y[j])``; grid point ``k = j * len(x) + i`` (the order of Li et al.'s
``meshgrid(x, y)``). A 1D surface has arrays of shape ``(len(x),)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flatlab.outputs import OutputFn
from flatlab.parallel import fan_out
from flatlab.surface.evaluate import VALUE_NAMES, PointEvaluator, SurfaceProblem
from flatlab.surface.journal import PointJournal


@dataclass
class Surface:
    """The computed values. Unfinished points are NaN (``done`` says which are finished).

    ``settings`` records how the surface was made (``kind``, ``norm``, ``seed``, ...);
    ``label`` names it in figure titles and legends (:mod:`flatlab.plots.surfaces` takes a
    ``Surface`` directly) and, by default, is derived from the settings (:attr:`display_label`).
    """

    xcoordinates: np.ndarray
    ycoordinates: np.ndarray | None
    values: dict[str, np.ndarray]
    done: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def dims(self) -> int:
        return 1 if self.ycoordinates is None else 2

    @property
    def display_label(self) -> str:
        """:attr:`label` if given, else a readable description of the settings, e.g.
        ``"random 2D surface (filter-normalized, seed 0)"``."""
        if self.label:
            return self.label
        kind = str(self.settings.get("kind", ""))
        if kind in ("line", "plane"):
            return "interpolation line" if kind == "line" else "interpolation plane"
        what = "Hessian-eigenvector" if kind.startswith("hessian") else "random"
        norm = self.settings.get("norm")
        details = [f"{norm}-normalized" if norm and norm not in ("none", "unit-eigenvector") else None,
                   f"seed {self.settings['seed']}" if self.settings.get("seed") is not None else None]
        shown = ", ".join(d for d in details if d)
        return f"{what} {self.dims}D surface" + (f" ({shown})" if shown else "")

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @property
    def shape(self) -> tuple[int, ...]:
        return self.done.shape

    def at(self, name: str, x: float, y: float | None = None) -> float:
        """The value nearest to coordinates ``(x, y)``."""
        i = int(np.argmin(np.abs(self.xcoordinates - x)))
        if self.ycoordinates is None:
            return float(self.values[name][i])
        j = int(np.argmin(np.abs(self.ycoordinates - (y or 0.0))))
        return float(self.values[name][j, i])


def grid_points(x: np.ndarray, y: np.ndarray | None) -> list[tuple[float, ...]]:
    """Coordinates of every grid point in flat order ``k = j * len(x) + i``."""
    if y is None:
        return [(float(a),) for a in x]
    return [(float(a), float(b)) for b in y for a in x]


def assemble_surface(x: np.ndarray, y: np.ndarray | None, finished: dict[int, Sequence[float]],
                     settings: dict[str, Any] | None = None) -> Surface:
    """A :class:`Surface` from finished points ``{flat index: values}``; the others are NaN."""
    shape = (len(x),) if y is None else (len(y), len(x))
    n = int(np.prod(shape))
    flat = {name: np.full(n, np.nan) for name in VALUE_NAMES}
    done = np.zeros(n, dtype=bool)
    for k, vals in finished.items():
        for name, v in zip(VALUE_NAMES, vals):
            flat[name][k] = v
        done[k] = True
    return Surface(xcoordinates=np.asarray(x, dtype=np.float64),
                   ycoordinates=None if y is None else np.asarray(y, dtype=np.float64),
                   values={name: arr.reshape(shape) for name, arr in flat.items()},
                   done=done.reshape(shape), settings=dict(settings or {}))


def _setup(problem: SurfaceProblem) -> PointEvaluator:
    return PointEvaluator(problem)


def _work(evaluator: PointEvaluator, chunk: list[tuple[int, tuple[float, ...]]]) -> list[tuple[int, tuple]]:
    values = evaluator.evaluate_many([c for _, c in chunk])
    return [(k, v) for (k, _), v in zip(chunk, values)]


def _teardown(evaluator: PointEvaluator) -> None:
    evaluator.restore()


def chunk_size_for(n_points: int, workers: int, points_per_pass: int, remote: bool) -> int:
    """Points per task: one pass in-process (each point journaled at once); with workers,
    enough tasks per worker to balance the load without a round trip per point."""
    if not remote:
        return points_per_pass
    per = math.ceil(n_points / (max(1, workers) * 16))
    per = max(1, min(per, 32))
    return max(points_per_pass, math.ceil(per / points_per_pass) * points_per_pass)


def compute_surface(problem: SurfaceProblem, x: np.ndarray, y: np.ndarray | None = None, *,
                    workers: int | None = 1, backend: str = "local", address: str | None = None,
                    journal: PointJournal | None = None,
                    progress: Callable[[int], None] | None = None,
                    settings: dict[str, Any] | None = None, label: str | None = None) -> Surface:
    """Evaluate ``problem`` at every grid point not yet in ``journal``.

    Args:
        problem: model, data and directions (one direction for 1D, two for 2D).
        x: coordinates along the first direction.
        y: coordinates along the second direction (2D), or ``None`` (1D).
        workers, backend, address: where the points are computed (:func:`flatlab.parallel.fan_out`).
        journal: finished points are read from it and every new one is recorded in it.
        progress: called with the number of points just finished (e.g. ``tqdm.update``).
        settings: stored with the result.
        label: the surface's name in figures (:attr:`Surface.label`).

    Returns:
        The :class:`Surface`; if interrupted (KeyboardInterrupt), the exception propagates after the
        finished points are journaled.
    """
    x = np.asarray(x, dtype=np.float64)
    y = None if y is None else np.asarray(y, dtype=np.float64)
    if (y is None) != (len(problem.directions) == 1):
        raise ValueError("a 1D surface needs one direction and no y axis; a 2D one two directions and y")
    n = len(x) * (1 if y is None else len(y))
    finished: dict[int, Sequence[float]] = dict(journal.done) if journal is not None else {}
    coords = grid_points(x, y)
    todo = [(k, coords[k]) for k in range(n) if k not in finished]
    remote = backend == "ray" or (workers or 1) > 1
    size = chunk_size_for(len(todo), workers or 1, problem.points_per_pass, remote)
    tasks = [todo[s:s + size] for s in range(0, len(todo), size)]
    if tasks:
        for _, results in fan_out(_setup, problem, _work, tasks, backend=backend, workers=workers,
                                  address=address, teardown=_teardown):
            for k, vals in results:
                finished[k] = vals
                if journal is not None:
                    journal.record(k, vals)
            if progress is not None:
                progress(len(results))
    surface = assemble_surface(x, y, finished, settings)
    surface.label = label
    return surface


def surface_of_model(model: Any, source: Iterable, target: Iterable | None = None, *,
                     x: np.ndarray | Sequence[float] | None = None,
                     y: np.ndarray | Sequence[float] | None = None, norm: str = "filter",
                     ignore: str = "biasbn", seed: int = 0, loss_fn: Callable | None = None,
                     device: str | None = None, workers: int = 1, points_per_pass: int = 1,
                     label: str | None = None, output_fn: OutputFn | None = None) -> Surface:
    """Random-direction surface of any ``nn.Module`` on any batches (the Python entry point).

    ``f(a) = L(w + a d1)`` (1D, ``y=None``) or ``f(a, b) = L(w + a d1 + b d2)`` (2D) with seeded
    Gaussian directions normalized by ``norm`` (see :mod:`flatlab.surface.directions`). The model
    is left with its original weights. ``label`` names the surface in figures (default: its
    settings in words, :attr:`Surface.display_label`).

    The settings record ``kind`` (``random<dims>d-<norm>``, as ``flatlab surface`` names it) and
    ``directions_sha256``, the hash of the raw Gaussian draws (the one ``flatlab surface``
    records): two models with the same parameter names and shapes and the same seed share their
    draws, so :func:`flatlab.store.write_result` files them as surfaces on shared directions.

    Any model: ``source`` and ``target`` are ``(x, y)`` batches, lists or DataLoaders (read once);
    ``output_fn`` maps the model's output (a dict, a tuple) to the tensor ``loss_fn`` takes. On a
    model without accuracy (a regressor: outputs other than ``(B, C)`` logits with integer
    targets) the surface holds the loss alone: ``train_acc`` and ``test_acc`` are NaN.

    The evaluation runs on ``device`` (default: the model's own). The user's model keeps its
    device (on another ``device`` a copy is evaluated), its weights and every module's
    train/eval mode (it is evaluated in eval mode and set back).
    """
    import copy

    import torch
    import torch.nn.functional as F

    from flatlab.io import array_sha256
    from flatlab.outputs import check_output_fn, model_device, prepare_batches, preserved_modes
    from flatlab.surface.directions import (
        flatten_direction,
        normalize_direction,
        parameter_tensors,
        random_direction,
    )

    check_output_fn(output_fn)
    x = np.linspace(-1.0, 1.0, 51) if x is None else x
    home = model_device(model)
    where = home if device is None else torch.device(device)
    if where.type == home.type and where.index in (None, home.index):
        where = home  # "cuda" names the model's own cuda:N
    # Never move the user's model: another device gets a copy (same weights, same names).
    work = model if where == home else copy.deepcopy(model).to(where)
    source = prepare_batches(source, where, name="source")
    target = None if target is None else prepare_batches(target, where, name="target")
    weights = {n: p.detach().cpu() for n, p in parameter_tensors(model).items()}
    ndir = 1 if y is None else 2
    raw = [random_direction(weights, seed, i) for i in range(ndir)]
    names = list(weights)
    draws_sha = array_sha256(np.stack([flatten_direction(r, names) for r in raw]))
    dirs = [normalize_direction(r, weights, norm, ignore) for r in raw]
    del raw  # as large as the model: keep only its hash
    problem = SurfaceProblem(model=work, source=source, target=target, directions=dirs,
                             loss_fn=loss_fn or F.cross_entropy, device=str(where),
                             points_per_pass=points_per_pass, output_fn=output_fn)
    with preserved_modes(model):  # the evaluator puts the model in eval mode
        return compute_surface(problem, np.asarray(x, dtype=np.float64),
                               None if y is None else np.asarray(y, dtype=np.float64), workers=workers,
                               settings={"kind": f"random{ndir}d-{norm}", "dims": ndir, "directions": "random",
                                         "norm": norm, "ignore": ignore, "seed": seed,
                                         "loss": getattr(loss_fn, "__name__", "custom") if loss_fn else "cross_entropy",
                                         "device": where.type, "directions_sha256": draws_sha,
                                         "train_size": sum(len(b[1]) for b in problem.source),
                                         "test_size": None if problem.target is None else
                                         sum(len(b[1]) for b in problem.target)},
                               label=label)
