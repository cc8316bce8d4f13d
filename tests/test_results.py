"""The HDF5 results module: schema, round trip, replace-in-place, atomicity, provenance."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest

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
