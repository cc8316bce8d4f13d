"""Checkpoint round trip, w0, and every kind of bad file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatlab.checkpoint import load_checkpoint, safe_torch_load, save_checkpoint
from flatlab.cli import main
from flatlab.errors import FlatlabError
from flatlab.models import build_model
from flatlab.train.trainer import seed_everything


def test_round_trip_identical_logits(erm_run: Path, tmp_path: Path):
    ckpt = load_checkpoint(erm_run / "model.pt")
    model = ckpt.build_model()
    x = ckpt.splits().split_batches("target", batch_size=64)[0][0]
    copy = tmp_path / "copy.pt"
    save_checkpoint(copy, model, ckpt.w0, ckpt.meta)
    again = load_checkpoint(copy).build_model()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_w0_equals_model_at_step_zero(erm_run: Path):
    ckpt = load_checkpoint(erm_run / "model.pt")
    meta = ckpt.meta
    seed_everything(meta["seed"])
    fresh = build_model(meta["model"], meta["input_shape"], meta["num_classes"], **meta["model_options"])
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, ckpt.w0[name]), name
    # and training moved the weights away from w0
    assert any(not torch.equal(ckpt.state_dict[k], ckpt.w0[k]) for k in ckpt.w0)


def test_checkpoint_names_its_provenance(erm_run: Path):
    meta = load_checkpoint(erm_run).meta
    for key in ("dataset", "domains", "test_envs", "model", "model_options", "algorithm", "seed",
                "trial_seed", "step", "hparams", "train_size", "bits"):
        assert key in meta
    assert meta["test_envs"] == [0] and meta["algorithm"] == "erm" and meta["bits"] is None


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['FLATLAB_EVIL_MARKER']}",))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path, capsys):
    marker = tmp_path / "pwned"
    os.environ["FLATLAB_EVIL_MARKER"] = str(marker)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "flatlab-checkpoint", "payload": _Evil()}, evil)
    assert main(["info", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatlab: error: refused to load") and err.count("\n") == 1
    assert not marker.exists()


def test_truncated_checkpoint(erm_run: Path, tmp_path: Path, capsys):
    data = (erm_run / "model.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    assert main(["evaluate", str(cut)]) == 2
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and err.count("\n") == 1


def test_not_a_checkpoint(tmp_path: Path, capsys):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, plain)
    assert main(["info", str(plain)]) == 2
    assert "not a flatlab checkpoint" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert main(["info", str(text)]) == 2
    assert main(["info", str(tmp_path / "missing.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_weights_that_do_not_fit(erm_run: Path, tmp_path: Path, capsys):
    payload = safe_torch_load(erm_run / "model.pt")
    payload["meta"]["model_options"] = {**payload["meta"]["model_options"], "width": 5}
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    with pytest.raises(FlatlabError, match="do not fit"):
        load_checkpoint(other).build_model()
    assert main(["evaluate", str(other)]) == 2
    err = capsys.readouterr().err
    assert "do not fit model cnn" in err and err.count("\n") == 1


def test_cli_error_has_no_traceback(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "flatlab.cli", "evaluate", str(tmp_path / "none.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("flatlab: error:") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
