"""``flatlab barrier``: loss and error barriers on the line between two checkpoints (linear mode
connectivity).

B = max over alpha of L((1-a) w1 + a w2) - [(1-a) L(w1) + a L(w2)] on a grid of alpha in [0, 1]
(Frankle et al. 2020), on CKPT1's source and target splits, with the paired standard error of the
per-sample gaps; the same on the error (1 - accuracy). Quantized checkpoints enter with their
de-quantized weights. With --results the line is stored under CKPT1's run
(/runs/<id>/barriers/<name>) and a rerun with the same settings reads it back.
"""

from __future__ import annotations

import argparse

from flatlab.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, __doc__)
    p.add_argument("checkpoint1", help="model 1 (alpha = 0): model.pt or a run folder")
    p.add_argument("checkpoint2", help="model 2 (alpha = 1): model.pt or a run folder")
    p.add_argument("--bn", default="interpolate", choices=["interpolate", "reestimate"],
                   help="BatchNorm statistics: interpolated like the weights (default), or reset and re-estimated "
                        "on the source split at every point (REPAIR's fix for variance collapse)")
    p.add_argument("--points", type=int, default=21, help="grid points on [0, 1], both ends included (default 21)")
    p.add_argument("--splits", default="source,target", metavar="LIST",
                   help="comma-separated splits: source, source-out, target (default source,target)")
    p.add_argument("--max-samples", type=int, default=None, help="seeded random subset of each split")
    p.add_argument("--batch-size", type=int, default=512, help="samples per forward pass (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seeds the subsets (default 0)")
    p.add_argument("--bn-batches", type=int, default=None,
                   help="with --bn reestimate: use the first N source batches (default all)")
    p.add_argument("--results", default=None, metavar="RESULTS.h5",
                   help="store the line in this results file under CKPT1's run, and reuse it on a rerun")
    p.add_argument("--name", default=None, help="the barrier's name in --results (default vs-<CKPT2's run id>)")
    common.add_data_dir_option(p)
    common.add_device_option(p, default="cpu")
    common.add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatlab.errors import FlatlabError
    from flatlab.surface.barrier_runner import BarrierRequest, run_barrier

    if args.name is not None and args.results is None:
        raise FlatlabError("--name names the barrier inside a results file: add --results FILE")
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    req = BarrierRequest(checkpoint1=args.checkpoint1, checkpoint2=args.checkpoint2, bn=args.bn, points=args.points,
                         splits=splits, max_samples=args.max_samples, batch_size=args.batch_size, seed=args.seed,
                         bn_batches=args.bn_batches, device=args.device, results=args.results, name=args.name,
                         data_dir=args.data_dir)
    try:
        outcome = run_barrier(req, provenance={"command_line": common.command_line()})
    except FlatlabError as exc:
        # the library names settings by their field names; here they are flags
        text = str(exc)
        for field, flag in (("bn_batches", "--bn-batches"), ("max_samples", "--max-samples"),
                            ("batch_size", "--batch-size"), ("points", "--points"), ("splits", "--splits"),
                            ("name", "--name"), ("bn", "--bn"), ("seed", "--seed"), ("device", "--device")):
            if text.startswith(f"{field} "):
                text = flag + text[len(field):]
                break
        raise FlatlabError(text) from None
    summary = dict(outcome.summary)
    summary.update(run_id=outcome.run_id, results=str(outcome.path) if outcome.path else None, group=outcome.group,
                   reused=outcome.reused, notes=outcome.notes)
    models = summary["models"]
    settings = summary["settings"]
    lines = [f"barrier: model 1 {models.get('model1_label')} ({args.checkpoint1}) -> model 2 "
             f"{models.get('model2_label')} ({args.checkpoint2})",
             f"bn {settings.get('bn')}, {settings.get('points')} points on [0, 1]"]
    rows = []
    for split in settings.get("splits", []):
        e = summary[split]
        ends = e.get("endpoint_losses") or [None, None]
        rows.append([split, f"{common.fmt(e['loss_barrier'])} +- {common.fmt(e['loss_barrier_stderr'], 2)}",
                     e["loss_barrier_alpha"], f"{common.fmt(e['error_barrier'])} +- {common.fmt(e['error_barrier_stderr'], 2)}",
                     ends[0], ends[1], e["num_samples"]])
    lines += ["", common.table(rows, ["split", "loss barrier (+- se)", "at alpha", "error barrier (+- se)", "L(model 1)",
                               "L(model 2)", "samples"])]
    if outcome.path is not None:
        lines.append("")
        lines.append(f"{'already in' if outcome.reused else 'stored in'} {outcome.path} ({outcome.group} of run "
                     f"{outcome.run_id})" + (": same settings, nothing recomputed" if outcome.reused else ""))
    for note in outcome.notes:
        lines.append(f"note: {note}")
    common.emit(args, summary, "\n".join(lines))
    return 0
