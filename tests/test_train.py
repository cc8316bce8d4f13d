"""The ERM trainer: accuracy, DomainBed records, resume after SIGKILL, refusals, NaN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from flatlab.checkpoint import load_checkpoint
from flatlab.cli import main

TRAIN = [sys.executable, "-m", "flatlab.cli", "train", "--quiet"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_erm_learns_source_and_shift_is_real(erm_run: Path):
    acc = load_checkpoint(erm_run).meta["accuracies"]
    assert acc["source_acc"] >= 0.95
    assert acc["id_acc"] >= 0.85
    assert acc["ood_acc"] < acc["id_acc"] - 0.2  # the rotation shift is real
    assert (erm_run / "done").exists() and not (erm_run / "state.pt").exists()


def test_results_jsonl_has_domainbed_keys(erm_run: Path):
    records = _records(erm_run / "results.jsonl")
    assert [r["step"] for r in records] == [100, 200, 300, 400]
    for r in records:
        for key in ("step", "epoch", "loss", "hparams", "args"):
            assert key in r
        for i in range(6):
            assert 0.0 <= r[f"env{i}_in_acc"] <= 1.0 and 0.0 <= r[f"env{i}_out_acc"] <= 1.0
        args = r["args"]
        assert args["dataset"] == "rotated-digits" and args["algorithm"] == "erm"
        assert args["test_envs"] == [0] and args["trial_seed"] == 0 and args["hparams_seed"] == 0
        assert args["seed"] == 0
    # Model selection: the checkpoint is the evaluation with the best mean source out-accuracy.
    best = max(records, key=lambda r: sum(r[f"env{i}_out_acc"] for i in range(1, 6)))
    assert load_checkpoint(erm_run).meta["step"] == best["step"]


def test_domainbed_selection_reads_flatlab_records(erm_run: Path):
    """DomainBed's IIDAccuracySelectionMethod logic (restated) runs on our records."""
    records = _records(erm_run / "results.jsonl")
    test_env = records[0]["args"]["test_envs"][0]
    val_keys = [f"env{i}_out_acc" for i in range(6) if i != test_env]
    chosen = max(records, key=lambda r: sum(r[k] for k in val_keys) / len(val_keys))
    assert 0.0 <= chosen[f"env{test_env}_in_acc"] <= 1.0


def _state_step(out: Path) -> int:
    path = out / "results.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return len(lines)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path: Path):
    args = ["--model", "cnn", "--width", "4", "--steps", "600", "--eval-every", "50", "--seed", "3"]
    whole = tmp_path / "whole"
    subprocess.run(TRAIN + args + ["--out", str(whole)], check=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(TRAIN + args + ["--out", str(cut)])
    deadline = time.time() + 120
    while _state_step(cut) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "done").exists(), "the run finished before it could be killed"
    assert (cut / "state.pt").exists()
    subprocess.run(TRAIN + args + ["--out", str(cut)], check=True)
    # Whatever the kill left (a temporary file, the lock) is gone after the resumed run.
    assert sorted(p.name for p in cut.iterdir()) == ["done", "model.pt", "results.jsonl", "run.json"]

    a, b = load_checkpoint(whole), load_checkpoint(cut)
    assert a.meta["step"] == b.meta["step"]
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    ra, rb = _records(whole / "results.jsonl"), _records(cut / "results.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in x:
            if key not in ("step_time", "args"):
                assert x[key] == y[key], key


def _copy_of_erm_run(erm_run: Path, tmp_path: Path) -> tuple[Path, bytes, list[str]]:
    """A writable copy of the erm_run fixture, its model bytes, and the command that trained it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(erm_run, run)
    same = ["train", "--quiet", "--lr", "3e-3", "--steps", "400", "--eval-every", "100", "--model", "cnn", "--width", "8",
            "--out", str(run)]
    return run, (run / "model.pt").read_bytes(), same


def test_done_is_noop_and_other_args_refused(erm_run: Path, tmp_path: Path, capsys):
    run, before, same = _copy_of_erm_run(erm_run, tmp_path)
    assert main(same) == 0
    assert (run / "model.pt").read_bytes() == before
    assert main(["train", "--lr", "3e-3", "--steps", "500", "--eval-every", "100", "--model", "cnn", "--width", "8",
                 "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "other arguments" in err and "steps" in err and err.count("\n") == 1
    assert (run / "model.pt").read_bytes() == before


def test_busy_run_folder_is_refused_even_with_fresh(erm_run: Path, tmp_path: Path, capsys):
    import fcntl

    run, before, same = _copy_of_erm_run(erm_run, tmp_path)
    with open(run / ".lock", "a+") as held:  # another trainer holds the folder
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        for extra in ([], ["--fresh"]):
            assert main([*same, *extra]) == 2
            err = capsys.readouterr().err
            assert "another `flatlab train` is running" in err and err.count("\n") == 1
            # nothing deleted: --fresh waits for the lock before it touches the folder
            assert (run / "model.pt").read_bytes() == before and (run / "done").exists()
    assert main(same) == 0  # released: the finished run is recognised again
    assert (run / "model.pt").read_bytes() == before


def test_nan_loss_stops_with_error(tmp_path: Path, capsys):
    out = tmp_path / "nan"
    assert main(["train", "--quiet", "--lr", "1e30", "--steps", "40", "--eval-every", "1",
                 "--model", "mlp", "--width", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatlab: error: the training loss became") and err.count("\n") == 1
    assert not (out / "done").exists()
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    if (out / "model.pt").exists():  # the last good checkpoint stays loadable
        load_checkpoint(out / "model.pt")


def test_bad_training_input(tmp_path: Path, capsys):
    cases = [
        (["--dataset", "imagenet"], "unknown data set"),
        (["--test-env", "7"], "unknown domain"),
        (["--model", "vgg"], "unknown model"),
        (["--algorithm", "magic"], "unknown algorithm"),
        (["--hparams", "{not json"], "not valid JSON"),
        (["--hparams", '{"lrr": 1}'], "unknown hyperparameter"),
        (["--lr", "-1"], "lr must be positive"),
    ]
    for extra, message in cases:
        assert main(["train", "--quiet", "--out", str(tmp_path / "x"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("flatlab: error:") and message in err and err.count("\n") == 1, (extra, err)


def test_evaluate_and_info_json(erm_run: Path, capsys):
    assert main(["evaluate", str(erm_run / "model.pt"), "--json", "--quiet", "--device", "cpu"]) == 0
    payload = json.loads(capsys.readouterr().out)
    meta = load_checkpoint(erm_run).meta
    assert abs(payload["id_acc"] - meta["accuracies"]["id_acc"]) < 1e-12
    assert abs(payload["ood_acc"] - meta["accuracies"]["ood_acc"]) < 1e-12
    assert main(["info", str(erm_run / "model.pt"), "--json", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_params"] == sum(p.numel() for p in load_checkpoint(erm_run).build_model().parameters())
    assert info["dataset"] == "rotated-digits" and info["test_envs"] == [0] and info["step"] == meta["step"]
    assert info["size_bytes"] == (erm_run / "model.pt").stat().st_size
