"""flatlab report's two uncertainties: estimation error per run (value +- se) and seed-to-seed
variation per variant (bootstrap CIs), comparisons with their pairing, Holm and seed counts."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_claims import VARIANTS, make_study
from test_report import _expect_error

from flatlab.cli import main
from flatlab.report import (
    Uncertainty,
    build_report,
    compare_variants,
    seeds_per_cell,
    variant_of,
)
from flatlab.results import write_group

FAST = Uncertainty(resamples=1000, correlation_resamples=500)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("unc") / "results.h5"
    variants = {k: VARIANTS[k] for k in ("erm", "qat4", "sam")}
    return path, make_study(path, seeds=3, variants=variants)


def test_variant_labels() -> None:
    assert variant_of({"algorithm": "qat", "bits": 4}) == "qat4"
    assert variant_of({"algorithm": "sam", "bits": None}) == "sam"
    assert variant_of({"algorithm": "erm", "bits": 32}) == "erm"
    assert variant_of({"algorithm": "eoq", "bits": 4, "members": [{}]}) == "eoq"
    assert variant_of({"algorithm": "erm"}, {"sweep": {"attrs": {"variant": "fp"}}}) == "fp"  # the sweep's label wins


def test_estimation_error_per_run_in_text_json_and_csv(study: tuple[Path, dict], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    path, known = study
    out = tmp_path / "rows.csv"
    assert main(["report", str(path), "--json", "--quiet", "--csv", str(out), "--resamples", "500"]) == 0
    payload = json.loads(capsys.readouterr().out)
    row = next(r for r in payload["rows"] if r["run_id"] == "0" * 16)
    assert row["trace"] == pytest.approx(known["0" * 16]["trace"]) and row["trace_stderr"] == 0.5
    assert row["local_flatness_target@0.1rel_stderr"] == 0.01
    assert row["top_eigenvalue_stderr"] is None  # Lanczos: no standard error, missing (not 0)
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    first = next(r for r in table if r["run_id"] == "0" * 16)
    assert float(first["trace_stderr"]) == 0.5 and first["top_eigenvalue_stderr"] == ""
    assert first["variant"] == "erm"
    assert main(["report", str(path), "--resamples", "500"]) == 0
    text = capsys.readouterr().out
    assert "+- 0.5" in text and "+- 0.01" in text


def test_seed_to_seed_summaries_are_stratified_bootstrap_cis(study: tuple[Path, dict]) -> None:
    from flatlab.stats import summarize_group

    path, known = study
    report = build_report([path], uncertainty=FAST)
    qat = next(v for v in report["variants"] if v["variant"] == "qat4")
    runs = sorted((k for k in known.values() if k["variant"] == "qat4"), key=lambda k: (k["env"], k["seed"]))
    direct = summarize_group([k["ood_acc"] for k in runs], [f"d{k['env']}" for k in runs], n_resamples=1000)
    s = qat["stats"]["ood_acc"]
    assert s["n"] == 6 and s["mean"] == pytest.approx(direct.mean)
    assert s["ci_low"] == pytest.approx(direct.ci_low) and s["ci_high"] == pytest.approx(direct.ci_high)
    assert s["method"] == "bca" and s["sd"] == pytest.approx(np.std([k["ood_acc"] for k in runs], ddof=1))
    assert s["small_sample"] and "fewer than 5 seeds" in s["note"]
    eoq = next(v for v in report["variants"] if v["variant"] == "eoq")
    assert eoq["ensemble"] and math.isnan(eoq["stats"]["ood_acc"]["ci_low"])
    from flatlab.report import report_text

    text = report_text(report)
    assert "95% BCa bootstrap CI over seeds" in text
    assert "* fewer than 5 seeds in a test domain: the bootstrap interval is unreliable" in text


def test_comparisons_pair_on_seed_and_domain_or_domain_only(study: tuple[Path, dict]) -> None:
    path, known = study
    report = build_report([path], uncertainty=FAST)
    comps = report["comparisons"]
    assert report["reference"] == "erm" and ["qat4", "erm"] in comps["pairs"] and ["eoq", "erm"] in comps["pairs"]
    by = {(c["a"], c["column"]): c for c in comps["results"]}
    qat = by[("qat4", "ood_acc")]
    assert qat["pairing"] == "paired" and qat["n"] == 6 and qat["exact"]
    diffs = []
    for k in known.values():
        if k["variant"] == "qat4":
            erm = next(o for o in known.values() if o["variant"] == "erm" and o["seed"] == k["seed"]
                       and o["env"] == k["env"])
            diffs.append(k["ood_acc"] - erm["ood_acc"])
    assert qat["mean_diff"] == pytest.approx(np.mean(diffs))
    assert qat["p_value"] == pytest.approx(2 / 2 ** 6)  # exact: all 6 differences positive
    # Holm over every comparison of the report
    p = np.asarray([c["p_value"] for c in comps["results"]])
    m = int(np.isfinite(p).sum())
    assert comps["m"] == m and f"Holm-Bonferroni over the {m} comparisons" in comps["family"]
    assert min(c["p_holm"] for c in comps["results"]) == pytest.approx(min(1.0, m * np.nanmin(p)))
    # the ensemble has no seed: paired on the test domain, the reference averaged over its seeds
    eoq = by[("eoq", "ood_acc")]
    assert eoq["pairing"] == "domain" and eoq["n"] == 2
    assert "eoq has no seed: paired on test domain only (erm averaged over its seeds in each test domain)" in eoq["note"]
    expected = np.mean([k["ood_acc"] - np.mean([o["ood_acc"] for o in known.values() if o["variant"] == "erm"
                                                and o["env"] == k["env"]])
                        for k in known.values() if k["variant"] == "eoq"])
    assert eoq["mean_diff"] == pytest.approx(expected)
    assert eoq["seeds_unit"] == "test domains (one ensemble each)"
    # 3 seeds per test domain: every verdict is withheld with the seeds that would settle it
    assert all(c["verdict"] == "inconclusive" for c in comps["results"])
    assert "inconclusive: about" in by[("sam", "ood_acc")]["summary"]


def test_seed_counts_follow_the_power_formula_and_min_effect(study: tuple[Path, dict]) -> None:
    from flatlab.report import exact_floor
    from flatlab.stats import seeds_needed

    path, _ = study
    report = build_report([path], uncertainty=Uncertainty(resamples=500, correlation_resamples=200,
                                                          min_effect={"ood_acc": 0.02}))
    m = report["comparisons"]["m"]
    by = {(c["a"], c["column"]): c for c in report["comparisons"]["results"]}
    sam = by[("sam", "ood_acc")]
    total = seeds_needed(0.02, sam["sd"], alpha=0.05, power=0.8, paired=True, max_n=2000)
    assert sam["sized_at"] == "min_effect" and sam["seeds_needed_single"] == max(5, math.ceil(total / 2), 3)
    total = seeds_needed(0.02, sam["sd"], alpha=0.05 / m, power=0.8, paired=True, max_n=2000)
    assert sam["seeds_needed"] == max(5, math.ceil(total / 2), exact_floor(0.05 / m, strata=2))
    assert f"about {sam['seeds_needed']} seeds per test domain would settle it" in sam["summary"]
    trace = by[("sam", "trace")]  # not named: sized at its observed effect
    total = seeds_needed(abs(trace["mean_diff"]), trace["sd"], alpha=0.05 / m, power=0.8, paired=True, max_n=2000)
    assert trace["sized_at"] == "observed effect"
    assert trace["seeds_needed"] == max(5, math.ceil(total / 2), exact_floor(0.05 / m, strata=2))


def test_exact_floor_is_the_smallest_p_the_permutation_tests_can_reach() -> None:
    from flatlab.report import exact_floor
    from flatlab.stats import sign_flip_test, two_sample_permutation_test

    for level in (0.05, 0.05 / 7, 0.05 / 30):
        n = exact_floor(level)  # pairs, one test domain: all differences positive is the most extreme data
        assert sign_flip_test(np.ones(n)).p_value < level <= sign_flip_test(np.ones(n - 1)).p_value
        per_domain = exact_floor(level, strata=2)
        assert per_domain == math.ceil(n / 2)
    for strata in (1, 2):
        k = exact_floor(0.05, paired=False, strata=strata)  # runs per variant and test domain

        def smallest_p(k: int, strata: int = strata) -> float:
            labels = [f"d{h}" for h in range(strata) for _ in range(k)]
            a = np.asarray([10.0 + i for i in range(strata * k)])  # every a above every b
            return two_sample_permutation_test(a, a - 100.0, labels, labels).p_value

        assert smallest_p(k) < 0.05 <= smallest_p(k - 1)


def test_unpaired_when_the_seeds_differ(tmp_path: Path) -> None:
    from flatlab.stats import unpaired_comparison

    path = tmp_path / "r.h5"
    values = {}
    rng = np.random.default_rng(0)
    for i, (variant, seeds) in enumerate((("erm", range(0, 6)), ("qat4", range(10, 16)))):
        for s in seeds:
            for e in (0, 1):
                v = 0.5 + 0.05 * i + 0.1 * e + rng.normal(0, 0.01)
                attrs = {"algorithm": variant.rstrip("4"), "bits": 4 if i else None, "seed": s, "test_envs": [e],
                         "domains": ["d0", "d1", "d2"], "ood_acc": v, "id_acc": 0.9}
                write_group(path, f"{i}{s:02d}{e}".ljust(16, "0"), attrs, "sweep", {}, {"variant": variant})
                values.setdefault(variant, []).append((v, f"d{e}"))
    rows = build_report([path], uncertainty=FAST)["rows"]
    c = compare_variants(rows, "qat4", "erm", "ood_acc", uncertainty=FAST)
    assert c.pairing == "unpaired" and "0 (seed, test domain) pair(s) in common" in c.note
    a, b = values["qat4"], values["erm"]
    direct = unpaired_comparison([v for v, _ in a], [v for v, _ in b], [d for _, d in a], [d for _, d in b],
                                 n_resamples=1000)
    assert c.evidence.mean_diff == pytest.approx(direct.mean_diff) and c.evidence.p_value == pytest.approx(direct.p_value)
    assert c.unit == "seeds per variant and test domain"
    needed = seeds_per_cell(c, abs(c.evidence.mean_diff), alpha=0.05)
    assert needed is not None and needed >= 5


def test_compare_reference_and_bad_flags(study: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    path, _ = study
    assert main(["report", str(path), "--reference", "sam", "--compare", "qat4:erm", "--json", "--quiet",
                 "--resamples", "300"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["reference"] == "sam"
    assert payload["comparisons"]["pairs"] == [["erm", "sam"], ["qat4", "sam"], ["eoq", "sam"], ["qat4", "erm"]]
    _expect_error(["report", str(path), "--reference", "fp"], capsys, "reference 'fp' is not a variant")
    _expect_error(["report", str(path), "--compare", "qat4:qat8"], capsys, "no run has variant 'qat8'")
    _expect_error(["report", str(path), "--compare", "qat4"], capsys, "two variant labels joined by ':'")
    _expect_error(["report", str(path), "--alpha", "0.7"], capsys, "alpha must be a number in (0, 0.5)")
    _expect_error(["report", str(path), "--min-effect", "big"], capsys, "--min-effect must be a number > 0")
    _expect_error(["report", str(path), "--resamples", "10"], capsys, "resamples must be an integer >= 100")


def test_run_folders_read_gaqat_conflict_from_their_log(mlp_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(mlp_run, run)
    log = run / "results.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [line["step"] for line in lines]
    for i, line in enumerate(lines):  # as GAQAT logs it: per layer, the mean since the last evaluation
        line["gaqat_conflict"] = {"features.1": 0.1 * (i + 1), "features.4": 0.05}
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    weights = np.diff([0, *steps])
    expected = float(np.sum(weights * 0.1 * np.arange(1, len(lines) + 1)) / np.sum(weights))
    report = build_report([run], uncertainty=FAST)
    (row,) = report["rows"]
    assert report["diagnostics"] == ["gaqat_conflict_max"]
    assert row["gaqat_conflict_max"] == pytest.approx(expected)
