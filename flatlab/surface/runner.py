"""``flatlab surface`` as a library call: checkpoints in, a surface file out, resumable.

:func:`run_surface` loads the checkpoint(s) (or a user's model and data, :mod:`flatlab.sources`), prepares the data once, builds the directions
(random, reused from a file, Hessian eigenvectors, or interpolation between checkpoints),
computes every grid point not already in the side journal (in this process, local worker
processes or Ray), and writes the final file by temp + rename: a standalone loss-landscape file
(``out``) or a group ``/runs/<id>/surfaces/<name>`` of a results file (``results``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatlab.errors import ConfigError, FlatlabError
from flatlab.io import array_sha256, check_writable, settings_fingerprint, sha256_file
from flatlab.surface.compute import Surface, assemble_surface, compute_surface
from flatlab.surface.directions import (
    IGNORES,
    NORMS,
    Direction,
    flatten_direction,
    hessian_directions,
    normalize_direction,
    parameter_tensors,
    random_direction,
    unflatten_direction,
)
from flatlab.surface.evaluate import SurfaceProblem
from flatlab.surface.grid import DEFAULT_AXIS, Axis, check_grid_memory, parse_axis
from flatlab.surface.io import (
    load_raw_directions,
    stored_fingerprint,
    surface_payload,
)
from flatlab.surface.journal import PointJournal

#: Settings that are paths: provenance, not part of the settings fingerprint (the same files moved
#: elsewhere give the same surface; their content is fingerprinted by SHA-256 instead).
PATH_KEYS = ("checkpoint", "checkpoint2", "checkpoint3", "directions_file", "weights_file")


@dataclass
class SurfaceRequest:
    """The settings of one ``flatlab surface`` run (the CLI's flags).

    The model is a flatlab ``checkpoint``, or (``checkpoint`` empty) a user's model and data:
    ``model_source`` with ``data_source`` (:mod:`flatlab.sources`; the surface needs the splits
    ``source`` and ``target``), stored under ``run_id`` (default derived from them).
    """

    checkpoint: str
    dims: int = 2
    x: str = DEFAULT_AXIS
    y: str = DEFAULT_AXIS
    norm: str = "filter"
    ignore: str = "biasbn"
    model2: str | None = None
    model3: str | None = None
    directions: str = "random"      # "random", "hessian" or a surface file with raw draws
    requantize: bool = False
    max_samples: int | None = None
    seed: int = 0
    batch_size: int = 512
    points_per_pass: int = 1
    workers: int | None = 1
    backend: str = "local"
    address: str | None = None
    out: str | None = None
    results: str | None = None
    name: str | None = None
    device: str = "cpu"
    data_dir: str | None = None
    model_source: Any = None
    data_source: Any = None
    run_id: str | None = None


@dataclass
class SurfaceOutcome:
    surface: Surface
    path: str
    group: str | None
    settings: dict[str, Any]
    computed: int
    resumed: int
    seconds: float
    reused_file: bool


def validate_request(req: SurfaceRequest) -> tuple[Axis, Axis | None]:
    """Check every setting that needs no checkpoint, before any work: the axes (and that the
    grid fits in memory, :func:`flatlab.surface.grid.check_grid_memory`), the option values and
    combinations, the surface name inside a results file, and that the output (and its journal
    beside it) can be written (:func:`flatlab.io.check_writable`; an existing output must be a
    surface or results file, which is never overwritten by another kind).

    Returns:
        The parsed x axis and, for 2D, the y axis.

    Raises:
        FlatlabError: naming the setting and how to fix it.
    """
    x = parse_axis(req.x, "--x")
    if req.model_source is not None:
        from flatlab.sources import check_model_choice, check_run_id

        check_model_choice(req.checkpoint or None, req.model_source, req.data_source)
        for key, given in (("model2", req.model2), ("model3", req.model3), ("requantize", req.requantize)):
            if given:
                raise ConfigError(key, "applies to flatlab checkpoints: a model given by arch or model_fn is "
                                       "measured on its own (a random or Hessian plane)")
        if req.run_id is not None:
            check_run_id(req.run_id)
    elif req.run_id is not None:
        raise ConfigError("run_id", "names the run of a model given by arch or model_fn: a checkpoint's run id "
                                    "is its SHA-256")
    if req.model3 is not None and req.model2 is None:
        raise ConfigError("model3", "needs model2: the plane goes through three checkpoints")
    if req.model2 is not None:
        if req.directions != "random":
            raise ConfigError("directions", "does not apply to interpolation (model2/model3 give the axes)")
        req.dims = 2 if req.model3 is not None else 1
    if req.dims not in (1, 2):
        raise FlatlabError(f"a surface is 1D or 2D, not {req.dims}D")
    y = parse_axis(req.y, "--y") if req.dims == 2 else None
    if req.norm not in NORMS:
        raise ConfigError("norm", f"must be one of {', '.join(NORMS)}, got {req.norm!r}")
    if req.ignore not in IGNORES:
        raise ConfigError("ignore", f"must be one of {', '.join(IGNORES)}, got {req.ignore!r}")
    if req.out is not None and req.results is not None:
        raise ConfigError("out", "(a standalone surface file) and results (a results file) exclude each other: give one")
    if req.max_samples is not None and req.max_samples <= 0:
        raise ConfigError("max_samples", f"must be positive, got {req.max_samples}")
    if req.batch_size <= 0:
        raise ConfigError("batch_size", f"must be positive, got {req.batch_size}")
    if req.points_per_pass < 1:
        raise ConfigError("points_per_pass", f"must be at least 1, got {req.points_per_pass}")
    if req.workers is not None and req.workers < 1:
        raise ConfigError("workers", f"must be at least 1, got {req.workers}")
    if req.address is not None and req.backend != "ray":
        raise ConfigError("address", "names a Ray cluster: use backend ray")
    check_grid_memory(x, y)
    _check_outputs(req)
    return x, y


def _check_outputs(req: SurfaceRequest) -> None:
    """The output file (and its journal, in the same folder) can be written and is of the right kind."""
    from flatlab import results

    if req.results is not None:
        if req.name is not None:
            results.check_group_name(req.name, "surface name")
        results.check_results_target(req.results)
        return
    out = req.out or "surface.h5"
    check_writable(out, "file")
    stored_fingerprint(out)  # an existing file must be a standalone surface file


def _perturbed_weights(model: nn.Module, fp_names: set[str] | None) -> dict[str, Tensor]:
    """The parameters random directions move (for a quantized model: the latent weights only)."""
    params = parameter_tensors(model)
    if fp_names is not None:
        params = {n: p for n, p in params.items() if n in fp_names}
        if not params:
            raise FlatlabError("found no latent weights with the full-precision names in the quantized model")
    return {n: p.detach().cpu() for n, p in params.items()}


def _load_models(req: SurfaceRequest, device: str) -> tuple[list[Any], list[nn.Module], set[str] | None]:
    from flatlab.checkpoint import load_checkpoint

    paths = [p for p in (req.checkpoint, req.model2, req.model3) if p is not None]
    ckpts = [load_checkpoint(p) for p in paths]
    if req.requantize:
        plain = [str(c.path) for c in ckpts if not c.is_quantized]
        if plain:
            raise ConfigError("requantize", f"needs quantized checkpoints; {plain[0]} is full precision")
    if len(ckpts) > 1:
        from flatlab.surface.interpolate import check_same_architecture

        check_same_architecture([c.meta for c in ckpts], [str(c.path) for c in ckpts])
        if req.requantize and len({repr(c.meta.get("quant")) for c in ckpts}) > 1:
            raise ConfigError("requantize", "interpolation needs checkpoints with the same quantization settings")
    # Deployed model: effective (de-quantized) weights; --requantize: the fake-quantized model,
    # whose latent weights are perturbed and re-quantized at every point.
    models = [c.build_model("cpu", effective=not req.requantize) for c in ckpts]
    fp_names = None
    if req.requantize:
        fp_names = {n for n, _ in ckpts[0].build_model("cpu", effective=True).named_parameters()}
    return ckpts, models, fp_names


def _run_paths(req: SurfaceRequest, run_id: str, kind: str) -> tuple[Path, str | None, str | None, Path]:
    """(output path, run id, group, journal path)."""
    if req.results is not None:
        name = req.name or kind
        group = f"surfaces/{name}"
        path = Path(req.results)
        journal = path.with_name(f"{path.name}.{run_id}.{name.replace('/', '_')}.journal")
        return path, run_id, group, journal
    path = Path(req.out or "surface.h5")
    return path, None, None, path.with_name(path.name + ".journal")


def _existing_results_fingerprint(path: Path, run_id: str, group: str) -> str | None:
    from flatlab.results import is_results_file, read_results

    if not path.exists():
        return None
    if not is_results_file(path):
        raise FlatlabError(f"{path} exists and is not a flatlab results file: refusing to overwrite it")
    view = read_results(path)
    node: Any = view["runs"].get(run_id)
    for part in group.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return str(node.get("attrs", {}).get("settings_fingerprint", ""))


def _read_existing(path: Path, run_id: str | None, group: str | None) -> Surface:
    """The surface stored at ``path`` (standalone or results group)."""
    from flatlab.results import read_results

    view = read_results(path)
    node: Any = view
    if run_id is not None and group is not None:
        node = view["runs"][run_id]
        for part in group.split("/"):
            node = node[part]
    names = ("train_loss", "train_acc", "test_loss", "test_acc")
    values = {n: np.asarray(node[n]) for n in names}
    return Surface(xcoordinates=np.asarray(node["xcoordinates"]),
                   ycoordinates=np.asarray(node["ycoordinates"]) if "ycoordinates" in node else None,
                   values=values, done=np.ones(values["train_loss"].shape, dtype=bool))


def run_surface(req: SurfaceRequest, progress_factory: Callable[[int, int], Any] | None = None,
                provenance: dict[str, Any] | None = None) -> SurfaceOutcome:
    """Compute (or resume, or reuse) the surface that ``req`` describes and write its file.

    Args:
        req: the settings.
        progress_factory: ``(total, initial) -> bar`` with ``update(n)`` and ``close()``
            (e.g. tqdm); ``None`` for no progress display.
        provenance: attributes recorded with the run in a results file (e.g. the command line).

    Raises:
        FlatlabError: bad settings, unreadable or mismatched checkpoints, an existing output or
            journal made with other settings (nothing is overwritten), an unreachable Ray address.
    """
    x_axis, y_axis = validate_request(req)
    if req.address is not None:
        from flatlab.parallel import check_address

        check_address(req.address)
    device = req.device
    model_settings: dict[str, Any]
    if req.model_source is not None:
        from flatlab.sources import load_source

        loaded = load_source(req.model_source, req.data_source, seed=req.seed, run_id=req.run_id)
        ckpts: list[Any] = []
        model, fp_names = loaded.model.to("cpu"), None
        source = loaded.split_batches("source", req.batch_size, req.max_samples, req.seed)
        target = loaded.split_batches("target", req.batch_size, req.max_samples, req.seed)
        run_id, run_attrs = loaded.run_id, loaded.run_attrs
        # What identifies a user's model in the fingerprint: its source, weights and data (its
        # run id may be a name given by hand).
        model_settings = {k: loaded.run_attrs.get(k) for k in ("model", "model_args", "num_classes", "weights_sha256",
                                                               "init_seed", "dataset", "test_envs", "data_fn",
                                                               "data_args")}
        model_settings["weights_file"] = loaded.run_attrs.get("weights")
        model_settings["weights_kind"] = "full precision"
    else:
        from flatlab.results import run_attrs_from_checkpoint, run_id_for

        ckpts, models, fp_names = _load_models(req, device)
        ckpt = ckpts[0]
        model = models[0]
        splits = ckpt.splits(req.data_dir)
        source = splits.split_batches("source", req.batch_size, req.max_samples, req.seed, device="cpu")
        target = splits.split_batches("target", req.batch_size, req.max_samples, req.seed, device="cpu")
        # Hashed only for a results file (a large checkpoint takes a while to hash).
        run_id = run_id_for(ckpt.path) if req.results is not None else ""
        run_attrs = run_attrs_from_checkpoint(ckpt) if req.results is not None else {}
        model_settings = {"checkpoint": str(ckpt.path), "checkpoint_sha256": sha256_file(ckpt.path),
                          "weights_kind": "requantized latent weights" if req.requantize else
                          ("effective (de-quantized)" if ckpt.is_quantized else "full precision")}

    raw_dirs: list[Direction] | None = None
    base: dict[str, Tensor] | None = None
    extra_settings: dict[str, Any] = {}
    if req.model2 is not None:
        from flatlab.surface.interpolate import interpolation_directions

        base, dirs = interpolation_directions(models, [str(c.path) for c in ckpts])
        kind = "plane" if req.model3 is not None else "line"
        norm_used = "none"
        extra_settings["checkpoint2_sha256"] = sha256_file(ckpts[1].path)
        extra_settings["checkpoint2"] = str(ckpts[1].path)
        if req.model3 is not None:
            extra_settings["checkpoint3_sha256"] = sha256_file(ckpts[2].path)
            extra_settings["checkpoint3"] = str(ckpts[2].path)
        names = list(dirs[0])
    else:
        weights = _perturbed_weights(model, fp_names)
        # BatchNorm and biases: 1-D tensors; with ignore=biasbn their direction is zero.
        names = list(weights)
        if req.directions == "hessian":
            hess_names = [n for n in names if weights[n].dim() > 1] if req.ignore == "biasbn" else names
            hess_model = model.to(device)
            hess_source = [(x.to(device), y.to(device)) for x, y in source]
            found, eigenvalues, residuals = hessian_directions(hess_model, hess_source, F.cross_entropy, hess_names,
                                                               k=req.dims, seed=req.seed)
            hess_model.to("cpu")
            dirs = [{n: d[n] if n in d else torch.zeros_like(weights[n]) for n in names} for d in found]
            kind = f"hessian{req.dims}d"
            norm_used = "unit-eigenvector"
            extra_settings["hessian_eigenvalues"] = [float(v) for v in eigenvalues]
            extra_settings["hessian_residuals"] = [float(v) for v in residuals]
        else:
            if req.directions == "random":
                raw_dirs = [random_direction(weights, req.seed, i) for i in range(req.dims)]
                kind = f"random{req.dims}d-{req.norm}"
            else:
                raw, stored_names, stored = load_raw_directions(req.directions)
                if stored_names != names:
                    raise FlatlabError(f"the directions in {req.directions} belong to another architecture "
                                       f"({len(stored_names)} tensors, this model has {len(names)})")
                if raw.shape[0] < req.dims:
                    raise FlatlabError(f"{req.directions} holds {raw.shape[0]} direction(s); a {req.dims}D surface needs {req.dims}")
                raw_dirs = [unflatten_direction(raw[i], weights) for i in range(req.dims)]
                kind = f"reused{req.dims}d-{req.norm}"
                # The draws themselves, not the file (a results file changes as groups are added)
                # nor its path (a moved or renamed file holds the same draws).
                extra_settings["directions_sha256"] = array_sha256(raw[: req.dims])
                extra_settings["directions_file"] = str(req.directions)
                extra_settings["directions_seed"] = stored.get("seed")
            dirs = [normalize_direction(r, weights, req.norm, req.ignore) for r in raw_dirs]
            norm_used = req.norm

    direction_matrix = np.stack([flatten_direction(d, names) for d in dirs])
    raw_matrix = None if raw_dirs is None else np.stack([flatten_direction(d, names) for d in raw_dirs])
    weights_kind = model_settings.pop("weights_kind")
    settings: dict[str, Any] = {
        "kind": kind,
        **{k: v for k, v in model_settings.items() if v is not None},
        "dims": req.dims,
        "x": x_axis.spec(),
        "y": y_axis.spec() if y_axis is not None else None,
        "norm": norm_used,
        "ignore": req.ignore if req.model2 is None else "none (interpolation moves every tensor)",
        "directions": ("interpolation" if req.model2 is not None else
                       req.directions if req.directions in ("random", "hessian") else "file"),
        "seed": req.seed,
        "weights": weights_kind,
        "requantize": bool(req.requantize),
        "max_samples": req.max_samples,
        "batch_size": req.batch_size,
        "points_per_pass": req.points_per_pass,
        "train_split": "source",
        "test_split": "target",
        "train_size": sum(len(y) for _, y in source),
        "test_size": sum(len(y) for _, y in target),
        "loss": "cross_entropy",
        "device": torch.device(device).type,
        "dtype": str(next(iter(dirs[0].values())).dtype).replace("torch.", ""),
        **extra_settings,
    }
    # Paths are provenance, not settings: the same files moved elsewhere give the same surface.
    fingerprint = settings_fingerprint({k: v for k, v in settings.items() if k not in PATH_KEYS}, direction_matrix)
    path, run_id, group, journal_path = _run_paths(req, run_id, kind)

    # An existing output: the same settings are resumed or reused, other settings refused.
    if run_id is not None and group is not None:
        found = _existing_results_fingerprint(path, run_id, group)
        where = f"{path} (/runs/{run_id}/{group})"
    else:
        found = stored_fingerprint(path)
        where = str(path)
    if found is not None and found != fingerprint:
        hint = "pass another --name" if run_id is not None else "choose another --out or delete it"
        raise FlatlabError(f"{where} holds a surface computed with other settings: {hint}")
    if found == fingerprint and not journal_path.exists():
        # Finished earlier with these settings (an interrupted run leaves its journal behind).
        existing = _read_existing(path, run_id, group)
        existing.settings = settings
        return SurfaceOutcome(existing, str(path), group, settings, 0, int(existing.done.sum()), 0.0, True)

    x = x_axis.values
    y = y_axis.values if y_axis is not None else None
    n_points = len(x) * (len(y) if y is not None else 1)
    journal = PointJournal(journal_path, fingerprint, n_points)
    resumed = len(journal.done)
    problem = SurfaceProblem(model=model, source=source, target=target, directions=dirs, base=base,
                             loss_fn=F.cross_entropy, device=device, points_per_pass=req.points_per_pass)
    bar = progress_factory(n_points, resumed) if progress_factory else None
    start = time.perf_counter()
    write = functools.partial(_write, path=path, run_id=run_id, group=group, run_attrs=run_attrs, provenance=provenance,
                              directions=direction_matrix, raw=raw_matrix, names=names,
                              shapes=[list(dirs[0][n].shape) for n in names], settings=settings,
                              fingerprint=fingerprint)
    try:
        surface = compute_surface(problem, x, y, workers=req.workers, backend=req.backend, address=req.address,
                                  journal=journal, progress=bar.update if bar else None, settings=settings)
    except KeyboardInterrupt:
        # Leave a readable partial file (NaN = not computed yet) next to the journal, then stop.
        journal.close()
        if bar:
            bar.close()
        write(assemble_surface(x, y, journal.done, settings))
        raise
    finally:
        journal.close()
    seconds = time.perf_counter() - start
    if bar:
        bar.close()
    write(surface)
    journal.remove()
    return SurfaceOutcome(surface, str(path), group, settings, n_points - resumed, resumed, seconds, False)


def _write(surface: Surface, path: Path, run_id: str | None, group: str | None, run_attrs: dict[str, Any],
           directions: np.ndarray, raw: np.ndarray | None, names: list[str], shapes: list[list[int]],
           settings: dict[str, Any], fingerprint: str, provenance: dict[str, Any] | None = None) -> None:
    from flatlab import environment, results

    arrays, attrs = surface_payload(surface, directions, raw, names, shapes, settings, fingerprint)
    attrs.update(environment.environment(settings["device"]))  # threads, versions, CPU: what rounding depends on
    if run_id is not None and group is not None:
        results.write_group(path, run_id, {**run_attrs, **(provenance or {})}, group, arrays, attrs)
    else:
        results.write_root_file(path, arrays, attrs)


def request_summary(outcome: SurfaceOutcome) -> dict[str, Any]:
    """The JSON payload of ``flatlab surface``: where, what, and the surface's key numbers."""
    s = outcome.surface
    loss = s.values["train_loss"]
    origin: dict[str, float] = {}
    xi = np.where(np.isclose(s.xcoordinates, 0.0, atol=1e-12))[0]
    yi = [0] if s.ycoordinates is None else np.where(np.isclose(s.ycoordinates, 0.0, atol=1e-12))[0]
    if len(xi) and len(yi):
        for name, arr in s.values.items():
            origin[name] = float(arr[int(xi[0])] if s.ycoordinates is None else arr[int(yi[0]), int(xi[0])])
    finite = loss[np.isfinite(loss)]
    total = int(s.done.size)
    return {
        "path": outcome.path,
        "group": outcome.group,
        "shape": list(s.shape),
        "points": total,
        "computed": outcome.computed,
        "resumed": outcome.resumed,
        "reused_existing_file": outcome.reused_file,
        "seconds": outcome.seconds,
        "seconds_per_point": outcome.seconds / outcome.computed if outcome.computed else None,
        "origin": origin or None,
        "train_loss_min": float(finite.min()) if finite.size else None,
        "train_loss_max": float(finite.max()) if finite.size else None,
        "settings": outcome.settings,
    }
