"""Any architecture through every measure and the surfaces: dict and tuple outputs (``output_fn``),
DataLoaders, a custom loss, and regression models.

Each measure of :data:`flatlab.measures.MEASURES` runs through :func:`flatlab.measure_model`
(and :func:`flatlab.surface.surface_of_model`) on a tiny MLP: an adapted model (dict/tuple output,
DataLoader data) gives exactly the plain model's results on the plain batch lists, a regressor
gets finite loss-based measures and a clear refusal from the accuracy-based bounds, and the
user's model keeps its train/eval modes, weights and device.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatlab.errors import ConfigError, FlatlabError
from flatlab.measures import MEASURES, MeasurementSettings, get_measure
from flatlab.outputs import ACCURACY_MEASURES
from flatlab.pipeline import measure_model
from flatlab.resume import to_jsonable
from flatlab.surface import surface_of_model

#: Cheap settings, as tests/test_registry.py measures every measure.
CHEAP: dict[str, Any] = {"top_k": 2, "trace_products": 6, "density_steps": 6, "mc_samples": 2,
                         "bisection_depth": 4, "ascent_steps": 2, "samples": 4, "gammas_rel": (0.05,),
                         "max_mc_samples": 10}
SETTINGS = MeasurementSettings(batch_size=32, device="cpu", seed=3)
BATCH = 32
XS = np.linspace(-0.5, 0.5, 3)


def _config(name: str) -> Any:
    measure = get_measure(name)
    names = {s.name for s in measure.config.setting_specs()}
    return measure.config(**{k: v for k, v in CHEAP.items() if k in names})


class Net(nn.Module):
    """The plain model: logits (B, out)."""

    def __init__(self, out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(12, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class DictNet(Net):
    """The same function, its logits under a key (a Hugging Face style output)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        logits = super().forward(x)
        return {"logits": logits, "hidden": logits.detach()}


class TupleNet(Net):
    """The same function, logits first in a tuple."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = super().forward(x)
        return logits, logits.sum()


class Regressor(Net):
    """One output per sample: (B,) with ``squeeze``, else (B, 1)."""

    def __init__(self, squeeze: bool) -> None:
        super().__init__(out=1)
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out.squeeze(1) if self.squeeze else out


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def _batches(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(y), BATCH)]


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    """A plain classifier trained well above chance (the bounds need room for the target drop)."""
    torch.manual_seed(0)
    net = Net()
    xs, ys = _data(96, 1)
    xt, yt = _data(64, 2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(net(xs), ys).backward()
        opt.step()
    return {"state": net.state_dict(), "source": (xs, ys), "target": (xt, yt)}


def _like(cls: type[Net], trained: dict[str, Any], **kwargs: Any) -> Net:
    model = cls(**kwargs)
    model.load_state_dict(trained["state"])
    return model


def _lists(trained: dict[str, Any]) -> dict[str, list[Any]]:
    return {"source": _batches(*trained["source"]), "target": _batches(*trained["target"])}


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _mixed_modes(model: nn.Module) -> nn.Module:
    """Train mode with one submodule in eval: a restore must be per module, not model.train()."""
    model.train()
    model.fc1.eval()
    return model


def _same_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, state[n]) for n, t in model.state_dict().items())


def _canonical(measurement: Any) -> dict[str, str]:
    """Each measure's payload and arrays as exact text (NaN written as NaN: equal to itself)."""
    return {name: json.dumps({"payload": to_jsonable(r.payload), "arrays": to_jsonable(r.arrays)},
                             sort_keys=True, default=str)
            for name, r in measurement.results.items()}


ALL = list(MEASURES)
LOSS_MEASURES = [n for n in MEASURES if n not in ACCURACY_MEASURES]


@pytest.fixture(scope="module")
def plain(trained: dict[str, Any]) -> dict[str, str]:
    """Every measure on the plain model and the plain batch lists (the reference)."""
    model = _like(Net, trained)
    return _canonical(measure_model(model, _lists(trained), [_config(n) for n in ALL], settings=SETTINGS))


