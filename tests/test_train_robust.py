"""The trainer's robustness: refused inputs leave no trace, nothing foreign is deleted, killed runs
leave nothing that blocks the next one, damaged folders give one line, a diverged run is flagged.

Every run here is a tiny MLP (8x8 digits, width 4) trained for a few steps: what is checked is
what the trainer writes, deletes and says, not what the model learns (except the chance-level
check, which compares a diverged and a learning run).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flatlab.cli import main
from flatlab.locks import LockBusy, LockHolder, PidLock, process_start_time

TINY = ["train", "--quiet", "--model", "mlp", "--width", "4", "--depth", "1", "--resolution", "8",
        "--steps", "4", "--eval-every", "2"]


def _train(out: Path, *extra: str) -> list[str]:
    return [*TINY, "--out", str(out), *extra]


def _one_line(err: str, expect: str) -> None:
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("flatlab: error: "), err
    assert expect in err, err


@contextlib.contextmanager
def _ctrl_c_at_evaluation(monkeypatch: pytest.MonkeyPatch, n: int) -> Iterator[None]:
    """Inside the block the trainer's n-th evaluation raises KeyboardInterrupt (Ctrl-C) instead
    of evaluating; the others, and all after the block, are the real ones."""
    import flatlab.train.trainer as trainer

    real = trainer.evaluate_models
    calls = {"n": 0}

    def evaluate_or_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(trainer, "evaluate_models", evaluate_or_interrupt)
        yield


def _interrupted_run(out: Path, monkeypatch, capsys) -> None:
    """A run stopped by Ctrl-C after its first evaluation (step 2): state.pt and one log line."""
    with _ctrl_c_at_evaluation(monkeypatch, 2):
        assert main(_train(out)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (out / "state.pt").exists() and not (out / "done").exists()
    assert len((out / "results.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("bad", [["--holdout-fraction", "1.5"], ["--pretrained", "missing.pt"],
                                 ["--hparams", '{"lr": "x"}'], ["--width", "0"]],
                         ids=["holdout", "pretrained", "hparams-type", "width"])
def test_refused_input_leaves_no_trace_and_the_corrected_command_runs(bad: list[str], tmp_path: Path, capsys):
    out = tmp_path / "o"
    assert main(_train(out, *bad)) == 2
    capsys.readouterr()
    assert not out.exists()  # validated before the folder was even created
    assert main(_train(out)) == 0
    assert (out / "done").exists()


def test_nan_before_the_first_checkpoint_then_a_lower_lr_runs(tmp_path: Path, capsys):
    out = tmp_path / "nan"
    assert main(_train(out, "--lr", "1e30", "--seed", "0")) == 2
    err = capsys.readouterr().err
    _one_line(err, "the training loss became")
    assert "no checkpoint was written yet" in err and "lower --lr and rerun" in err
    assert (out / "run.json").exists() and not (out / "model.pt").exists()
    # As the message advises: the same folder, a lower learning rate.
    assert main(_train(out, "--lr", "1e-3", "--seed", "0")) == 0
    assert (out / "done").exists()
    assert json.loads((out / "run.json").read_text())["hparams"]["lr"] == 1e-3


def test_other_arguments_still_refused_once_a_run_saved_something(tmp_path: Path, capsys):
    out = tmp_path / "r"
    assert main(_train(out)) == 0
    capsys.readouterr()
    assert main(_train(out, "--lr", "0.01")) == 2
    _one_line(capsys.readouterr().err, "differs in: hparams")


def test_fresh_refuses_a_folder_with_foreign_files_and_deletes_nothing(tmp_path: Path, capsys):
    out = tmp_path / "r"
    assert main(_train(out)) == 0
    capsys.readouterr()
    (out / "thesis.tex").write_text("months of work\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(_train(out, "--fresh")) == 2
    _one_line(capsys.readouterr().err, "it holds the file thesis.tex")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "sub").mkdir()
    (out / "thesis.tex").unlink()
    assert main(_train(out, "--fresh")) == 2
    _one_line(capsys.readouterr().err, "it holds the folder sub")
    (out / "sub").rmdir()
    # Only the run's own files (and temporary files of their pattern) left: --fresh starts over.
    (out / ".model.pt.k3j2.tmp").write_bytes(b"half")
    assert main(_train(out, "--fresh")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["done", "model.pt", "results.jsonl", "run.json"]


def test_stale_temp_files_of_killed_runs_are_removed_foreign_ones_kept(tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "r"
    _interrupted_run(out, monkeypatch, capsys)
    # What SIGKILL leaves: atomic_path's temporary files, which only its cleanup would remove.
    stale = [out / ".state.pt.a1b2c3.pt.tmp", out / ".model.pt.zz9.tmp", out / ".results.jsonl.q.tmp"]
    for path in stale:
        path.write_bytes(b"torn")
    foreign = [out / ".notes.abc.tmp", out / "state.pt.backup"]
    for path in foreign:
        path.write_bytes(b"mine")
    assert main(_train(out)) == 0
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"mine" for p in foreign)
    assert not (out / ".lock").exists()  # the lock is removed when the run ends


def test_torn_last_log_line_resumes_damaged_middle_line_is_one_error(tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "r"
    _interrupted_run(out, monkeypatch, capsys)
    log = out / "results.jsonl"
    good = log.read_text()
    log.write_text(good + '{"step": 4, "env0_in')  # killed while appending
    assert main(_train(out)) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]

    out2 = tmp_path / "r2"
    _interrupted_run(out2, monkeypatch, capsys)
    log2 = out2 / "results.jsonl"
    log2.write_text("garbage\n" + log2.read_text())
    assert main(_train(out2)) == 2
    _one_line(capsys.readouterr().err, "line 1 is not a flatlab record")


def test_damaged_run_json(tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "r"
    _interrupted_run(out, monkeypatch, capsys)
    (out / "run.json").write_text("{not json")
    assert main(_train(out)) == 2  # saved state of an unknown run: refused, nothing deleted
    _one_line(capsys.readouterr().err, "run.json is damaged")
    assert (out / "state.pt").exists()
    # A damaged run.json of a run that never saved anything is simply replaced.
    fresh = tmp_path / "never-saved"
    fresh.mkdir()
    (fresh / "run.json").write_text("\x00\x01garbage")
    assert main(_train(fresh)) == 0


def test_live_lock_holder_is_named(tmp_path: Path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from flatlab.locks import PidLock; "
         "PidLock(sys.argv[1]).acquire(); print('ready', flush=True); time.sleep(60)", str(out / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for extra in ([], ["--fresh"]):
            assert main(_train(out, *extra)) == 2
            _one_line(capsys.readouterr().err, f"another `flatlab train` is running in {out} (pid {holder.pid})")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, nothing deleted
    finally:
        holder.kill()
        holder.wait()
    # Its holder gone, the lock is stale: the next run breaks it with a note, and runs.
    assert main(_train(out)) == 0
    err = capsys.readouterr().err
    assert f"flatlab: note: removed the stale lock {out / '.lock'} of pid {holder.pid}" in err


def test_lock_held_by_an_orphan_of_a_dead_trainer_is_broken(tmp_path: Path, capsys):
    """The flock outlives its trainer when a forked child inherited the descriptor: the lock file
    names the dead trainer, so the lock is stale and broken (with a note), not a refusal forever."""
    out = tmp_path / "r"
    out.mkdir()
    script = ("import os, sys, time\n"
              "from flatlab.locks import PidLock\n"
              "PidLock(sys.argv[1]).acquire()\n"
              "child = os.fork()\n"
              "if child == 0:\n"
              "    time.sleep(60); os._exit(0)\n"
              "print(child, flush=True)\n"
              "os._exit(0)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    orphan = int(proc.stdout.readline())
    proc.wait()
    try:
        dead = LockHolder.parse((out / ".lock").read_text())
        assert dead is not None and dead.pid == proc.pid and not dead.is_alive()
        assert main(_train(out)) == 0
        err = capsys.readouterr().err
        assert f"flatlab: note: broke the stale lock {out / '.lock'} of pid {proc.pid}" in err
        assert (out / "done").exists()
    finally:
        os.kill(orphan, 9)


def test_lock_record_with_a_recycled_pid_is_stale(tmp_path: Path):
    """A live pid whose start time differs from the record's is another process: not the holder."""
    me = LockHolder.current()
    assert me.start_time == process_start_time(os.getpid()) and me.is_alive()
    recycled = LockHolder(pid=me.pid, start_time=(me.start_time or 0) + 12345, host=me.host)
    assert not recycled.is_alive()
    path = tmp_path / "x.lock"
    path.write_text(recycled.to_json())
    with open(path) as held:  # the flock is held, but by a "process" the record says is gone
        import fcntl

        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        lock = PidLock(path, note=False).acquire()
        assert lock.broken == recycled
        assert LockHolder.parse(path.read_text()).pid == os.getpid()
        lock.release()
    assert not path.exists()


