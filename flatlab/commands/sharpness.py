"""``flatlab sharpness``: Hessian spectrum, trace and spectral density of a checkpoint.

Measures on exactly the split recorded in the checkpoint (default ``source``, the training set),
in eval mode, over the whole split or a seeded subset (``--max-samples``). Curvature measures
(``--top-k``, ``--trace``, ``--density``, ``--per-layer``) come from :mod:`flatlab.curvature`;
sharpness bounds (PAC-Bayes, magnitude-aware, worst case, local flatness) are added by the
optional module :mod:`flatlab.commands.sharpness_bounds`, whose contract is:

* ``add_arguments(parser)``: adds its flags;
* ``requested(args) -> bool``: whether any of its measures was asked for;
* ``run_bounds(args, ckpt, device, splits) -> dict``: computes them (and writes its own groups to
  ``args.out`` if given), returning ``{measure: value or dict of values}`` that is merged into the
  JSON payload and printed as a table.

With no measure flag at all, the top-5 eigenvalues and the trace are computed. With only bound
flags, no curvature is computed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from flatlab.commands.common import (
    add_data_dir_option,
    add_device_option,
    add_output_options,
    emit,
    fmt,
    table,
)

try:
    sharpness_bounds: Any = importlib.import_module("flatlab.commands.sharpness_bounds")
except ModuleNotFoundError as _exc:  # the bounds part is optional (built separately)
    if _exc.name != "flatlab.commands.sharpness_bounds":
        raise
    sharpness_bounds = None

SPLITS = ("source", "source-out", "target")
SOLVERS = ("lanczos", "pyhessian", "dense")
DEFAULT_TOP_K = 5
PYHESSIAN_NOTE = ("pyhessian runs power iteration with deflation: its eigenvalues are the largest in "
                  "magnitude (a large negative one can appear), in the order found, not sorted")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sharpness", help="Hessian eigenvalues, trace, spectral density (and sharpness bounds) of a checkpoint",
        description="Curvature of a checkpoint's loss on one data split, in eval mode: top Hessian "
                    "eigenvalues by Lanczos with residuals, trace (Hutch++) with standard error, "
                    "spectral density (stochastic Lanczos quadrature), per-layer curvature. "
                    "Without measure flags: --top-k 5 --trace.")
    p.add_argument("checkpoint", help="model.pt (or a run folder)")
    p.add_argument("--split", choices=SPLITS, default="source",
                   help="data to measure on: source (training set, default), source-out, target")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="number of largest Hessian eigenvalues")
    p.add_argument("--trace", action="store_true", help="Hessian trace with standard error")
    p.add_argument("--density", action="store_true", help="spectral density by stochastic Lanczos quadrature")
    p.add_argument("--per-layer", action="store_true", help="top eigenvalue and trace of every layer's Hessian block")
    p.add_argument("--solver", choices=SOLVERS, default="lanczos",
                   help="lanczos (default; early-stopping Lanczos, or ARPACK with --tol), pyhessian (its power "
                        "iteration, for comparison), dense (float64 validation, small models only)")
    p.add_argument("--wrt", choices=("effective", "latent"), default="effective",
                   help="quantized checkpoints: Hessian w.r.t. the de-quantized (deployed) weights (default) "
                        "or the latent weights through the straight-through estimator")
    p.add_argument("--params", choices=("all", "weights", "no-bn"), default="all",
                   help="parameters: all (default), weights (conv/linear kernels only), no-bn (all but normalization)")
    p.add_argument("--max-samples", type=int, default=None, metavar="N",
                   help="measure on a seeded random subset of N samples (default: the whole split)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (no effect on the result)")
    p.add_argument("--rtol", type=float, default=None, metavar="R",
                   help="Lanczos stops once every top-k eigenvalue's residual ||Hu - lu|| is below R x |l| "
                        "(default 1e-3; the error of each eigenvalue is below its residual)")
    p.add_argument("--tol", type=float, default=None, metavar="T",
                   help="use ARPACK (scipy eigsh, implicitly restarted Lanczos) to relative accuracy T instead "
                        "of the early-stopping Lanczos: more products, tighter answers (e.g. 1e-6)")
    p.add_argument("--trace-products", type=int, default=99, metavar="M",
                   help="Hessian-vector products for the trace (default 99)")
    p.add_argument("--trace-method", choices=("hutch++", "hutchinson"), default="hutch++")
    p.add_argument("--density-steps", type=int, default=80, metavar="M", help="Lanczos steps per SLQ run")
    p.add_argument("--density-runs", type=int, default=1, metavar="R", help="SLQ runs (random start vectors)")
    p.add_argument("--hvp", choices=("auto", "double-backward", "forward-over-reverse"), default="auto",
                   help="how Hessian-vector products are computed (auto: the faster one, see benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="seeds the subset, start vectors and probes")
    p.add_argument("--out", default=None, metavar="RESULTS.h5",
                   help="write /runs/<run_id>/curvature to this HDF5 results file (with provenance)")
    add_data_dir_option(p)
    add_device_option(p)
    add_output_options(p)
    if sharpness_bounds is not None:
        sharpness_bounds.add_arguments(p)
    p.set_defaults(func=run)


def _curvature_requested(args: argparse.Namespace) -> bool:
    return args.top_k is not None or args.trace or args.density or args.per_layer


def _validate(args: argparse.Namespace) -> None:
    from flatlab.errors import FlatlabError

    if args.top_k is not None and args.top_k < 1:
        raise FlatlabError(f"--top-k must be at least 1, got {args.top_k}")
    if args.max_samples is not None and args.max_samples < 1:
        raise FlatlabError(f"--max-samples must be positive, got {args.max_samples}: the split would be empty")
    if args.batch_size < 1:
        raise FlatlabError(f"--batch-size must be positive, got {args.batch_size}")
    if args.trace_products < (3 if args.trace_method == "hutch++" else 1):
        raise FlatlabError(f"--trace-products {args.trace_products} is too few for {args.trace_method} "
                           "(hutch++ needs at least 3)")
    if args.density_steps < 1 or args.density_runs < 1:
        raise FlatlabError("--density-steps and --density-runs must be positive")
    if args.rtol is not None and not args.rtol > 0:
        raise FlatlabError(f"--rtol must be positive, got {args.rtol}")
    if args.tol is not None and not args.tol >= 0:
        raise FlatlabError(f"--tol must be non-negative, got {args.tol}")
    if args.tol is not None and args.rtol is not None:
        raise FlatlabError("--tol (ARPACK) and --rtol (early-stopping Lanczos) pick different solvers: give one")
    if args.solver == "pyhessian":
        from flatlab.curvature.power_iteration import PYHESSIAN_DENSITY_REFUSAL, import_pyhessian

        if args.density:
            raise FlatlabError(PYHESSIAN_DENSITY_REFUSAL)
        if args.per_layer:
            raise FlatlabError("--per-layer uses flatlab's Lanczos solver: drop --solver pyhessian")
        import_pyhessian()


class _Progress:
    """A tqdm bar on stderr counting Hessian-vector products (silent with --quiet)."""

    def __init__(self, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc="Hessian-vector products", unit="hvp", disable=quiet, file=sys.stderr,
                        dynamic_ncols=True, leave=False)

    def __call__(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


CURVATURE_STEPS = ("eigen", "trace", "density", "per_layer")


def eigen_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The Lanczos variant and its tolerance: early-stopping with ``--rtol`` (default), or ARPACK
    with ``--tol`` (keyword arguments of :func:`~flatlab.curvature.lanczos.lanczos_top_eigenvalues`)."""
    from flatlab.curvature.lanczos import DEFAULT_RTOL

    if args.tol is not None:
        return {"method": "arpack", "tol": args.tol}
    return {"method": "lanczos", "rtol": DEFAULT_RTOL if args.rtol is None else args.rtol}


