"""flatlab report: rows, rank correlations (vs scipy), granulated tau (vs a hand computation)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from cases import write_non_results
from scipy import stats

from flatlab.cli import main
from flatlab.errors import FlatlabError
from flatlab.report import build_report, granulated_tau, load_inputs, rank_correlation
from flatlab.results import write_group

DOMAINS = ["rot0", "rot15", "rot30"]
CONFIGS = [("erm", None), ("qat", 8), ("qat", 4)]
RADII = [0.0, 0.05, 0.1]


def _accs(rng: np.random.Generator, test_env: int) -> dict[str, float]:
    return {f"env{e}_{s}_acc": float(rng.uniform(0.5, 1.0)) for e in range(len(DOMAINS)) for s in ("in", "out")}


def _density(grid: np.ndarray, top: float) -> np.ndarray:
    """A spectral density like SLQ's: a bulk near 0 and a few outliers up to the top eigenvalue."""
    gauss = [np.exp(-0.5 * ((grid - c) / s) ** 2) / (s * np.sqrt(2 * np.pi)) for c, s in ((0.0, 0.4), (top, 0.8))]
    return 0.97 * gauss[0] + 0.03 * gauss[1]


def make_results(path: Path, surfaces: bool = True) -> dict[str, dict]:
    """A results file of 12 runs (erm FP, qat 8b, qat 4b; seeds 0, 1; test domains 0, 1) plus an EoQ.

    Returns the known values per run id: attrs and measures as written.
    """
    rng = np.random.default_rng(7)
    known: dict[str, dict] = {}
    i = 0
    for test_env in (0, 1):
        for algorithm, bits in CONFIGS:
            for seed in (0, 1):
                run_id = f"{i:016x}"
                i += 1
                accs = _accs(rng, test_env)
                attrs = {"dataset": "RotatedDigits", "domains": DOMAINS, "test_envs": [test_env], "model": "cnn",
                         "algorithm": algorithm, "bits": bits, "seed": seed,
                         "id_acc": float(rng.uniform(0.8, 1.0)), "ood_acc": float(rng.uniform(0.3, 0.8)),
                         "per_domain_accuracies": accs}
                m = {"top_eigenvalue": float(rng.uniform(1, 50)), "trace": float(rng.uniform(10, 500)),
                     "pacbayes_inv_sigma_sq": float(rng.uniform(1, 1e4)),
                     "magnitude_inv_sigma_sq": float(rng.uniform(1, 100)),
                     "worst_case_inv_alpha_sq": float(rng.uniform(1, 1e3)),
                     "lf_source": np.array([0.0, *np.sort(rng.uniform(0, 1, 2))]),
                     "lf_target": np.array([0.0, *np.sort(rng.uniform(0, 2, 2))])}
                eig = np.array([m["top_eigenvalue"], m["top_eigenvalue"] / 2, m["top_eigenvalue"] / 3])
                write_group(path, run_id, attrs, "curvature", {
                    "top_eigenvalues": eig, "residuals": np.full(3, 1e-6), "trace": np.float64(m["trace"]),
                    "trace_stderr": np.float64(1.0), "density_grid": np.linspace(-1, 60, 120),
                    "density": _density(np.linspace(-1, 60, 120), m["top_eigenvalue"])},
                    {"solver": "lanczos", "wrt": "effective"})
                write_group(path, run_id, attrs, "bounds/pacbayes", {}, {"inv_sigma_sq": m["pacbayes_inv_sigma_sq"],
                                                                         "sigma": m["pacbayes_inv_sigma_sq"] ** -0.5})
                write_group(path, run_id, attrs, "bounds/magnitude", {}, {"inv_sigma_sq": m["magnitude_inv_sigma_sq"]})
                write_group(path, run_id, attrs, "bounds/worst_case", {}, {"inv_alpha_sq": m["worst_case_inv_alpha_sq"]})
                write_group(path, run_id, attrs, "local_flatness", {
                    "gammas": np.asarray(RADII) * 10.0, "source": m["lf_source"], "source_stderr": np.full(3, 0.01),
                    "target": m["lf_target"], "target_stderr": np.full(3, 0.02)},
                    {"radii": RADII, "relative": True, "samples": 100})
                known[run_id] = {"attrs": attrs, "measures": m}
                if surfaces and test_env == 0 and seed == 0 and bits in (None, 4):
                    sharp = 1.0 if bits is None else 0.5  # the quantized model sits in the flatter bowl
                    x = np.linspace(-1, 1, 21)
                    loss1 = 0.05 + sharp * 3 * x ** 2
                    one = {"xcoordinates": x, "train_loss": loss1, "test_loss": loss1 + 0.4,
                           "train_acc": np.clip(1 - loss1 / 4, 0, 1), "test_acc": np.clip(0.8 - loss1 / 4, 0, 1)}
                    write_group(path, run_id, attrs, "surfaces/random1d-filter", one,
                                {"kind": "random1d-filter", "norm": "filter"})
                    if bits is None:
                        xs, ys = np.linspace(-1, 1, 41), np.linspace(-0.6, 0.6, 31)
                        xx, yy = np.meshgrid(xs, ys)  # (len(y), len(x))
                        z = 0.05 + 2 * (xx - 0.2) ** 2 + 6 * (yy + 0.1) ** 2 + xx * yy
                        two = {"xcoordinates": xs, "ycoordinates": ys, "train_loss": z, "test_loss": 1.5 * z + 0.3,
                               "train_acc": np.clip(1 - z / 5, 0, 1), "test_acc": np.clip(0.8 - z / 5, 0, 1)}
                        write_group(path, run_id, attrs, "surfaces/random2d-filter", two,
                                    {"kind": "random2d-filter", "norm": "filter"})
                        known[run_id]["surfaces"] = {"random1d-filter": one, "random2d-filter": two}
                    else:
                        known[run_id]["surfaces"] = {"random1d-filter": one}
    # An ensemble of quantized models: a run with no measures (every measure must read as missing).
    eoq_attrs = {"dataset": "RotatedDigits", "domains": DOMAINS, "test_envs": [0], "model": "cnn", "algorithm": "eoq",
                 "bits": 4, "id_acc": 0.97, "ood_acc": 0.81, "per_domain_accuracies": _accs(rng, 0),
                 "members": [{"checkpoint": "a.pt", "sha256": "0" * 64}, {"checkpoint": "b.pt", "sha256": "1" * 64}]}
    write_group(path, "e" * 16, eoq_attrs, "ensemble", {"member_ood_acc": np.array([0.7, 0.75])}, {"algorithm": "eoq"})
    known["e" * 16] = {"attrs": eoq_attrs, "measures": {}}
    return known


