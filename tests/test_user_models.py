"""A model and data flatlab did not train, through the command line (flatlab.sources).

A torchvision ResNet-18 state dict (6 classes) and a one-block torchvision VisionTransformer
(scaled-dot-product attention) on random 3x16x16 images from a ``--data-fn`` module written into
a temporary folder go through ``flatlab sharpness``, ``surface``, ``report`` and ``figures``
in-process (``flatlab.cli.main``); the CLI's eigenvalues equal ``flatlab.measure_model``'s on the
same model and batches; a flatlab CNN on the built-in digits covers ``--dataset``. Bad inputs:
one line, exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from test_bad_input import assert_one_error_line

from flatlab.cli import main

USER_MODULE = '''
import torch
from torch.utils.data import DataLoader, TensorDataset


def tiny_vit(num_classes=6):
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=num_classes)


def make_splits(n=24, batch=12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, 3, 16, 16, generator=g)
    y = torch.arange(2 * n) % 6
    source = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    target = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=batch)  # a DataLoader is read once, in order
    return {"source": source, "target": target}


def not_splits():
    return 3
'''


class PickledObject:
    """Not a state dict: ``torch.load(weights_only=True)`` refuses to unpickle it."""


@dataclass
class Files:
    root: Path
    module: Path
    resnet: Path
    vit: Path

    @property
    def data_fn(self) -> str:
        return f"{self.module}:make_splits"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("user-models")
    module = root / "usermods.py"
    module.write_text(textwrap.dedent(USER_MODULE), encoding="utf-8")
    (root / "broken.py").write_text("import no_such_package_for_flatlab\n", encoding="utf-8")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=6).state_dict(), root / "r18.pt")
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=6)
    torch.save({"model": vit.state_dict(), "epoch": 3}, root / "vit.pt")  # a training script's dict
    torch.save({"model": PickledObject()}, root / "pickled.pt")
    torch.save([torch.zeros(2)], root / "list.pt")
    return Files(root, module, root / "r18.pt", root / "vit.pt")


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resnet18_state_dict_eigenvalues_equal_the_api(files: Files, tmp_path: Path, capsys):
    results = tmp_path / "r.h5"
    # ResNet-18 products take ~0.5 s each on the 2-core CPU: 8 samples, a loose Lanczos tolerance.
    code, out, err = _cli(["sharpness", "--arch", "resnet18", "--num-classes", "6", "--weights", files.resnet,
                           "--data-fn", files.data_fn, "--data-args", '{"n": 8, "batch": 8}', "--top-k", "1",
                           "--rtol", "0.05", "--trace", "--trace-products", "3", "--device", "cpu",
                           "--results", results, "--json", "--quiet"], capsys)
    assert code == 0, err
    payload = json.loads(out)
    assert payload["model"] == "resnet18" and payload["n_samples"] == 8

    import flatlab
    from flatlab.measures import MeasurementSettings, TopEigenvaluesConfig
    from flatlab.sources import import_callable

    model = torchvision.models.resnet18(num_classes=6)
    model.load_state_dict(torch.load(files.resnet, weights_only=True))
    data = {k: list(v) for k, v in import_callable(files.data_fn, "data_fn")(n=8, batch=8).items()}
    # The eigenvalue alone: each measure draws from its own seeded generator, so the trace the
    # CLI computed besides does not change it (and the API's call is 7 products, not 10).
    api = flatlab.measure_model(model.eval(), data, [TopEigenvaluesConfig(top_k=1, rtol=0.05)],
                                settings=MeasurementSettings(device="cpu"))
    np.testing.assert_allclose(payload["top_eigenvalues"], api["top_eigenvalues"].payload["top_eigenvalues"],
                               rtol=1e-6)

    from flatlab.results import read_results

    run = read_results(results)["runs"][payload["run_id"]]
    attrs = run["attrs"]
    assert attrs["algorithm"] == "user" and attrs["arch"] == "resnet18" and attrs["num_classes"] == 6
    assert attrs["weights"] == str(files.resnet.resolve()) and attrs["weights_sha256"] == _sha256(files.resnet)
    assert attrs["data_fn"] == files.data_fn and attrs["split_sizes"] == {"source": 8, "target": 8}
    assert attrs["data_args"] == {"n": 8, "batch": 8}
    assert attrs["run_id_source"].startswith("derived") and "command_line" in attrs
    np.testing.assert_allclose(run["curvature"]["top_eigenvalues"], payload["top_eigenvalues"])


def test_vit_sharpness_surface_report_figures(files: Files, tmp_path: Path, capsys):
    results = tmp_path / "vit.h5"
    model = ["--model-fn", f"{files.module}:tiny_vit", "--weights", files.vit, "--data-fn", files.data_fn]
    code, out, err = _cli(["sharpness", *model, "--top-k", "2", "--trace", "--trace-products", "6", "--device", "cpu",
                           "--results", results, "--json", "--quiet"], capsys)
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    code, out, err = _cli(["surface", *model, "--x", "-0.5:0.5:3", "--y", "-0.5:0.5:3", "--results", results,
                           "--name", "plane", "--device", "cpu", "--json", "--quiet"], capsys)
    assert code == 0, err
    surface = json.loads(out)
    assert surface["group"] == "surfaces/plane" and surface["shape"] == [3, 3]
    assert surface["settings"]["weights_sha256"] == _sha256(files.vit)
    # A second model in the same file: a run named by hand, on the target split.
    code, _, err = _cli(["sharpness", "--model-fn", f"{files.module}:tiny_vit", "--weights", files.vit,
                         "--data-fn", files.data_fn, "--split", "target", "--top-k", "1", "--run-id", "vit-target",
                         "--device", "cpu", "--results", results, "--quiet"], capsys)
    assert code == 0, err

    from flatlab.results import read_results

    runs = read_results(results)["runs"]
    assert set(runs) == {run_id, "vit-target"}
    assert "plane" in runs[run_id]["surfaces"] and runs[run_id]["attrs"]["model"] == f"{files.module}:tiny_vit"
    assert runs["vit-target"]["attrs"]["run_id_source"] == "given"

    code, out, err = _cli(["report", results, "--json"], capsys)
    assert code == 0, err
    rows = {r["run_id"]: r for r in json.loads(out)["rows"]}
    assert rows[run_id]["algorithm"] == "user" and rows[run_id]["test_domain"] is None
    assert rows[run_id]["top_eigenvalue"] > 0 and rows[run_id]["id_acc"] is None  # unknown: missing, not zero
    assert rows["vit-target"]["variant"] == "user"

    code, _, err = _cli(["figures", results, "--out", tmp_path / "figs", "--quiet"], capsys)
    assert code == 0, err
    assert any(p.name.startswith("contour_") for p in (tmp_path / "figs").iterdir())


def test_evaluate_a_user_model(files: Files, capsys):
    code, out, err = _cli(["evaluate", "--model-fn", f"{files.module}:tiny_vit", "--weights", files.vit,
                           "--data-fn", files.data_fn, "--device", "cpu", "--json", "--quiet"], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert 0.0 <= metrics["source_acc"] <= 1.0 and metrics["ood_acc"] == metrics["target_acc"]
    assert metrics["source_loss"] > 0


def test_builtin_digits_with_a_flatlab_model(tmp_path: Path, capsys):
    results = tmp_path / "d.h5"
    code, out, err = _cli(["sharpness", "--arch", "cnn", "--model-args", '{"width": 4}', "--dataset", "rotated-digits",
                           "--test-env", "15", "--resolution", "8", "--max-samples", "64", "--top-k", "1",
                           "--run-id", "digits-cnn", "--device", "cpu", "--results", results, "--json", "--quiet"],
                          capsys)
    assert code == 0, err
    assert json.loads(out)["n_samples"] == 64

    from flatlab.results import read_results

    attrs = read_results(results)["runs"]["digits-cnn"]["attrs"]
    assert attrs["dataset"] == "rotated-digits" and attrs["test_envs"] == [1] and attrs["init_seed"] == 0
    assert attrs["dataset_options"]["resolution"] == 8 and "weights" not in attrs
    code, out, err = _cli(["report", results, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["rows"][0]["test_domain"] == "15"


NO_DATA = "(no --data-fn)"
BAD = [
    ("wrong-architecture", ["--arch", "resnet34", "--num-classes", "6", "--weights", "{r18}"], "do not fit model resnet34"),
    ("wrong-classes", ["--arch", "resnet18", "--num-classes", "10", "--weights", "{r18}"], "check --num-classes"),
    ("missing-module", ["--model-fn", "no_such_module_for_flatlab:build"],
     "--model-fn names module no_such_module_for_flatlab, which cannot be imported (ModuleNotFoundError"),
    ("module-fails", ["--model-fn", "{root}/broken.py:build"], "No module named 'no_such_package_for_flatlab'"),
    ("function-not-found", ["--model-fn", "{module}:nope"], "does not define (it defines"),
    ("checkpoint-and-model-fn", ["{r18}", "--model-fn", "{module}:tiny_vit"], "not both"),
    ("pickled-object", ["--arch", "resnet18", "--num-classes", "6", "--weights", "{root}/pickled.pt"],
     "refused to load"),
    ("not-a-state-dict", ["--arch", "resnet18", "--num-classes", "6", "--weights", "{root}/list.pt"],
     "holds a list, not a state dict"),
    ("data-fn-not-splits", ["--model-fn", "{module}:tiny_vit", "--data-fn", "{module}:not_splits"],
     "returned a int"),
    ("no-data", ["--model-fn", "{module}:tiny_vit", NO_DATA], "needs data"),
    ("unknown-arch", ["--arch", "resnet1800"], "is not an architecture"),
]


@pytest.mark.parametrize("command", ["sharpness", "surface", "evaluate"])
@pytest.mark.parametrize("name, argv, expect", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(files: Files, tmp_path: Path, capsys, command, name, argv, expect):
    given = [a.format(r18=files.resnet, root=files.root, module=files.module) for a in argv if a != NO_DATA]
    data = [] if "--data-fn" in argv or NO_DATA in argv else ["--data-fn", files.data_fn]
    results = [] if command == "evaluate" else ["--results", tmp_path / "r.h5"]
    code, out, err = _cli([command, *given, *data, *results, "--quiet"], capsys)
    assert code == 2
    assert_one_error_line(err, expect)
    assert not (tmp_path / "r.h5").exists()


def test_surface_refuses_interpolation_of_a_user_model(files: Files, tmp_path: Path, capsys):
    code, _, err = _cli(["surface", "--model-fn", f"{files.module}:tiny_vit", "--data-fn", files.data_fn,
                         "--model2", files.vit, "--quiet"], capsys)
    assert code == 2
    assert_one_error_line(err, "--model2 applies to flatlab checkpoints")
