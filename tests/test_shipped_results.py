"""The README's verdict tables come from the shipped study results through the shipped claims files.

Every README block ``<!-- verdicts: RESULTS CLAIMS -->`` followed by a Markdown verdict table must
be what ``flatlab report RESULTS --claims CLAIMS --markdown`` prints for it, test by test: the same
claims, verdicts, effects, p-values and n (the bootstrap intervals are compared too; they are
seeded, so the same numbers come back on any machine with the same scipy).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flatlab.claims import VERDICT_COLUMNS, verdict_rows
from flatlab.cli import main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = re.compile(r"<!-- verdicts: (\S+) (\S+) -->\n((?:\|.*\|\n)+)")


def readme_tables() -> list[tuple[str, str, list[list[str]]]]:
    """(results, claims, table rows) of every verdict block in the README."""
    out = []
    for results, claims, block in MARKER.findall(README.read_text(encoding="utf-8")):
        lines = [line for line in block.strip().splitlines()]
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        assert header == VERDICT_COLUMNS, f"README verdict table for {results}: columns {header}"
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
        out.append((results, claims, rows))
    return out


TABLES = readme_tables()


def test_the_readme_has_a_verdict_table_per_shipped_study() -> None:
    shipped = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "analysis" / "results").glob("*.h5"))
    assert shipped, "no shipped results under analysis/results/"
    assert sorted({r for r, _, _ in TABLES}) == shipped
    for results, claims, _ in TABLES:
        assert (REPO / claims).is_file(), claims
        # The bit-width study (210 runs) is the largest, about 15 MB: nearly all of it is each group's
        # provenance and resume record, kept so a reader can check how every number was made.
        assert (REPO / results).stat().st_size < 16 * 2**20, f"{results}: keep shipped results small"


@pytest.mark.parametrize(("results", "claims", "rows"), TABLES, ids=[Path(r).stem + "-" + Path(c).stem
                                                                    for r, c, _ in TABLES])
def test_readme_verdicts_are_what_the_report_prints(results: str, claims: str, rows: list[list[str]],
                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(REPO / results), "--claims", str(REPO / claims), "--json", "--quiet"]) == 0
    payload = json.loads(capsys.readouterr().out)
    (evaluated,) = payload["claims"]
    printed = [[str(c) for c in row] for row in verdict_rows(evaluated)]
    assert [r[0] for r in rows] == [r[0] for r in printed], "the README lists other tests than the report"
    for readme_row, row in zip(rows, printed):
        assert readme_row == row, f"{results} {row[0]}: README {readme_row} != report {row}"
