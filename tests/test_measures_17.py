"""The issue-17 measures through the registry: fixed-radius sharpness, relative flatness, per-domain
curvature, and loss barriers (runner, command, sweep sections, report columns, figures).

For each registered measure the registry contract (flag on ``flatlab sharpness``, study section
accepted by ``flatlab sweep --dry-run``, value -> results file -> ``flatlab report --csv``, axis
label, a rerun resumed); the values checked against the library functions they wire (truth-tested
in their own files) and, where cheap, against dense float64 Hessians; the bad-input contracts
(one ``flatlab: error:`` line, exit status 2, no file).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cases import BARRIER_STUDY, ERM_STUDY, one_error_line, refused_study, write_study

from flatlab.cli import main

NEW = ("sharpness", "relative_flatness", "per_domain")
SETTINGS = {"max_samples": 90, "batch_size": 64, "device": "cpu"}


def _train(out: Path, **kwargs: Any) -> Path:
    from flatlab.train import TrainConfig, train

    train(TrainConfig(out=str(out), quiet=True, **kwargs))
    return out


@pytest.fixture(scope="module")
def mlp_other(tmp_path_factory) -> Path:
    """A second MLP of mlp_run's architecture and split (seed 1, trial seed 0), briefly trained."""
    return _train(tmp_path_factory.mktemp("runs17") / "mlp-s1", steps=60, eval_every=30, model="mlp",
                  model_options={"width": 8, "depth": 1}, dataset_options={"resolution": 8}, seed=1, trial_seed=0)


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory) -> Path:
    """Another architecture (a CNN) on the same 8x8 data."""
    return _train(tmp_path_factory.mktemp("runs17") / "cnn", steps=4, eval_every=2, model="cnn",
                  model_options={"width": 4}, dataset_options={"resolution": 8}, seed=0)


@pytest.fixture(scope="module")
def qat_mlp(tmp_path_factory) -> Path:
    """mlp_run's architecture and split, 4-bit QAT (a few steps: only its format matters here)."""
    return _train(tmp_path_factory.mktemp("runs17") / "qat-mlp", steps=20, eval_every=10, model="mlp",
                  model_options={"width": 8, "depth": 1}, dataset_options={"resolution": 8}, seed=0,
                  algorithm="qat", hparam_flags={"bits": 4, "quant_start": 10})


def _configs() -> list[Any]:
    from flatlab.measures import PerDomainConfig, RelativeFlatnessMeasureConfig, SharpnessConfig

    return [SharpnessConfig(steps=3, samples=4, m=30), RelativeFlatnessMeasureConfig(),
            PerDomainConfig(top_k=2, trace_products=6)]


@pytest.fixture(scope="module")
def measured(mlp_run: Path, tmp_path_factory) -> dict[str, Any]:
    from flatlab.measures import MeasurementSettings
    from flatlab.pipeline import measure_checkpoint

    out = tmp_path_factory.mktemp("m17") / "results.h5"
    first = measure_checkpoint(mlp_run, _configs(), settings=MeasurementSettings(**SETTINGS), results=out)
    return {"path": out, "first": first}


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    # Python warning lines (a library's notes on these commands) are not the refusal.
    return one_error_line(capsys, skip_warnings=True)


# --- the registry contract, measure by measure ----------------------------------------------------

@pytest.mark.parametrize("name", NEW)
def test_flags_are_on_the_sharpness_help(name: str, capsys):
    from flatlab.measures import get_measure

    with pytest.raises(SystemExit):
        main(["sharpness", "--help"])
    text = capsys.readouterr().out
    measure = get_measure(name)
    assert measure.request_flag in text
    for spec in measure.config.setting_specs():
        assert spec.flag in text, spec.flag