@pytest.fixture()
def results_file(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "results.h5"
    return path, make_results(path)


def test_rows_hold_the_file_values_and_missing_is_missing(results_file: tuple[Path, dict]) -> None:
    path, known = results_file
    report = build_report([path])
    rows = {r["run_id"]: r for r in report["rows"]}
    assert set(rows) == set(known)
    assert report["measures"][:5] == ["top_eigenvalue", "trace", "pacbayes_inv_sigma_sq", "magnitude_inv_sigma_sq",
                                      "worst_case_inv_alpha_sq"]
    # default local-flatness columns: the largest radius every run shares (0.1 x ||w||)
    assert report["measures"][5:] == ["local_flatness_source@0.1rel", "local_flatness_target@0.1rel"]
    for run_id, k in known.items():
        row, a, m = rows[run_id], k["attrs"], k["measures"]
        assert row["ood_acc"] == a["ood_acc"] and row["id_acc"] == a["id_acc"]
        assert row["domain_gap"] == pytest.approx(a["id_acc"] - a["ood_acc"])
        src = [e for e in range(3) if e not in a["test_envs"]]
        accs = a["per_domain_accuracies"]
        gap = np.mean([accs[f"env{e}_in_acc"] for e in src]) - np.mean([accs[f"env{e}_out_acc"] for e in src])
        assert row["generalization_gap"] == pytest.approx(gap)
        assert row["test_domain"] == DOMAINS[a["test_envs"][0]]
        for name in ("top_eigenvalue", "trace", "pacbayes_inv_sigma_sq", "magnitude_inv_sigma_sq",
                     "worst_case_inv_alpha_sq"):
            if m:
                assert row[name] == pytest.approx(m[name], rel=1e-12)
            else:
                assert math.isnan(row[name])  # missing, never 0
        if m:
            assert row["local_flatness_target@0.1rel"] == m["lf_target"][2]
    eoq = rows["e" * 16]
    assert eoq["algorithm"] == "eoq" and eoq["members"] == 2 and eoq["seed"] is None


def test_taus_equal_scipy_per_domain_and_pooled(results_file: tuple[Path, dict]) -> None:
    path, known = results_file
    report = build_report([path])
    measured = {rid: k for rid, k in known.items() if k["measures"]}
    checked = 0
    for c in report["correlations"]:
        if c["measure"] != "trace":
            continue
        sel = [k for k in measured.values()
               if c["scope"] == "pooled" or DOMAINS[k["attrs"]["test_envs"][0]] == c["scope"]]
        x = [k["measures"]["trace"] for k in sel]
        if c["target"] == "ood_acc":
            y = [k["attrs"]["ood_acc"] for k in sel]
        elif c["target"] == "domain_gap":
            y = [k["attrs"]["id_acc"] - k["attrs"]["ood_acc"] for k in sel]
        else:
            continue
        tau, rho = stats.kendalltau(x, y), stats.spearmanr(x, y)
        assert c["n"] == len(sel)
        assert c["kendall_tau"] == pytest.approx(tau.statistic, abs=1e-12)
        assert c["kendall_p"] == pytest.approx(tau.pvalue, rel=1e-9)
        assert c["spearman_rho"] == pytest.approx(rho.statistic, abs=1e-12)
        assert c["spearman_p"] == pytest.approx(rho.pvalue, rel=1e-9)
        checked += 1
    assert checked == 6  # 2 targets x (2 test domains + pooled)


def test_rank_correlation_undefined_is_nan() -> None:
    assert math.isnan(rank_correlation([1.0, 1.0, 1.0], [0.1, 0.2, 0.3])["kendall_tau"])
    assert math.isnan(rank_correlation([1.0], [0.1])["spearman_rho"])
    two = rank_correlation([1.0, 2.0], [0.2, 0.1])
    assert two["kendall_tau"] == -1.0 and math.isnan(two["kendall_p"])


def test_granulated_tau_equals_hand_computation() -> None:
    def row(alg: str, seed: int, m: float, t: float, domain: str = "d0") -> dict:
        return {"algorithm": alg, "bits": None, "seed": seed, "test_domain": domain, "m": m, "t": t}

    rows = [row("a", 0, 1.0, 0.9), row("b", 0, 2.0, 0.7), row("c", 0, 3.0, 0.8),
            row("a", 1, 1.5, 0.6), row("b", 1, 2.5, 0.65), row("c", 1, 0.5, 0.9),
            # another test domain: its own cells; if the test domain were pooled or an axis the numbers would change
            row("a", 0, 1.0, 0.5, "d1"), row("b", 0, 2.0, 0.6, "d1")]
    # By hand (sign agreement over pairs, no ties):
    #   algorithm axis: cell (d0, seed 0): ab -, ac -, bc + -> -1/3; cell (d0, seed 1): ab +, ac -, bc - -> -1/3;
    #                   cell (d1, seed 0): ab + -> +1.  psi_algorithm = (-1/3 - 1/3 + 1) / 3 = 1/9
    #   seed axis: cells (d0, a): -1, (d0, b): -1, (d0, c): -1; d1 has one seed only. psi_seed = -1
    #   bits never varies. Psi = (1/9 - 1) / 2 = -4/9
    out = granulated_tau(rows, "m", "t")
    assert out["varying_axes"] == ["algorithm", "seed"]
    assert out["axes"]["algorithm"]["tau"] == pytest.approx(1 / 9)
    assert out["axes"]["algorithm"]["cells"] == 3
    assert out["axes"]["seed"]["tau"] == pytest.approx(-1.0)
    assert out["axes"]["seed"]["cells"] == 3
    assert out["granulated_tau"] == pytest.approx(-4 / 9)
    assert "bits" not in out["axes"]


def test_grouped_means_and_stderr(results_file: tuple[Path, dict]) -> None:
    path, known = results_file
    report = build_report([path])
    groups = {(g["algorithm"], g["bits_label"]): g for g in report["groups"]}
    assert set(groups) == {("erm", "fp"), ("qat", "8b"), ("qat", "4b"), ("eoq", "4b")}
    sel = [k for k in known.values() if k["attrs"]["algorithm"] == "qat" and k["attrs"]["bits"] == 4]
    vals = np.array([k["attrs"]["ood_acc"] for k in sel])
    s = groups[("qat", "4b")]["stats"]["ood_acc"]
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(vals.mean())
    assert s["stderr"] == pytest.approx(vals.std(ddof=1) / 2)
    eoq = groups[("eoq", "4b")]["stats"]
    assert eoq["trace"]["n"] == 0 and math.isnan(eoq["trace"]["mean"])
    assert eoq["ood_acc"]["n"] == 1 and math.isnan(eoq["ood_acc"]["stderr"])


def test_cli_text_json_csv(results_file: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, known = results_file
    csv_path = tmp_path / "rows.csv"
    assert main(["report", str(path), "--json", "--quiet", "--csv", str(csv_path)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["rows"]) == len(known)
    eoq = next(r for r in payload["rows"] if r["algorithm"] == "eoq")
    assert eoq["trace"] is None  # NaN -> null in JSON: missing, not 0
    table = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert len(table) == len(known)
    eoq_csv = next(r for r in table if r["algorithm"] == "eoq")
    assert eoq_csv["trace"] == "" and eoq_csv["seed"] == ""
    rid = next(iter(known))
    row = next(r for r in table if r["run_id"] == rid)
    assert float(row["trace"]) == pytest.approx(known[rid]["measures"]["trace"], rel=1e-15)

    assert main(["report", str(path), "--measures", "trace,local_flatness_target@0.05rel"]) == 0
    text = capsys.readouterr().out
    assert "granulated tau" in text and "local_flatness_target@0.05rel" in text
    assert "top_eigenvalue" not in text
    eoq_line = next(line for line in text.splitlines() if line.startswith("e" * 8))
    assert eoq_line.split()[-2:] == ["-", "-"]  # missing measures print "-"


def test_run_folder_row(mlp_run: Path) -> None:
    collection = load_inputs([mlp_run])
    assert len(collection.runs) == 1
    report = build_report([mlp_run])
    row = report["rows"][0]
    assert row["algorithm"] == "erm" and row["bits_label"] == "fp"
    assert 0.0 <= row["ood_acc"] <= 1.0
    assert math.isfinite(row["generalization_gap"])  # from the run's results.jsonl
    assert report["measures"] == []


def _expect_error(argv: list[str], capsys: pytest.CaptureFixture, needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flatlab: error:"), err
    assert needle in err[0]


def test_bad_inputs_exit_2_one_line(results_file: tuple[Path, dict], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    path, _ = results_file
    for bad, words in write_non_results(tmp_path):
        _expect_error(["report", str(bad)], capsys, words)
    _expect_error(["report", str(path), "--measures", "trace,flatness"], capsys, "unknown measure 'flatness'")
    _expect_error(["report", str(tmp_path / "missing.h5")], capsys, "no such file")
    with pytest.raises(FlatlabError):
        build_report([path], measures=["local_flatness_middle@0.1"])
    _expect_error(["report", str(path), "--radii", "0.07"], capsys, "no run holds local flatness at radius 0.07")


def test_chosen_radii(results_file: tuple[Path, dict]) -> None:
    path, known = results_file
    report = build_report([path], radii=[0.05, 0.1])
    assert report["measures"][-4:] == ["local_flatness_source@0.05rel", "local_flatness_source@0.1rel",
                                       "local_flatness_target@0.05rel", "local_flatness_target@0.1rel"]
    rid = next(iter(known))
    row = next(r for r in report["rows"] if r["run_id"] == rid)
    assert row["local_flatness_source@0.05rel"] == known[rid]["measures"]["lf_source"][1]


def test_report_measure_runs_sharpness_once(erm_run, tmp_path, capsys):
    """--measure measures run folders into --measure-out (the same numbers as flatlab sharpness),
    and a second report does not measure them again."""
    import json as _json

    from flatlab.cli import main as cli_main

    out = tmp_path / "m.h5"
    flags = "--top-k 2 --trace --trace-products 9 --max-samples 200"
    assert cli_main(["report", str(erm_run), "--measure", "--measure-out", str(out), "--measure-args", flags,
                     "--json", "--quiet"]) == 0
    report = _json.loads(capsys.readouterr().out)
    (row,) = report["rows"]
    assert cli_main(["sharpness", str(erm_run), *flags.split(), "--json", "--quiet"]) == 0
    direct = _json.loads(capsys.readouterr().out)
    assert row["top_eigenvalue"] == pytest.approx(direct["top_eigenvalues"][0], rel=1e-9)
    stamp = out.stat().st_mtime_ns
    assert cli_main(["report", str(erm_run), "--measure", "--measure-out", str(out), "--measure-args", flags,
                     "--json", "--quiet"]) == 0
    capsys.readouterr()
    assert out.stat().st_mtime_ns == stamp
