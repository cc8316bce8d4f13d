"""Claims files and verdicts: known effects give each verdict, Holm is said and applied, missing
data is "not testable", bad files are one error line, the shipped files fit the shipped studies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from flatlab.cli import main
from flatlab.errors import FlatlabError
from flatlab.report import Uncertainty, load_inputs
from flatlab.results import write_group

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["d0", "d1", "d2"]  # d0 and d1 are test domains in turn
FAST = Uncertainty(resamples=2000, correlation_resamples=1000)

#: Variants of the constructed study: label -> (algorithm, bits, true OOD effect vs erm, noise sd,
#: true effect on local flatness at 0.1 x ||w|| on the target domain).
VARIANTS = {
    "erm": ("erm", None, 0.0, 0.002, 0.0),
    "qat4": ("qat", 4, 0.05, 0.002, -0.3),   # clearly better and flatter
    "qat8": ("qat", 8, 0.0, 0.002, 0.0),     # the same as erm (equivalent within 0.01)
    "noise4": ("noise", 4, -0.05, 0.002, 0.0),  # clearly worse
    "sam": ("sam", None, 0.01, 0.02, 0.0),   # a small effect in a lot of noise: too few seeds
}


def make_study(path: Path, seeds: int = 8, variants: dict | None = None, ensembles: bool = True,
               test_envs: tuple[int, ...] = (0, 1), seed: int = 1) -> dict[str, dict]:
    """A results file like a sweep's: every variant x seed x test domain, with sweep labels.

    ood_acc = 0.5 + 0.1 (test env) + u_(seed, env) + effect(variant) + e, with u ~ N(0, 0.02)
    shared by the variants of one (seed, test domain) (what pairing removes) and e ~ N(0, noise).
    The trace falls with ood_acc (trace = 300 - 200 ood_acc + N(0, 1)): a strong negative rank
    correlation. Returns {run_id: {"variant", "seed", "env", "ood_acc", "trace", "lf"}}.
    """
    rng = np.random.default_rng(seed)
    variants = VARIANTS if variants is None else variants
    shared = {(s, e): rng.normal(0, 0.02) for s in range(seeds) for e in test_envs}
    known: dict[str, dict] = {}
    i = 0
    for label, (algorithm, bits, effect, noise, lf_effect) in variants.items():
        for e in test_envs:
            for s in range(seeds):
                run_id = f"{i:016x}"
                i += 1
                ood = 0.5 + 0.1 * e + shared[(s, e)] + effect + rng.normal(0, noise)
                accs = {f"env{k}_{split}_acc": 0.9 for k in range(len(DOMAINS)) for split in ("in", "out")}
                attrs = {"dataset": "RotatedDigits", "domains": DOMAINS, "test_envs": [e], "model": "cnn",
                         "algorithm": algorithm, "bits": bits, "seed": s, "id_acc": 0.9, "ood_acc": float(ood),
                         "per_domain_accuracies": accs}
                trace = 300.0 - 200.0 * ood + rng.normal(0, 1.0)
                lf = 1.0 + lf_effect + 0.5 * shared[(s, e)] + rng.normal(0, 0.01)
                write_group(path, run_id, attrs, "sweep", {}, {"variant": label, "job_id": f"{label}-te{e}-s{s}"})
                write_group(path, run_id, attrs, "curvature", {"top_eigenvalues": np.array([trace / 10]),
                                                               "residuals": np.array([1e-6]), "trace": np.float64(trace),
                                                               "trace_stderr": np.float64(0.5)}, {"solver": "lanczos"})
                write_group(path, run_id, attrs, "local_flatness", {
                    "gammas": np.array([0.0, 1.0]), "source": np.array([0.0, lf]), "source_stderr": np.full(2, 0.01),
                    "target": np.array([0.0, lf]), "target_stderr": np.full(2, 0.01)},
                    {"radii": [0.0, 0.1], "relative": True})
                known[run_id] = {"variant": label, "seed": s, "env": e, "ood_acc": float(ood), "trace": trace,
                                 "lf": lf}
    if ensembles:
        for e in test_envs:
            members = [k["ood_acc"] for k in known.values() if k["variant"] == "qat4" and k["env"] == e][:3]
            attrs = {"dataset": "RotatedDigits", "domains": DOMAINS, "test_envs": [e], "model": "cnn",
                     "algorithm": "eoq", "bits": 4, "id_acc": 0.95, "ood_acc": max(members) + 0.03,
                     "per_domain_accuracies": {f"env{k}_{s}_acc": 0.9 for k in range(3) for s in ("in", "out")},
                     "members": [{"checkpoint": f"m{j}.pt", "sha256": f"{j}" * 64} for j in range(3)]}
            run_id = f"e{e:015x}"
            write_group(path, run_id, attrs, "ensemble", {"member_ood_acc": np.asarray(members),
                                                          "member_id_acc": np.full(3, 0.9)}, {"algorithm": "eoq"})
            known[run_id] = {"variant": "eoq", "seed": None, "env": e, "ood_acc": attrs["ood_acc"], "members": members}
    return known


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("claims") / "results.h5"
    return path, make_study(path)


CLAIMS = """
[claims]
source = "constructed"
alpha = 0.05

