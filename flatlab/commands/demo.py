"""``flatlab demo``: the whole study on the built-in data in one command."""

from __future__ import annotations

import argparse
import math

from flatlab.commands.common import add_output_options, emit, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole study (train, QAT, EoQ, sharpness, surfaces, report, figures) on rotated-digits",
                       description="Train ERM, QAT 8-bit and 4-bit (and two more 4-bit seeds for an EoQ ensemble) "
                                   "on rotated-digits, measure curvature, PAC-Bayes sigma and local flatness, "
                                   "compute shared-direction 2D surfaces and the FP -> 4-bit interpolation, then "
                                   "write results.h5, the report and the figures into --out. Rerun to continue "
                                   "after an interruption.")
    p.add_argument("--out", default="flatlab-demo", help="demo folder (default flatlab-demo)")
    p.add_argument("--quick", action="store_true", help="the same pipeline at toy size (under a minute; for tests)")
    p.add_argument("--force", action="store_true", help="start over in a folder holding another demo")
    add_output_options(p)
    p.set_defaults(func=run)


def _pick(row: dict, *keys: str):
    for key in keys:
        value = row.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return value
    return None


def run(args: argparse.Namespace) -> int:
    from flatlab.demo import run_demo

    summary = run_demo(args.out, quick=args.quick, force=args.force, quiet=args.quiet)
    rows = []
    for r in summary["runs"]:
        rows.append([r.get("algorithm"), r.get("bits") or "fp", r.get("seed"), r.get("id_acc"), r.get("ood_acc"),
                     _pick(r, "top_eigenvalue"), _pick(r, "trace"), _pick(r, "pacbayes_inv_sigma_sq")])
    text = table(rows, ["algorithm", "bits", "seed", "id_acc", "ood_acc", "top eig", "trace", "1/sigma^2"])
    text += (f"\n\nresults: {summary['results']}\nreport:  {summary['report_csv']}\nfigures: {summary['figures']}"
             f"\ntime: {summary['seconds_total']} s of computation ({summary['seconds_this_run']} s in this run)")
    emit(args, summary, text)
    return 0
