"""``flatlab figures``: figures from results files: surfaces, spectra, local flatness, measures vs OOD
accuracy.

Writes whatever the inputs hold: 1D loss curves (source and target; FP and quantized on one axis;
accuracy on a twin axis), 2D contours with log-spaced levels, 3D surfaces (static, interactive
offline HTML, VTK .vtp for ParaView), Hessian spectral densities (log scale), local flatness F_gamma
vs gamma per algorithm, each measure vs OOD accuracy with its rank correlation (95% CIs) and per-run
estimation error bars, bit width vs OOD accuracy and vs sharpness with 95% bootstrap CIs over seeds,
and with --claims a forest plot of the claims' verdicts. Reads results only; no measurement is
recomputed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flatlab.commands import common


def register(sub: argparse._SubParsersAction) -> None:
    p = common.add_command(sub, __doc__)
    common.add_results_inputs(p, inputs="results file(s) (.h5) or stand-alone surface files (several: drawn together)",
                              use="plot against OOD accuracy",
                              claims="also draw its forest plot (effect and CI per claim, coloured by verdict)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: <first input's folder>/<its name>_figures)")
    p.add_argument("--format", default="pdf,png,html,vtp", metavar="LIST",
                   help="comma-separated subset of pdf,png,svg,html,vtp (default pdf,png,html,vtp)")
    p.add_argument("--reference", default=None, metavar="VARIANT",
                   help="the reference variant of the claims (default: the claims file's, else erm / fp)")
    p.add_argument("--alpha", type=float, default=None, metavar="A",
                   help="level of the claims' tests (default: the claims file's alpha, else 0.05)")
    p.add_argument("--no-titles", dest="titles", action="store_false",
                   help="draw no titles (figure, panels, HTML page), e.g. for a paper's captions; each panel's "
                        "split then goes into its colour-bar or axis label. File names are unchanged")
    p.add_argument("--z-scale", default="linear", metavar="SCALE",
                   help="z axis of the 3D surfaces (static and HTML): linear (default), log (log10 of the loss) or "
                        "clip (clipped at the --clip-quantile quantile, said in the colour-bar label)")
    p.add_argument("--clip-quantile", type=float, default=0.95, metavar="Q",
                   help="the quantile --z-scale clip clips at, in (0, 1] (default 0.95: the 95th percentile)")
    common.add_output_options(p)
    p.set_defaults(func=run)


def default_out_dir(first: str) -> Path:
    path = Path(first)
    if path.is_dir():
        return path / "figures"
    return path.with_name(f"{path.stem}_figures")


def run(args: argparse.Namespace) -> int:
    from flatlab.commands.report import parse_list, parse_radii
    from flatlab.errors import FlatlabError
    from flatlab.io import check_writable
    from flatlab.plots.collect import parse_formats, write_figures
    from flatlab.plots.surfaces import check_z_scale
    from flatlab.report import check_measure_names, load_inputs

    formats = parse_formats(args.format)
    check_z_scale(args.z_scale, args.clip_quantile)  # a ConfigError: main() names the flag
    measures = parse_list(args.measures)
    if measures is not None:
        check_measure_names(measures)
    radii = parse_radii(args.radii)
    out = Path(args.out) if args.out else default_out_dir(args.results[0])
    check_writable(out, "folder")  # before reading and drawing anything
    collection = load_inputs(args.results)

    def progress(stem: str) -> None:
        if not args.quiet:
            sys.stderr.write(f"figure {stem}\n")

    claims = []
    if args.claims:
        from flatlab.claims import evaluate_claims, load_claims
        from flatlab.report import Uncertainty

        known = {r.variant for r in collection.runs.values()}
        files = [load_claims(path, known) for path in args.claims]
        if not collection.runs:
            raise FlatlabError("--claims needs runs: the inputs hold only surfaces")
        u = Uncertainty() if args.alpha is None else Uncertainty(alpha=args.alpha)
        claims = [evaluate_claims(f, collection, uncertainty=u, alpha=args.alpha, reference=args.reference)
                  for f in files]
    summary = write_figures(collection, out, formats, measures, radii, progress if not args.json else None,
                            claims=claims, titles=args.titles, z_scale=args.z_scale,
                            clip_quantile=args.clip_quantile)
    lines = [f"{len(summary['figures'])} figure(s) in {summary['out_dir']}"]
    for fig in summary["figures"]:
        lines.append(f"  {fig['kind']:<18} {', '.join(Path(f).name for f in fig['files'])}")
    for skip in summary["skipped"]:
        lines.append(f"  skipped {skip['figure']}: {skip['reason']}")
    common.emit(args, summary, "\n".join(lines))
    return 0