[[claim]]
id = "qat-better"
text = "QAT beats ERM out of domain"
kind = "accuracy"
a = "qat4"
b = "reference"
expect = "greater"

[[claim]]
id = "noise-better"
text = "noise beats ERM out of domain (false)"
kind = "accuracy"
a = "noise4"
b = "erm"
expect = "greater"

[[claim]]
id = "sam-better"
text = "SAM beats ERM (a small effect, too few seeds)"
kind = "comparison"
measure = "ood_acc"
a = "sam"
b = "erm"
expect = "greater"

[[claim]]
id = "q8-equivalent"
text = "8 bit is equivalent to ERM within 1 point"
kind = "comparison"
measure = "ood_acc"
a = "qat8"
b = "erm"
expect = "equivalent"
margin = 0.01

[[claim]]
id = "q4-equivalent"
text = "4 bit is equivalent to ERM within 1 point (false)"
kind = "comparison"
measure = "ood_acc"
a = "qat4"
b = "erm"
expect = "equivalent"
margin = 0.01

[[claim]]
id = "flatter"
text = "quantized models are flatter on the target domain"
kind = "comparison"
measure = "local_flatness_target@max"
a = "qat*"
b = "reference"
expect = "less"

[[claim]]
id = "trace-tracks-ood"
text = "the trace falls as OOD accuracy rises"
kind = "correlation"
measure = "trace"
statistic = "kendall"
expect = "less"

[[claim]]
id = "two-bit"
text = "2-bit QAT beats ERM"
kind = "accuracy"
a = "qat2"
b = "erm"
expect = "greater"

[[claim]]
id = "eoq-members"
text = "EoQ beats its best member"
kind = "accuracy"
a = "eoq"
against = "best_member"
expect = "greater"

