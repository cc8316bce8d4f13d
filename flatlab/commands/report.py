"""``flatlab report``: does flatter mean better out of domain here? Rows, rank correlations, means."""

from __future__ import annotations

import argparse

from flatlab.commands.common import add_deprecated_alias, add_output_options, command_line, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="flatness vs out-of-domain accuracy: per-run table, rank correlations, grouped means",
        description="One row per run (ensembles included): algorithm, bits, seed, test domain, id_acc, ood_acc, "
                    "generalization gap (source in-split minus out-split accuracy), domain gap (id_acc - ood_acc) "
                    "and every measure present (missing shown as '-', never 0). Per measure: Kendall's tau and "
                    "Spearman's rho with p-values against ood_acc and each gap, per test domain and pooled; "
                    "Jiang et al.'s granulated tau over algorithm, bits and seed; means +- standard error per "
                    "(algorithm, bits). Run folders and checkpoints contribute their accuracies only, unless "
                    "--measure: then each is measured first with `flatlab sharpness` into --measure-results.")
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="results files (.h5), stand-alone surface files, run folders or checkpoints")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the per-run table as CSV (missing = empty cell)")
    p.add_argument("--measures", default=None, metavar="LIST",
                   help="comma-separated measure columns (default: every measure present), e.g. "
                        "top_eigenvalue,trace,pacbayes_inv_sigma_sq,local_flatness_target@0.1rel")
    p.add_argument("--radii", default=None, metavar="LIST",
                   help="local-flatness radii to show, as stored (relative or absolute); default: the largest "
                        "radius every measured run shares")
    p.add_argument("--measure", action="store_true",
                   help="measure the run folders and checkpoints among RESULTS first (flatlab sharpness with "
                        "--measure-args) into --measure-results, then report on it too")
    p.add_argument("--measure-results", default="measures.h5", metavar="FILE",
                   help="results file the measurements go to (default measures.h5); runs already measured "
                        "there are not measured again")
    add_deprecated_alias(p, "--measure-out", "--measure-results", "measure_results", metavar="FILE")
    p.add_argument("--measure-args", default="--top-k 5 --trace --pacbayes", metavar="FLAGS",
                   help="flatlab sharpness flags for --measure (default '--top-k 5 --trace --pacbayes')")
    add_output_options(p)
    p.set_defaults(func=run)


def parse_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_radii(text: str | None) -> list[float] | None:
    from flatlab.errors import FlatlabError

    parts = parse_list(text)
    if parts is None:
        return None
    try:
        return [float(v.removesuffix("rel")) for v in parts]
    except ValueError:
        raise FlatlabError(f"--radii must be comma-separated numbers, e.g. 0.05,0.1; got {text!r}") from None


def measure_configs(text: str) -> tuple[list, object]:
    """``--measure-args`` (flatlab sharpness flags) -> measure configs and settings."""
    import shlex

    from flatlab.cli import build_parser
    from flatlab.commands.sharpness import configs_from_args
    from flatlab.errors import FlatlabError

    tokens = shlex.split(text)
    if any(t.split("=")[0] in ("--results", "--out") for t in tokens):
        raise FlatlabError("--measure-args must not name a results file: use --measure-results")
    parsed = build_parser().parse_args(["sharpness", "-", *tokens])
    return configs_from_args(parsed)


def run(args: argparse.Namespace) -> int:
    from flatlab.io import atomic_write_text
    from flatlab.report import build_report, report_text, rows_csv

    inputs = list(args.results)
    if args.measure:
        from flatlab.report import measure_checkpoints

        configs, settings = measure_configs(args.measure_args)
        measured = measure_checkpoints(inputs, args.measure_results, configs, settings, quiet=args.quiet,
                                       provenance={"command_line": command_line()})
        if measured is not None:
            inputs.append(measured)
    report = build_report(inputs, parse_list(args.measures), parse_radii(args.radii))
    if args.csv:
        atomic_write_text(args.csv, rows_csv(report))
        report["csv"] = str(args.csv)
    emit(args, report, report_text(report))
    return 0