def curvature_step_settings(args: argparse.Namespace, device_type: str) -> dict[str, dict[str, Any]]:
    """What each curvature step's numbers depend on (besides the checkpoint), for its fingerprint."""
    common = {"split": args.split, "max_samples": args.max_samples, "seed": args.seed, "params": args.params,
              "wrt": args.wrt, "solver": args.solver, "hvp": args.hvp, "batch_size": args.batch_size,
              "device": device_type}
    eigen = eigen_settings(args)
    return {"eigen": {**common, **eigen, "top_k": args.top_k},
            "trace": {**common, "trace_products": args.trace_products, "trace_method": args.trace_method},
            "density": {**common, "density_steps": args.density_steps, "density_runs": args.density_runs},
            "per_layer": {**common, **eigen, "trace_products": min(args.trace_products, 30)}}


def requested_curvature_steps(args: argparse.Namespace) -> list[str]:
    flags = {"eigen": args.top_k is not None, "trace": args.trace, "density": args.density,
             "per_layer": args.per_layer}
    return [step for step in CURVATURE_STEPS if flags[step]]


def measure_curvature(args: argparse.Namespace, model: Any, batches: list, progress: Any,
                      stored: dict[str, Any] | None = None,
                      save: Callable[[dict[str, Any], dict[str, Any]], None] | None = None) -> tuple[dict, dict, dict]:
    """Run the requested curvature measures; return (JSON payload part, HDF5 arrays, HDF5 attrs).

    Args:
        stored: step records of an earlier, interrupted run with ``--out`` (``{step: {"fingerprint",
            "payload", "arrays", "attrs", "products"}}``, the attribute ``steps_json``); a step
            whose fingerprint matches is taken from there instead of being computed again.
        save: called with (arrays, attrs) so far after every computed step (writes them to
            ``--out``, marked incomplete).
    """
    from flatlab.curvature import MAX_DENSE_PARAMS, HessianOperator
    from flatlab.errors import FlatlabError
    from flatlab.io import settings_fingerprint
    from flatlab.resume import from_jsonable, to_jsonable

    op = HessianOperator(model, batches, params=args.params, method=args.hvp, progress=progress)
    k = args.top_k
    if k is not None and k > op.dim:
        raise FlatlabError(f"--top-k {k} exceeds the number of selected parameters ({op.dim}): use at most {op.dim}")
    if args.solver == "dense" and op.dim > MAX_DENSE_PARAMS:
        raise FlatlabError(f"--solver dense is limited to {MAX_DENSE_PARAMS} parameters and this model has {op.dim} "
                           "selected: use --solver lanczos (dense is the float64 validation mode for small models)")
    payload: dict[str, Any] = {"num_params": op.dim, "hvp_method": op.method}
    arrays: dict[str, Any] = {}
    attrs: dict[str, Any] = {"solver": args.solver, "wrt": args.wrt, "params": args.params, "split": args.split,
                             "n_samples": op.num_samples, "seed": args.seed, "num_params": op.dim}
    fingerprints = {step: settings_fingerprint(settings)
                    for step, settings in curvature_step_settings(args, str(op.device.type)).items()}
    records: dict[str, Any] = {}
    resumed: list[str] = []
    hvps = 0
    dense: list[Any] = []  # the dense spectrum, computed once if a step needs it
    for step in requested_curvature_steps(args):
        record = (stored or {}).get(step)
        if record is not None and record.get("fingerprint") == fingerprints[step]:
            resumed.append(step)
        else:
            part, part_arrays, part_attrs, products = _curvature_step(step, args, model, batches, op, dense)
            record = {"fingerprint": fingerprints[step], "payload": part, "arrays": to_jsonable(part_arrays),
                      "attrs": part_attrs, "products": int(products)}
        records[step] = record
        payload.update(record["payload"])
        arrays.update(from_jsonable(record["arrays"]))
        attrs.update(record["attrs"])
        hvps += int(record["products"])
        attrs.update(hvps=int(hvps), hvp_method=op.method, steps_json=json.dumps(records))
        if save is not None and step not in resumed:
            save(arrays, attrs)
    payload["hvps"] = int(hvps)
    if "density" in records:
        payload["density_stored"] = bool(args.out)
    if resumed:
        payload["resumed"] = resumed
    return payload, arrays, attrs