def _adapted(kind: str, trained: dict[str, Any]) -> tuple[nn.Module, dict[str, Any], Any]:
    data: dict[str, Any] = _lists(trained)
    if kind == "dict":
        return _like(DictNet, trained), data, lambda out: out["logits"]
    if kind == "tuple":
        return _like(TupleNet, trained), data, lambda out: out[0]
    loaders = {k: DataLoader(TensorDataset(*trained[k]), batch_size=BATCH, shuffle=False) for k in data}
    return _like(Net, trained), loaders, None


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataloader"])
def test_adapted_model_equals_plain_model_on_every_measure(kind: str, trained, plain):
    model, data, output_fn = _adapted(kind, trained)
    _mixed_modes(model)
    modes = _modes(model)
    out = measure_model(model, data, [_config(n) for n in ALL], settings=SETTINGS, output_fn=output_fn)
    got = _canonical(out)
    assert list(got) == list(plain)
    for name in ALL:
        assert got[name] == plain[name], f"{kind}: {name} differs from the plain model's"
    assert _modes(model) == modes
    assert next(model.parameters()).device.type == "cpu"
    assert _same_weights(model, trained["state"])


def _finite_columns(measurement: Any) -> dict[str, float]:
    values = {}
    for key, value in measurement.estimates().items():
        v = getattr(value, "value", value)
        if isinstance(v, (int, float)):
            values[key] = float(v)
    return values


def test_custom_loss_reaches_every_measure(trained):
    """Label-smoothed CE on the dict model equals it on the plain model, and is not plain CE."""
    def smoothed(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=0.2)

    configs = [_config(n) for n in ALL]
    ref = measure_model(_like(Net, trained), _lists(trained), configs, settings=SETTINGS, loss_fn=smoothed)
    model = _mixed_modes(_like(DictNet, trained))
    modes = _modes(model)
    got = measure_model(model, _lists(trained), configs, settings=SETTINGS, loss_fn=smoothed,
                        output_fn=lambda out: out["logits"])
    assert _canonical(got) == _canonical(ref)
    assert _modes(model) == modes
    ce = measure_model(_like(Net, trained), _lists(trained), [_config("trace"), _config("local_flatness"),
                                                               _config("worst_case")], settings=SETTINGS)
    assert ref["trace"].payload["trace"] != ce["trace"].payload["trace"]
    assert ref["worst_case"].payload["keskar_loss"] != ce["worst_case"].payload["keskar_loss"]
    assert all(math.isfinite(v) for k, v in _finite_columns(ref).items() if "stderr" not in k)


def _regression(trained: dict[str, Any], squeeze: bool) -> tuple[nn.Module, dict[str, list[Any]]]:
    torch.manual_seed(5)
    model = Regressor(squeeze)

    def target(x: torch.Tensor) -> torch.Tensor:
        t = (x[:, 0] - 0.5 * x[:, 2]).float()
        return t if squeeze else t.unsqueeze(1)

    data = {k: _batches(x, target(x)) for k, (x, _) in (("source", trained["source"]), ("target", trained["target"]))}
    return model, data


