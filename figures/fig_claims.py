"""Forest plot of a claims report: effect and CI per claim, coloured by verdict.

Usage: python figures/fig_claims.py RESULTS... OUTDIR [--format pdf,png] [--claims FILE ...]

Without --claims, the paper claims shipped in analysis/claims/ (QT-DoG, QGen, GAQAT, ...) are
checked, one figure per file. Bad input ends with one ``error:`` line and exit status 2.
"""

import argparse
from pathlib import Path

from flatlab.claims import evaluate_claims, load_claims
from flatlab.errors import FlatlabError
from flatlab.plots import claims_forest, save_figure
from flatlab.plots.collect import figure_formats, script_main, slug
from flatlab.report import Collection

SHIPPED = Path(__file__).resolve().parents[1] / "analysis" / "claims"


def draw(collection: Collection, out: Path, formats: list[str], claims: list[str]) -> list[Path]:
    if not collection.runs:
        raise FlatlabError("the inputs hold no runs: claims need a results file with /runs")
    claims = claims or sorted(str(p) for p in SHIPPED.glob("*.toml"))
    if not claims:
        raise FlatlabError(f"no claims file given and none in {SHIPPED}")
    known = {r.variant for r in collection.runs.values()}
    files = []
    for path in claims:
        report = evaluate_claims(load_claims(path, known), collection)
        fig = claims_forest(report["results"], f"claims of {report['source'] or Path(path).stem}: effect and "
                                               "interval per test")
        files += save_figure(fig, out / f"fig_claims_{slug(Path(path).stem)}", figure_formats(formats))
    return files


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--claims", action="append", default=[], help="claims file(s); default analysis/claims/*.toml")


if __name__ == "__main__":
    script_main(__doc__, draw, add_options=add_options)