[[claim]]
id = "eoq-fp"
text = "EoQ beats an FP ensemble"
kind = "accuracy"
a = "eoq"
against = "fp_ensemble"
expect = "greater"
"""


def _write(tmp_path: Path, text: str, name: str = "claims.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _only_claims(*ids: str) -> str:
    """CLAIMS with its [claims] header and only the claims of these ids."""
    head, *claims = CLAIMS.split("[[claim]]")
    kept = [c for c in claims if any(f'id = "{i}"' in c for i in ids)]
    assert len(kept) == len(ids), ids
    return head + "".join("[[claim]]" + c for c in kept)


def _by_id(result: dict) -> dict[str, dict]:
    return {r["id"]: r for r in result["results"]}


def test_known_effects_give_each_verdict(study: tuple[Path, dict], tmp_path: Path) -> None:
    from flatlab.claims import evaluate_claims, load_claims

    path, known = study
    result = evaluate_claims(load_claims(_write(tmp_path, CLAIMS)), load_inputs([path]), uncertainty=FAST)
    r = _by_id(result)
    assert result["reference"] == "erm"
    # a true effect of +0.05 with pairs differing by N(0, 0.002 sqrt 2): supported, CI around 0.05
    qat = r["qat-better"]
    assert qat["verdict"] == "supported" and qat["pairing"] == "paired" and qat["n"] == 16
    truth = np.mean([k["ood_acc"] for k in known.values() if k["variant"] == "qat4"]) - \
        np.mean([k["ood_acc"] for k in known.values() if k["variant"] == "erm"])
    assert qat["effect"] == pytest.approx(truth, abs=1e-12)  # paired mean = difference of means here
    assert qat["ci_low"] < 0.05 < qat["ci_high"] and qat["ci_low"] > 0.045
    assert qat["p_value"] == pytest.approx(2 / 2 ** 16)  # exact sign flip: all 16 differences positive
    # the opposite true effect: contradicted
    assert r["noise-better"]["verdict"] == "contradicted" and r["noise-better"]["ci_high"] < 0
    # a small effect in noise, 8 seeds per test domain: inconclusive, with the seeds that would settle it
    sam = r["sam-better"]
    assert sam["verdict"] == "inconclusive"
    from flatlab.report import exact_floor
    from flatlab.stats import seeds_needed

    single = seeds_needed(abs(sam["effect"]), sam["sd"], alpha=0.05, power=0.8, paired=True, max_n=2000)
    assert sam["seeds_needed_single"] == max(5, math.ceil(single / 2))  # this test alone, at alpha
    assert f"about {sam['seeds_needed_single']} seeds per test domain would settle it" in sam["reason"]
    m = result["m"]  # within the file's Holm family: sized at alpha / m
    total = seeds_needed(abs(sam["effect"]), sam["sd"], alpha=0.05 / m, power=0.8, paired=True, max_n=2000)
    assert sam["seeds_needed"] == max(5, math.ceil(total / 2), exact_floor(0.05 / m, strata=2))
    assert f"Holm family of {m} test(s), sized at alpha/{m}" in sam["reason"]
    assert f"about {sam['seeds_needed']} seeds per test domain" in sam["reason"].split("Holm family")[1]
    # equivalence: shown for the identical variant, refuted for the one 5 points better
    assert r["q8-equivalent"]["verdict"] == "supported" and r["q8-equivalent"]["confidence"] == pytest.approx(0.9)
    assert r["q4-equivalent"]["verdict"] == "contradicted"
    # patterns: one test per quantized variant against the reference
    assert r["flatter[qat4]"]["verdict"] == "supported" and r["flatter[qat4]"]["measure"] == \
        "local_flatness_target@0.1rel"
    assert r["flatter[qat8]"]["verdict"] == "inconclusive"
    assert r["trace-tracks-ood"]["verdict"] == "supported" and r["trace-tracks-ood"]["effect"] < -0.5
    # what the results lack is said, never dropped
    assert r["two-bit"]["verdict"] == "not testable" and r["two-bit"]["reason"] == "not testable: needs variant qat2"
    assert "needs an ensemble of 3 full-precision models" in r["eoq-fp"]["reason"]
    # EoQ vs its best member: 2 ensembles (one per test domain), too few to decide
    eoq = r["eoq-members"]
    assert eoq["pairing"] == "members" and eoq["n"] == 2 and eoq["effect"] == pytest.approx(0.03)
    assert eoq["verdict"] == "inconclusive"
    assert result["counts"] == {"supported": 4, "contradicted": 2, "inconclusive": 3, "not testable": 2}


def test_holm_over_the_direction_tests_of_a_file(study: tuple[Path, dict], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    path, _ = study
    claims = _write(tmp_path, CLAIMS)
    assert main(["report", str(path), "--claims", str(claims), "--json", "--quiet", "--resamples", "1000"]) == 0
    payload = json.loads(capsys.readouterr().out)
    (result,) = payload["claims"]
    family = [r for r in result["results"] if r["in_holm"]]
    # direction tests with a p-value: qat-better, noise-better, sam-better, flatter x2, trace, eoq-members
    assert len(family) == result["m"] == 7
    p = np.asarray([r["p_value"] for r in family])
    order = np.argsort(p, kind="stable")
    expected = np.maximum.accumulate(np.minimum(1.0, (7 - np.arange(7)) * p[order]))  # Holm by hand
    np.testing.assert_allclose(np.asarray([r["p_holm"] for r in family])[order], expected, rtol=1e-12)
    margin = next(r for r in result["results"] if r["id"] == "q8-equivalent")
    assert not margin["in_holm"] and margin["p_holm"] is None  # NaN -> null: margin claims are outside
    assert main(["report", str(path), "--claims", str(claims), "--resamples", "1000"]) == 0
    text = capsys.readouterr().out
    assert "Holm-Bonferroni over the 7 direction test(s) of this file" in text
    assert "Holm-Bonferroni over the" in text.split("claims:")[0]  # the report's own comparisons too
    line = next(ln for ln in text.splitlines() if ln.startswith("two-bit "))
    assert "not testable" in line
    assert "two-bit: not testable: needs variant qat2" in text


def test_correlation_with_fewer_than_5_runs_says_n_too_small(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from flatlab.claims import evaluate_claims, load_claims

    path = tmp_path / "small.h5"
    make_study(path, seeds=2, variants={"erm": VARIANTS["erm"], "qat4": VARIANTS["qat4"]}, ensembles=False,
               test_envs=(0,))
    claims = _write(tmp_path, _only_claims("trace-tracks-ood"))
    r = evaluate_claims(load_claims(claims), load_inputs([path]), uncertainty=FAST)["results"][0]
    assert r["n"] == 4 and r["verdict"] == "inconclusive" and "n too small" in r["reason"]
    assert math.isnan(r["ci_low"]) and math.isnan(r["p_value"])
    assert main(["report", str(path), "--resamples", "500"]) == 0
    text = capsys.readouterr().out
    corr = text.split("rank correlations")[1].split("granulated")[0]
    assert "n too small" in corr and "0e+00" not in text
    row = next(ln for ln in corr.splitlines() if ln.startswith("trace") and "ood_acc" in ln)
    assert row.split()[3] == "4" and row.count("n too small") == 4
    assert main(["report", str(path), "--json", "--quiet", "--resamples", "500"]) == 0
    payload = json.loads(capsys.readouterr().out)
    c = next(c for c in payload["correlations"] if c["measure"] == "trace" and c["target"] == "ood_acc")
    assert c["kendall_p"] is None and c["kendall_ci"] == [None, None] and "n too small" in c["note"]


GOOD = """
[claims]
source = "x"

