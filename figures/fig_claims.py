"""Forest plot of a claims report: effect and CI per claim, coloured by verdict.

Usage: python figures/fig_claims.py RESULTS... OUTDIR [--format pdf,png] [--claims FILE ...]

Without --claims, the paper claims shipped in analysis/claims/ (QT-DoG, QGen, GAQAT, ...) are
checked, one figure per file. Bad input ends with one ``error:`` line and exit status 2.
"""

import argparse
import sys
from pathlib import Path

from flatlab.claims import evaluate_claims, load_claims
from flatlab.errors import FlatlabError
from flatlab.plots import claims_forest, save_figure
from flatlab.plots.collect import figure_formats, load_inputs_for_script, parse_formats, slug

SHIPPED = Path(__file__).resolve().parents[1] / "analysis" / "claims"


def draw(results: list[str], out: Path, formats: list[str], claims: list[str]) -> list[Path]:
    collection = load_inputs_for_script(results)
    if not collection.runs:
        raise FlatlabError("the inputs hold no runs: claims need a results file with /runs")
    known = {r.variant for r in collection.runs.values()}
    files = []
    for path in claims:
        report = evaluate_claims(load_claims(path, known), collection)
        fig = claims_forest(report["results"], f"claims of {report['source'] or Path(path).stem}: effect and "
                                               "interval per test")
        files += save_figure(fig, out / f"fig_claims_{slug(Path(path).stem)}", figure_formats(formats))
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("results", nargs="+", help="results file(s)")
    parser.add_argument("out_dir", help="folder for the figure files")
    parser.add_argument("--format", default="pdf,png", help="comma-separated formats (default pdf,png)")
    parser.add_argument("--claims", action="append", default=[], help="claims file(s); default analysis/claims/*.toml")
    args = parser.parse_args(argv)
    try:
        claims = args.claims or sorted(str(p) for p in SHIPPED.glob("*.toml"))
        if not claims:
            raise FlatlabError(f"no claims file given and none in {SHIPPED}")
        files = draw(args.results, Path(args.out_dir), parse_formats(args.format), claims)
    except FlatlabError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        sys.exit(2)
    for f in files:
        sys.stdout.write(f"{f}\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
