"""Surfaces: refused before any work (grid memory, names), and fingerprinted by content, not path."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from cases import write_tiny_checkpoint

import flatlab.surface.compute as compute
from flatlab.cli import main
from flatlab.errors import FlatlabError
from flatlab.surface.grid import BYTES_PER_POINT, Axis, check_grid_memory, grid_memory
from flatlab.surface.journal import PointJournal


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("surface-robust") / "tiny.pt")


class _Problem:
    """The two attributes compute_surface reads when fan_out is replaced."""

    directions = [None, None]
    points_per_pass = 1


def _instant_fan_out(setup, problem, work, tasks, **kwargs):
    # Every point "computed" at once: what is left to measure is the bookkeeping per point.
    for index, chunk in enumerate(tasks):
        yield index, [(k, (0.5 * k, 0.25, 0.125 * k, 0.75)) for k, _ in chunk]


@pytest.mark.parametrize("workers", [1, 4])
def test_bytes_per_point_bounds_the_real_peak(tmp_path: Path, monkeypatch, workers: int):
    """The memory check's estimate is an upper bound of what computing a grid allocates: the
    journal, the work items, the finished values and the assembled arrays, traced by tracemalloc."""
    monkeypatch.setattr(compute, "fan_out", _instant_fan_out)
    nx = ny = 150
    x, y = np.linspace(-1, 1, nx), np.linspace(-1, 1, ny)
    tracemalloc.start()
    try:
        journal = PointJournal(tmp_path / "j", "fp", nx * ny)
        surface = compute.compute_surface(_Problem(), x, y, workers=workers, journal=journal)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    journal.close()
    assert surface.complete and surface.values["train_loss"].shape == (ny, nx)
    estimate = grid_memory(Axis(-1, 1, nx), Axis(-1, 1, ny)).bytes_needed
    assert peak <= estimate, f"{peak / (nx * ny):.0f} bytes per point measured > {BYTES_PER_POINT} assumed"
    assert peak >= estimate / 10  # and not absurdly loose


def test_grid_memory_check_against_a_budget():
    x = Axis(-1.0, 1.0, 1000)
    need = check_grid_memory(x, x, budget=1000 * 1000 * BYTES_PER_POINT)  # exactly fits
    assert need.points == 10**6 and need.fits
    with pytest.raises(FlatlabError, match="1000 x 1001 grid has 1,001,000 points") as info:
        check_grid_memory(x, Axis(-1.0, 1.0, 1001), budget=1000 * 1000 * BYTES_PER_POINT)
    assert "use fewer points per axis (at most about 1,000 each" in str(info.value)
    with pytest.raises(FlatlabError, match="100001-point grid"):
        check_grid_memory(Axis(-1.0, 1.0, 100_001), None, budget=100_000 * BYTES_PER_POINT)
    assert check_grid_memory(Axis(-1, 1, 51), Axis(-1, 1, 51)).fits  # the default, on any machine


def test_renamed_directions_file_gives_the_same_surface(tiny_ckpt: Path, tmp_path: Path, capsys):
    grid = ["--x", "-1:1:3", "--y", "-1:1:3", "--max-samples", "20", "--quiet"]
    source = tmp_path / "A.h5"
    assert main(["surface", str(tiny_ckpt), "--out", str(source), *grid]) == 0
    capsys.readouterr()
    out = tmp_path / "S.h5"
    assert main(["surface", str(tiny_ckpt), "--directions", str(source), "--out", str(out), *grid, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["computed"] == 9
    moved = tmp_path / "A2.h5"
    shutil.move(source, moved)  # `mv A.h5 A2.h5`: the same draws under another name
    assert main(["surface", str(tiny_ckpt), "--directions", str(moved), "--out", str(out), *grid, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reused_existing_file"] is True and again["computed"] == 0
    assert again["settings"]["directions"] == "file" and again["settings"]["directions_file"] == str(moved)
    assert again["settings"]["directions_sha256"] == first["settings"]["directions_sha256"]
    # Other draws (another seed) under the old name are other settings: refused, nothing overwritten.
    assert main(["surface", str(tiny_ckpt), "--out", str(source), "--seed", "1", *grid]) == 0
    capsys.readouterr()
    before = out.read_bytes()
    assert main(["surface", str(tiny_ckpt), "--directions", str(source), "--out", str(out), *grid]) == 2
    assert "computed with other settings" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_bad_name_is_refused_before_any_work(tiny_ckpt: Path, tmp_path: Path, monkeypatch, capsys):
    import flatlab.surface.runner as runner

    def no_work(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded before the name was checked")

    monkeypatch.setattr(runner, "_load_models", no_work)
    for name in ("../x", "a/../b", "", "./"):
        req = runner.SurfaceRequest(checkpoint=str(tiny_ckpt), results=str(tmp_path / "r.h5"), name=name)
        with pytest.raises(FlatlabError, match="invalid surface name"):
            runner.run_surface(req)
    assert list(tmp_path.iterdir()) == []
