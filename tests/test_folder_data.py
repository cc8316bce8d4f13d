"""DomainBed folder data sets and ResNets, on a tiny image tree built here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flatlab.checkpoint import load_checkpoint
from flatlab.cli import main
from flatlab.data import DomainSplits, build_dataset
from flatlab.errors import FlatlabError

DOMAINS = ["beta", "alpha", "gamma"]  # created out of order: discovery must sort them
CLASSES = {"beta": ["dog", "cat"], "alpha": ["cat", "dog", "emu"], "gamma": ["cat", "dog", "emu"]}


def make_tree(root: Path, per_class: int = 4, corrupt: bool = True) -> Path:
    rng = np.random.RandomState(0)
    for d_i, domain in enumerate(DOMAINS):
        for c_i, cls in enumerate(CLASSES[domain]):
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                base = np.full((20, 24, 3), 40 * c_i + 10 * d_i, dtype=np.uint8)
                img = np.clip(base + rng.randint(0, 60, size=base.shape), 0, 255).astype(np.uint8)
                ext = ".png" if k % 2 == 0 else ".jpg"
                Image.fromarray(img).save(folder / f"img{k}{ext}")
    if corrupt:
        (root / "alpha" / "cat" / "broken.png").write_bytes(b"this is not an image")
    (root / "alpha" / "cat" / "notes.txt").write_text("ignored: not an image extension")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("imgs") / "tree")


def test_discovery_order_classes_and_corrupt_file(tree: Path, capsys):
    ds = build_dataset("folder", data_dir=str(tree), resolution=16, workers=2)
    assert ds.domains == ["alpha", "beta", "gamma"]
    assert ds.classes == ["cat", "dog", "emu"] and ds.num_classes == 3
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "broken.png" in err
    assert [ds.domain_size(e) for e in range(3)] == [12, 8, 12]
    # One class, one label, in every domain: beta has no emu, yet dog is 1 everywhere.
    for env, domain in enumerate(ds.domains):
        labels = ds.labels(env).tolist()
        names = [ds._paths[env][i].parent.name for i in range(len(labels))]
        assert all(ds.classes[lab] == name for lab, name in zip(labels, names)), domain


def test_augmentation_only_on_training_draws(tree: Path):
    ds = build_dataset("folder", data_dir=str(tree), resolution=16, workers=2)
    splits = DomainSplits(ds, [2], trial_seed=0)
    idx = splits.in_idx[0]
    a, _ = ds.load(0, idx, augment=False)
    b, _ = ds.load(0, idx, augment=False)
    assert torch.equal(a, b) and a.shape == (len(idx), 3, 16, 16)
    out_a = splits.split_batches("source-out")
    out_b = splits.split_batches("source-out")
    assert all(torch.equal(x[0], y[0]) for x, y in zip(out_a, out_b))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    aug1, _ = ds.load(0, idx, augment=True, generator=g1)
    aug2, _ = ds.load(0, idx, augment=True, generator=g2)
    assert torch.equal(aug1, aug2)  # seeded: resumable
    assert not torch.equal(aug1, a)  # and really augmented
    # The named split "source" is the un-augmented training set.
    src = torch.cat([x for x, _ in splits.split_batches("source")])
    plain = torch.cat([ds.load(e, splits.in_idx[e])[0] for e in splits.source_envs])
    assert torch.equal(src, plain)


def test_cache_budget_and_streaming(tree: Path):
    tiny = build_dataset("folder", data_dir=str(tree), resolution=16, cache_mb=0, workers=1)
    big = build_dataset("folder", data_dir=str(tree), resolution=16, cache_mb=64, workers=1)
    idx = np.arange(tiny.domain_size(0))
    x_stream, _ = tiny.load(0, idx)
    x_cached, _ = big.load(0, idx)
    big.load(0, idx)
    assert torch.equal(x_stream, x_cached)
    assert tiny._cache.used == 0 and big._cache.hits == len(idx)


TRAIN = [sys.executable, "-m", "flatlab.cli", "train", "--quiet", "--dataset", "folder", "--model", "resnet18",
         "--resolution", "32", "--batch-size", "2", "--test-env", "gamma", "--lr", "1e-3", "--decode-threads", "1"]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_resnet18_trains_and_resumes(tree: Path, tmp_path: Path):
    args = ["--data-dir", str(tree), "--steps", "8", "--eval-every", "2", "--seed", "1"]
    whole = tmp_path / "whole"
    subprocess.run(TRAIN + args + ["--out", str(whole)], check=True, stderr=subprocess.DEVNULL)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(TRAIN + args + ["--out", str(cut)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _lines(cut / "results.jsonl") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (cut / "state.pt").exists() and not (cut / "done").exists()
    subprocess.run(TRAIN + args + ["--out", str(cut)], check=True, stderr=subprocess.DEVNULL)
    a, b = load_checkpoint(whole), load_checkpoint(cut)
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    meta = a.meta
    assert meta["model"] == "resnet18" and meta["model_options"]["freeze_bn"] is True
    assert meta["data_hash"] and meta["test_env_names"] == ["gamma"]
    # Frozen BatchNorm: running statistics never moved during training.
    bn = [k for k in a.state_dict if k.endswith("running_mean")]
    assert bn and all(torch.equal(a.state_dict[k], a.w0[k]) for k in bn)
    # But the BN affine parameters (trainable) did.
    assert any(not torch.equal(a.state_dict[k.replace("running_mean", "weight")], a.w0[k.replace("running_mean", "weight")])
               for k in bn)


def test_data_dir_hash_check(tree: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert main(TRAIN[3:] + ["--data-dir", str(tree), "--steps", "2", "--eval-every", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    moved = tmp_path / "moved"
    shutil.copytree(tree, moved)
    assert main(["evaluate", str(run / "model.pt"), "--data-dir", str(moved), "--json", "--quiet"]) == 0
    assert "ood_acc" in json.loads(capsys.readouterr().out)
    (moved / "beta" / "dog" / "img0.png").rename(moved / "beta" / "dog" / "renamed.png")
    assert main(["evaluate", str(run / "model.pt"), "--data-dir", str(moved)]) == 2
    err = capsys.readouterr().err
    assert "differ from the data this checkpoint was trained on" in err.splitlines()[-1]
    assert sum(line.startswith("flatlab: error") for line in err.splitlines()) == 1


def test_bad_folder_input(tree: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "noimg"
    make_tree(no_images, corrupt=False)
    for f in (no_images / "beta").rglob("*.*"):
        f.unlink()
    cases = [
        (["--dataset", "PACS"], "--data-dir must be given"),
        (["--data-dir", str(tmp_path / "missing")], "does not exist"),
        (["--data-dir", str(empty)], "needs at least 2"),
        (["--data-dir", str(no_images)], "holds no readable images"),
        (["--data-dir", str(tree), "--test-env", "delta"], "unknown domain"),
        (["--dataset", "PACS", "--data-dir", str(tree)], "missing domain folder"),
    ]
    for extra, message in cases:
        base = ["train", "--quiet", "--dataset", "folder", "--model", "resnet18", "--out", str(tmp_path / "o")]
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("flatlab: error:") and message in err, (extra, err)
        assert sum(line.startswith("flatlab: error") for line in err.splitlines()) == 1


def test_named_layout_and_pretrained(tmp_path: Path):
    import torchvision

    root = tmp_path / "data" / "PACS"
    for domain in ["art_painting", "cartoon", "photo", "sketch"]:
        for cls in ["dog", "horse"]:
            (root / domain / cls).mkdir(parents=True)
            for k in range(3):
                Image.fromarray(np.full((12, 12, 3), 50 * k + 20, dtype=np.uint8)).save(root / domain / cls / f"{k}.png")
    ds = build_dataset("PACS", data_dir=str(tmp_path / "data"), resolution=16)
    assert ds.domains == ["art_painting", "cartoon", "photo", "sketch"]
    weights = torchvision.models.resnet18(weights=None).state_dict()
    pretrained = tmp_path / "resnet18.pth"
    torch.save(weights, pretrained)
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--dataset", "PACS", "--data-dir", str(tmp_path / "data"), "--model", "resnet18",
                 "--resolution", "32", "--batch-size", "2", "--test-env", "sketch", "--steps", "1",
                 "--pretrained", str(pretrained), "--out", str(out)]) == 0
    w0 = load_checkpoint(out).w0
    assert torch.equal(w0["features.conv1.weight"], weights["conv1.weight"])
    assert torch.equal(w0["features.layer4.1.bn2.running_var"], weights["layer4.1.bn2.running_var"])
    with pytest.raises(FlatlabError, match="no tensor"):
        from flatlab.models import build_model, load_pretrained

        bogus = tmp_path / "bogus.pth"
        torch.save({"x": torch.zeros(2)}, bogus)
        load_pretrained(build_model("resnet18", (3, 32, 32), 2), str(bogus))