def test_diverged_run_is_flagged_at_chance_a_learning_run_is_not(tmp_path: Path, capsys):
    from flatlab.train import chance_level

    assert main(_train(tmp_path / "diverged", "--lr", "1e6", "--json")) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["at_chance"] is True and payload["warnings"]
    assert "flatlab: warning: the selected model" in captured.err and "at chance level" in captured.err
    assert payload["source_acc"] <= 0.1 + chance_level(payload["source_acc"], 10, 1000).margin

    learn = [*TINY[:-4], "--width", "32", "--steps", "60", "--eval-every", "30", "--lr", "3e-3"]
    assert main([*learn, "--out", str(tmp_path / "learns"), "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["at_chance"] is False and payload["warnings"] == [] and "warning" not in captured.err
    assert payload["source_acc"] > 0.3


def test_chance_level_closed_form():
    from flatlab.train import chance_level

    # p = 1/10, n = 10,000: 3 standard errors = 3 sqrt(0.09 / 10^4) = 0.009 < the 0.02 floor.
    check = chance_level(0.11, 10, 10_000)
    assert check.chance == 0.1 and check.margin == 0.02 and check.at_chance
    assert not chance_level(0.121, 10, 10_000).at_chance
    # p = 1/2, n = 100: 3 sqrt(0.25 / 100) = 0.15 above the floor.
    check = chance_level(0.64, 2, 100)
    assert abs(check.margin - 0.15) < 1e-15 and check.at_chance
    assert not chance_level(0.66, 2, 100).at_chance
    assert chance_level(0.0, 10, 50).at_chance  # below chance is no better
    assert not chance_level(float("nan"), 10, 50).at_chance
    with pytest.raises(ValueError, match="num_classes"):
        chance_level(0.5, 1, 10)


def test_holder_on_another_host_is_refused_with_how_to_clear_it(tmp_path: Path):
    import fcntl

    path = tmp_path / "x.lock"
    path.write_text(LockHolder(pid=1, start_time=5, host="elsewhere-node", command="flatlab train").to_json())
    with open(path) as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(LockBusy, match=r"busy \(pid 1 on elsewhere-node\) \(if that process no longer runs, "
                                            r"delete .*x\.lock\)"):
            PidLock(path, busy_message="busy{holder}").acquire()
    assert LockHolder.parse(path.read_text()).host == "elsewhere-node"  # not broken


def test_run_json_records_the_environment_and_a_resume_under_another_says_so(tmp_path, capsys, monkeypatch):
    """run.json keeps the environment of the run's start (threads, torch, device, CPU) apart from
    its arguments: a rerun with the same arguments is the same run, and resuming under another
    thread count prints a note (its numbers will not be bit for bit an uninterrupted run's)."""
    import json

    from flatlab.train import TrainConfig, train

    out = tmp_path / "run"
    config = TrainConfig(steps=20, eval_every=5, model="mlp", model_options={"width": 8, "depth": 1},
                         dataset_options={"resolution": 8}, out=str(out), quiet=True)
    with _ctrl_c_at_evaluation(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        train(config)
    record = json.loads((out / "run.json").read_text())
    env = record["environment"]
    assert env["torch_threads"] >= 1 and env["torch_version"] and env["device"] == "cpu"
    assert (out / "state.pt").exists()
    record["environment"]["torch_threads"] = env["torch_threads"] + 7  # as if started elsewhere
    (out / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    result = train(config)  # the same arguments: resumed, not refused
    assert result.resumed_from > 0
    err = capsys.readouterr().err
    assert "flatlab: note: resuming" in err and "torch_threads" in err
    assert train(config).already_done
