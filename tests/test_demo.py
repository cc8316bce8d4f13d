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
    by_algo = {(r["attrs"]["algorithm"], r["attrs"].get("bits")): r for r in runs}
    assert set(by_algo) == {("erm", None), ("qat", 8), ("qat", 4), ("eoq", 4)}
    for key in [("erm", None), ("qat", 8), ("qat", 4)]:
        run = by_algo[key]
        assert {"curvature", "bounds", "local_flatness"} <= set(run), key
        assert len(run["curvature"]["top_eigenvalues"]) == 2
        assert "pacbayes" in run["bounds"]
        assert abs(float(sum(run["curvature"]["density"]) * (run["curvature"]["density_grid"][1] -
                                                           run["curvature"]["density_grid"][0])) - 1) < 0.05
    assert set(by_algo[("erm", None)]["surfaces"]) - {"attrs"} == {"fp-2d", "interp-fp-q4"}
    assert set(by_algo[("qat", 4)]["surfaces"]) - {"attrs"} == {"q4-2d-shared"}
    fp, q4 = by_algo[("erm", None)]["surfaces"]["fp-2d"], by_algo[("qat", 4)]["surfaces"]["q4-2d-shared"]
    assert fp["train_loss"].shape == q4["train_loss"].shape == (5, 5)
    # Shared directions: the same raw draws under both surfaces.
    assert (fp["raw_directions"] == q4["raw_directions"]).all()
    members = by_algo[("eoq", 4)]["attrs"]["members"]
    members = json.loads(members) if isinstance(members, str) else members
    assert len(members) == 3


def test_quick_demo_report_figures_summary(demo_dir: Path):
    assert (demo_dir / "report.csv").read_text().count("\n") >= 5
    figures = sorted(p.name for p in (demo_dir / "figures").iterdir())
    for stem in ("spectral_density", "local_flatness", "bits_vs_ood_acc"):
        assert f"{stem}.png" in figures and f"{stem}.pdf" in figures
    assert any(name.startswith("contour_") for name in figures)
    # the FP and 4-bit surfaces on shared draws: found by the hash `flatlab surface` records
    assert any(name.startswith("contour_shared_") and name.endswith(".png") for name in figures)
    assert any(name.endswith(".html") for name in figures)
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert len(summary["runs"]) == 4


def test_rerun_continues_and_other_settings_are_refused(demo_dir: Path, capsys):
    before = (demo_dir / "results.h5").stat().st_mtime_ns
    done_before = json.loads((demo_dir / "demo.json").read_text())["done"]
    assert main(["demo", "--quick", "--out", str(demo_dir), "--quiet", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["runs"]) == 4
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
