"""flatlab figures: every figure produced, drawn data equal the file's arrays, orientation kept."""

from __future__ import annotations

import json
import math
import re
import runpy
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import matplotlib
import numpy as np
import pytest
from cases import write_non_results
from matplotlib.contour import ContourSet
from scipy import stats
from test_report import RADII, _expect_error, make_results

from flatlab.cli import main
from flatlab.plots import surfaces as splots
from flatlab.plots.collect import figure_jobs
from flatlab.report import load_inputs
from flatlab.results import write_group, write_root_file

# A non-square, asymmetric surface: loss[j, i] = f(x[i], y[j]) = 5 + x + 3 y (linear, so the
# contour-line vertices lie exactly on their level; a transposed array would put them elsewhere).
XS = np.linspace(-1.0, 1.0, 7)
YS = np.linspace(-0.5, 0.5, 4)


def f_lin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return 5.0 + x + 3.0 * y


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("figs") / "results.h5"
    return path, make_results(path)


@pytest.fixture()
def asym_surface(tmp_path: Path) -> Path:
    xx, yy = np.meshgrid(XS, YS)  # (len(y), len(x))
    z = f_lin(xx, yy)
    path = tmp_path / "surf.h5"
    write_root_file(path, {"xcoordinates": XS, "ycoordinates": YS, "train_loss": z, "test_loss": 2 * z,
                           "train_acc": z / 10, "test_acc": z / 20},
                    {"format": "flatlab-surface", "kind": "random2d-filter", "norm": "filter",
                     "weights": "full precision"})
    return path


def _figures(collection, kind: str) -> list:  # noqa: ANN001
    jobs, _ = figure_jobs(collection)
    return [job for job in jobs if job.kind == kind]


