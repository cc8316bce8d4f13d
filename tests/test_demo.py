"""``flatlab demo --quick`` end to end: every group in the results file, report, figures, rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatlab.cli import main
from flatlab.results import read_results


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "d"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    return out


def test_quick_demo_writes_every_group(demo_dir: Path):
    view = read_results(demo_dir / "results.h5")
    runs = list(view["runs"].values())
    by_algo: dict = {}
    for r in runs:
        by_algo.setdefault((r["attrs"]["algorithm"], r["attrs"].get("bits")), []).append(r)
    assert {k: len(v) for k, v in by_algo.items()} == {("erm", None): 3, ("qat", 8): 3, ("qat", 4): 3, ("eoq", 4): 1}
    for key in [("erm", None), ("qat", 8), ("qat", 4)]:
        assert sorted(int(r["attrs"]["seed"]) for r in by_algo[key]) == [0, 1, 2]
        for run in by_algo[key]:
            assert {"curvature", "bounds", "local_flatness"} <= set(run), key
            assert len(run["curvature"]["top_eigenvalues"]) == 2
            assert {"pacbayes", "magnitude"} <= set(run["bounds"])
            grid = run["curvature"]["density_grid"]
            assert abs(float(sum(run["curvature"]["density"]) * (grid[1] - grid[0])) - 1) < 0.05
    first = {key: next(r for r in by_algo[key] if int(r["attrs"]["seed"]) == 0) for key in by_algo
             if key[0] != "eoq"}
    assert set(first[("erm", None)]["surfaces"]) - {"attrs"} == {"fp-2d", "interp-fp-q4"}
    assert set(first[("qat", 4)]["surfaces"]) - {"attrs"} == {"q4-2d-shared"}
    fp, q4 = first[("erm", None)]["surfaces"]["fp-2d"], first[("qat", 4)]["surfaces"]["q4-2d-shared"]
    assert fp["train_loss"].shape == q4["train_loss"].shape == (5, 5)
    # Shared directions: the same raw draws under both surfaces.
    assert (fp["raw_directions"] == q4["raw_directions"]).all()
    members = by_algo[("eoq", 4)][0]["attrs"]["members"]
    members = json.loads(members) if isinstance(members, str) else members
    assert len(members) == 3
    # The study the demo swept is in the folder, and `flatlab sweep` reads it.
    from flatlab.sweep import load_study

    assert load_study(demo_dir / "study.toml").seeds == [0, 1, 2]


def test_quick_demo_report_claims_figures_summary(demo_dir: Path):
    assert (demo_dir / "report.csv").read_text().count("\n") >= 11
    text = (demo_dir / "report.txt").read_text()
    assert "seed-to-seed variation per variant" in text and "claims:" in text
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert len(summary["runs"]) == 10
    variants = {v["variant"] for v in summary["variants"]}
    assert {"erm", "qat8", "qat4", "eoq"} <= variants
    verdicts = summary["claims"]["results"]
    assert {r["claim"] for r in verdicts} >= {"qgen-smaller-gap", "qgen-8bit-matches-fp", "qtdog-qat-ood"}
    assert all(r["verdict"] in ("supported", "contradicted", "inconclusive", "not testable") for r in verdicts)
    # Every measure the claims need is in the demo's results: nothing is "not testable".
    assert not [r["id"] for r in verdicts if r["verdict"] == "not testable"]
    figures = sorted(p.name for p in (demo_dir / "figures").iterdir())
    for stem in ("spectral_density", "local_flatness", "bits_vs_ood_acc", "claims_forest_demo_claims"):
        assert f"{stem}.png" in figures and f"{stem}.pdf" in figures
    assert any(name.startswith("contour_") for name in figures)
    # the FP and 4-bit surfaces on shared draws: found by the hash `flatlab surface` records
    assert any(name.startswith("contour_shared_") and name.endswith(".png") for name in figures)
    assert any(name.endswith(".html") for name in figures)


def test_rerun_continues_and_other_settings_are_refused(demo_dir: Path, capsys):
    before = (demo_dir / "results.h5").stat().st_mtime_ns
    done_before = json.loads((demo_dir / "demo.json").read_text())["done"]
    assert main(["demo", "--quick", "--out", str(demo_dir), "--quiet", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["runs"]) == 10
    # Nothing was recomputed: every step kept its record and the results file is untouched.
    assert json.loads((demo_dir / "demo.json").read_text())["done"] == done_before
    assert (demo_dir / "results.h5").stat().st_mtime_ns == before
    assert main(["demo", "--out", str(demo_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds a demo with another mode" in err and err.count("\n") == 1


def test_non_demo_folder_is_refused(tmp_path: Path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(tmp_path), "--quiet"]) == 2
    assert "not part of a flatlab demo" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_quick_demo_gives_the_recorded_numbers(demo_dir: Path):
    """The library redesign changed structure, not results: the same numbers as the record made
    with the CLI-chained pipeline before it (tests/pipeline_record.py)."""
    from pipeline_record import check_against_record

    check_against_record("demo_quick", demo_dir / "results.h5")
