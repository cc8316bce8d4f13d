"""Python-API results are first-class: one call files them (write_result), the report and the
figures read them, to_dataframe equals `report --csv`, the figure builders take a Surface, and
the figures' --no-titles / --z-scale options."""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatlab
from flatlab.cli import main
from flatlab.curvature import HessianOperator, hutchpp_trace, lanczos_top_eigenvalues, slq_density
from flatlab.errors import ConfigError, FlatlabError
from flatlab.plots import surfaces as splots
from flatlab.plots.collect import figure_jobs
from flatlab.report import load_inputs
from flatlab.results import read_results
from flatlab.store import to_dataframe, write_result
from flatlab.surface import Surface, surface_of_model

XS = np.linspace(-1.0, 1.0, 5)


def _batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 4, generator=g)
    return [(x, x[:, :3].argmax(1))]  # learnable: the PAC-Bayes search needs accuracy above chance


def _model(seed: int) -> nn.Module:
    """A tiny MLP fitted for a moment to the labels of :func:`_batches`."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = _batches(10 + seed)[0]
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two tiny models measured and surfaced through the API, filed with write_result."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("api")
    path = folder / "api.h5"
    configs = [flatlab.TopEigenvaluesConfig(top_k=2), flatlab.TraceConfig(trace_products=9),
               flatlab.DensityConfig(density_steps=8), flatlab.PacBayesConfig(),
               flatlab.LocalFlatnessConfig(samples=4, gammas_rel=(0.05, 0.1))]
    out: dict = {"path": path, "folder": folder, "measurements": {}}
    for i, (algorithm, ood) in enumerate((("erm", 0.7), ("sam", 0.8))):
        model, source, target = _model(i), _batches(10 + i), _batches(20 + i)
        m = flatlab.measure_model(model, {"source": source, "target": target}, configs)
        run_id = write_result(path, m, run_id=f"mlp-{algorithm}",
                              attrs={"algorithm": algorithm, "seed": 0, "dataset": "rotated-digits",
                                     "domains": ["0", "15"], "test_envs": [0], "id_acc": 0.9, "ood_acc": ood})
        assert run_id == f"mlp-{algorithm}"
        out["measurements"][run_id] = m
        out[f"surface_{algorithm}"] = surface_of_model(model, source, target, x=XS, y=XS)
        write_result(path, out[f"surface_{algorithm}"], run_id=run_id)
        write_result(path, surface_of_model(model, source, target, x=XS), run_id=run_id)
    # The curvature functions' own results, one call each, into one run.
    model, source = _model(2), _batches(12)
    op = HessianOperator(model, source, F.cross_entropy)
    out["low"] = {"top": lanczos_top_eigenvalues(op, k=2), "trace": hutchpp_trace(op, num_products=9),
                  "density": slq_density(op, num_steps=8)}
    for key in ("trace", "top", "density"):  # one at a time: each adds to the curvature group
        write_result(path, out["low"][key], run_id="functions",
                     attrs={"algorithm": "erm", "seed": 1, "ood_acc": 0.6, "id_acc": 0.8} if key == "trace" else None)
    return out


def test_report_reads_every_api_result(api: dict, capsys: pytest.CaptureFixture) -> None:
    api["csv"] = api["folder"] / "report.csv"
    assert main(["report", str(api["path"]), "--csv", str(api["csv"]), "--json", "--quiet", "--resamples", "200",
                 "--radii", "0.05,0.1"]) == 0
    runs = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(runs) == {"mlp-erm", "mlp-sam", "functions"}
    for run_id, m in api["measurements"].items():
        row = runs[run_id]
        assert row["top_eigenvalue"] == max(m["top_eigenvalues"].payload["top_eigenvalues"])
        assert row["trace"] == m["trace"].payload["trace"]
        assert row["trace_stderr"] == m["trace"].payload["trace_stderr"]
        assert row["pacbayes_inv_sigma_sq"] == m.estimates()["pacbayes_inv_sigma_sq"].value
        lf = m["local_flatness"].payload
        for j, gamma in enumerate(lf["radii"]):
            assert row[f"local_flatness_target@{gamma:g}rel"] == lf["target"][j]
        assert row["ood_acc"] == {"mlp-erm": 0.7, "mlp-sam": 0.8}[run_id]
        assert row["test_domain"] == "0"
    low = runs["functions"]
    assert low["top_eigenvalue"] == float(np.max(api["low"]["top"].eigenvalues))
    assert low["trace"] == api["low"]["trace"].trace and low["trace_stderr"] == api["low"]["trace"].stderr


def test_stored_groups_have_the_cli_layout_and_provenance(api: dict) -> None:
    view = read_results(api["path"])["runs"]
    run = view["mlp-erm"]
    assert {"curvature", "bounds", "local_flatness", "surfaces"} <= set(run)
    assert {"random2d-filter", "random1d-filter"} <= set(run["surfaces"])
    curv = run["curvature"]["attrs"]
    for key in ("torch_threads", "torch_version", "flatlab_version", "measures_json"):
        assert key in curv
    surf = run["surfaces"]["random2d-filter"]
    assert surf["train_loss"].shape == (len(XS), len(XS))
    assert surf["attrs"]["settings_fingerprint"] and surf["attrs"]["torch_threads"] == 1
    assert run["attrs"]["versions"]["flatlab"] == flatlab.__version__
    assert run["attrs"]["algorithm"] == "erm"  # kept when the surface was added afterwards
    # The three function results written one at a time all stay in one group.
    low = view["functions"]["curvature"]
    assert {"top_eigenvalues", "residuals", "trace", "trace_stderr", "density", "density_grid"} <= set(low)
    assert set(low["attrs"]["measures_json"]) == {"top_eigenvalues", "trace", "density"}  # JSON, read back
    assert low["attrs"]["hvps"] == sum(r.products for r in api["low"].values())


def test_measure_model_resumes_from_a_written_measurement(api: dict, tmp_path: Path) -> None:
    path = tmp_path / "again.h5"
    model, source, target = _model(0), _batches(10), _batches(20)
    configs = [flatlab.TopEigenvaluesConfig(top_k=2), flatlab.TraceConfig(trace_products=9)]
    m = flatlab.measure_model(model, {"source": source, "target": target}, configs)
    write_result(path, m, run_id="r")
    again = flatlab.measure_model(model, {"source": source, "target": target}, configs, results=path, run_id="r")
    assert sorted(again.resumed) == ["top_eigenvalues", "trace"]


def test_figures_draw_the_api_results(api: dict, capsys: pytest.CaptureFixture) -> None:
    out = api["folder"] / "figs"
    # png and one measure keep it fast; HTML and the z scales are drawn in test_z_scales
    assert main(["figures", str(api["path"]), "--out", str(out), "--format", "png,vtp", "--measures", "trace",
                 "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    kinds = {f["kind"] for f in summary["figures"]}
    # Both models' surfaces used seed 0 on one architecture: they share their draws.
    assert {"loss_curves_1d", "contour_2d", "surface_3d", "contour_2d_shared", "spectral_density",
            "local_flatness", "measure_vs_ood"} <= kinds
    for fig in summary["figures"]:
        assert all(Path(f).stat().st_size > 500 for f in fig["files"])
    # Titles show runs in words, never a run id's hex.
    jobs, _ = figure_jobs(load_inputs([api["path"]]))
    contour = next(j for j in jobs if j.kind == "contour_2d").build()
    assert contour.get_suptitle().startswith("erm seed 0, test 0°, random2d-filter")


def test_to_dataframe_equals_report_csv(api: dict) -> None:
    frame = to_dataframe(api["path"], radii=[0.05, 0.1])
    with open(api["csv"], newline="") as fh:
        rows = list(csv.reader(fh))
    assert list(frame.columns) == rows[0]
    assert len(frame) == len(rows) - 1 == 3
    for (_, record), cells in zip(frame.iterrows(), rows[1:]):
        for column, cell in zip(rows[0], cells):
            value = record[column]
            if cell == "":
                assert value is None or (isinstance(value, float) and math.isnan(value)), (column, value)
            elif isinstance(value, (float, np.floating)):
                assert float(cell) == value, column
            else:
                assert str(value) == cell, column
    assert flatlab.to_dataframe is to_dataframe and flatlab.write_result is write_result


def test_to_dataframe_without_pandas_says_how_to_install(api: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(FlatlabError, match="pip install pandas"):
        to_dataframe(api["path"])


def test_write_result_names_its_bad_parameters(api: dict, tmp_path: Path) -> None:
    m = next(iter(api["measurements"].values()))
    with pytest.raises(ConfigError, match="^run_id must name the run"):
        write_result(tmp_path / "x.h5", m)
    with pytest.raises(ConfigError, match="^run_id must be letters"):
        write_result(tmp_path / "x.h5", m, run_id="../up")
    with pytest.raises(ConfigError, match="^config is a TraceConfig"):
        write_result(tmp_path / "x.h5", api["low"]["top"], run_id="r", config=flatlab.TraceConfig())
    with pytest.raises(FlatlabError, match="cannot store a dict"):
        write_result(tmp_path / "x.h5", {"trace": 1.0}, run_id="r")
    # Another split into a group that holds the source split's eigenvalues: refused, not mixed.
    path = tmp_path / "y.h5"
    write_result(path, api["low"]["top"], run_id="r")
    with pytest.raises(FlatlabError, match="measured with split 'source'"):
        write_result(path, api["low"]["trace"], run_id="r", config=flatlab.TraceConfig(split="target"))
    write_result(path, api["low"]["trace"], run_id="r", config=flatlab.TraceConfig(split="target"), merge=False)
    assert "top_eigenvalues" not in read_results(path)["runs"]["r"]["curvature"]
    assert not (tmp_path / "x.h5").exists()


def test_builders_take_an_api_surface(api: dict, tmp_path: Path) -> None:
    s2d: Surface = api["surface_erm"]
    assert s2d.display_label == "random 2D surface (filter-normalized, seed 0)"
    fig = splots.contour_2d(s2d, "t", label="tiny MLP")
    assert fig.get_suptitle() == "t" and len(fig.axes) == 4  # two panels, two colour bars
    fig = splots.surface_3d(s2d)
    assert len(fig.axes) == 4  # each panel has its colour bar
    html = splots.surface_html(s2d)
    assert "random 2D surface (filter-normalized, seed 0)" in html
    s1d = surface_of_model(_model(0), _batches(10), None, x=XS, label="no target")
    fig = splots.loss_curves_1d([s1d, replace(s1d, label=None)])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["no target", "random 1D surface (filter-normalized, seed 0)"]
    fig = splots.loss_curves_1d([s1d], labels=["mine"])
    assert fig.legends[0].get_texts()[0].get_text() == "mine"
    fig = splots.contour_2d_shared([api["surface_erm"], api["surface_sam"]], labels=["erm", "sam"])
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["erm: source", "erm: target", "sam: source",
                                                                     "sam: target"]
    vtp = splots.write_vtp(tmp_path / "s.vtp", s2d)
    assert vtp.read_text().startswith("<?xml")
    with pytest.raises(FlatlabError, match="must be a flatlab.surface.Surface"):
        splots.contour_2d({"x": 1})
    with pytest.raises(ConfigError, match="^labels must give one label per curve"):
        splots.loss_curves_1d([s1d], labels=["a", "b"])


def test_no_titles_gives_untitled_figures(api: dict) -> None:
    jobs, _ = figure_jobs(load_inputs([api["path"]]), titles=False)
    built = [j for j in jobs if j.build is not None]
    assert {"contour_2d", "surface_3d", "loss_curves_1d", "spectral_density", "local_flatness"} <= {j.kind for j in built}
    for job in built:
        fig = job.build()
        assert fig.get_suptitle() == "", job.kind
        assert all(ax.get_title(loc) == "" for ax in fig.axes for loc in ("left", "center", "right")), job.kind
    contour = next(j for j in built if j.kind == "contour_2d").build()
    bars = [ax.get_ylabel() for ax in contour.axes if ax.get_ylabel().startswith(("source", "target"))]
    assert bars == ["source loss (cross-entropy, nats)", "target loss (cross-entropy, nats)"]  # panels still named
    html = next(j for j in jobs if j.kind == "surface_3d").html()
    assert "source (source domains)" not in html
    titled, _ = figure_jobs(load_inputs([api["path"]]))
    assert next(j for j in titled if j.kind == "contour_2d").build().get_suptitle() != ""


def test_z_scales(api: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    s = api["surface_erm"]
    loss = s.values["train_loss"]
    drawn, label = splots.scaled_z(loss, "log")
    np.testing.assert_allclose(drawn, np.log10(loss))
    drawn, label = splots.scaled_z(loss, "clip", 0.95)
    q = np.quantile(loss, 0.95)
    assert drawn.max() == pytest.approx(q) and "95th percentile" in label and f"{q:.3g}" in label
    fig = splots.surface_3d(s, z_scale="clip")
    bar_labels = [ax.get_ylabel() for ax in fig.axes if "clipped" in ax.get_ylabel()]
    assert len(bar_labels) == 2
    assert json.dumps("log₁₀ loss")[1:-1] in splots.surface_html(s, z_scale="log")  # plotly escapes non-ASCII
    surface_only = tmp_path / "surface.h5"
    write_result(surface_only, s, run_id="mlp", name="plane")
    for scale in ("log", "clip"):
        out = tmp_path / scale
        assert main(["figures", str(surface_only), "--out", str(out), "--format", "png,html", "--z-scale", scale,
                     "--quiet", *(["--no-titles"] if scale == "log" else [])]) == 0
        assert list(out.glob("surface3d_*plane.png")) and list(out.glob("surface3d_*plane.html"))
    capsys.readouterr()
    assert main(["figures", str(surface_only), "--out", str(tmp_path / "bad"), "--z-scale", "cubic"]) == 2
    err = capsys.readouterr().err
    assert err == "flatlab: error: --z-scale must be one of linear, log, clip, got 'cubic'\n"
    assert main(["figures", str(surface_only), "--out", str(tmp_path / "bad"), "--z-scale", "clip",
                 "--clip-quantile", "1.5"]) == 2
    assert capsys.readouterr().err.startswith("flatlab: error: --clip-quantile must be a number in (0, 1]")
    assert not (tmp_path / "bad").exists()