def _curvature_step(step: str, args: argparse.Namespace, model: Any, batches: list, op: Any,
                    dense: list[Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], int]:
    """One curvature measure: (payload part, arrays, attrs, Hessian-vector products used)."""
    from flatlab.curvature.density import gaussian_broadening, slq_density
    from flatlab.curvature.lanczos import lanczos_top_eigenvalues
    from flatlab.curvature.per_layer import per_layer_curvature
    from flatlab.curvature.trace import estimate_trace

    products = 0
    if args.solver == "dense" and not dense:
        from flatlab.curvature.dense import dense_hessian, dense_spectrum

        dense.append(dense_spectrum(dense_hessian(model, batches, params=args.params)))
        products += op.dim  # one column per parameter
    spectrum = dense[0] if dense else None
    solver = eigen_settings(args)
    payload: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    if step == "eigen":
        k = args.top_k
        if spectrum is not None:
            values = spectrum.eigenvalues[:k]
            vectors = spectrum.eigenvectors[:, :k]
            residuals = np.linalg.norm(spectrum.hessian @ vectors - vectors * values, axis=0)
            eig_products = 0
        elif args.solver == "pyhessian":
            from flatlab.curvature.power_iteration import pyhessian_top_eigenvalues

            result = pyhessian_top_eigenvalues(op, k, seed=args.seed)
            values, residuals, eig_products = result.eigenvalues, result.residuals, result.products
            payload["note"] = PYHESSIAN_NOTE
            attrs["note"] = PYHESSIAN_NOTE
        else:
            result = lanczos_top_eigenvalues(op, k, seed=args.seed, **solver)
            values, residuals, eig_products = result.eigenvalues, result.residuals, result.products
            payload["converged"] = result.converged
            if result.note:
                payload["eigen_note"] = result.note
            # "method" alone would be ambiguous next to hvp_method
            recorded = {("eigen_method" if key == "method" else key): value for key, value in solver.items()}
            payload.update(recorded)
            attrs.update(recorded)
        products += eig_products
        payload.update(top_eigenvalues=[float(v) for v in values], residuals=[float(r) for r in residuals],
                       eigen_hvps=int(eig_products))
        arrays.update(top_eigenvalues=np.asarray(values, dtype=np.float64),
                      residuals=np.asarray(residuals, dtype=np.float64))
        attrs["eigen_hvps"] = int(eig_products)
    elif step == "trace":
        if spectrum is not None:
            trace, stderr, used, method = float(np.trace(spectrum.hessian)), 0.0, 0, "exact"
        elif args.solver == "pyhessian":
            from flatlab.curvature.power_iteration import pyhessian_trace

            est = pyhessian_trace(op, seed=args.seed)
            trace, stderr, used, method = est.trace, est.stderr, est.products, est.method
        else:
            est = estimate_trace(op, args.trace_products, args.trace_method, args.seed)
            trace, stderr, used, method = est.trace, est.stderr, est.products, est.method
        products += used
        payload.update(trace=trace, trace_stderr=stderr, trace_method=method, trace_hvps=int(used))
        arrays.update(trace=np.float64(trace), trace_stderr=np.float64(stderr))
        attrs.update(trace_method=method, trace_hvps=int(used))
    elif step == "density":
        if spectrum is not None:
            n = len(spectrum.eigenvalues)
            nodes, weights = [spectrum.eigenvalues[::-1].copy()], [np.full(n, 1.0 / n)]
            grid, density, sigma = gaussian_broadening(nodes, weights)
            used = 0
        else:
            slq = slq_density(op, args.density_steps, args.density_runs, args.seed)
            nodes, weights, grid, density, sigma, used = slq.nodes, slq.weights, slq.grid, slq.density, slq.sigma, slq.products
        products += used
        payload.update(density_grid=grid.tolist(), density=density.tolist(), density_sigma=sigma,
                       density_hvps=int(used))
        arrays.update(density_grid=grid, density=density, density_nodes=np.stack(nodes),
                      density_weights=np.stack(weights))
        attrs.update(density_sigma=sigma, density_steps=int(len(nodes[0])), density_runs=len(nodes),
                     density_hvps=int(used))
    else:
        layers = per_layer_curvature(op, trace_products=min(args.trace_products, 30), seed=args.seed, **solver)
        products += sum(layer.products for layer in layers)
        payload["per_layer"] = [{"layer": L.layer, "num_params": L.num_params, "top_eigenvalue": L.top_eigenvalue,
                                 "residual": L.residual, "trace": L.trace, "trace_stderr": L.trace_stderr,
                                 "hvps": L.products} for L in layers]
        arrays["per_layer"] = {L.layer: {"num_params": np.int64(L.num_params), "top_eigenvalue": np.float64(L.top_eigenvalue),
                                         "residual": np.float64(L.residual), "trace": np.float64(L.trace),
                                         "trace_stderr": np.float64(L.trace_stderr)} for L in layers}
    return payload, arrays, attrs, products


