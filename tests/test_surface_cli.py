"""`flatlab surface` from the command line: bad input, refusal, resume after SIGKILL, workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flatlab.cli import main


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _file_view(path: Path) -> dict:
    from flatlab.results import read_results

    view = read_results(path)
    view["attrs"].pop("command_line", None)
    return view


def _assert_same_file(a: Path, b: Path) -> None:
    va, vb = _file_view(a), _file_view(b)
    assert set(va) == set(vb)
    for key in va:
        if key in ("attrs", "runs"):
            assert va[key] == vb[key], key
        else:
            np.testing.assert_array_equal(va[key], vb[key], err_msg=key)


@pytest.mark.parametrize("grid", ["-1:1", "1:-1:5", "a:b:c", "-1:1:0"])
def test_malformed_grid_exit_2_one_line(mlp_run, tmp_path, capsys, grid):
    out = tmp_path / "s.h5"
    assert main(["surface", str(mlp_run), "--x", grid, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flatlab: error: --x")
    assert not out.exists()


def test_bad_combinations_exit_2(mlp_run, erm_run, tmp_path, capsys):
    out = tmp_path / "s.h5"
    cases = [
        ["surface", str(erm_run), "--model2", str(mlp_run), "--1d", "--x", "0:1:2"],    # architectures
        ["surface", str(mlp_run), "--backend", "ray", "--address", f"127.0.0.1:{_closed_port()}"],
        ["surface", str(mlp_run), "--model3", str(mlp_run)],
        ["surface", str(mlp_run), "--requantize"],                                         # FP checkpoint
    ]
    for argv in cases:
        start = time.monotonic()
        assert main([*argv, "--out", str(out), "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flatlab: error:"), (argv, err)
        assert time.monotonic() - start < 30
        assert not out.exists()


def test_other_settings_refused_nothing_overwritten(mlp_run, tmp_path, capsys):
    out = tmp_path / "s.h5"
    argv = ["surface", str(mlp_run), "--x", "-1:1:3", "--y", "0:1:2", "--out", str(out), "--quiet", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["shape"] == [2, 3] and first["computed"] == 6
    before = out.read_bytes()
    assert main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]
    assert out.read_bytes() == before
    # Same settings again: the finished file is reused, not recomputed.
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reused_existing_file"] and again["computed"] == 0
    assert out.read_bytes() == before
    # A file that is not a surface is never overwritten.
    other = tmp_path / "notes.h5"
    other.write_text("not hdf5")
    assert main(["surface", str(mlp_run), "--out", str(other), "--quiet"]) == 2
    assert other.read_text() == "not hdf5"


def test_loss_landscape_layout_and_results_file(mlp_run, tmp_path, capsys):
    import h5py

    out = tmp_path / "s.h5"
    assert main(["surface", str(mlp_run), "--x", "-1:1:4", "--y", "-0.5:0.5:3", "--out", str(out), "--quiet"]) == 0
    with h5py.File(out, "r") as fh:
        assert fh["train_loss"].shape == (3, 4)
        np.testing.assert_array_equal(fh["xcoordinates"][()], np.linspace(-1, 1, 4))
        np.testing.assert_array_equal(fh["ycoordinates"][()], np.linspace(-0.5, 0.5, 3))
        for name in ("train_acc", "test_loss", "test_acc"):
            assert fh[name].shape == (3, 4)
        assert fh["directions"].shape[0] == 2 and fh["raw_directions"].shape == fh["directions"].shape
        assert fh.attrs["norm"] == "filter" and fh.attrs["ignore"] == "biasbn"
        assert bool(fh.attrs["complete"])
    results = tmp_path / "results.h5"
    assert main(["surface", str(mlp_run), "--1d", "--x", "-1:1:4", "--results", str(results), "--quiet"]) == 0
    from flatlab.results import read_results, run_id_for

    run = read_results(results)["runs"][run_id_for(mlp_run)]
    group = run["surfaces"]["random1d-filter"]
    assert group["train_loss"].shape == (4,)
    assert group["attrs"]["dims"] == 1


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flatlab.cli", "surface", *args]


def test_sigkill_then_rerun_equals_uninterrupted(erm_run, tmp_path):
    common = ["--x", "-1:1:8", "--y", "-1:0.5:5", "--max-samples", "200", "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed.h5"
    journal = tmp_path / "killed.h5.journal"
    proc = subprocess.Popen(_cli(str(erm_run), *common, "--out", str(killed)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 4:  # header + 3 points
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists() and journal.exists()
    done_before = journal.read_text().count("\n") - 1
    assert 3 <= done_before < 40
    rerun = subprocess.run(_cli(str(erm_run), *common, "--out", str(killed), "--json"), env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["resumed"] >= done_before and summary["computed"] == 40 - summary["resumed"]
    assert not journal.exists()
    straight = tmp_path / "straight.h5"  # same thread count as the killed run: it is recorded
    done = subprocess.run(_cli(str(erm_run), *common, "--out", str(straight)), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _assert_same_file(killed, straight)


def test_two_local_workers_equal_one(mlp_run, tmp_path, capsys):
    common = ["--x", "-1:1:5", "--y", "-1:1:4", "--quiet"]
    assert main(["surface", str(mlp_run), *common, "--out", str(tmp_path / "one.h5")]) == 0
    assert main(["surface", str(mlp_run), *common, "--workers", "2", "--out", str(tmp_path / "two.h5")]) == 0
    _assert_same_file(tmp_path / "one.h5", tmp_path / "two.h5")