@pytest.mark.parametrize("squeeze", [True, False], ids=["B", "B1"])
def test_regression_loss_measures_work_and_accuracy_measures_refuse(squeeze: bool, trained):
    model, data = _regression(trained, squeeze)
    _mixed_modes(model)
    modes = _modes(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = measure_model(model, data, [_config(n) for n in LOSS_MEASURES], settings=SETTINGS, loss_fn=F.mse_loss)
    assert set(out.results) == set(LOSS_MEASURES)
    columns = _finite_columns(out)
    for name in LOSS_MEASURES:
        produced = [k for k in columns for c in MEASURES[name].columns if c.matches(k)]
        assert produced or not MEASURES[name].columns, f"{name}: no column"
        assert all(math.isfinite(columns[k]) for k in produced), f"{name}: {[(k, columns[k]) for k in produced]}"
    assert _modes(model) == modes and _same_weights(model, state)
    for name in ACCURACY_MEASURES:
        with pytest.raises(FlatlabError, match=rf"{name} needs a classifier's accuracy.*local_flatness"):
            measure_model(model, data, [_config(name)], settings=SETTINGS, loss_fn=F.mse_loss)
        assert _modes(model) == modes
    # Refused in the input check, before any measure of the call is computed.
    with pytest.raises(FlatlabError, match="needs a classifier's accuracy"):
        measure_model(model, data, [_config("trace"), _config("pacbayes")], settings=SETTINGS, loss_fn=F.mse_loss)


def test_library_bounds_refuse_a_regressor(trained):
    from flatlab.sharpness import (
        magnitude_bounds,
        pacbayes_bounds,
        worst_case_alpha,
        worst_case_sharpness,
    )

    model, data = _regression(trained, True)
    for fn, name in ((pacbayes_bounds, "pacbayes"), (magnitude_bounds, "magnitude"),
                     (worst_case_sharpness, "worst_case"), (worst_case_alpha, "worst_case")):
        with pytest.raises(FlatlabError, match=f"{name} needs a classifier's accuracy"):
            fn(model, data["source"])


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataloader"])
@pytest.mark.parametrize("points_per_pass", [1, 3])
def test_surface_of_adapted_model_equals_plain(kind: str, points_per_pass: int, trained):
    lists = _lists(trained)
    ref = surface_of_model(_like(Net, trained), lists["source"], lists["target"], x=XS, y=XS, seed=2,
                           points_per_pass=points_per_pass)
    model, data, output_fn = _adapted(kind, trained)
    _mixed_modes(model)
    modes = _modes(model)
    surf = surface_of_model(model, data["source"], data["target"], x=XS, y=XS, seed=2, output_fn=output_fn,
                            points_per_pass=points_per_pass)
    for key in ref.values:
        np.testing.assert_array_equal(surf.values[key], ref.values[key], err_msg=f"{kind}: {key}")
    assert np.isfinite(surf.values["train_acc"]).all() and (surf.values["train_acc"] > 0).all()
    assert surf.settings["directions_sha256"] == ref.settings["directions_sha256"]
    assert _modes(model) == modes
    assert next(model.parameters()).device.type == "cpu"
    assert _same_weights(model, trained["state"])


@pytest.mark.parametrize("squeeze", [True, False], ids=["B", "B1"])
@pytest.mark.parametrize("points_per_pass", [1, 3])
def test_surface_of_regressor_records_loss_only(squeeze: bool, points_per_pass: int, trained):
    model, data = _regression(trained, squeeze)
    _mixed_modes(model)
    modes = _modes(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    surf = surface_of_model(model, data["source"], data["target"], x=XS, seed=1, loss_fn=F.mse_loss,
                            points_per_pass=points_per_pass)
    assert np.isfinite(surf.values["train_loss"]).all() and np.isfinite(surf.values["test_loss"]).all()
    assert np.isnan(surf.values["train_acc"]).all() and np.isnan(surf.values["test_acc"]).all()
    import copy

    reference = copy.deepcopy(model).eval()  # the origin (x = 0), in eval mode
    with torch.no_grad():
        origin = sum(F.mse_loss(reference(x), y).item() * len(y) for x, y in data["source"])
    assert surf.values["train_loss"][1] == pytest.approx(origin / sum(len(y) for _, y in data["source"]), rel=1e-6)
    assert _modes(model) == modes and _same_weights(model, state)


def test_bad_output_fn_and_missing_output_fn_are_clear(trained):
    lists = _lists(trained)
    with pytest.raises(ConfigError, match="output_fn must be callable"):
        measure_model(_like(DictNet, trained), lists, [_config("trace")], settings=SETTINGS, output_fn="logits")
    with pytest.raises(FlatlabError, match="pass output_fn"):
        surface_of_model(_like(DictNet, trained), lists["source"], None, x=XS)
    with pytest.raises(FlatlabError, match="pass output_fn"):
        measure_model(_like(DictNet, trained), lists, [_config("local_flatness")], settings=SETTINGS)
    with pytest.raises(ConfigError, match="data must be"):
        measure_model(_like(Net, trained), {"source": torch.zeros(3)}, [_config("trace")], settings=SETTINGS)


SOURCE_FILE = '''
import torch
from torch import nn


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.fc(x)}


def make():
    return DictNet()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return {"source": [(x[:20], y[:20]), (x[20:], y[20:])], "target": [(x[:10], y[:10])]}


def logits(out):
    return out["logits"]
'''


def test_load_source_takes_an_output_fn(tmp_path):
    """A user's model through flatlab.sources: output_fn by import path, in the run's identity."""
    from flatlab.pipeline import measure_source
    from flatlab.sources import DataSource, ModelSource, evaluate_source, load_source

    path = tmp_path / "user_model.py"
    path.write_text(SOURCE_FILE)
    model, data = ModelSource(model_fn=f"{path}:make"), DataSource(data_fn=f"{path}:data")
    plain = load_source(model, data)
    source = load_source(model, data, output_fn=f"{path}:logits")
    assert source.run_attrs["output_fn"] == f"{path}:logits" and "output_fn" not in plain.run_attrs
    assert source.run_id != plain.run_id
    out = measure_source(source, [_config("trace"), _config("local_flatness")], settings=SETTINGS)
    assert math.isfinite(out["trace"].payload["trace"])
    scores = evaluate_source(source)
    assert 0.0 <= scores["source_acc"] <= 1.0 and math.isfinite(scores["target_loss"])


def test_sharpness_functions_take_output_fn_and_dataloaders(trained):
    """The library functions themselves: a train-mode dict model on a DataLoader equals the plain
    model on the batch list, and keeps its modes (the functions evaluate in eval mode)."""
    from flatlab.sharpness import (
        AdaptiveSharpnessConfig,
        adaptive_sharpness,
        local_flatness,
        magnitude_bounds,
        pacbayes_bounds,
        relative_flatness,
        worst_case_sharpness,
    )

    lists = _lists(trained)
    loader = DataLoader(TensorDataset(*trained["source"]), batch_size=BATCH, shuffle=False)
    search = {"mc_samples": 2, "max_samples": 10, "depth": 4}
    calls = {
        "pacbayes": lambda m, b, **kw: pacbayes_bounds(m, b, **search, **kw),
        "magnitude": lambda m, b, **kw: magnitude_bounds(m, b, **search, **kw),
        "worst_case": lambda m, b, **kw: worst_case_sharpness(m, b, depth=3, ascent_steps=2, **kw),
        "local_flatness": lambda m, b, **kw: local_flatness(m, {"source": b}, [0.05], samples=4, **kw),
        "sharpness": lambda m, b, **kw: adaptive_sharpness(m, b, AdaptiveSharpnessConfig(rho=0.05, steps=3),
                                                           **kw).to_dict(),
        "relative_flatness": lambda m, b, **kw: relative_flatness(m, b, **kw).to_dict(),
    }
    for name, call in calls.items():
        reference = call(_like(Net, trained).eval(), lists["source"])
        model = _mixed_modes(_like(DictNet, trained))
        modes = _modes(model)
        got = call(model, loader, output_fn=lambda out: out["logits"])
        assert json.dumps(to_jsonable(got), sort_keys=True, default=str) == \
            json.dumps(to_jsonable(reference), sort_keys=True, default=str), name
        assert _modes(model) == modes, name
        assert _same_weights(model, trained["state"]), name