def curvature_table(payload: dict[str, Any]) -> str:
    lines = [f"checkpoint {payload['checkpoint']}",
             f"split {payload['split']} ({payload['n_samples']} samples), wrt {payload['wrt']}, "
             f"params {payload['params']} ({payload.get('num_params', '-')}), solver {payload['solver']}, "
             f"{payload.get('hvps', 0)} Hessian-vector products"]
    if payload.get("resumed"):
        lines.append(f"taken from {payload.get('out', '--out')} (computed earlier with these settings): "
                     f"{', '.join(payload['resumed'])}")
    if "top_eigenvalues" in payload:
        rows = [[i + 1, v, r] for i, (v, r) in enumerate(zip(payload["top_eigenvalues"], payload["residuals"]))]
        lines += ["", table(rows, ["k", "eigenvalue", "residual ||Hv - lv||"])]
        if "eigen_method" in payload:
            lanczos = payload["eigen_method"] == "lanczos"
            rule = f"rtol {payload['rtol']:g}" if lanczos else f"tol {payload['tol']:g}"
            lines.append(f"eigenvalues: {'early-stopping Lanczos' if lanczos else 'ARPACK'} "
                         f"({rule}), {payload['eigen_hvps']} products"
                         + ("" if payload.get("converged", True) else ", NOT converged"))
        if "eigen_note" in payload:
            lines.append(f"note: {payload['eigen_note']}")
    if "note" in payload:
        lines.append(f"note: {payload['note']}")
    if "trace" in payload:
        lines += ["", f"trace {fmt(payload['trace'])} +- {fmt(payload['trace_stderr'])} (standard error; "
                      f"{payload['trace_method']}, {payload['trace_hvps']} products)"]
    if "density" in payload:
        grid = payload["density_grid"]
        where = "stored in --out" if payload.get("density_stored") else "in the JSON output (--json) or --out"
        lines += ["", f"spectral density on [{fmt(grid[0])}, {fmt(grid[-1])}], sigma {fmt(payload['density_sigma'])}, "
                      f"{payload['density_hvps']} products: {where}"]
    if "per_layer" in payload:
        rows = [[L["layer"], L["num_params"], L["top_eigenvalue"], L["trace"], L["trace_stderr"]] for L in payload["per_layer"]]
        lines += ["", table(rows, ["layer", "params", "top eigenvalue", "trace", "trace stderr"])]
    return "\n".join(lines)


