"""``flatlab report``: flatness vs out-of-domain accuracy: per-run table, variants with CIs,
comparisons, correlations, claims.

One row per run (ensembles included): variant, algorithm, bits, seed, test domain, id_acc, ood_acc,
generalization gap (source in-split minus out-split accuracy), domain gap (id_acc - ood_acc) and
every measure present as 'value +- se' (its estimation error; missing shown as '-', never 0). Then
seed-to-seed variation per variant (mean, bootstrap CI over seeds within test domains, sd, n); every
variant against the reference (paired on seed and test domain: mean difference, CI, sign-flip p,
Holm over the report, seeds for 80% power); Kendall's tau and Spearman's rho with CIs and p-values
against ood_acc and each gap, per test domain and pooled; Jiang et al.'s granulated tau with a CI.
--claims FILE adds one verdict per claim (supported, contradicted, inconclusive, not testable). Run
folders and checkpoints contribute their accuracies only, unless --measure: then each is measured
first with `flatlab sharpness` into --measure-results.
"""

from __future__ import annotations

import argparse

from flatlab.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, __doc__)
    common.add_results_inputs(
        p, use="show", claims="one verdict per claim",
        inputs="results files (.h5), stand-alone surface files, run folders or checkpoints")
    p.add_argument("--csv", default=None, metavar="FILE",
                   help="also write the per-run table as CSV (with <measure>_stderr columns; missing = empty cell)")
    p.add_argument("--markdown", action="store_true",
                   help="print the claims' verdict tables as Markdown (for a paper or a README) instead of text")
    p.add_argument("--reference", default=None, metavar="VARIANT",
                   help="the variant every other one is compared with (default: erm if present, else fp); also "
                        "what claims call 'reference'")
    p.add_argument("--compare", action="append", default=[], metavar="A:B",
                   help="also compare variant A with variant B (effect A - B); repeat or comma-separate")
    p.add_argument("--alpha", type=float, default=None, metavar="A",
                   help="level of every test, in (0, 0.5); intervals are 1 - alpha (default 0.05, or the claims "
                        "file's alpha)")
    p.add_argument("--min-effect", default=None, metavar="X|COL=X,...",
                   help="the smallest effect that matters, to size studies with instead of the observed effect: "
                        "one number for every column, or column=value pairs (e.g. ood_acc=0.01,trace=20)")
    p.add_argument("--resamples", type=int, default=9999, metavar="N",
                   help="bootstrap resamples of means and differences (default 9999; correlations use half)")
    p.add_argument("--resample-seed", type=int, default=0, metavar="S",
                   help="seed of the bootstrap and Monte Carlo permutation draws (default 0)")
    p.add_argument("--measure", action="store_true",
                   help="measure the run folders and checkpoints among RESULTS first (flatlab sharpness with "
                        "--measure-args) into --measure-results, then report on it too")
    p.add_argument("--measure-results", default="measures.h5", metavar="FILE",
                   help="results file the measurements go to (default measures.h5); runs already measured "
                        "there are not measured again")
    common.add_deprecated_alias(p, "--measure-out", "--measure-results", "measure_results", metavar="FILE")
    p.add_argument("--measure-args", default="--top-k 5 --trace --pacbayes", metavar="FLAGS",
                   help="flatlab sharpness flags for --measure (default '--top-k 5 --trace --pacbayes')")
    common.add_output_options(p)
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


def parse_min_effect(text: str | None) -> float | dict[str, float] | None:
    """``--min-effect``: one number, or ``column=value`` pairs."""
    from flatlab.errors import FlatlabError

    if text is None:
        return None
    bad = FlatlabError(f"--min-effect must be a number > 0 or comma-separated column=number pairs (e.g. "
                       f"ood_acc=0.01,trace=20), got {text!r}")
    try:
        if "=" not in text:
            value = float(text)
            if not value > 0:
                raise bad
            return value
        out = {}
        for part in parse_list(text) or []:
            column, sep, value = part.partition("=")
            if not sep or not column.strip():
                raise bad
            out[column.strip()] = float(value)
            if not out[column.strip()] > 0:
                raise bad
        return out or None
    except ValueError:
        raise bad from None


def uncertainty_from_args(args: argparse.Namespace, alpha: float | None = None):  # noqa: ANN201
    from flatlab.report import Uncertainty

    kwargs = {"resamples": args.resamples, "correlation_resamples": max(100, args.resamples // 2),
              "seed": args.resample_seed, "min_effect": parse_min_effect(args.min_effect)}
    if alpha is not None:
        kwargs["alpha"] = alpha
    return Uncertainty(**kwargs)


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
    from flatlab.errors import FlatlabError
    from flatlab.io import atomic_write_text
    from flatlab.report import build_report, load_inputs, report_text, rows_csv

    if args.markdown and not args.claims:
        raise FlatlabError("--markdown prints the claims' verdict tables: add --claims FILE")
    inputs = list(args.results)
    if args.measure:
        from flatlab.report import measure_checkpoints

        configs, settings = measure_configs(args.measure_args)
        measured = measure_checkpoints(inputs, args.measure_results, configs, settings, quiet=args.quiet,
                                       provenance={"command_line": common.command_line()})
        if measured is not None:
            inputs.append(measured)
    uncertainty = uncertainty_from_args(args, args.alpha)
    compare = [pair for text in args.compare for pair in (parse_list(text) or [])]
    collection = load_inputs(inputs)
    claims_files = []
    if args.claims:
        from flatlab.claims import load_claims

        known = {r.variant for r in collection.runs.values()}
        claims_files = [load_claims(path, known) for path in args.claims]
    report = build_report(inputs, parse_list(args.measures), parse_radii(args.radii), uncertainty=uncertainty,
                          reference=args.reference, compare=compare, collection=collection)
    text = report_text(report)
    if claims_files:
        from flatlab.claims import claims_markdown, claims_text, evaluate_claims

        report["claims"] = [evaluate_claims(c, collection, uncertainty=uncertainty, alpha=args.alpha,
                                            reference=args.reference) for c in claims_files]
        render = claims_markdown if args.markdown else claims_text
        text += "\n\n" + "\n\n".join(render(c) for c in report["claims"])
    if args.csv:
        try:
            atomic_write_text(args.csv, rows_csv(report))
        except OSError as exc:
            raise FlatlabError(f"--csv {args.csv}: cannot write it ({exc.strerror})") from None
        report["csv"] = str(args.csv)
    common.emit(args, report, text)
    return 0
