"""Bad input and interrupts of the chained commands: sharpness, sweep, demo, report --measure.

Each refusal is one ``flatlab: error:`` line, exit status 2, no traceback, and leaves no trace:
it comes before any work (the measure functions are replaced by ones that fail the test if
called) and writes nothing. An interrupt stops the chain with exit status 130, resumable.
"""

from __future__ import annotations

import json

import pytest
from cases import CURVATURE_STUDY, one_error_line, write_study

from flatlab.cli import main


@pytest.fixture
def no_work(monkeypatch):
    """Every registered measure fails the test if it starts computing."""
    import dataclasses

    from flatlab.measures import registry

    def refuse(*_a, **_k):
        raise AssertionError("work started before the input was checked")

    for name, measure in list(registry.MEASURES.items()):
        monkeypatch.setitem(registry.MEASURES, name, dataclasses.replace(measure, compute=refuse))


@pytest.mark.parametrize("flags, words", [
    (["--mc-samples", "0", "--top-k", "2", "--pacbayes"], "--mc-samples must be at least 1"),
    (["--trace", "--trace-products", "2"], "too few for hutch++"),
    (["--top-k", "-1"], "--top-k must be at least 1"),
    (["--local-flatness", "--gammas", "1", "--gammas-rel", "0.1"], "exclude each other"),
    (["--local-flatness", "--flatness-samples", "1"], "--flatness-samples must be at least 2"),
    (["--pacbayes", "--drop-tolerance", "0.5"], "--drop-tolerance must lie in"),
    (["--worst-case", "--keskar-eps", "0"], "--keskar-eps must be greater than 0"),
    (["--density", "--solver", "pyhessian"], "torch.eig"),
    (["--per-layer", "--solver", "pyhessian"], "per-layer"),
    (["--max-samples", "0"], "--max-samples must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--sigma-max", "-1", "--pacbayes"], "--sigma-max must be greater than 0"),
])
def test_sharpness_settings_refused_before_work(mlp_run, tmp_path, capsys, no_work, flags, words):
    out = tmp_path / "r.h5"
    assert main(["sharpness", str(mlp_run), *flags, "--results", str(out)]) == 2
    assert words in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["text file", "folder"])
def test_sharpness_results_onto_a_non_results_path(mlp_run, tmp_path, capsys, no_work, kind):
    target = tmp_path / "target"
    if kind == "folder":
        target.mkdir()
    else:
        target.write_text("my notes\n")
    assert main(["sharpness", str(mlp_run), "--trace", "--results", str(target)]) == 2
    line = one_error_line(capsys)
    assert str(target) in line
    if kind == "text file":
        assert target.read_text() == "my notes\n"


def test_measure_model_refuses_a_bad_run_id_before_work(tmp_path, no_work):
    import torch

    from flatlab.errors import FlatlabError
    from flatlab.measures import TraceConfig
    from flatlab.pipeline import measure_model

    model = torch.nn.Linear(3, 2)
    data = {"source": [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]}
    with pytest.raises(FlatlabError, match="run_id"):
        measure_model(model, data, [TraceConfig()], results=tmp_path / "r.h5")
    with pytest.raises(FlatlabError, match="invalid"):
        measure_model(model, data, [TraceConfig()], results=tmp_path / "r.h5", run_id="../x")
    assert not (tmp_path / "r.h5").exists()


# Bad studies, with and without --dry-run: BAD_STUDIES in tests/test_sweep.py.
def test_sweep_out_onto_a_file_is_refused(tmp_path, capsys):
    study = write_study(tmp_path, CURVATURE_STUDY)
    target = tmp_path / "a-file"
    target.write_text("x")
    assert main(["sweep", str(study), "--out", str(target)]) == 2
    assert "is a file" in one_error_line(capsys)
    assert target.read_text() == "x"


def test_report_measure_args_are_checked(tmp_path, mlp_run, capsys):
    assert main(["report", str(mlp_run), "--measure", "--measure-args", "--top-k 0",
                 "--measure-results", str(tmp_path / "m.h5")]) == 2
    assert "--top-k must be at least 1" in one_error_line(capsys)
    assert main(["report", str(mlp_run), "--measure", "--measure-args", "--trace --results x.h5"]) == 2
    assert "--measure-results" in one_error_line(capsys)
    assert not (tmp_path / "m.h5").exists()


def test_demo_force_never_deletes_foreign_files(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    for extra in ([], ["--force"]):
        assert main(["demo", "--quick", "--out", str(folder), "--quiet", *extra]) == 2
        line = one_error_line(capsys)
        assert "thesis.txt" in line and "--force" not in line
    assert (folder / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]


def test_demo_force_refuses_a_demo_folder_with_a_foreign_file_inside(tmp_path, capsys):
    from flatlab.demo import QUICK, foreign_entry

    folder = tmp_path / "d"
    runs = folder / "sweep" / "runs" / "erm-te0-s0"
    runs.mkdir(parents=True)
    (folder / "demo.json").write_text(json.dumps({"flatlab_version": "0", "mode": "quick", "settings": {}, "done": {}}))
    (runs / "model.pt").write_bytes(b"x")
    assert foreign_entry(folder, QUICK) is None
    (runs / "notes.md").write_text("mine")
    assert foreign_entry(folder, QUICK) == str(runs / "notes.md")
    assert main(["demo", "--quick", "--out", str(folder), "--quiet", "--force"]) == 2
    assert "notes.md" in one_error_line(capsys)
    assert (runs / "notes.md").read_text() == "mine" and (runs / "model.pt").exists()


def test_ctrl_c_in_a_demo_step_exits_130_and_resumes(tmp_path, capsys, monkeypatch):
    import flatlab.train as train_module

    calls = {"n": 0}
    real = train_module.train

    def interrupted(config):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(config)

    monkeypatch.setattr(train_module, "train", interrupted)
    folder = tmp_path / "d"
    assert main(["demo", "--quick", "--out", str(folder), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and "flatlab: error" not in err
    state = json.loads((folder / "demo.json").read_text())
    assert state["done"] == {}  # interrupted inside the sweep step, after its first job
    assert (folder / "sweep" / "jobs" / "erm-te0-s0" / "done").exists()
    assert not (folder / "sweep" / "jobs" / "erm-te0-s1" / "done").exists()


def test_ctrl_c_in_a_sweep_measurement_step_stops_the_sweep(tmp_path, capsys, monkeypatch):
    import flatlab.pipeline as pipeline

    study = write_study(tmp_path, CURVATURE_STUDY)
    out = tmp_path / "out"

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pipeline, "measure_checkpoint", interrupted)
        assert main(["sweep", str(study), "--out", str(out), "--workers", "1", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    job = next((out / "jobs").iterdir())
    assert not (job / "error.txt").exists() and not (job / "done").exists()
    # the rerun continues: training is done, the measurement runs now
    assert main(["sweep", str(study), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    assert (job / "done").exists() and (out / "results.h5").exists()


def test_study_grid_memory_check_matches_the_surface_command(tmp_path, mlp_run, capsys):
    assert main(["surface", str(mlp_run), "--2d", "--x", "-1:1:100000", "--y", "-1:1:100000",
                 "--out", str(tmp_path / "s.h5")]) == 2
    assert "memory" in one_error_line(capsys)
    assert not (tmp_path / "s.h5").exists()