[[claim]]
id = "ok"
text = "fine"
kind = "comparison"
measure = "trace"
a = "qat4"
b = "erm"
expect = "less"

[[claim]]
id = "bad-one"
text = "broken"
kind = "comparison"
measure = "trace"
a = "qat4"
b = "erm"
expect = "less"
"""


@pytest.mark.parametrize("old, new, needle", [
    ('measure = "trace"\na = "qat4"\nb = "erm"\nexpect = "less"\n', 'measure = "trce"\na = "qat4"\nb = "erm"\n'
     'expect = "less"\n', "unknown measure 'trce'"),
    ('a = "qat4"\nb = "erm"\nexpect = "less"\n', 'a = "qatt4"\nb = "erm"\nexpect = "less"\n', "unknown variant 'qatt4'"),
    ('expect = "less"\n', 'expect = "less"\nmesure = "trace"\n', "unknown key 'mesure'"),
    ('expect = "less"\n', 'expect = "equivalent"\nmargin = "small"\n', "margin must be a number"),
    ('kind = "comparison"\nmeasure = "trace"\na = "qat4"\nb = "erm"\nexpect = "less"\n',
     'kind = "compare"\nmeasure = "trace"\na = "qat4"\nb = "erm"\nexpect = "less"\n', "kind must be one of"),
    ('b = "erm"\nexpect = "less"\n', 'expect = "less"\n', "needs b"),
    ('expect = "less"\n', 'expect = "equivalent"\n', "needs margin > 0"),
    ('expect = "less"\n', 'expect = 3\n', "expect must be a non-empty string"),
])
def test_bad_claims_files_are_one_error_line(study: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture,
                                             old: str, new: str, needle: str) -> None:
    path, _ = study
    head, _, last = GOOD.rpartition('id = "bad-one"')
    assert old in last
    claims = _write(tmp_path, head + 'id = "bad-one"' + last.replace(old, new, 1), "bad.toml")
    assert main(["report", str(path), "--claims", str(claims)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flatlab: error:"), err
    assert str(claims) in err[0] and "'bad-one'" in err[0] and needle in err[0], err[0]
    assert captured.out == ""


def test_bad_claims_files_without_a_claim_to_name(study: tuple[Path, dict], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    path, _ = study
    for text, needle in (("[[claim]\nid = 1", "is not valid TOML"),
                         (GOOD.replace("[claims]", "[claim_file]"), "unknown key 'claim_file' at the top level"),
                         (GOOD.replace('source = "x"', 'sorce = "x"'), "unknown key 'sorce' in [claims]"),
                         (GOOD.replace('id = "bad-one"', 'id = "ok"'), "claim 'ok': the id is used twice"),
                         ("[claims]\nsource = 'x'\n", "no [[claim]] entries")):
        claims = _write(tmp_path, text, "bad.toml")
        assert main(["report", str(path), "--claims", str(claims)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flatlab: error:") and str(claims) in err[0], err
        assert needle in err[0], err[0]
    assert main(["report", str(path), "--claims", str(tmp_path / "none.toml")]) == 2
    assert "no such claims file" in capsys.readouterr().err


def test_a_label_of_the_results_is_a_known_variant(tmp_path: Path) -> None:
    from flatlab.claims import load_claims

    text = GOOD.replace('a = "qat4"\nb = "erm"\nexpect = "less"\n', 'a = "mine"\nb = "erm"\nexpect = "less"\n')
    path = _write(tmp_path, text)
    with pytest.raises(FlatlabError, match="unknown variant 'mine'"):
        load_claims(path)
    assert load_claims(path, known_variants={"mine"}).claims[1].a == "mine"
    declared = _write(tmp_path, text.replace('source = "x"', 'source = "x"\nvariants = ["mine"]'), "d.toml")
    assert load_claims(declared).variants == ("mine",)


def _study_labels(path: Path) -> set[str]:
    from flatlab.sweep import load_study

    study = load_study(path)
    return {v.label for v in study.variants} | {e["name"] for e in study.ensembles}


#: Variants the shipped claims name that no shipped study trains (their claims are "not testable"
#: on the shipped studies, by design: GAQAT's SAM + QAT baseline and 3-bit variants).
NOT_IN_SHIPPED_STUDIES = {"sam4", "sam3", "gaqat3"}


def test_shipped_claims_files_validate_against_the_shipped_studies() -> None:
    import fnmatch

    from flatlab.claims import load_claims

    studies = sorted((REPO / "analysis").rglob("*.toml"))
    studies = [s for s in studies if "claims" not in s.parts]
    labels = set().union(*(_study_labels(s) for s in studies))
    assert {"erm", "fp", "qat4", "qat8", "qat2", "qat3", "gaqat4", "noise4", "noise7", "eoq"} <= labels
    files = sorted((REPO / "analysis" / "claims").glob("*.toml"))
    assert {f.stem for f in files} >= {"qtdog", "qgen", "gaqat"}
    for f in files:
        claims = load_claims(f, labels)
        assert claims.source and all(c.source for c in claims.claims), f.name  # every claim says where it is from
        assert claims.labels() - labels <= NOT_IN_SHIPPED_STUDIES, (f.name, claims.labels() - labels)
        for c in claims.claims:
            for label in (c.a, c.b):
                if label and label != "reference" and label not in NOT_IN_SHIPPED_STUDIES:
                    probe = label.replace("{bits}", "4")
                    assert any(fnmatch.fnmatchcase(v, probe) for v in labels), (f.name, c.id, label)
        text = f.read_text()
        assert all(line.startswith("#") for line in text.splitlines()[:3]), f.name  # stated in comments


def test_shipped_claims_on_a_results_file(study: tuple[Path, dict]) -> None:
    from flatlab.claims import evaluate_claims, load_claims

    path, _ = study
    collection = load_inputs([path])
    for name in ("qtdog", "qgen", "gaqat", "sharpness"):
        result = evaluate_claims(load_claims(REPO / "analysis" / "claims" / f"{name}.toml"), collection,
                                 uncertainty=FAST)
        assert result["results"] and all(r["verdict"] in ("supported", "contradicted", "inconclusive", "not testable")
                                          for r in result["results"])
    qtdog = _by_id(evaluate_claims(load_claims(REPO / "analysis" / "claims" / "qtdog.toml"), collection,
                                   uncertainty=FAST))
    assert qtdog["qtdog-flatter-target[qat4]"]["verdict"] == "supported"
    assert qtdog["qtdog-noise-below-qat"]["verdict"] == "supported"  # noise4 vs qat4 at the same bits
    assert qtdog["qtdog-noise-below-qat"]["a"] == "noise4" and qtdog["qtdog-noise-below-qat"]["b"] == "qat4"
    sharp = evaluate_claims(load_claims(REPO / "analysis" / "claims" / "sharpness.toml"), collection)
    assert all(r["verdict"] == "not testable" and "sharpness_" in r["reason"] for r in sharp["results"])


def test_correlation_difference_bootstrap_equals_explicit_resamples() -> None:
    from scipy import stats

    from flatlab.claims import correlation_difference
    from flatlab.stats._common import Strata, bootstrap_indices

    rng = np.random.default_rng(3)
    y = rng.normal(size=12)
    x = -y + rng.normal(0, 0.3, 12)  # tracks y (negatively)
    z = rng.normal(size=12)  # does not
    strata = ["a"] * 6 + ["b"] * 6
    out = correlation_difference(x, z, y, strata, method="kendall", sign="absolute", n_resamples=300, seed=5)
    tx, tz = stats.kendalltau(x, y).statistic, stats.kendalltau(z, y).statistic
    assert out.estimate == pytest.approx(abs(tx) - abs(tz), abs=1e-12)
    # the same resamples, drawn and scored one by one with scipy
    theta = []
    for idx in bootstrap_indices(Strata.of(strata, 12), 300, np.random.default_rng(5)):
        for row in idx:
            a, b = stats.kendalltau(x[row], y[row]).statistic, stats.kendalltau(z[row], y[row]).statistic
            theta.append(abs(a) - abs(b))
    lo, hi = np.quantile(np.asarray(theta), [0.025, 0.975])
    assert out.ci_low == pytest.approx(lo, abs=1e-12) and out.ci_high == pytest.approx(hi, abs=1e-12)
    assert out.ci_low > 0  # x tracks y better
    spear = correlation_difference(x, z, y, strata, method="spearman", sign="negative", n_resamples=300)
    assert spear.estimate == pytest.approx(-stats.spearmanr(x, y).statistic + stats.spearmanr(z, y).statistic)
    small = correlation_difference(x[:4], z[:4], y[:4])
    assert math.isnan(small.ci_low) and "n too small" in small.note


def test_gaqat_conflict_is_a_step_weighted_mean(tmp_path: Path) -> None:
    from flatlab.report import gaqat_conflict_of_log

    log = tmp_path / "results.jsonl"
    lines = [{"step": 100, "gaqat_conflict": {"a": 0.2, "b": 0.0}},
             {"step": 300, "gaqat_conflict": {"a": 0.5}},  # 200 steps; b not logged
             {"step": 300, "gaqat_conflict": {"a": 1.0}},  # no new steps (a final evaluation): weight 0
             {"step": 350, "loss": 1.0}]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n{truncated")
    out = gaqat_conflict_of_log(log)
    assert out == {"a": pytest.approx((100 * 0.2 + 200 * 0.5) / 300), "b": 0.0}
    assert gaqat_conflict_of_log(tmp_path / "missing.jsonl") == {}
