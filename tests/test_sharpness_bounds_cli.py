"""``flatlab sharpness CKPT --pacbayes --magnitude --worst-case --local-flatness``: JSON, HDF5, errors."""

from __future__ import annotations

import json

import pytest

from flatlab.cli import main

FAST = ["--mc-samples", "3", "--flatness-samples", "4", "--ascent-steps", "3", "--bisection-depth", "8",
        "--device", "cpu"]


def test_all_bounds_json_and_results_file(mlp_run, tmp_path, capsys):
    out = tmp_path / "results.h5"
    rc = main(["sharpness", str(mlp_run), "--all", "--json", "--quiet", "--gammas-rel", "0,0.05,0.1",
               "--results", str(out), *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    payload = json.loads(captured.out)
    pb = payload["pacbayes"]
    for key in ("sigma", "orig", "init", "inv_sigma_sq", "m", "omega", "weight_norm_sq", "dist_init_sq",
                "target_drop", "passes", "converged", "sigma_note"):
        assert key in pb
    assert pb["m"] == 1200 and pb["inv_sigma_sq"] == pytest.approx(1 / pb["sigma"] ** 2)
    assert "standard deviation" in pb["sigma_note"]
    assert payload["magnitude"]["epsilon"] == 1e-3
    assert payload["worst_case"]["inv_alpha_sq"] == pytest.approx(1 / payload["worst_case"]["alpha"] ** 2)
    lf = payload["local_flatness"]
    assert len(lf["source"]) == len(lf["target"]) == len(lf["gammas"]) == 3 and lf["relative"]

    from flatlab.results import read_results

    runs = read_results(out)["runs"]
    (run,) = runs.values()
    assert run["bounds"]["pacbayes"]["attrs"]["sigma"] == pytest.approx(pb["sigma"])
    assert run["bounds"]["worst_case"]["attrs"]["keskar"] == pytest.approx(payload["worst_case"]["keskar"])
    stored = run["local_flatness"]
    assert list(stored["target_stderr"]) == pytest.approx(lf["target_stderr"])


@pytest.mark.parametrize("flags, words", [
    (["--pacbayes", "--target-drop", "1.5"], "--target-drop must lie in (0, 1)"),
    (["--pacbayes", "--target-drop", "0"], "--target-drop must lie in (0, 1)"),
    (["--local-flatness", "--gammas-rel", "0.1,0.05"], "strictly increasing"),
    (["--local-flatness", "--gammas", "0,x"], "comma-separated"),
    (["--pacbayes", "--target-drop", "0.9"], "chance"),
])
def test_bad_input_is_one_line_and_exit_2(mlp_run, capsys, flags, words):
    rc = main(["sharpness", str(mlp_run), "--quiet", *flags, *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("flatlab: error:") and words in err
