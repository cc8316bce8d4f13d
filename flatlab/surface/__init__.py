"""Loss surfaces (Li et al. 2018): directions, grids, fast point evaluation, interpolation, files.

From Python, on any model and data::

    from flatlab.surface import surface_of_model
    surf = surface_of_model(model, source_batches, target_batches, x=np.linspace(-1, 1, 51),
                            y=np.linspace(-1, 1, 51), norm="filter")
    surf.values["train_loss"][j, i]   # f(x[i], y[j])

From checkpoints (what ``flatlab surface`` runs): :func:`flatlab.surface.runner.run_surface`.
"""

from flatlab.surface.compute import (
    Surface,
    assemble_surface,
    compute_surface,
    grid_points,
    surface_of_model,
)
from flatlab.surface.directions import (
    IGNORES,
    NORMS,
    filter_norms,
    hessian_directions,
    normalize_direction,
    random_direction,
)
from flatlab.surface.evaluate import PointEvaluator, SurfaceProblem
from flatlab.surface.grid import Axis, parse_axis

__all__ = [
    "IGNORES",
    "NORMS",
    "Axis",
    "PointEvaluator",
    "Surface",
    "SurfaceProblem",
    "assemble_surface",
    "compute_surface",
    "filter_norms",
    "grid_points",
    "hessian_directions",
    "normalize_direction",
    "parse_axis",
    "random_direction",
    "surface_of_model",
]