def bounds_table(results: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    for name, value in results.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                if isinstance(inner, (int, float, str, bool)) or inner is None:
                    rows.append([name, key, inner])
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append([name, "value", value])
    return table(rows, ["measure", "quantity", "value"]) if rows else ""


def _curvature_journal(args: argparse.Namespace, ckpt: Any, run_id: str, wrt: str
                       ) -> tuple[dict[str, Any], Callable[[dict[str, Any], dict[str, Any]], None] | None]:
    """With ``--out``: the step records an earlier run left in the file, and a function that
    writes what is measured so far after each step, marked ``complete = False``."""
    if not args.out:
        return {}, None
    from flatlab.results import run_attrs_from_checkpoint, write_group
    from flatlab.resume import stored_attr

    text = stored_attr(args.out, run_id, "curvature", "steps_json")
    run_attrs = run_attrs_from_checkpoint(ckpt)

    def save(arrays: dict[str, Any], attrs: dict[str, Any]) -> None:
        write_group(args.out, run_id, run_attrs, "curvature", arrays, {**attrs, "wrt": wrt, "complete": False})

    return (json.loads(text) if text else {}), save


def run(args: argparse.Namespace) -> int:
    from flatlab.checkpoint import load_checkpoint
    from flatlab.results import run_attrs_from_checkpoint, run_id_for, write_group
    from flatlab.train import resolve_device

    bounds_wanted = sharpness_bounds is not None and bool(sharpness_bounds.requested(args))
    if not _curvature_requested(args) and not bounds_wanted:
        args.top_k, args.trace = DEFAULT_TOP_K, True
    _validate(args)
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    splits = ckpt.splits(args.data_dir)
    payload: dict[str, Any] = {"checkpoint": str(ckpt.path), "run_id": run_id_for(ckpt.path), "split": args.split,
                               "wrt": args.wrt if ckpt.is_quantized else "fp", "params": args.params,
                               "solver": args.solver, "seed": args.seed, "quantized": ckpt.is_quantized}
    text_parts = []
    if _curvature_requested(args):
        import torch

        torch.manual_seed(args.seed)
        model = ckpt.build_model(device, effective=args.wrt == "effective")
        batches = splits.split_batches(args.split, args.batch_size, args.max_samples, args.seed, device)
        payload["n_samples"] = int(sum(len(y) for _, y in batches))
        progress = _Progress(args.quiet)
        stored, save = _curvature_journal(args, ckpt, payload["run_id"], payload["wrt"])
        try:
            part, arrays, attrs = measure_curvature(args, model, batches, progress, stored, save)
        finally:
            progress.close()
        payload.update(part)
        attrs["wrt"] = payload["wrt"]
        if args.out:
            write_group(args.out, payload["run_id"], run_attrs_from_checkpoint(ckpt), "curvature", arrays,
                        {**attrs, "complete": True})
            payload["out"] = str(args.out)
        text_parts.append(curvature_table(payload))
    if bounds_wanted:
        results = sharpness_bounds.run_bounds(args, ckpt, device, splits)
        payload.update(results)
        text = bounds_table(results)
        if results.get("bounds_resumed"):
            text += (f"\ntaken from {args.out} (computed earlier with these settings): "
                     f"{', '.join(results['bounds_resumed'])}")
        if text:
            text_parts.append(text)
    emit(args, payload, "\n\n".join(text_parts))
    return 0
