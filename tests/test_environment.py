"""The environment record (threads, versions, device, CPU) on every results group, and the note
a resume under another environment gives."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from flatlab.environment import (
    ISA_FLAGS,
    REPRODUCIBILITY_KEYS,
    cpu_flags,
    cpu_model,
    environment,
    environment_note,
)


def test_record_names_what_rounding_depends_on():
    rec = environment("cpu")
    assert rec["torch_threads"] == torch.get_num_threads()
    assert rec["torch_version"] == torch.__version__ and rec["device"] == "cpu"
    assert rec["machine"] == platform.machine() and rec["cpu"] == cpu_model() == rec["device_name"]
    assert set(cpu_flags()) <= set(ISA_FLAGS) and rec["cpu_flags"] == " ".join(cpu_flags())
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")]
        if names:
            assert rec["cpu"] == names[0]
        if "avx2" in info.read_text().split():
            assert "avx2" in rec["cpu_flags"].split()
    assert set(REPRODUCIBILITY_KEYS) <= set(rec)


def test_note_lists_exactly_the_differences():
    rec = environment("cpu")
    assert environment_note(dict(rec), rec) is None
    assert environment_note({"torch_threads": rec["torch_threads"]}, rec) is None  # an older file: fewer keys
    other = {**rec, "torch_threads": rec["torch_threads"] + 1, "torch_version": "0.0.1", "python_version": "x"}
    note = environment_note(other, rec, "bounds/pacbayes")
    assert note.startswith("bounds/pacbayes: measured earlier under another environment")
    assert f"torch_threads {rec['torch_threads'] + 1} -> {rec['torch_threads']}" in note
    assert f"torch_version 0.0.1 -> {torch.__version__}" in note
    assert "python_version" not in note  # not a reproducibility key


def _tiny():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(64, 4, generator=g)
    return model, {"source": [(x, torch.randint(0, 3, (64,), generator=g))],
                   "target": [(x + 0.5, torch.randint(0, 3, (64,), generator=g))]}


def test_pipeline_writes_the_record_and_a_resume_under_other_threads_says_so(tmp_path):
    from flatlab.measures import LocalFlatnessConfig
    from flatlab.pipeline import measure_model
    from flatlab.results import read_results

    model, data = _tiny()
    out = tmp_path / "r.h5"
    config = LocalFlatnessConfig(gammas_rel=(0.05,), samples=4)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = measure_model(model, data, [config], results=out, run_id="tiny")
        assert not first.notes
        attrs = read_results(out)["runs"]["tiny"]["local_flatness"]["attrs"]
        for key, value in environment("cpu").items():
            assert str(attrs[key]) == str(value), key
        torch.set_num_threads(2)
        again = measure_model(model, data, [config], results=out, run_id="tiny")
        assert again.resumed == ["local_flatness"]
        assert len(again.notes) == 1 and "torch_threads 1 -> 2" in again.notes[0]
    finally:
        torch.set_num_threads(saved)


def test_surface_and_ensemble_groups_carry_the_record(mlp_run, tmp_path):
    from flatlab.cli import main
    from flatlab.results import read_results, run_id_for

    results = tmp_path / "results.h5"
    assert main(["surface", str(mlp_run), "--1d", "--x", "-1:1:3", "--results", str(results), "--quiet"]) == 0
    assert main(["ensemble", str(mlp_run), "--results", str(results), "--quiet"]) == 0
    runs = read_results(results)["runs"]
    surface = runs[run_id_for(mlp_run)]["surfaces"]["random1d-filter"]["attrs"]
    (ensemble,) = [r["ensemble"]["attrs"] for r in runs.values() if "ensemble" in r]
    for attrs in (surface, ensemble):
        assert int(attrs["torch_threads"]) == torch.get_num_threads()
        assert attrs["torch_version"] == torch.__version__ and attrs["cpu"] == cpu_model()
