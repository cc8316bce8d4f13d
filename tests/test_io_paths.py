"""Output-path checks and own-file cleanup (flatlab.io): what is refused, what is deleted, what
is left. Each check is against the file system itself: the files that exist before and after."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flatlab.errors import FlatlabError
from flatlab.io import (
    atomic_path,
    atomic_write_text,
    check_writable,
    clear_own_files,
    remove_stale_temp_files,
    temp_pattern,
)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_check_writable_accepts_new_and_existing_paths_and_creates_nothing(tmp_path: Path):
    (tmp_path / "old.h5").write_text("x")
    (tmp_path / "dir").mkdir()
    before = _tree(tmp_path)
    assert check_writable(tmp_path / "new.h5") == tmp_path / "new.h5"
    check_writable(tmp_path / "old.h5")
    check_writable(tmp_path / "a" / "b" / "c.h5")  # parents are created later, by the writer
    check_writable(tmp_path / "dir", "folder")
    check_writable(tmp_path / "x" / "y", "folder")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("make, kind, words", [
    (lambda t: t / "dir", "file", "it is a folder, not a file"),
    (lambda t: t / "plain", "folder", "it is a file, not a folder"),
    (lambda t: t / "plain" / "sub" / "x.h5", "file", "plain is a file, not a folder"),
    (lambda t: t / "plain" / "run", "folder", "plain is a file, not a folder"),
    (lambda t: Path("/sys/flatlab-probe-test"), "folder", "permission denied"),
    (lambda t: Path("/sys/flatlab-probe-test.h5"), "file", "permission denied"),
], ids=["folder-for-file", "file-for-folder", "file-in-path", "file-in-path-folder", "sys-folder", "sys-file"])
def test_check_writable_refusals(tmp_path: Path, make, kind, words):
    (tmp_path / "dir").mkdir()
    (tmp_path / "plain").write_text("x")
    target = make(tmp_path)
    with pytest.raises(FlatlabError, match="cannot write") as info:
        check_writable(target, kind)
    assert str(target) in str(info.value) and words in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "plain"]


def test_atomic_path_turns_os_errors_into_one_message_and_leaves_nothing(tmp_path: Path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(FlatlabError, match=f"cannot write {tmp_path / 'dir'}: it is a folder, not a file"):
        atomic_write_text(tmp_path / "dir", "text")  # e.g. report --csv DIR
    (tmp_path / "plain").write_text("x")
    with pytest.raises(FlatlabError, match="a part of the path is a file, not a folder"):
        atomic_write_text(tmp_path / "plain" / "out.csv", "text")
    with pytest.raises(FlatlabError, match="cannot write /sys/flatlab-x.csv: permission denied"):
        atomic_write_text("/sys/flatlab-x.csv", "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "plain"]
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == []
    # Errors of the caller's own code inside the block stay what they are.
    with pytest.raises(KeyError), atomic_path(tmp_path / "ok.txt"):
        raise KeyError("not about the path")
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "ok.txt"):
        open(tmp_path / "some-input-that-is-missing")  # noqa: SIM115 - reading another file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "plain"]


def test_clear_own_files_deletes_only_own_files_and_refuses_before_deleting(tmp_path: Path):
    own = ["model.pt", "done", "run.json"]
    patterns = [temp_pattern(n) for n in own]
    for name in [*own, ".model.pt.abc.tmp", ".lock"]:
        (tmp_path / name).write_text("x")
    (tmp_path / "paper.pdf").write_text("foreign")
    with pytest.raises(FlatlabError, match="it holds the file paper.pdf, which this command did not write"):
        clear_own_files(tmp_path, [*own, ".lock"], patterns, keep=[".lock"])
    assert len(list(tmp_path.iterdir())) == 6  # nothing deleted
    (tmp_path / "paper.pdf").unlink()
    (tmp_path / "done").unlink()
    (tmp_path / "done").mkdir()  # an own name, but a folder: not ours to delete
    with pytest.raises(FlatlabError, match="it holds the folder done"):
        clear_own_files(tmp_path, [*own, ".lock"], patterns, keep=[".lock"])
    (tmp_path / "done").rmdir()
    link = tmp_path / "run.json"
    link.unlink()
    link.symlink_to(tmp_path / ".lock")  # a link named like an own file: refused, not followed
    with pytest.raises(FlatlabError, match="run.json"):
        clear_own_files(tmp_path, [*own, ".lock"], patterns, keep=[".lock"])
    link.unlink()
    removed = clear_own_files(tmp_path, [*own, ".lock"], patterns, keep=[".lock"])
    assert [p.name for p in removed] == [".model.pt.abc.tmp", "model.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    assert clear_own_files(tmp_path / "missing", own) == []
    with pytest.raises(FlatlabError, match="is a file, not a folder"):
        clear_own_files(tmp_path / ".lock", own)


def test_remove_stale_temp_files_matches_atomic_paths_own_pattern(tmp_path: Path):
    # The names atomic_path really makes, left behind as a SIGKILL would leave them.
    made = []
    for name, suffix in (("state.pt", ".pt"), ("model.pt", ""), ("results.jsonl", "")):
        with atomic_path(tmp_path / name, suffix=suffix) as tmp:
            made.append(tmp.name)
            os.link(tmp, tmp_path / f"copy-{name}")  # keep a second name: the "torn" temp file
        os.rename(tmp_path / f"copy-{name}", tmp_path / tmp.name)
    keep = ["state.pt", "model.pt", "results.jsonl", ".other.abc.tmp", ".state.pt.backup", "notes.tmp"]
    for name in keep[3:]:
        (tmp_path / name).write_text("mine")
    removed = remove_stale_temp_files(tmp_path, ["state.pt", "model.pt", "results.jsonl"])
    assert sorted(p.name for p in removed) == sorted(made)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
