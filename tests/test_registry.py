"""The measure registry's contract, checked for every registered measure.

For each measure: its request flag exists on ``flatlab sharpness``, its study-file section is
accepted by ``flatlab sweep --dry-run``, a measured value round-trips through a results file
into ``flatlab report --csv``, every column has a figure axis label, and a rerun with the same
settings is resumed, not recomputed. A new measure gets all of this by being registered; a
measure that breaks any of it fails here, by name.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from cases import ERM_STUDY, write_study

from flatlab.cli import build_parser, main
from flatlab.measures import FAMILIES, MEASURES, get_measure
from flatlab.measures.registry import axis_label, check_registry, family_settings

#: Small values for settings that make a measure expensive (applied where a measure has them).
CHEAP: dict[str, Any] = {"top_k": 2, "trace_products": 6, "density_steps": 6, "mc_samples": 2,
                         "bisection_depth": 4, "ascent_steps": 2, "samples": 4, "gammas_rel": (0.05,)}
SETTINGS = {"max_samples": 120, "batch_size": 64, "device": "cpu"}


def _sharpness_options() -> dict[str, Any]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(sub.choices["sharpness"]._option_string_actions)


def _config(name: str) -> Any:
    measure = get_measure(name)
    names = {s.name for s in measure.config.setting_specs()}
    return measure.config(**{k: v for k, v in CHEAP.items() if k in names})


@pytest.fixture(scope="module")
def measured(mlp_run: Path, tmp_path_factory) -> dict[str, Any]:
    """Every measure that a single checkpoint can take, measured once into one results file."""
    from flatlab.measures import MeasurementSettings
    from flatlab.pipeline import measure_checkpoint

    out = tmp_path_factory.mktemp("registry") / "results.h5"
    configs = [_config(name) for name in MEASURES]
    first = measure_checkpoint(mlp_run, configs, settings=MeasurementSettings(**SETTINGS), results=out)
    return {"path": out, "first": first, "configs": configs}


def test_registry_is_consistent():
    check_registry()
    assert list(MEASURES) == list(dict.fromkeys(MEASURES))
    for measure in MEASURES.values():
        assert measure.family in FAMILIES, measure.name


@pytest.mark.parametrize("name", list(MEASURES))
def test_request_flag_and_settings_flags_exist(name: str):
    options = _sharpness_options()
    measure = MEASURES[name]
    assert measure.request_flag in options, f"{name}: no {measure.request_flag} on flatlab sharpness"
    for spec in measure.config.setting_specs():
        assert spec.flag in options, f"{name}.{spec.name}: no {spec.flag} on flatlab sharpness"


@pytest.mark.parametrize("name", list(MEASURES))
def test_study_section_is_accepted_by_dry_run(name: str, tmp_path: Path, capsys):
    measure = MEASURES[name]
    family = FAMILIES[measure.family]
    keys = {s.name: s.toml for s in family_settings(family.name)}
    lines = [f"[measure.{family.name}]"]
    if family.request == "keys":
        value = CHEAP.get(measure.value_field or "", "true") if measure.value_field else "true"
        lines.append(f"{measure.request_key} = {str(value).lower()}")
    elif family.request == "list":
        lines.append(f'measures = ["{name}"]')
    for setting, value in CHEAP.items():
        if setting in keys and setting != measure.value_field:
            toml_value = json.dumps(list(value)) if isinstance(value, tuple) else json.dumps(value)
            lines.append(f"{keys[setting]} = {toml_value}")
    study = write_study(tmp_path, ERM_STUDY + "[measure]\nmax_samples = 50\n\n" + "\n".join(lines) + "\n")
    assert main(["sweep", str(study), "--dry-run", "--json", "--quiet", "--out", str(tmp_path / "o")]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["jobs"][0]["steps"] == [family.name]


@pytest.mark.parametrize("name", list(MEASURES))
def test_value_round_trips_through_results_and_report_csv(name: str, measured: dict[str, Any], capsys):
    from flatlab.results import read_results

    measure = MEASURES[name]
    result = measured["first"][name]
    view = read_results(measured["path"])
    (run,) = view["runs"].values()
    node: Any = run
    group = measure.group_for(result.config)
    for part in group.split("/"):
        assert part in node, f"{name}: no group {group} in the results file"
        node = node[part]
    for key, value in result.arrays.items():
        if not isinstance(value, dict):
            assert key in node, f"{name}: array {key} not stored"
    columns = measured["first"].estimates()
    assert main(["report", str(measured["path"]), "--csv", str(measured["path"].with_suffix(".csv")),
                 "--quiet"]) == 0
    rows = list(csv.DictReader(io.StringIO(measured["path"].with_suffix(".csv").read_text())))
    assert len(rows) == 1
    produced = [c for c in measure.columns if any(c.matches(k) for k in columns)]
    assert produced or not measure.columns, f"{name}: none of its columns was produced"
    for column in produced:
        found = [k for k in columns if column.matches(k)]
        for key in found:
            if key in rows[0]:  # the report shows every static column, local flatness at its default radius
                assert math.isclose(float(rows[0][key]), columns[key].value, rel_tol=1e-12), key
        shown = [k for k in found if k in rows[0]]
        assert shown, f"{name}: none of {found} in report --csv columns {list(rows[0])}"


@pytest.mark.parametrize("name", list(MEASURES))
def test_columns_have_axis_labels(name: str, measured: dict[str, Any]):
    columns = measured["first"].estimates()
    for column in MEASURES[name].columns:
        for key in [k for k in columns if column.matches(k)]:
            label = axis_label(key)
            assert label and label != key, f"{key}: no axis label"


def test_rerun_with_the_same_settings_is_resumed(mlp_run: Path, measured: dict[str, Any], monkeypatch):
    from flatlab.measures import MeasurementSettings
    from flatlab.pipeline import measure_checkpoint

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("recomputed instead of resumed")

    # Measures are frozen dataclasses: replace each registered one by a copy that refuses to compute.
    import dataclasses

    from flatlab.measures import registry

    for name, measure in list(registry.MEASURES.items()):
        monkeypatch.setitem(registry.MEASURES, name, dataclasses.replace(measure, compute=refuse))
    again = measure_checkpoint(mlp_run, measured["configs"], settings=MeasurementSettings(**SETTINGS),
                               results=measured["path"])
    assert again.resumed == list(MEASURES)
    for name in MEASURES:
        assert json.dumps(again[name].payload, default=str) == json.dumps(measured["first"][name].payload, default=str)
