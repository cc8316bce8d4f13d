"""``flatlab demo``: the whole study (train, QAT, EoQ, sharpness, surfaces, report, figures) on
rotated-digits.

A small QGen / QT-DoG study on rotated-digits: ERM, 8-bit and 4-bit QAT at 8 seeds each (a flatlab
sweep, 2 workers), every model's curvature, PAC-Bayes sigma and sigma' and local flatness, EoQ of
three 4-bit models, shared-direction 2D surfaces and the FP -> 4-bit line, then the report with
intervals over seeds, the verdicts of the claims it can test, and the figures, all in --out. Rerun
to continue after an interruption.
"""

from __future__ import annotations

import argparse

from flatlab.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, __doc__)
    p.add_argument("--out", default="flatlab-demo", help="demo folder (default flatlab-demo)")
    p.add_argument("--quick", action="store_true", help="the same pipeline at toy size (under a minute; for tests)")
    p.add_argument("--force", action="store_true", help="start over in a folder holding another demo")
    common.add_output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flatlab.claims import claims_text
    from flatlab.demo import run_demo
    from flatlab.report import interval_text

    summary = run_demo(args.out, quick=args.quick, force=args.force, quiet=args.quiet)
    columns = ["id_acc", "ood_acc", "generalization_gap", "top_eigenvalue", "trace", "pacbayes_inv_sigma_sq",
               "magnitude_inv_sigma_sq", "local_flatness_target@0.1rel"]
    rows = []
    for v in summary["variants"]:
        for column in columns:
            stat = v["stats"].get(column)
            if stat and stat["n"]:
                rows.append([v["variant"], column, stat["n"], common.fmt(stat["mean"]),
                             interval_text(stat["ci_low"], stat["ci_high"])])
    text = ("per variant, over seeds: mean and 95% bootstrap CI (n runs)\n"
            + common.table(rows, ["variant", "column", "n", "mean", "95% CI"]) + "\n\n" + claims_text(summary["claims"]))
    text += (f"\n\nresults: {summary['results']}\nreport:  {summary['report_text']} (every run, comparison and "
             f"correlation), {summary['report_csv']}\nfigures: {summary['figures']}"
             f"\ntime: {summary['seconds_total']} s of computation ({summary['seconds_this_run']} s in this run)")
    common.emit(args, summary, text)
    return 0
