"""The HDF5 results module: schema, round trip, replace-in-place, atomicity, provenance."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest
from cases import write_tiny_checkpoint

from flatlab.errors import FlatlabError
from flatlab.results import (
    SCHEMA_VERSION,
    is_results_file,
    read_results,
    run_attrs_from_checkpoint,
    run_id_for,
    write_group,
    write_root_file,
)


def test_round_trip_nested_groups_and_attrs(tmp_path):
    path = tmp_path / "r.h5"
    run_attrs = {"dataset": "rotated_digits", "test_envs": [0], "bits": 4, "per_domain_accuracies": {"env0_in_acc": 0.5},
                 "skipped": None}
    write_group(path, "abc", run_attrs, "curvature",
                {"top_eigenvalues": np.array([3.0, 2.0]), "per_layer": {"fc": {"trace": np.float64(1.5)}}},
                {"solver": "lanczos", "hvps": 12})
    write_group(path, "abc", run_attrs, "bounds/pacbayes", {"value": 0.25}, {"sigma": 0.1})
    view = read_results(path)
    assert view["attrs"]["schema_version"] == SCHEMA_VERSION
    run = view["runs"]["abc"]
    assert run["attrs"]["test_envs"] == [0]
    assert run["attrs"]["per_domain_accuracies"] == {"env0_in_acc": 0.5}
    assert "skipped" not in run["attrs"]
    np.testing.assert_array_equal(run["curvature"]["top_eigenvalues"], [3.0, 2.0])
    assert run["curvature"]["per_layer"]["fc"]["trace"] == 1.5
    assert run["curvature"]["attrs"] == {"solver": "lanczos", "hvps": 12}
    assert run["bounds"]["pacbayes"]["value"] == 0.25
    assert run["bounds"]["pacbayes"]["attrs"]["sigma"] == 0.1
    assert is_results_file(path)


def test_rewrite_replaces_group_and_keeps_others(tmp_path):
    path = tmp_path / "r.h5"
    write_group(path, "a", {}, "curvature", {"trace": 1.0, "old": 2.0})
    write_group(path, "b", {}, "curvature", {"trace": 5.0})
    write_group(path, "a", {"step": 3}, "curvature", {"trace": 9.0})
    runs = read_results(path)["runs"]
    assert set(runs) == {"a", "b"}
    assert runs["a"]["curvature"]["trace"] == 9.0 and "old" not in runs["a"]["curvature"]
    assert runs["a"]["attrs"]["step"] == 3
    assert runs["b"]["curvature"]["trace"] == 5.0
    with pytest.raises(FlatlabError, match="already holds"):
        write_group(path, "a", {}, "curvature", {"trace": 1.0}, replace=False)
    assert not list(tmp_path.glob(".r.h5.*"))  # no temporary file left behind


def test_failed_write_leaves_file_untouched(tmp_path):
    path = tmp_path / "r.h5"
    write_group(path, "a", {}, "curvature", {"trace": 1.0})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_group(path, "a", {}, "curvature", {"trace": 2.0}, {"bad": object()})
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".r.h5.*"))


def test_refuses_foreign_files(tmp_path):
    other = tmp_path / "x.h5"
    with h5py.File(other, "w") as f:
        f["a"] = 1
    assert not is_results_file(other)
    with pytest.raises(FlatlabError, match="not a flatlab results file"):
        write_group(other, "a", {}, "g", {"v": 1})
    with pytest.raises(FlatlabError, match="not a flatlab results file"):
        read_results(other)
    with pytest.raises(FlatlabError, match="no such results file"):
        read_results(tmp_path / "missing.h5")
    text = tmp_path / "t.h5"
    text.write_text("hello")
    assert not is_results_file(text)
    with pytest.raises(FlatlabError, match="invalid group"):
        write_group(tmp_path / "n.h5", "a", {}, "../x", {"v": 1})


def test_root_file_for_standalone_surfaces(tmp_path):
    path = tmp_path / "surf.h5"
    write_root_file(path, {"xcoordinates": np.linspace(-1, 1, 3), "train_loss": np.ones((2, 3))}, {"dir_type": "weights"})
    view = read_results(path)
    assert view["runs"] == {}
    assert view["train_loss"].shape == (2, 3)
    assert view["attrs"]["dir_type"] == "weights"


def test_run_id_and_provenance_from_checkpoint(mlp_run):
    from flatlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(mlp_run)
    rid = run_id_for(mlp_run)
    assert rid == hashlib.sha256((mlp_run / "model.pt").read_bytes()).hexdigest()[:16]
    assert run_id_for(mlp_run / "model.pt") == rid
    attrs = run_attrs_from_checkpoint(ckpt)
    assert attrs["checkpoint_sha256"].startswith(rid)
    assert attrs["dataset"] == ckpt.meta["dataset"]
    assert attrs["model"] == "mlp" and attrs["step"] == ckpt.meta["step"]
    assert attrs["id_acc"] == ckpt.meta["accuracies"]["id_acc"]
    assert any(k.startswith("env") for k in attrs["per_domain_accuracies"])
    assert "torch" in attrs["versions"]


# --- locking: in use by another process, no lock files left, stale writer locks ------------------

_HOLDER = ("import sys, time, h5py\n"
           "from flatlab.locks import PidLock\n"
           "lock = PidLock(sys.argv[1] + '.lock').acquire() if sys.argv[2] == 'flatlab' else None\n"
           "handle = h5py.File(sys.argv[1], 'a')  # held open for writing: HDF5 locks the file\n"
           "print('ready', flush=True)\n"
           "time.sleep(60)\n")


def _hold_open_for_writing(path, who: str):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), who], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("who", ["other", "flatlab"])
def test_file_open_for_writing_elsewhere_is_in_use_not_foreign(tmp_path, capsys, who):
    from flatlab.cli import main

    path = tmp_path / "r.h5"
    write_group(path, "a", {}, "curvature", {"trace": 1.0})
    holder = _hold_open_for_writing(path, who)
    try:
        named = f"(flatlab pid {holder.pid} is writing it)"
        calls = [is_results_file, read_results]
        if who == "other":  # (a flatlab writer's lock makes another writer wait for it instead)
            calls.append(lambda p: write_group(p, "b", {}, "g", {"v": 1.0}))
        for call in calls:
            with pytest.raises(FlatlabError, match="in use by another process") as info:
                call(path)
            assert (named in str(info.value)) == (who == "flatlab")
        ckpt = write_tiny_checkpoint(tmp_path / "tiny.pt")
        for argv in (["report", str(path)], ["surface", str(ckpt), "--results", str(path), "--x", "-1:1:3"]):
            assert main([*argv, "--quiet"]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("flatlab: error: ") and "in use by another process" in err
            assert "Traceback" not in err and "not a flatlab results file" not in err
        expected = {"r.h5", "r.h5.lock", "tiny.pt"} if who == "flatlab" else {"r.h5", "tiny.pt"}
        assert {p.name for p in tmp_path.iterdir()} == expected  # readers created nothing
    finally:
        holder.kill()
        holder.wait()
    assert read_results(path)["runs"]["a"]["curvature"]["trace"] == 1.0


def test_writers_and_readers_leave_no_lock_file(tmp_path):
    from flatlab.results import merge_results

    path = tmp_path / "r.h5"
    write_group(path, "a", {}, "curvature", {"trace": 1.0})
    write_root_file(tmp_path / "s.h5", {"xcoordinates": np.zeros(2)})
    merge_results(tmp_path / "m.h5", [path])
    read_results(path)
    assert is_results_file(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5", "r.h5", "s.h5"]


def test_lock_of_a_killed_writer_is_stale(tmp_path, capsys):
    import subprocess
    import sys

    from flatlab.locks import LockHolder

    path = tmp_path / "r.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = LockHolder(pid=int(dead.stdout), start_time=1, host=LockHolder.current().host)
    (tmp_path / "r.h5.lock").write_text(record.to_json())  # what a writer killed mid-write leaves
    write_group(path, "a", {}, "curvature", {"trace": 1.0})
    assert "removed the stale lock" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]


def test_runs_that_is_a_dataset_is_refused_by_readers_and_writers(tmp_path):
    from flatlab.results import merge_results

    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as fh:
        fh.attrs["schema_version"] = SCHEMA_VERSION
        fh["runs"] = np.arange(3)
    before = path.read_bytes()
    for call in (lambda: read_results(path), lambda: write_group(path, "a", {}, "g", {"v": 1.0}),
                 lambda: merge_results(tmp_path / "m.h5", [path])):
        with pytest.raises(FlatlabError, match="/runs is a dataset, not a group"):
            call()
    with h5py.File(path, "a") as fh:  # a run that is a dataset
        del fh["runs"]
        fh.create_group("runs")["abc"] = 1.0
    with pytest.raises(FlatlabError, match="/runs/abc is a dataset"):
        read_results(path)
    with pytest.raises(FlatlabError, match="/runs/abc is a dataset"):
        write_group(path, "abc", {}, "g", {"v": 1.0})
    with h5py.File(path, "a") as fh:  # a group path through a dataset
        del fh["runs/abc"]
        fh["runs"].create_group("abc")["surfaces"] = 1.0
    with pytest.raises(FlatlabError, match="/runs/abc/surfaces is a dataset where a group is expected"):
        write_group(path, "abc", {}, "surfaces/random2d", {"v": 1.0})
    assert path.read_bytes() != before and not (tmp_path / "m.h5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]