@pytest.mark.parametrize("name, section", [
    ("sharpness", "[measure.sharpness]\nrho = 0.005\np = inf\nscalings = [\"adaptive\"]\nkinds = [\"worst\"]\n"
                  "m = 16\nsteps = 3"),
    ("relative_flatness", "[measure.relative_flatness]\nlayer = \"classifier\"\nmethod = \"hutch++\"\nproducts = 6"),
    ("per_domain", "[measure.per_domain]\ntop_k = 3\ntrace_products = 6\nsource_part = \"out\""),
])
def test_study_section_is_accepted_by_dry_run(name: str, section: str, tmp_path: Path, capsys):
    study = write_study(tmp_path, ERM_STUDY + "[measure]\nmax_samples = 50\n\n" + section + "\n")
    assert main(["sweep", str(study), "--dry-run", "--json", "--quiet", "--out", str(tmp_path / "o")]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["jobs"][0]["steps"] == [name]
    assert payload["estimated_seconds"] >= 0
    from flatlab.measures import get_measure
    from flatlab.sweep import expand_jobs, load_study

    definition = json.loads(json.dumps(expand_jobs(load_study(study))[0].definition))  # as job.json holds it
    ((step_name, step),) = definition["steps"]
    (entry,) = step["measures"]
    assert step_name == name and entry["measure"] == name
    get_measure(name).config(**entry["config"])  # what a worker rebuilds from job.json


@pytest.mark.parametrize("name", NEW)
def test_value_round_trips_through_results_and_report_csv(name: str, measured: dict[str, Any], capsys):
    from flatlab.measures import get_measure
    from flatlab.measures.registry import axis_label
    from flatlab.results import read_results

    measure = get_measure(name)
    (run,) = read_results(measured["path"])["runs"].values()
    assert measure.group in run
    columns = {k: e for k, e in measured["first"].estimates().items()
               if any(c.matches(k) for c in measure.columns)}
    assert columns, f"{name}: no column"
    csv_path = measured["path"].with_suffix(f".{name}.csv")
    assert main(["report", str(measured["path"]), "--csv", str(csv_path), "--quiet"]) == 0
    (row,) = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    for key, est in columns.items():
        assert math.isclose(float(row[key]), est.value, rel_tol=1e-12), key
        label = axis_label(key)
        assert label and label != key


def test_stderrs_are_read_back(measured: dict[str, Any]):
    est = measured["first"].estimates()
    payload = measured["first"]["sharpness"].payload
    # m = 30 of 90 samples: three subsets, so the worst case has a standard error over subsets
    assert est["sharpness_adaptive_worst"].stderr == pytest.approx(payload["adaptive_worst_stderr"])
    assert est["sharpness_adaptive_worst"].stderr > 0
    assert est["sharpness_standard_average"].stderr > 0
    assert est["relative_flatness"].stderr == 0.0  # the classifier (10 x 8) is computed exactly
    assert est["per_domain_trace_target"].stderr is not None and est["per_domain_trace_target"].stderr > 0
    assert est["per_domain_top_eigenvalue_target"].stderr is None  # Lanczos: no sampling error


def test_rerun_with_the_same_settings_is_resumed_not_recomputed(mlp_run: Path, measured: dict[str, Any],
                                                                  monkeypatch):
    from flatlab.measures import MeasurementSettings, registry
    from flatlab.pipeline import measure_checkpoint

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("recomputed instead of resumed")

    for name in NEW:
        monkeypatch.setitem(registry.MEASURES, name, dataclasses.replace(registry.MEASURES[name], compute=refuse))
    again = measure_checkpoint(mlp_run, _configs(), settings=MeasurementSettings(**SETTINGS), results=measured["path"])
    assert again.resumed == list(NEW)
    for name in NEW:
        assert json.dumps(again[name].payload, default=str) == json.dumps(measured["first"][name].payload, default=str)


# --- the values against the library and against truth ---------------------------------------------

def _source(mlp_run: Path, split: str = "source") -> tuple[Any, list[Any]]:
    from flatlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(mlp_run / "model.pt")
    torch.manual_seed(0)
    model = ckpt.build_model("cpu", effective=True)
    batches = ckpt.splits().split_batches(split, SETTINGS["batch_size"], SETTINGS["max_samples"], 0, "cpu")
    return model, batches


def test_sharpness_equals_the_library_at_the_matched_standard_radius(mlp_run: Path, measured: dict[str, Any]):
    from flatlab.sharpness import AdaptiveSharpnessConfig, adaptive_sharpness

    model, batches = _source(mlp_run)
    payload = measured["first"]["sharpness"].payload
    weights = torch.cat([p.detach().double().ravel() for p in model.parameters()])
    rms = float(weights.pow(2).mean().sqrt())
    assert payload["weight_rms"] == pytest.approx(rms, rel=1e-12)
    assert payload["rho_standard"] == pytest.approx(0.002 * rms, rel=1e-12)
    for scaling in ("adaptive", "standard"):
        for kind in ("worst", "average"):
            rho = 0.002 if scaling == "adaptive" else payload["rho_standard"]
            lib = adaptive_sharpness(model, batches, AdaptiveSharpnessConfig(
                rho=rho, kind=kind, scaling=scaling, p="inf", m=30, steps=3, samples=4, seed=0))
            assert payload[f"{scaling}_{kind}"] == pytest.approx(lib.value, rel=1e-9, abs=1e-12)
    # the matched radius gives both average-case sets the same mean squared perturbation:
    # E||rho c z||^2 = rho^2 sum c_i^2 / 3 for c = |w| at rho, and c = 1 at rho x rms(w)
    n = weights.numel()
    assert (0.002 ** 2 * float(weights.pow(2).sum()) / 3) == pytest.approx(payload["rho_standard"] ** 2 * n / 3)


def test_relative_flatness_equals_the_dense_double_sum(mlp_run: Path, measured: dict[str, Any]):
    from flatlab.curvature.dense import dense_hessian

    model, batches = _source(mlp_run)
    weight = model.classifier.weight.detach().double()
    h = dense_hessian(model, batches, params=["classifier.weight"], max_params=weight.numel()).detach().double()
    d, n = weight.shape
    blocks = h.reshape(d, n, d, n)
    truth = sum(float(weight[s] @ weight[t]) * float(torch.einsum("ii->", blocks[s, :, t, :]))
                for s in range(d) for t in range(d))
    assert measured["first"]["relative_flatness"].payload["kappa"] == pytest.approx(truth, rel=1e-8)


def test_per_domain_top_eigenvalue_within_its_residual_of_the_dense_spectrum(mlp_run: Path,
                                                                             measured: dict[str, Any]):
    from flatlab.checkpoint import load_checkpoint
    from flatlab.curvature.dense import dense_hessian
    from flatlab.curvature.per_domain import domain_batches

    payload = measured["first"]["per_domain"].payload
    ckpt = load_checkpoint(mlp_run / "model.pt")
    assert payload["targets"] == ["0"] and payload["domains"][-1] == "0"
    domains = domain_batches(ckpt.splits(), batch_size=64, max_samples=90, seed=0)
    assert list(domains) == payload["domains"]
    model, _ = _source(mlp_run)
    for i in (0, len(domains) - 1):  # one source domain and the target
        name = payload["domains"][i]
        spectrum = np.linalg.eigvalsh(dense_hessian(model, domains[name]).detach().double().numpy())[::-1]
        for j in range(2):
            assert abs(payload["eigenvalues"][i][j] - spectrum[j]) <= payload["residuals"][i][j] + 1e-6
        truth = float(np.sum(spectrum))
        assert abs(payload["traces"][i] - truth) <= 4 * payload["trace_stderrs"][i] + 1e-6
    # the columns are the stated means of the stored arrays
    overlap = np.asarray(payload["overlap"])
    assert payload["per_domain_mean_overlap_target_source"] == pytest.approx(overlap[-1, :-1].mean())
    off = overlap[:-1, :-1][~np.eye(5, dtype=bool)]
    assert payload["per_domain_mean_overlap_source_source"] == pytest.approx(off.mean())
    assert payload["per_domain_top_eigenvalue_source"] == pytest.approx(np.mean([e[0] for e in payload["eigenvalues"][:-1]]))
    assert payload["per_domain_trace_target_stderr"] == pytest.approx(payload["trace_stderrs"][-1])


def test_per_domain_sample_cap_is_its_own(mlp_run: Path):
    from flatlab.measures import MeasurementSettings, PerDomainConfig
    from flatlab.pipeline import measure_checkpoint

    out = measure_checkpoint(mlp_run, [PerDomainConfig(top_k=2, trace_products=0, max_samples=40)],
                             settings=MeasurementSettings(**SETTINGS))
    assert out["per_domain"].payload["num_samples"] == [40] * 6
    assert out["per_domain"].payload["max_samples_per_domain"] == 40


def test_model_context_domains_are_the_named_splits_or_the_given_domains(mlp_run: Path):
    from flatlab.measures import MeasurementSettings, PerDomainConfig
    from flatlab.pipeline import measure_model

    model, batches = _source(mlp_run)
    out = measure_model(model, {"source": batches[:1], "target": batches[1:]}, [PerDomainConfig(top_k=2,
                        trace_products=0)], settings=MeasurementSettings(device="cpu"))
    assert out["per_domain"].payload["domains"] == ["source", "target"]
    assert out["per_domain"].payload["targets"] == ["target"]
    est = out.estimates()
    assert "per_domain_trace_target" not in est  # trace_products = 0 skips the trace
    assert est["per_domain_mean_overlap_target_source"].value == pytest.approx(out["per_domain"].payload["overlap"][1][0])
    three = measure_model(model, {"source": batches}, [PerDomainConfig(top_k=2, trace_products=0)],
                          domains={"a": batches[:1], "b": batches[1:], "c": batches}, target_domains=["c"],
                          settings=MeasurementSettings(device="cpu"))
    assert three["per_domain"].payload["targets"] == ["c"]
    assert "per_domain_mean_overlap_source_source" in three.estimates()


def test_quantized_checkpoint_effective_by_default_latent_on_request(qat_mlp: Path, mlp_run: Path, tmp_path: Path,
                                                                      capsys):
    from flatlab.checkpoint import load_checkpoint
    from flatlab.measures import MeasurementSettings, PerDomainConfig, SharpnessConfig
    from flatlab.pipeline import measure_checkpoint
    from flatlab.sharpness import AdaptiveSharpnessConfig, adaptive_sharpness

    settings = MeasurementSettings(**SETTINGS)
    cheap = {"kinds": ("average",), "scalings": ("adaptive",), "samples": 4}
    eff = measure_checkpoint(qat_mlp, [SharpnessConfig(**cheap), PerDomainConfig(top_k=1, trace_products=0,
                                                                                 max_samples=30)], settings=settings)
    lat = measure_checkpoint(qat_mlp, [SharpnessConfig(wrt="latent", **cheap)], settings=settings)
    assert eff["sharpness"].payload["wrt"] == "effective" and lat["sharpness"].payload["wrt"] == "latent"
    assert eff["per_domain"].payload["wrt"] == "effective"
    ckpt = load_checkpoint(qat_mlp / "model.pt")
    torch.manual_seed(0)
    deployed = ckpt.build_model("cpu", effective=True)
    batches = ckpt.splits().split_batches("source", 64, 90, 0, "cpu")
    lib = adaptive_sharpness(deployed, batches, AdaptiveSharpnessConfig(rho=0.002, kind="average", p="inf",
                                                                        samples=4))
    assert eff["sharpness"].payload["adaptive_average"] == pytest.approx(lib.value, rel=1e-9, abs=1e-12)
    # an FP model and a quantized one of one architecture share a line
    assert main(["barrier", str(mlp_run), str(qat_mlp), "--points", "3", "--max-samples", "40", "--json",
                 "--quiet"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["models"]["model2_bits"] == 4 and line["target"]["loss_barrier"] >= 0


# --- the CLI: families kept apart, bad input ------------------------------------------------------

def test_setting_names_repeat_across_families_but_values_stay_apart():
    from flatlab.cli import build_parser
    from flatlab.commands.sharpness import configs_from_args

    args = build_parser().parse_args(["sharpness", "x.pt", "--top-k", "3", "--per-domain", "--per-domain-top-k", "2",
                                      "--adaptive-sharpness", "--sharpness-samples", "6", "--local-flatness",
                                      "--flatness-samples", "9", "--sharpness-p", "2",
                                      "--sharpness-kinds", "average"])
    configs, _ = configs_from_args(args)
    by_name = {c.measure: c for c in configs}
    assert by_name["top_eigenvalues"].top_k == 3 and by_name["per_domain"].top_k == 2
    assert by_name["sharpness"].samples == 6 and by_name["local_flatness"].samples == 9
    assert by_name["sharpness"].p == 2.0 and by_name["sharpness"].kinds == ("average",)


def test_check_registry_refuses_a_flag_used_by_two_families(monkeypatch):
    from flatlab.errors import FlatlabError
    from flatlab.measures import registry
    from flatlab.measures.base import Family
    from flatlab.measures.config import MeasureConfig, setting

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Clash(MeasureConfig):
        measure = "clash"
        anything: int = setting(1, "collides with per-domain curvature's flag", flag="--per-domain-top-k")

    family = Family("clashing", "a test family", request="section", nest=True)
    base = registry.MEASURES["relative_flatness"]
    monkeypatch.setitem(registry.FAMILIES, "clashing", family)
    monkeypatch.setitem(registry.MEASURES, "clash", dataclasses.replace(base, name="clash", family="clashing",
                                                                         config=Clash, columns=(),
                                                                         request_flag="--clash"))
    with pytest.raises(FlatlabError, match=r"flag --per-domain-top-k of clash.anything is also per_domain.top_k"):
        registry.check_registry()
    monkeypatch.setitem(registry.MEASURES, "clash", dataclasses.replace(base, name="clash", family="clashing",
                                                                         config=Clash, columns=(),
                                                                         request_flag="--trace"))
    with pytest.raises(FlatlabError, match=r"request flag --trace of clash is also trace's request flag"):
        registry.check_registry()


@pytest.mark.parametrize("extra, needle", [
    # --top-k would run first: it must not leave a group either (every check runs before any compute)
    (["--top-k", "2", "--relative-flatness", "--relative-flatness-layer", "fc9"],
     "--relative-flatness-layer = 'fc9' is not a layer of the model (its nn.Linear layers: 'features.1', 'classifier')"),
    (["--top-k", "2", "--adaptive-sharpness", "--sharpness-rho", "0"], "--sharpness-rho must be positive, got 0"),
    (["--adaptive-sharpness", "--sharpness-rho", "-1"], "--sharpness-rho must be positive, got -1"),
    (["--top-k", "2", "--adaptive-sharpness", "--sharpness-m", "100000"],
     "--sharpness-m must be at most the number of measured samples (40 in source), got 100000"),
    (["--per-domain", "--per-domain-trace-products", "2"],
     "--per-domain-trace-products = 2 is too few for hutch++"),
    (["--adaptive-sharpness", "--sharpness-scalings", "adaptive,odd"], "--sharpness-scalings must be made of"),
])
def test_bad_input_is_one_line_exit_2_no_file(mlp_run: Path, tmp_path: Path, capsys, extra, needle):
    out = tmp_path / "r.h5"
    assert main(["sharpness", str(mlp_run), "--max-samples", "40", "--results", str(out), *extra]) == 2
    assert needle in _one_error_line(capsys)
    assert not out.exists()


def test_norm_outside_2_and_inf_is_refused_by_the_parser(mlp_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "r.h5"
    with pytest.raises(SystemExit) as exc:
        main(["sharpness", str(mlp_run), "--adaptive-sharpness", "--sharpness-p", "3", "--results", str(out)])
    assert exc.value.code == 2
    assert "argument --sharpness-p: invalid choice: 3.0 (choose from 2.0, inf)" in _one_error_line(capsys)
    assert not out.exists()
    from flatlab.measures import ConfigError, SharpnessConfig

    with pytest.raises(ConfigError, match="p must be 2 or inf, got 1"):
        SharpnessConfig(p=1)
    assert SharpnessConfig(p="inf").p == math.inf and SharpnessConfig(p=2).settings()["p"] == 2


@pytest.mark.parametrize("section, needle", [
    ("[measure.sharpness]\nrho = 0", "[measure.sharpness] rho must be positive, got 0"),
    ("[measure.sharpness]\np = 3", "[measure.sharpness] p must be 2 or inf, got 3"),
    ("[measure.sharpness]\nkinds = [\"worst\", \"worst\"]", "kinds lists worst, worst: give each once"),
    ("[measure.relative_flatness]\nproducts = 1", "[measure.relative_flatness] products must be at least 2"),
    ("[measure.per_domain]\ntopk = 3", "unknown key 'topk' in [measure.per_domain]"),
])
def test_bad_study_section_is_one_line_exit_2(section: str, needle: str, tmp_path: Path, capsys):
    assert needle in refused_study(tmp_path, capsys, ERM_STUDY + section + "\n", "--dry-run", skip_warnings=True)


# --- barriers -------------------------------------------------------------------------------------

def _barrier_truth(mlp_run: Path, other: Path, points: int) -> Any:
    from flatlab.checkpoint import load_checkpoint
    from flatlab.surface.barrier import BarrierConfig, loss_barrier

    a, b = load_checkpoint(mlp_run / "model.pt"), load_checkpoint(other / "model.pt")
    splits = a.splits()
    data = {s: splits.split_batches(s, 512, 80, 0, "cpu") for s in ("source", "target")}
    return loss_barrier(a.build_model("cpu", effective=True), b.build_model("cpu", effective=True), data,
                        config=BarrierConfig(num_points=points))


def test_barrier_command_stores_reuses_and_reports(mlp_run: Path, mlp_other: Path, tmp_path: Path, capsys,
                                                   monkeypatch):
    from flatlab.measures.registry import axis_label
    from flatlab.results import read_results, run_id_for

    results = tmp_path / "r.h5"
    cmd = ["barrier", str(mlp_run), str(mlp_other), "--points", "5", "--max-samples", "80", "--results",
           str(results), "--name", "s0-s1", "--json", "--quiet"]
    assert main(cmd) == 0
    first = json.loads(capsys.readouterr().out)
    truth = _barrier_truth(mlp_run, mlp_other, 5)
    for split in ("source", "target"):
        prof = truth.splits[split]
        assert first[split]["loss_barrier"] == pytest.approx(prof.loss_barrier, rel=1e-12)
        assert first[split]["loss_barrier_stderr"] == pytest.approx(prof.loss_barrier_stderr, rel=1e-12)
        assert first[split]["losses"] == pytest.approx(list(prof.losses), rel=1e-12)
    assert first["run_id"] == run_id_for(mlp_run) and not first["reused"]
    node = read_results(results)["runs"][run_id_for(mlp_run)]["barriers"]["s0-s1"]
    assert node["attrs"]["model2_run_id"] == run_id_for(mlp_other)
    assert node["attrs"]["model2_sha256"] and node["attrs"]["kind"] == "line"

    import flatlab.surface.barrier as barrier_module

    monkeypatch.setattr(barrier_module, "loss_barrier", lambda *a, **k: pytest.fail("recomputed"))
    assert main(cmd) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reused"] and again["target"] == first["target"]
    monkeypatch.undo()
    assert main([*cmd[:3], "--points", "3", *cmd[5:]]) == 0  # other settings: computed again
    assert not json.loads(capsys.readouterr().out)["reused"]

    csv_path = tmp_path / "r.csv"
    assert main(["report", str(results), "--csv", str(csv_path), "--quiet"]) == 0
    (row,) = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert row["run_id"] == run_id_for(mlp_run)
    stored = read_results(results)["runs"][run_id_for(mlp_run)]["barriers"]["s0-s1"]["attrs"]
    assert float(row["barrier_loss_target@s0-s1"]) == pytest.approx(stored["loss_barrier_target"])
    assert float(row["barrier_error_source@s0-s1"]) == pytest.approx(stored["error_barrier_source"])
    assert axis_label("barrier_loss_target@s0-s1") == "loss barrier on target, s0-s1 (nats)"


def test_barrier_between_different_architectures_is_one_line_and_no_file(mlp_run: Path, tiny_cnn: Path,
                                                                          tmp_path: Path, capsys):
    out = tmp_path / "r.h5"
    assert main(["barrier", str(mlp_run), str(tiny_cnn), "--results", str(out)]) == 2
    assert "CKPT1 and CKPT2 have different architectures" in _one_error_line(capsys)
    assert not out.exists()
    assert main(["barrier", str(mlp_run), str(mlp_run)]) == 2
    assert "are the same checkpoint" in _one_error_line(capsys)
    assert main(["barrier", str(mlp_run), str(tiny_cnn), "--points", "1"]) == 2
    assert "--points must be an integer of at least 2, got 1" in _one_error_line(capsys)
    assert main(["barrier", str(mlp_run), str(tiny_cnn), "--name", "x"]) == 2
    assert "--name names the barrier inside a results file" in _one_error_line(capsys)


def test_member_barriers_matrix_and_figures(mlp_run: Path, mlp_other: Path, measured: dict[str, Any],
                                            tmp_path: Path, capsys):
    from flatlab.ensemble import (
        ensemble_id,
        evaluate_ensemble,
        load_members,
        write_ensemble_results,
    )
    from flatlab.io import sha256_file
    from flatlab.results import read_results
    from flatlab.surface.barrier_runner import MemberBarrierRequest, run_member_barriers

    results = tmp_path / "r.h5"
    shutil.copyfile(measured["path"], results)  # a run with per-domain curvature: its overlap map
    members = load_members([mlp_run / "model.pt", mlp_other / "model.pt"])
    write_ensemble_results(results, members, evaluate_ensemble(members, "cpu", 512))
    outcome = run_member_barriers(MemberBarrierRequest(members=[str(mlp_run), str(mlp_other)], points=5,
                                                       max_samples=80, results=str(results)))
    run_id = ensemble_id([sha256_file(m.path) for m in members])
    assert outcome.run_id == run_id
    run = read_results(results)["runs"][run_id]
    assert run["attrs"]["algorithm"] == "ensemble" and "ensemble" in run  # the ensemble's run kept its attributes
    truth = _barrier_truth(mlp_run, mlp_other, 5)
    matrix = np.asarray(run["barriers"]["members"]["target"]["loss_barriers"])
    assert matrix[0, 1] == matrix[1, 0] == pytest.approx(truth.splits["target"].loss_barrier, rel=1e-12)
    assert run["barriers"]["members"]["attrs"]["loss_barrier_target"] == pytest.approx(matrix[0, 1])
    assert main(["barrier", str(mlp_run), str(mlp_other), "--points", "5", "--max-samples", "80",
                 "--results", str(results), "--name", "line", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "figs"
    assert main(["figures", str(results), "--out", str(out), "--format", "png", "--json", "--quiet"]) == 0
    figures = json.loads(capsys.readouterr().out)["figures"]
    kinds = {f["kind"]: f for f in figures}
    assert {"eigenspace_overlap", "barrier_line", "barrier_matrix"} <= set(kinds)
    for kind in ("eigenspace_overlap", "barrier_line", "barrier_matrix"):
        assert all(Path(f).stat().st_size > 1000 for f in kinds[kind]["files"])


def test_merged_results_keep_every_child_of_a_container(tmp_path: Path):
    from flatlab.results import merge_results, read_results, write_group

    write_group(tmp_path / "a.h5", "r1", {"x": 1}, "barriers/one", {"alphas": [0.0, 1.0]})
    write_group(tmp_path / "b.h5", "r1", {"x": 1}, "barriers/two", {"alphas": [0.0, 1.0]})
    write_group(tmp_path / "b.h5", "r1", {"x": 1}, "curvature", {"trace": 2.0})
    write_group(tmp_path / "c.h5", "r1", {"x": 1}, "curvature", {"top_eigenvalues": [3.0]})
    merge_results(tmp_path / "m.h5", [tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"])
    run = read_results(tmp_path / "m.h5")["runs"]["r1"]
    assert {"one", "two"} <= set(run["barriers"])
    assert "trace" not in run["curvature"] and "top_eigenvalues" in run["curvature"]  # a result is replaced whole


# --- sweeps with [[barriers]] (bad sections: BAD_STUDIES in tests/test_sweep.py) ------------------

def test_sweep_runs_barrier_jobs_after_training_and_merges_them(mlp_run: Path, mlp_other: Path, tmp_path: Path,
                                                                capsys):
    """The trained runs are put in place (their jobs marked done), so only the ensemble and barrier
    jobs run: lines between the variants at each seed, the ensemble members' matrix, all merged."""
    from flatlab.results import read_results, run_id_for
    from flatlab.sweep import expand_jobs, load_study, run_sweep

    path = tmp_path / "study.toml"
    path.write_text(BARRIER_STUDY)
    study = load_study(path)
    jobs = expand_jobs(study)
    assert [j.kind for j in jobs] == ["train"] * 4 + ["ensemble"] + ["barrier"] * 3
    assert [j.job_id for j in jobs if j.kind == "barrier"] == [
        "barrier-fp-fpb-te0-s0", "barrier-fp-fpb-te0-s1", "barrier-fp-fpb-fine-te0-s0"]
    assert jobs[4].steps == ["ensemble", "barriers-members"]
    assert main(["sweep", str(path), "--dry-run", "--json", "--quiet", "--out", str(tmp_path / "dry")]) == 0
    dry = {j["job_id"]: j for j in json.loads(capsys.readouterr().out)["jobs"]}
    assert dry["barrier-fp-fpb-te0-s0"]["members"] == ["fp-te0-s0", "fpb-te0-s0"]
    from flatlab.sweep import barrier_samples, estimate_seconds

    assert estimate_seconds(study, jobs)["per_job"]["barrier-fp-fpb-te0-s0"] > 0
    # 3 points x (source in-split + target, each capped at 40 samples)
    assert barrier_samples(jobs[5].definition["steps"][0][1]["settings"], 1000, 300, 0.2) == 3 * (40 + 40)

    out = tmp_path / "out"
    placed = {"fp-te0-s0": mlp_run, "fp-te0-s1": mlp_other, "fpb-te0-s0": mlp_other, "fpb-te0-s1": mlp_run}
    from flatlab.sweep import _prepare_out

    _prepare_out(study, out, jobs)
    for job_id, src in placed.items():
        shutil.copytree(src, out / "runs" / job_id)
        (out / "jobs" / job_id / "done").write_text(json.dumps({"run_id": run_id_for(src)}))
    summary = run_sweep(study, out, quiet=True)
    assert not summary.failed, [(o.job_id, o.error) for o in summary.failed]
    assert [o.status for o in summary.outcomes] == ["skipped"] * 4 + ["done"] * 4
    runs = read_results(out / "results.h5")["runs"]
    fp0 = runs[run_id_for(out / "runs" / "fp-te0-s0")]
    assert set(fp0["barriers"]) - {"attrs"} == {"fp-fpb", "fp-fpb-fine"}  # both survive the merge
    assert fp0["barriers"]["fp-fpb-fine"]["alphas"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert fp0["barriers"]["fp-fpb"]["attrs"]["model2_run_id"] == run_id_for(out / "runs" / "fpb-te0-s0")
    (ensemble,) = [r for r in runs.values() if r["attrs"].get("algorithm") == "ensemble"]
    assert "ensemble" in ensemble and "members" in ensemble["barriers"]
    assert ensemble["attrs"]["ood_acc"] > 0  # the ensemble's own attributes, not overwritten
