"""`flatlab sharpness`: JSON contract, solvers against each other, results file, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flatlab.cli import main
from flatlab.results import read_results, run_id_for


def _json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object on stdout
    return json.loads(out)


def test_lanczos_matches_dense_solver_and_trace_within_stderr(mlp_run, capsys):
    common = [str(mlp_run), "--max-samples", "300", "--top-k", "3", "--trace", "--json", "--quiet"]
    dense = _json(capsys, ["sharpness", *common, "--solver", "dense"])
    lanczos = _json(capsys, ["sharpness", *common])
    assert dense["solver"] == "dense" and lanczos["solver"] == "lanczos"
    assert dense["n_samples"] == lanczos["n_samples"] == 300
    assert dense["num_params"] == lanczos["num_params"] == 610  # 64*8 + 8 + 8*10 + 10
    np.testing.assert_allclose(lanczos["top_eigenvalues"], dense["top_eigenvalues"], rtol=1e-4)
    assert lanczos["top_eigenvalues"] == sorted(lanczos["top_eigenvalues"], reverse=True)
    assert all(r < 1e-3 * lanczos["top_eigenvalues"][0] for r in lanczos["residuals"])
    assert abs(lanczos["trace"] - dense["trace"]) <= 3 * lanczos["trace_stderr"]
    assert lanczos["hvps"] == lanczos["eigen_hvps"] + lanczos["trace_hvps"]
    assert lanczos["wrt"] == "fp" and lanczos["params"] == "all"


def test_default_measures_table_and_results_file(mlp_run, tmp_path, capsys):
    out = tmp_path / "results.h5"
    args = ["sharpness", str(mlp_run), "--max-samples", "200", "--quiet", "--density", "--density-steps", "12",
            "--top-k", "2", "--trace", "--trace-products", "30", "--results", str(out), "--seed", "3"]
    first = _json(capsys, [*args, "--json"])
    second = _json(capsys, [*args, "--json"])
    for key in ("top_eigenvalues", "residuals", "trace", "trace_stderr", "density", "hvps"):
        assert first[key] == second[key]  # one seed, identical numbers
    assert np.trapezoid(first["density"], first["density_grid"]) == pytest.approx(1.0, abs=1e-9)
    view = read_results(out)
    run_id = run_id_for(mlp_run)
    assert list(view["runs"]) == [run_id]  # measuring again replaced the group
    curv = view["runs"][run_id]["curvature"]
    np.testing.assert_array_equal(curv["top_eigenvalues"], first["top_eigenvalues"])
    assert curv["attrs"]["solver"] == "lanczos" and curv["attrs"]["hvps"] == first["hvps"]
    assert curv["attrs"]["eigen_method"] == "lanczos" and curv["attrs"]["rtol"] == 1e-3
    assert curv["density"].shape == curv["density_grid"].shape
    assert view["runs"][run_id]["attrs"]["model"] == "mlp"
    # no measure flags: top-5 eigenvalues and the trace, as a table on stdout
    assert main(["sharpness", str(mlp_run), "--max-samples", "100"]) == 0
    table = capsys.readouterr().out
    assert "eigenvalue" in table and "trace" in table and table.count("\n") >= 9
    assert "early-stopping Lanczos (rtol 0.001)" in table


def test_pyhessian_solver_says_largest_magnitude(mlp_run, capsys):
    common = [str(mlp_run), "--max-samples", "200", "--top-k", "1", "--json", "--quiet"]
    ours = _json(capsys, ["sharpness", *common])
    theirs = _json(capsys, ["sharpness", *common, "--solver", "pyhessian"])
    assert "magnitude" in theirs["note"]
    assert theirs["top_eigenvalues"][0] == pytest.approx(ours["top_eigenvalues"][0], rel=0.05)
    assert theirs["hvps"] > 0


@pytest.mark.parametrize("extra,needle", [
    (["--top-k", "100000"], "exceeds the number of selected parameters"),
    (["--max-samples", "0"], "--max-samples"),
    (["--density", "--solver", "pyhessian"], "torch.eig"),
    (["--top-k", "0"], "--top-k"),
])
def test_bad_input_exits_2_with_one_line(mlp_run, capsys, extra, needle):
    assert main(["sharpness", str(mlp_run), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatlab: error:") and needle in err
    assert err.count("\n") == 1


def test_dense_refused_on_a_large_model(mlp_run, capsys, monkeypatch):
    import flatlab.curvature

    monkeypatch.setattr(flatlab.curvature, "MAX_DENSE_PARAMS", 500)  # the MLP has 610
    assert main(["sharpness", str(mlp_run), "--solver", "dense", "--max-samples", "20", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "limited to 500 parameters" in err and err.count("\n") == 1


def test_quantized_checkpoint_effective_and_latent(qat_run, capsys):
    common = ["sharpness", str(qat_run), "--max-samples", "64", "--top-k", "1", "--json", "--quiet"]
    eff = _json(capsys, common)
    lat = _json(capsys, [*common, "--wrt", "latent"])
    assert eff["wrt"] == "effective" and lat["wrt"] == "latent" and eff["quantized"]
    assert eff["num_params"] == lat["num_params"]  # scales are not curvature parameters
    assert eff["top_eigenvalues"][0] > 0 and lat["top_eigenvalues"][0] > 0


def test_early_stopping_lanczos_matches_dense_with_fewer_products_than_arpack(mlp_run, capsys):
    common = [str(mlp_run), "--max-samples", "300", "--top-k", "3", "--json", "--quiet"]
    dense = _json(capsys, ["sharpness", *common, "--solver", "dense"])
    arpack = _json(capsys, ["sharpness", *common, "--tol", "1e-5"])
    early = _json(capsys, ["sharpness", *common])  # the default: early-stopping Lanczos, rtol 1e-3
    tight = _json(capsys, ["sharpness", *common, "--rtol", "1e-6"])
    assert arpack["eigen_method"] == "arpack" and arpack["tol"] == 1e-5 and "rtol" not in arpack
    assert early["eigen_method"] == "lanczos" and early["rtol"] == 1e-3 and "tol" not in early
    for result, rtol in [(early, 1e-3), (tight, 1e-6)]:
        # the stopping rule: every residual below rtol |eigenvalue|, which bounds the error
        assert all(r <= rtol * abs(v) * 1.01 for r, v in zip(result["residuals"], result["top_eigenvalues"]))
        np.testing.assert_allclose(result["top_eigenvalues"], dense["top_eigenvalues"], rtol=rtol)
    np.testing.assert_allclose(arpack["top_eigenvalues"], dense["top_eigenvalues"], rtol=1e-4)
    assert early["eigen_hvps"] < tight["eigen_hvps"] and early["eigen_hvps"] < arpack["eigen_hvps"]
    assert main(["sharpness", str(mlp_run), "--rtol", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--rtol must be greater than 0" in err and err.count("\n") == 1
    assert main(["sharpness", str(mlp_run), "--rtol", "1e-3", "--tol", "1e-6"]) == 2
    err = capsys.readouterr().err
    assert "give one" in err and err.count("\n") == 1


def test_lanczos_under_a_memory_cap_restarts_and_a_too_small_cap_is_refused(mlp_run, capsys, monkeypatch):
    import flatlab.curvature.lanczos as lanczos

    args = ["sharpness", str(mlp_run), "--max-samples", "100", "--top-k", "3", "--rtol", "1e-6", "--quiet", "--json"]
    free = _json(capsys, args)
    monkeypatch.setattr(lanczos, "DEFAULT_MAX_BASIS_BYTES", 12 * 610 * 4)  # 12 float32 vectors of 610
    capped = _json(capsys, args)
    assert capped["converged"] and capped["eigen_hvps"] > 8  # an 8-vector working basis: it restarted
    np.testing.assert_allclose(capped["top_eigenvalues"], free["top_eigenvalues"], rtol=1e-5)
    assert all(r <= 1e-6 * abs(v) * 1.01 for r, v in zip(capped["residuals"], capped["top_eigenvalues"]))
    monkeypatch.setattr(lanczos, "DEFAULT_MAX_BASIS_BYTES", 4 * 610 * 4)  # too small for top-3
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "max_basis_bytes" in err and err.count("\n") == 1


class _Killed(Exception):
    """Stands in for a crash in the middle of a measurement."""


def test_interrupted_measurement_resumes_from_its_results_file(mlp_run, tmp_path, capsys, monkeypatch):
    import flatlab.curvature.lanczos as lanczos
    import flatlab.curvature.trace as trace
    import flatlab.sharpness as sharpness

    out = tmp_path / "results.h5"
    args = ["sharpness", str(mlp_run), "--max-samples", "200", "--top-k", "2", "--trace", "--trace-products", "12",
            "--pacbayes", "--local-flatness", "--gammas-rel", "0,0.05", "--mc-samples", "3",
            "--flatness-samples", "4", "--bisection-depth", "6", "--json", "--quiet"]
    reference = _json(capsys, args)  # no --out: computed whole, nothing stored
    assert "resumed" not in reference

    def killed(*_args, **_kwargs):
        raise _Killed

    # 1. killed during the trace: the eigenvalues are already in the file, marked incomplete
    with monkeypatch.context() as m:
        m.setattr(trace, "estimate_trace", killed)
        with pytest.raises(_Killed):
            main([*args, "--results", str(out)])
    capsys.readouterr()
    curv = read_results(out)["runs"][run_id_for(mlp_run)]["curvature"]
    assert not curv["attrs"]["complete"] and "top_eigenvalues" in curv and "trace" not in curv
    # 2. rerun, killed in local flatness: eigenvalues reused (Lanczos must not run), trace and
    #    PAC-Bayes computed and stored
    with monkeypatch.context() as m:
        m.setattr(lanczos, "lanczos_top_eigenvalues", killed)
        m.setattr(sharpness, "local_flatness", killed)
        with pytest.raises(_Killed):
            main([*args, "--results", str(out)])
    capsys.readouterr()
    # 3. rerun: only local flatness is left to compute
    with monkeypatch.context() as m:
        m.setattr(lanczos, "lanczos_top_eigenvalues", killed)
        m.setattr(trace, "estimate_trace", killed)
        m.setattr(sharpness, "pacbayes_bounds", killed)
        resumed = _json(capsys, [*args, "--results", str(out)])
    assert resumed["resumed"] == ["top_eigenvalues", "trace", "pacbayes"]
    for key in ("top_eigenvalues", "residuals", "trace", "trace_stderr", "hvps", "pacbayes", "local_flatness"):
        assert resumed[key] == reference[key], key  # the same numbers as one uninterrupted run
    view = read_results(out)["runs"][run_id_for(mlp_run)]
    assert view["curvature"]["attrs"]["complete"]
    assert set(view["bounds"]) >= {"pacbayes"} and "local_flatness" in view
    # the default spelled out is the same setting (fingerprints hold what ran, not how it was asked)
    explicit = _json(capsys, [*args, "--results", str(out), "--rtol", "1e-3"])
    assert explicit["resumed"] == ["top_eigenvalues", "trace", "pacbayes", "local_flatness"]
    # 4. other settings are computed again, not taken from the file
    changed = _json(capsys, [*args, "--results", str(out), "--rtol", "1e-6", "--seed", "1"])
    assert "resumed" not in changed