def test_every_figure_is_written(demo: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = demo
    out = tmp_path / "figs"
    assert main(["figures", str(path), "--out", str(out), "--json", "--quiet", "--format", "png,html,vtp"]) == 0
    summary = json.loads(capsys.readouterr().out)
    kinds = {f["kind"] for f in summary["figures"]}
    assert kinds == {"loss_curves_1d", "contour_2d", "surface_3d", "spectral_density", "local_flatness",
                     "measure_vs_ood", "bits_vs_ood", "bits_vs_sharpness"}
    assert summary["skipped"] == []
    measures = {f["measure"] for f in summary["figures"] if f["kind"] == "measure_vs_ood"}
    assert measures == {"top_eigenvalue", "trace", "pacbayes_inv_sigma_sq", "magnitude_inv_sigma_sq",
                        "worst_case_inv_alpha_sq", "local_flatness_source@0.1rel", "local_flatness_target@0.1rel"}
    for fig in summary["figures"]:
        for name in fig["files"]:
            data = Path(name).read_bytes()
            assert len(data) > 500
            if name.endswith(".pdf"):
                assert data.startswith(b"%PDF")
            elif name.endswith(".png"):
                assert data.startswith(b"\x89PNG")
    suffixes = {Path(n).suffix for f in summary["figures"] for n in f["files"]}
    assert suffixes == {".png", ".html", ".vtp"}
    # vector PDF, in the default folder next to the input (fewer measure figures to keep it quick)
    assert main(["figures", str(path), "--format", "pdf", "--measures", "trace", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {f["kind"] for f in summary["figures"]} == kinds
    pdf = path.parent / "results_figures" / "spectral_density.pdf"
    assert pdf.read_bytes().startswith(b"%PDF") and b"/FontFile2" in pdf.read_bytes()  # TrueType embedded
    assert matplotlib.get_backend().lower() == "agg"


def test_loss_curves_hold_the_file_arrays(demo: tuple[Path, dict]) -> None:
    path, known = demo
    collection = load_inputs([path])
    (job,) = _figures(collection, "loss_curves_1d")
    fig = job.build()
    src_ax, tgt_ax = [ax for ax in fig.axes if ax.get_title()]
    curves = [k["surfaces"]["random1d-filter"] for k in known.values() if "surfaces" in k]
    assert len(curves) == 2
    for ax, prefix in ((src_ax, "train"), (tgt_ax, "test")):
        twin = next(a for a in fig.axes if a is not ax and a.get_shared_x_axes().joined(a, ax) and not a.get_title())
        loss_lines = [ln for ln in ax.get_lines() if ln.get_gid() == "loss"]
        acc_lines = [ln for ln in twin.get_lines() if ln.get_gid() == "accuracy"]
        assert len(loss_lines) == 2 and len(acc_lines) == 2
        for c in curves:
            assert any(np.array_equal(ln.get_xdata(), c["xcoordinates"]) and
                       np.array_equal(ln.get_ydata(), c[f"{prefix}_loss"]) for ln in loss_lines)
            assert any(np.allclose(ln.get_ydata(), 100 * c[f"{prefix}_acc"], rtol=0, atol=1e-12) for ln in acc_lines)


def test_contour_is_not_flipped(asym_surface: Path) -> None:
    collection = load_inputs([asym_surface])
    (surface,) = collection.surfaces
    assert surface.values["train_loss"].shape == (len(YS), len(XS))
    fig = splots.contour_2d(surface)
    axes = [ax for ax in fig.axes if ax.get_title().startswith(("source", "target"))]
    for ax, scale in zip(axes, (1.0, 2.0)):
        lines = [c for c in ax.collections if isinstance(c, ContourSet) and not c.filled]
        filled = [c for c in ax.collections if isinstance(c, ContourSet) and c.filled]
        assert len(lines) == 1 and len(filled) == 1
        z = scale * f_lin(*np.meshgrid(XS, YS))
        levels = filled[0].levels
        np.testing.assert_allclose(levels, np.geomspace(z.min(), z.max(), len(levels)), rtol=1e-8)
        assert np.allclose(np.diff(np.log(levels)), np.log(levels[1] / levels[0]))  # log-spaced
        checked = 0
        for level, p in zip(lines[0].levels, lines[0].get_paths()):
            if len(p.vertices) == 0:
                continue
            vx, vy = p.vertices[:, 0], p.vertices[:, 1]
            np.testing.assert_allclose(scale * f_lin(vx, vy), level, rtol=1e-9)
            checked += len(vx)
        assert checked > 5
        origin = [ln for ln in ax.get_lines() if ln.get_gid() == "origin"]
        assert origin and origin[0].get_xdata()[0] == 0 and origin[0].get_ydata()[0] == 0


def test_reference_tool_file_is_read_in_its_enumeration_order(tmp_path: Path) -> None:
    # Li et al.'s tool: no flatlab attributes, arrays allocated (len(x), len(y)) and filled flat in
    # meshgrid(x, y) order (k = j * len(x) + i).
    xx, yy = np.meshgrid(XS, YS)
    flat = f_lin(xx, yy).ravel()
    path = tmp_path / "li.h5"
    with h5py.File(path, "w") as fh:
        fh["xcoordinates"], fh["ycoordinates"] = XS, YS
        fh["train_loss"] = flat.reshape(len(XS), len(YS))
    (surface,) = load_inputs([path]).surfaces
    np.testing.assert_array_equal(surface.values["train_loss"], f_lin(xx, yy))


def test_static_3d_html_and_vtp_hold_the_arrays(asym_surface: Path, tmp_path: Path) -> None:
    (surface,) = load_inputs([asym_surface]).surfaces
    z = f_lin(*np.meshgrid(XS, YS))
    # static: plot_surface colours each quad by the mean of its 4 corners, row-major over (j, i)
    fig = splots.surface_3d(surface)
    quads = (z[:-1, :-1] + z[:-1, 1:] + z[1:, :-1] + z[1:, 1:]) / 4
    for ax, scale in zip([a for a in fig.axes if a.name == "3d"], (1.0, 2.0)):
        (poly,) = ax.collections
        np.testing.assert_allclose(np.asarray(poly.get_array()), scale * quads.ravel(), rtol=1e-12)
    # interactive: the page holds the numbers as plain JSON, z[j][i] = f(x[i], y[j])
    html = splots.surface_html(surface)
    assert "<script" in html and len(html) > 1_000_000  # plotly.js inline: works offline
    zs = [json.loads(m) for m in re.findall(r'"z":(\[\[.*?\]\])', html)]
    xs = [json.loads(m) for m in re.findall(r'"x":(\[[-0-9.e, ]*\])', html)]
    assert len(zs) == 2
    np.testing.assert_array_equal(np.asarray(zs[0]), z)
    np.testing.assert_array_equal(np.asarray(zs[1]), 2 * z)
    assert any(np.array_equal(np.asarray(x), XS) for x in xs)
    # VTK: points (x[i], y[j], loss[j, i]) at p = j * len(x) + i, quads over the grid
    vtp = splots.write_vtp(tmp_path / "s.vtp", surface, "target")
    root = ET.parse(vtp).getroot()
    assert root.attrib["type"] == "PolyData"
    arrays = {a.attrib["Name"]: np.asarray(a.text.split(), dtype=float) for a in root.iter("DataArray")}
    pts = arrays["Points"].reshape(-1, 3)
    assert len(pts) == len(XS) * len(YS)
    for j in range(len(YS)):
        for i in range(len(XS)):
            np.testing.assert_array_equal(pts[j * len(XS) + i], [XS[i], YS[j], 2 * z[j, i]])
    np.testing.assert_array_equal(arrays["target_loss"], (2 * z).ravel())
    assert len(arrays["offsets"]) == (len(XS) - 1) * (len(YS) - 1)


def test_spectral_density_and_local_flatness_hold_the_arrays(demo: tuple[Path, dict], tmp_path: Path) -> None:
    path, known = demo
    collection = load_inputs([path])
    (job,) = _figures(collection, "spectral_density")
    ax = job.build().axes[0]
    assert ax.get_yscale() == "log"
    lines = ax.get_lines()
    with h5py.File(path, "r") as fh:
        for run_id in fh["runs"]:
            if "curvature" not in fh["runs"][run_id]:
                continue
            grid, dens = fh[f"runs/{run_id}/curvature/density_grid"][()], fh[f"runs/{run_id}/curvature/density"][()]
            assert sum(np.array_equal(ln.get_xdata(), grid) and np.array_equal(ln.get_ydata(), dens)
                       for ln in lines) == 1
    dashed = {ln.get_linestyle() for ln in lines if ln.get_label().startswith("qat")}
    assert dashed == {"--"}  # quantized dashed, FP solid

    # local flatness, several runs per algorithm: mean over runs
    (job,) = _figures(collection, "local_flatness")
    fig = job.build()
    src_ax = next(a for a in fig.axes if a.get_title().startswith("source"))
    erm = [k["measures"]["lf_source"] for k in known.values() if k["attrs"]["algorithm"] == "erm"]
    assert any(np.allclose(ln.get_ydata(), np.mean(erm, axis=0)) and np.allclose(ln.get_xdata(), RADII)
               for ln in src_ax.get_lines())

    # one run per algorithm: the stored arrays themselves
    one = tmp_path / "lf.h5"
    stored = {}
    for k, alg in enumerate(("sam", "qat")):
        arrays = {"gammas": np.array([0.0, 5.0, 10.0]), "source": np.array([0.0, 0.1, 0.3]) * (k + 1),
                  "source_stderr": np.full(3, 0.01), "target": np.array([0.0, 0.2, 0.5]) * (k + 1),
                  "target_stderr": np.full(3, 0.02)}
        write_group(one, f"{k:016x}", {"algorithm": alg, "bits": 7 if alg == "qat" else None, "ood_acc": 0.5},
                    "local_flatness", arrays, {"radii": [0.0, 5.0, 10.0], "relative": False})
        stored[alg] = arrays
    (job,) = _figures(load_inputs([one]), "local_flatness")
    fig = job.build()
    for split in ("source", "target"):
        ax = next(a for a in fig.axes if a.get_title().startswith(split))
        assert ax.get_xlabel().startswith("radius γ (")
        for arrays in stored.values():
            assert any(np.array_equal(ln.get_xdata(), arrays["gammas"]) and np.array_equal(ln.get_ydata(), arrays[split])
                       for ln in ax.get_lines())


def test_measure_vs_ood_and_bits_hold_the_rows(demo: tuple[Path, dict]) -> None:
    path, known = demo
    collection = load_inputs([path])
    jobs = {job.data["measure"]: job for job in _figures(collection, "measure_vs_ood")}
    fig = jobs["trace"].build()
    ax = fig.axes[0]
    from matplotlib.collections import PathCollection

    # the scatter points (the error bars of each run's estimation error are LineCollections)
    pts = {tuple(p) for c in ax.collections if isinstance(c, PathCollection) for p in np.asarray(c.get_offsets())}
    measured = [k for k in known.values() if k["measures"]]
    expect = {(k["measures"]["trace"], 100 * k["attrs"]["ood_acc"]) for k in measured}
    assert len(pts) == len(expect)
    for x, y in expect:
        assert any(math.isclose(x, px, rel_tol=1e-12) and math.isclose(y, py, rel_tol=1e-12) for px, py in pts)
    tau = stats.kendalltau([k["measures"]["trace"] for k in measured], [k["attrs"]["ood_acc"] for k in measured])
    assert f"Kendall τ = {tau.statistic:.2f}" in ax.get_title()

    (job,) = _figures(collection, "bits_vs_ood")
    ax = job.build().axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "8", "FP"]
    qat4 = [k["attrs"]["ood_acc"] for k in known.values() if k["attrs"]["algorithm"] == "qat" and k["attrs"]["bits"] == 4]
    qat8 = [k["attrs"]["ood_acc"] for k in known.values() if k["attrs"]["algorithm"] == "qat" and k["attrs"]["bits"] == 8]
    assert any(np.allclose(ln.get_xdata(), [0, 1]) and np.allclose(ln.get_ydata(), [100 * np.mean(qat4), 100 * np.mean(qat8)])
               for ln in ax.get_lines())


def test_figure_scripts(demo: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = demo
    scripts = sorted((Path(__file__).resolve().parents[1] / "figures").glob("fig_*.py"))
    assert len(scripts) >= 7
    for script in scripts:
        out = tmp_path / script.stem
        monkeypatch.setattr(sys, "argv", [str(script), str(path), str(out), "--format", "png"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name="__main__")
        assert exit_info.value.code == 0, script.name
        assert list(out.glob("*.png")), script.name


def test_bad_inputs_exit_2_one_line(demo: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = demo
    for bad, words in write_non_results(tmp_path):
        _expect_error(["figures", str(bad)], capsys, words)
    _expect_error(["figures", str(path), "--measures", "sharpness"], capsys, "unknown measure 'sharpness'")
    _expect_error(["figures", str(path), "--format", "pdf,gif"], capsys, "unknown figure format gif")
    assert not (tmp_path / "notes_figures").exists()


def test_shared_direction_surfaces_are_compared_on_one_colour_scale(tmp_path: Path) -> None:
    import hashlib

    rng = np.random.default_rng(0)
    raw = rng.standard_normal((2, 40)).astype(np.float32)
    other = rng.standard_normal((2, 40)).astype(np.float32)
    digest = hashlib.sha256(np.ascontiguousarray(raw).tobytes()).hexdigest()
    xx, yy = np.meshgrid(XS, YS)
    path = tmp_path / "results.h5"

    def surface(run_id: str, name: str, scale: float, quantized: bool, draws: np.ndarray | None,
                reused: bool = False, xs: np.ndarray = XS) -> np.ndarray:
        gx, gy = np.meshgrid(xs, YS)
        z = scale * f_lin(gx, gy)
        arrays = {"xcoordinates": xs, "ycoordinates": YS, "train_loss": z, "test_loss": 2 * z,
                  "train_acc": z / 10, "test_acc": z / 20}
        attrs = {"format": "flatlab-surface", "kind": "reused2d-filter" if reused else "random2d-filter",
                 "norm": "filter", "weights": "effective (de-quantized)" if quantized else "full precision"}
        if draws is not None:
            arrays["raw_directions"] = draws
        if reused:
            attrs["directions_sha256"] = digest
        run_attrs = {"algorithm": "qat" if quantized else "erm", "seed": 0, "test_envs": [0], "domains": ["0", "15"],
                     **({"bits": 4} if quantized else {})}
        write_group(path, run_id, run_attrs, f"surfaces/{name}", arrays, attrs)
        return z

    z_fp = surface("a" * 16, "fp-2d", 1.0, False, raw)  # made the draws
    z_q = surface("b" * 16, "q-2d", 3.0, True, raw, reused=True)  # reused them
    surface("c" * 16, "other-2d", 2.0, True, other)  # its own draws: not comparable
    surface("d" * 16, "q-2d-wide", 2.0, True, raw, reused=True, xs=2 * XS)  # same draws, another grid
    collection = load_inputs([path])
    (job,) = _figures(collection, "contour_2d_shared")
    assert job.data["surfaces"][0].startswith("erm")  # full precision first
    fig = job.build()
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split(": ")[1] for ax in titled] == ["source", "target", "source", "target"]
    for col, scale in ((0, 1.0), (1, 2.0)):
        rows = [titled[col], titled[2 + col]]
        filled = [next(c for c in ax.collections if isinstance(c, ContourSet) and c.filled) for ax in rows]
        # one set of log-spaced levels spanning both models' losses
        np.testing.assert_array_equal(filled[0].levels, filled[1].levels)
        both = scale * np.concatenate([z_fp.ravel(), z_q.ravel()])
        np.testing.assert_allclose(filled[0].levels[[0, -1]], [both.min(), both.max()], rtol=1e-8)
    # 2 colour bars (one per column) besides the 4 panels
    assert len(fig.axes) == 6
    with pytest.raises(Exception, match="different grids"):
        wide = next(s for s in collection.surfaces if s.name == "q-2d-wide")
        splots.contour_2d_shared([collection.surfaces[0], wide])


def test_figures_draw_intervals(demo: tuple[Path, dict]) -> None:
    """Bits sweep: bootstrap CI of the mean over seeds; measure vs OOD: +-1.96 stderr per run."""
    from flatlab.report import build_rows, grouped_means

    path, known = demo
    collection = load_inputs([path])
    (job,) = _figures(collection, "bits_vs_ood")
    fig = job.build()
    ax = fig.axes[0]
    rows, _ = build_rows(collection)
    qat = next(g for g in grouped_means(rows, ["ood_acc"]) if g["algorithm"] == "qat" and g["bits_label"] == "4b")
    s = qat["stats"]["ood_acc"]
    assert s["n"] == 4 and s["ci_low"] < s["mean"] < s["ci_high"]
    # errorbar draws each bar as a vertical segment from the CI's low to its high end (in percent)
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    assert any(np.allclose(seg[:, 1], [100 * s["ci_low"], 100 * s["ci_high"]]) for seg in segments)
    assert "95% bootstrap CI" in fig.get_suptitle()

    jobs = {job.data["measure"]: job for job in _figures(collection, "measure_vs_ood")}
    ax = jobs["trace"].build().axes[0]
    widths = {round(float(seg[1, 0] - seg[0, 0]), 9) for c in ax.collections if hasattr(c, "get_segments")
              for seg in c.get_segments()}
    assert widths == {round(2 * 1.96 * 1.0, 9)}  # every run: +-1.96 trace_stderr (= 1 in make_results)
    assert "[" in ax.get_title() and "n = 12" in ax.get_title()  # tau with its CI


def test_claims_forest_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_claims import CLAIMS, FAST, make_study

    from flatlab.claims import evaluate_claims, load_claims
    from flatlab.plots import claims_forest
    from flatlab.plots.measures import VERDICT_COLORS

    path = tmp_path / "study.h5"
    make_study(path, seeds=5)
    claims = tmp_path / "claims.toml"
    claims.write_text(CLAIMS)
    report = evaluate_claims(load_claims(claims), load_inputs([path]), uncertainty=FAST)
    fig = claims_forest(report["results"])
    diff_ax, corr_ax = fig.axes[:2]
    testable = [r for r in report["results"] if r["verdict"] != "not testable"]
    drawn = [r for r in testable if r["kind"] != "correlation" and r["sd"] and r["sd"] > 0]
    labels = [t.get_text() for t in diff_ax.get_yticklabels()]
    assert set(labels) == {r["id"] for r in testable if r["kind"] != "correlation"}
    effects = [ln for ln in diff_ax.get_lines() if ln.get_gid() == "effect"]
    assert len(effects) == len(drawn)
    for r in drawn:  # standardized effect E / sd, in the verdict's colour
        assert sum(np.isclose(ln.get_xdata()[0], r["effect"] / r["sd"]) and
                   ln.get_color() == VERDICT_COLORS[r["verdict"]] for ln in effects) == 1
    (corr,) = [r for r in testable if r["kind"] == "correlation"]
    (point,) = [ln for ln in corr_ax.get_lines() if ln.get_gid() == "effect"]
    assert point.get_xdata()[0] == pytest.approx(corr["effect"])
    texts = fig.get_supxlabel()
    assert "not testable: two-bit (needs variant qat2)" in texts
    # through the command line: flatlab figures --claims
    out = tmp_path / "figs"
    assert main(["figures", str(path), "--out", str(out), "--format", "png", "--claims", str(claims),
                 "--measures", "trace", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    forest = [f for f in summary["figures"] if f["kind"] == "claims_forest"]
    assert len(forest) == 1 and forest[0]["counts"]["not testable"] == 2
    assert Path(forest[0]["files"][0]).read_bytes().startswith(b"\x89PNG")
    _expect_error(["figures", str(path), "--out", str(out), "--claims", str(tmp_path / "missing.toml")], capsys,
                  "no such claims file")


def test_correlation_titles_never_print_p_zero() -> None:
    from flatlab.plots.measures import correlation_title
    from flatlab.report import rank_correlation

    small = rank_correlation([1.0, 2.0, 3.0, 4.0], [0.4, 0.3, 0.2, 0.1])
    assert small["kendall_tau"] == -1.0 and math.isnan(small["kendall_p"]) and "n too small" in small["note"]
    assert "n too small" in correlation_title("trace", small) and "p =" not in correlation_title("trace", small)
    big = {"n": 40, "kendall_tau": -0.9, "kendall_p": 0.0, "spearman_rho": -0.95, "spearman_p": 1e-30,
           "kendall_ci": [-0.95, -0.85], "spearman_ci": [-0.97, -0.9]}
    title = correlation_title("trace", big)
    assert "0e+00" not in title and "(p < 0.001)" in title and "[-0.95, -0.85]" in title
