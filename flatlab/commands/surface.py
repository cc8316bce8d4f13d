"""``flatlab surface``: loss surface around a checkpoint (1D/2D), or between checkpoints.

f(a, b) = L(w + a d1 + b d2) on a grid, with seeded Gaussian directions normalized per filter (Li et
al. 2018); or the line/plane through two/three checkpoints. Loss and accuracy on the source
(train_*) and target (test_*) splits. Interrupted runs resume from a side journal when rerun with
the same command.
"""

from __future__ import annotations

import argparse
import re
import sys

from flatlab.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, __doc__)
    # Let grids with a negative minimum follow their flag (`--x -1:1:51`, as in Li et al.'s docs):
    # argparse would otherwise read "-1:1:51" as an unknown option.
    p._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\d.]+(e[-+]?\d+)?:")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="model.pt (or a run folder); or your own model with --arch/--model-fn below")
    dims = p.add_mutually_exclusive_group()
    dims.add_argument("--2d", dest="dims", action="store_const", const=2, help="2D surface (default)")
    dims.add_argument("--1d", dest="dims", action="store_const", const=1, help="1D curve")
    p.add_argument("--x", default="-1:1:51", help="x grid min:max:num (default -1:1:51)")
    p.add_argument("--y", default="-1:1:51", help="y grid min:max:num (default -1:1:51; 2D only)")
    p.add_argument("--norm", default="filter", choices=["filter", "layer", "weight", "none"],
                   help="direction normalization (default filter)")
    p.add_argument("--ignore", default="biasbn", choices=["biasbn", "none"],
                   help="biasbn (default): biases and BatchNorm get zero direction; none: include them "
                        "(their direction is the weight itself, as in Li et al.'s code)")
    p.add_argument("--model2", default=None, help="second checkpoint: the line f(a) = L((1-a) w1 + a w2)")
    p.add_argument("--model3", default=None, help="third checkpoint: the plane w1 + a (w2-w1) + b (w3-w1)")
    p.add_argument("--directions", default="random",
                   help="random (default), hessian (top Hessian eigenvectors), or a surface file whose raw "
                        "random draws are re-normalized to this checkpoint")
    p.add_argument("--requantize", action="store_true",
                   help="quantized checkpoints: perturb the latent weights and re-quantize at every point "
                        "(default: perturb the deployed de-quantized weights)")
    p.add_argument("--max-samples", type=int, default=None, help="seeded subset of each split")
    p.add_argument("--seed", type=int, default=0, help="seed of the directions and the subsets (default 0)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--points-per-pass", type=int, default=1,
                   help="grid points per forward pass (vmap); pays on GPUs and small MLPs (default 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="local processes, or Ray actors (default: 1 locally, all cluster CPUs with Ray)")
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument("--address", default=None, help="Ray cluster HOST:PORT (with --backend ray)")
    p.add_argument("--out", default=None, help="standalone surface file (default surface.h5)")
    p.add_argument("--results", default=None, help="write into this results file (/runs/<id>/surfaces/<name>)")
    p.add_argument("--name", default=None, help="surface name inside --results (default: from the settings)")
    common.add_data_dir_option(p)
    common.add_model_source_options(p, loss=False)
    common.add_device_option(p)
    common.add_output_options(p)
    p.set_defaults(func=run, dims=2)


def _progress(args: argparse.Namespace):  # noqa: ANN202 - returns a factory or None
    if args.quiet:
        return None
    from tqdm import tqdm

    def factory(total: int, initial: int):  # noqa: ANN202
        return tqdm(total=total, initial=initial, desc="surface points", unit="pt", file=sys.stderr,
                    dynamic_ncols=True)

    return factory


def run(args: argparse.Namespace) -> int:
    from flatlab.surface.runner import SurfaceRequest, request_summary, run_surface
    from flatlab.train import resolve_device

    model_source, data_source = common.model_source_from_args(args, args.checkpoint)
    workers = args.workers if args.workers is not None else (None if args.backend == "ray" else 1)
    req = SurfaceRequest(
        checkpoint=args.checkpoint or "", model_source=model_source, data_source=data_source, run_id=args.run_id,
        dims=args.dims, x=args.x, y=args.y, norm=args.norm, ignore=args.ignore,
        model2=args.model2, model3=args.model3, directions=args.directions, requantize=args.requantize,
        max_samples=args.max_samples, seed=args.seed, batch_size=args.batch_size,
        points_per_pass=args.points_per_pass, workers=workers, backend=args.backend, address=args.address,
        out=args.out, results=args.results, name=args.name, device="cpu", data_dir=args.data_dir)
    # Validate cheap things before resolving the device (which may initialise CUDA).
    from flatlab.surface.runner import validate_request

    validate_request(req)
    req.device = str(resolve_device(args.device))
    outcome = run_surface(req, _progress(args), provenance={"command_line": common.command_line()})
    summary = request_summary(outcome)
    lines = [f"surface {outcome.settings['kind']}: {'x'.join(map(str, summary['shape']))} points -> {summary['path']}"
             + (f" ({summary['group']})" if summary["group"] else "")]
    if outcome.reused_file:
        lines.append("already complete with these settings: nothing recomputed")
    else:
        lines.append(f"computed {summary['computed']}, resumed {summary['resumed']}, "
                     f"{common.fmt(summary['seconds_per_point'])} s per point")
    if summary["origin"]:
        o = summary["origin"]
        lines.append(f"origin: train_loss {common.fmt(o['train_loss'])} train_acc {common.fmt(o['train_acc'])} "
                     f"test_loss {common.fmt(o['test_loss'])} test_acc {common.fmt(o['test_acc'])}")
    lines.append(f"train_loss range [{common.fmt(summary['train_loss_min'])}, {common.fmt(summary['train_loss_max'])}]")
    common.emit(args, summary, "\n".join(lines))
    return 0
