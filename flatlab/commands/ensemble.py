"""``flatlab ensemble``: evaluate a logit-averaged ensemble (EoQ) on every domain.

Average the members' logits and evaluate on every domain (same keys as `flatlab evaluate`), with the
members and their total storage size.
"""

from __future__ import annotations

import argparse

from flatlab.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, __doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="member checkpoints (model.pt or run folders)")
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/ensemble.json (members, sha256, metrics)")
    p.add_argument("--results", default=None, metavar="FILE",
                   help="also add the ensemble as a run (algorithm eoq) to this HDF5 results file")
    p.add_argument("--batch-size", type=int, default=512)
    common.add_data_dir_option(p)
    common.add_device_option(p)
    common.add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatlab.commands.evaluate import evaluation_table
    from flatlab.ensemble import (
        check_ensemble_outputs,
        evaluate_ensemble,
        load_members,
        write_ensemble_record,
        write_ensemble_results,
    )
    from flatlab.errors import FlatlabError
    from flatlab.train import resolve_device

    if args.batch_size < 1:
        raise FlatlabError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_ensemble_outputs(args.out, args.results)
    device = resolve_device(args.device)
    members = load_members(args.checkpoints)
    result = evaluate_ensemble(members, device, args.batch_size, args.data_dir)
    if args.out:
        result["record"] = str(write_ensemble_record(args.out, result))
    if args.results:
        result["results"] = args.results
        result["run_id"] = write_ensemble_results(args.results, members, result,
                                                  provenance={"command_line": common.command_line()})
    text = common.table([[i, r["checkpoint"], r["algorithm"], r["bits"], r["seed"], r["id_acc"], r["ood_acc"], r["size_bytes"]]
                  for i, r in enumerate(result["members"])],
                 ["member", "checkpoint", "algorithm", "bits", "seed", "id_acc", "ood_acc", "bytes"])
    text += "\n\n" + evaluation_table(members[0].meta, result)
    text += (f"\nensemble of {result['num_members']}: {result['total_size_bytes']} bytes = "
             f"{result['size_x_fp32']:.3g}x one FP32 model")
    common.emit(args, result, text)
    return 0
