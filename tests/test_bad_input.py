"""Bad input, every command: one line ``flatlab: error: ...``, exit 2, no traceback, no trace left.

Each case of the battery runs ``flatlab.cli.main(argv)`` in this process and asserts: exit status
2, stderr exactly one line starting ``flatlab: error:`` and holding the expected words, no
traceback text, and none of the case's would-be outputs (a run folder, a results file, a journal,
a lock file) on disk afterwards. The checkpoints are tiny and untrained (an 8x8 MLP of width 4):
nothing here depends on what a model learnt. Cases of sweep, demo, sharpness and report options
belong to those commands' owners and are added there.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from cases import tiny_meta, write_raw_checkpoint, write_tiny_checkpoint

from flatlab.cli import main

# --- tiny inputs ---------------------------------------------------------------------------------

@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path | None]:
    """A folder nobody may create files in: mode 0555, or for root (who ignores modes) the
    immutable attribute. Yields None where neither works (the case is then skipped)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0 \
        if _have("chattr") else False
    try:
        yield path if made else None
    finally:
        if made:
            subprocess.run(["chattr", "-i", str(path)], check=True)


def _have(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


@dataclass
class Inputs:
    """The files the battery's cases point at (built once per module, never modified)."""

    root: Path
    ckpt: Path
    qckpt: Path
    results: Path
    runs_dataset: Path
    plain_file: Path
    folder: Path
    read_only: Path | None
    bad: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Iterator[Inputs]:
    from flatlab.checkpoint import load_checkpoint
    from flatlab.results import run_attrs_from_checkpoint, run_id_for, write_group

    root = tmp_path_factory.mktemp("bad-input")
    ckpt = write_tiny_checkpoint(root / "tiny.pt")
    qckpt = write_tiny_checkpoint(root / "tiny4bit.pt", quantized=True)
    results = root / "results.h5"
    write_group(results, run_id_for(ckpt), run_attrs_from_checkpoint(load_checkpoint(ckpt)), "curvature",
                {"trace": np.asarray(1.0)})
    runs_dataset = root / "runs-dataset.h5"
    with h5py.File(runs_dataset, "w") as fh:
        fh.attrs["schema_version"] = 1
        fh["runs"] = np.arange(3)
    plain_file = root / "notes.txt"
    plain_file.write_text("not flatlab's\n")
    folder = root / "a-folder"
    folder.mkdir()
    bad = {
        "no_input_shape": write_tiny_checkpoint(root / "no-input-shape.pt", input_shape=...),
        "test_env_7": write_tiny_checkpoint(root / "test-env-7.pt", test_envs=[7]),
        "meta_string": write_raw_checkpoint(root / "meta-string.pt", "just a string"),
        "meta_no_model": write_raw_checkpoint(root / "meta-no-model.pt", {"dataset": "rotated-digits"}),
        "weights_not_tensors": root / "weights-not-tensors.pt",
    }
    meta, _ = tiny_meta()
    torch.save({"format": "flatlab-checkpoint", "format_version": 1, "meta": meta, "state_dict": {"w": [1, 2]},
                "w0": {}}, bad["weights_not_tensors"])
    with read_only_folder(root / "read-only") as ro:
        yield Inputs(root=root, ckpt=ckpt, qckpt=qckpt, results=results, runs_dataset=runs_dataset,
                     plain_file=plain_file, folder=folder, read_only=ro, bad=bad)


# --- the battery ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One bad command line: ``argv(inputs, tmp)``, the words its error must hold, and the paths
    that must not exist afterwards (``absent(inputs, tmp)``; globs allowed)."""

    name: str
    argv: Callable[[Inputs, Path], list[str]]
    expect: str
    absent: Callable[[Inputs, Path], list[str]] = lambda i, t: []
    needs_read_only: bool = False


TRAIN = ["train", "--quiet", "--model", "mlp", "--width", "4", "--depth", "1", "--resolution", "8", "--steps", "2"]


def _train(*extra: str) -> Callable[[Inputs, Path], list[str]]:
    return lambda i, t: [*TRAIN, "--out", str(t / "run"), *extra]


def _no_run(i: Inputs, t: Path) -> list[str]:
    return [str(t / "run")]


#: Paths an output cannot take, the words of each refusal and the path given a name: a file where
#: a folder goes, a folder where a file goes, a path under a file, and a folder nobody may write.
BAD_OUTPUTS: dict[str, tuple[str, Callable[[Inputs, str], Path]]] = {
    "is-file": ("it is a file, not a folder", lambda i, name: i.plain_file),
    "is-folder": ("it is a folder, not a file", lambda i, name: i.folder),
    "under-file": ("is a file, not a folder", lambda i, name: i.plain_file / name),
    "sys": ("cannot write /sys/{name}", lambda i, name: Path("/sys") / name),
}


def _on(command: str, source: str, *options: str) -> Callable[[Inputs], list[str]]:
    """``flatlab COMMAND <inputs.SOURCE> OPTIONS --quiet`` (the start of a command line)."""
    return lambda i: [command, str(getattr(i, source)), *options, "--quiet"]


def _bad_outputs(prefix: str, argv: Callable[[Inputs], list[str]], flag: str, name: str, *kinds: str) -> list[Case]:
    """The cases ``PREFIX-KIND`` of one output option: ``argv(inputs) FLAG <a bad path>`` for each
    kind of :data:`BAD_OUTPUTS` (``name``: the file or folder the option would write)."""
    return [Case(f"{prefix}-{kind}", lambda i, t, path=BAD_OUTPUTS[kind][1]: [*argv(i), flag, str(path(i, name))],
                 BAD_OUTPUTS[kind][0].format(name=name))
            for kind in kinds]


#: A cheap measurement of the tiny checkpoint, for the cases of its output path.
SHARPNESS = _on("sharpness", "ckpt", "--trace", "--trace-products", "6", "--max-samples", "50")

CASES = [
    # train: values and types, refused before anything is written
    Case("train-holdout-1.5", _train("--holdout-fraction", "1.5"), "holdout_fraction must lie strictly between 0 and 1", _no_run),
    Case("train-holdout-0", _train("--holdout-fraction", "0"), "holdout_fraction", _no_run),
    Case("train-hparams-lr-string", _train("--hparams", '{"lr": "x"}'), "lr must be a finite number, got 'x'", _no_run),
    Case("train-hparams-batch-float", _train("--hparams", '{"batch_size": 2.5}'), "batch_size must be an integer", _no_run),
    Case("train-hparams-bool-word", _train("--algorithm", "qat", "--hparams", '{"per_channel": "maybe"}'),
         "per_channel must be true or false", _no_run),
    Case("train-hparams-str-number", _train("--algorithm", "qat", "--hparams", '{"grad_scale_n": 3}'),
         "grad_scale_n must be a string", _no_run),
    Case("train-lr-nan", _train("--lr", "nan"), "lr must be a finite number", _no_run),
    Case("train-lr-negative", _train("--lr", "-1"), "lr must be positive", _no_run),
    Case("train-hparams-unknown", _train("--hparams", '{"lrr": 1}'), "unknown hyperparameter", _no_run),
    Case("train-hparams-not-object", _train("--hparams", "[1]"), "must be a JSON object", _no_run),
    Case("train-width-negative", lambda i, t: [*TRAIN, "--width", "-3", "--out", str(t / "run")],
         "--width must be a positive integer (model mlp option), got -3", _no_run),
    Case("train-width-zero", lambda i, t: [*TRAIN, "--width", "0", "--out", str(t / "run")],
         "--width must be a positive integer (model mlp option), got 0", _no_run),
    Case("train-depth-zero", _train("--depth", "0"), "--depth must be a positive integer (model mlp option)", _no_run),
    Case("train-steps-zero", _train("--steps", "0"), "steps must be at least 1", _no_run),
    Case("train-eval-every-negative", _train("--eval-every", "-1"), "eval_every must be at least 1", _no_run),
    Case("train-seed-negative", _train("--seed", "-1"), "seed must be at least 0", _no_run),
    Case("train-device-meta", _train("--device", "meta"), "device 'meta' is not supported", _no_run),
    Case("train-device-mps", _train("--device", "mps"), "device 'mps'", _no_run),
    Case("train-device-unknown", _train("--device", "banana"), "unknown device 'banana'", _no_run),
    Case("train-pretrained-missing", lambda i, t: [*TRAIN, "--pretrained", str(t / "none.pt"), "--out", str(t / "run")],
         "pretrained weights file", _no_run),
    Case("train-test-env-unknown", _train("--test-env", "9"), "unknown domain", _no_run),
    # train: output folders that cannot be
    *_bad_outputs("train-out", lambda i: TRAIN, "--out", "flatlab-test-run", "is-file", "under-file", "sys"),
    Case("train-out-read-only", lambda i, t: [*TRAIN, "--out", str(i.read_only / "run")], "cannot write",
         lambda i, t: [str(i.read_only / "run")], needs_read_only=True),
    # evaluate / info: damaged checkpoints and bad values
    Case("evaluate-batch-0", lambda i, t: ["evaluate", str(i.ckpt), "--batch-size", "0", "--quiet"],
         "batch_size must be a positive integer, got 0"),
    Case("evaluate-batch-negative", lambda i, t: ["evaluate", str(i.ckpt), "--batch-size", "-1", "--quiet"],
         "batch_size must be a positive integer, got -1"),
    Case("evaluate-device-meta", lambda i, t: ["evaluate", str(i.ckpt), "--device", "meta", "--quiet"],
         "device 'meta' is not supported"),
    Case("evaluate-test-env-out-of-range", lambda i, t: ["evaluate", str(i.bad["test_env_7"]), "--quiet"],
         "test domain index 7 is outside 0..5"),
    Case("evaluate-no-input-shape", lambda i, t: ["evaluate", str(i.bad["no_input_shape"]), "--quiet"],
         "no 'input_shape'"),
    Case("evaluate-meta-string", lambda i, t: ["evaluate", str(i.bad["meta_string"]), "--quiet"],
         "its metadata is a str, not a dict"),
    Case("info-meta-string", lambda i, t: ["info", str(i.bad["meta_string"]), "--quiet"], "its metadata is a str"),
    Case("info-meta-no-model", lambda i, t: ["info", str(i.bad["meta_no_model"]), "--quiet"], "no 'domains'"),
    Case("evaluate-weights-not-tensors", lambda i, t: ["evaluate", str(i.bad["weights_not_tensors"]), "--quiet"],
         "is not a dict of named tensors"),
    # surface: validated before any work (no output, no journal)
    Case("surface-name-dotdot", lambda i, t: ["surface", str(i.ckpt), "--results", str(t / "r.h5"), "--name", "../x",
                                              "--quiet"],
         "invalid surface name '../x'", lambda i, t: [str(t / "r.h5"), str(t / "r.h5*")]),
    Case("surface-grid-too-big", lambda i, t: ["surface", str(i.ckpt), "--x", "-1:1:100000", "--y", "-1:1:100000",
                                               "--out", str(t / "s.h5"), "--quiet"],
         "100000 x 100000 grid has 10,000,000,000 points", lambda i, t: [str(t / "s.h5*")]),
    Case("surface-out-is-folder", lambda i, t: ["surface", str(i.ckpt), "--out", str(i.folder), "--quiet"],
         "it is a folder, not a file", lambda i, t: [str(i.folder) + ".journal"]),
    *_bad_outputs("surface-out", _on("surface", "ckpt"), "--out", "flatlab-s.h5", "sys", "under-file"),
    Case("surface-out-foreign-file", lambda i, t: ["surface", str(i.ckpt), "--out", str(i.plain_file), "--quiet"],
         "not an HDF5 file", lambda i, t: [str(i.plain_file) + ".journal"]),
    *_bad_outputs("surface-results", _on("surface", "ckpt"), "--results", "r.h5", "is-folder"),
    Case("surface-results-runs-dataset", lambda i, t: ["surface", str(i.ckpt), "--results", str(i.runs_dataset),
                                                       "--quiet"],
         "/runs is a dataset, not a group", lambda i, t: [str(i.runs_dataset) + ".*"]),
    Case("surface-out-read-only", lambda i, t: ["surface", str(i.ckpt), "--out", str(i.read_only / "s.h5"), "--quiet"],
         "cannot write", needs_read_only=True),
    # export / ensemble / figures / report: output paths
    *_bad_outputs("export-out", _on("export", "qckpt"), "--out", "flatlab-x.pt", "sys", "under-file"),
    Case("export-out-is-folder", lambda i, t: ["export", str(i.qckpt), "--out", str(i.folder), "--quiet"],
         "is a folder"),
    *_bad_outputs("ensemble-out", _on("ensemble", "ckpt"), "--out", "flatlab-ens", "is-file", "sys"),
    *_bad_outputs("ensemble-results", _on("ensemble", "ckpt"), "--results", "r.h5", "is-folder"),
    Case("ensemble-results-foreign", lambda i, t: ["ensemble", str(i.ckpt), "--results", str(i.plain_file), "--quiet"],
         "is not a flatlab results file"),
    Case("ensemble-batch-0", lambda i, t: ["ensemble", str(i.ckpt), "--batch-size", "0", "--quiet"], "batch-size"),
    *_bad_outputs("figures-out", _on("figures", "results"), "--out", "flatlab-figs", "is-file", "sys"),
    *_bad_outputs("report-csv", _on("report", "ckpt"), "--csv", "flatlab-r.csv", "is-folder", "sys"),
    # sharpness: a refused --results is named with the reason
    Case("sharpness-out-sys", lambda i, t: [*SHARPNESS(i), "--results", "/sys/flatlab-m.h5"],
         "cannot write /sys/flatlab-m.h5: permission denied"),
    *_bad_outputs("sharpness-out", SHARPNESS, "--results", "m.h5", "is-folder"),
    Case("report-runs-dataset", lambda i, t: ["report", str(i.runs_dataset), "--quiet"], "/runs is a dataset"),
]


def assert_one_error_line(err: str, expect: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("flatlab: error: "), err
    assert expect in err, err


def test_battery_is_large_enough():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case: Case, inputs: Inputs, tmp_path: Path, capsys):
    if case.needs_read_only and inputs.read_only is None:
        pytest.skip("cannot make a read-only folder here (root without chattr)")
    before = sorted(p.name for p in inputs.root.rglob("*"))
    argv = case.argv(inputs, tmp_path)
    assert main(argv) == 2, argv
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, case.expect)
    assert captured.out == ""
    for pattern in case.absent(inputs, tmp_path):
        found = list(Path(pattern).parent.glob(Path(pattern).name)) if "*" in pattern else \
            ([Path(pattern)] if Path(pattern).exists() else [])
        assert not found, f"{case.name} left {found}"
    # The shared inputs are never touched: no lock, journal or temporary file appears next to them.
    assert sorted(p.name for p in inputs.root.rglob("*")) == before


def test_cli_error_subprocess_has_no_traceback(inputs: Inputs, tmp_path: Path):
    """The same contract seen from outside: a separate process, its real stderr and exit status."""
    proc = subprocess.run([sys.executable, "-m", "flatlab.cli", *_train("--width", "0")(inputs, tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "--width must be a positive integer (model mlp option), got 0")
    assert not (tmp_path / "run").exists()


# --- the error path of cli.main -----------------------------------------------------------------

def _failing_command(exc: BaseException, with_bar: bool):
    def run(args):
        if with_bar:
            from tqdm import tqdm

            bar = tqdm(total=10, file=sys.stderr, desc="work", ascii=True)
            bar.update(3)  # a half-drawn bar: its line has no newline yet
        raise exc

    return run


def test_error_line_starts_on_a_fresh_line_after_a_progress_bar(monkeypatch, capsys):
    import flatlab.commands.info as info
    from flatlab.errors import FlatlabError

    monkeypatch.setattr(info, "run", _failing_command(FlatlabError("the input is wrong"), with_bar=True))
    assert main(["info", "x.pt"]) == 2
    err = capsys.readouterr().err
    assert "work" in err  # the bar was drawn
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last == "flatlab: error: the input is wrong", repr(err)  # its own line, not after the bar
    from tqdm import tqdm

    assert not list(getattr(tqdm, "_instances", ()))  # every bar was closed


def test_interrupt_also_closes_bars(monkeypatch, capsys):
    import flatlab.commands.info as info

    monkeypatch.setattr(info, "run", _failing_command(KeyboardInterrupt(), with_bar=True))
    assert main(["info", "x.pt"]) == 130
    last = capsys.readouterr().err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("flatlab: interrupted; rerun the same command")


@pytest.mark.parametrize("exc, words", [
    (PermissionError(13, "Permission denied", "/data/out.h5"), "cannot access /data/out.h5: permission denied"),
    (IsADirectoryError(21, "Is a directory", "/data/dir"), "cannot access /data/dir: it is a folder, not a file"),
    (OSError(30, "Read-only file system", "/mnt/ro/x"), "cannot access /mnt/ro/x: read-only file system"),
], ids=["permission", "is-a-directory", "read-only"])
def test_os_errors_naming_a_path_become_one_line(monkeypatch, capsys, exc, words):
    import flatlab.commands.info as info

    monkeypatch.setattr(info, "run", _failing_command(exc, with_bar=False))
    assert main(["info", "x.pt"]) == 2
    assert_one_error_line(capsys.readouterr().err, words)


def test_os_errors_without_a_path_are_bugs_and_keep_their_traceback(monkeypatch):
    import flatlab.commands.info as info

    monkeypatch.setattr(info, "run", _failing_command(OSError(5, "Input/output error"), with_bar=False))
    with pytest.raises(OSError, match="Input/output error"):
        main(["info", "x.pt"])


def test_bars_of_an_enclosing_pipeline_stay_open(monkeypatch, capsys):
    """A command run in-process with its stderr redirected (flatlab.pipeline.run_flatlab) closes
    its own bars only, not the pipeline's bar on the real stderr."""
    import contextlib
    import io

    from tqdm import tqdm

    import flatlab.commands.info as info
    from flatlab.errors import FlatlabError

    outer = tqdm(total=5, file=sys.stderr, desc="pipeline")
    try:
        monkeypatch.setattr(info, "run", _failing_command(FlatlabError("inner failure"), with_bar=True))
        inner_err = io.StringIO()
        with contextlib.redirect_stderr(inner_err):
            assert main(["info", "x.pt"]) == 2
        assert inner_err.getvalue().rstrip("\n").rsplit("\n", 1)[-1] == "flatlab: error: inner failure"
        assert outer in list(tqdm._instances) and not outer.disable
    finally:
        outer.close()
