"""QAT: the switch hands latent weights and scales to the optimizer, selection, resume, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flatlab.checkpoint import load_checkpoint
from flatlab.cli import main
from flatlab.models import build_model
from flatlab.quant import QuantLayerMixin, quantized_layers
from flatlab.train import TrainConfig, train
from flatlab.train.qat import QAT, default_quant_start


def _algorithm(quant_start: int, steps: int = 10, **extra) -> QAT:
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 4, width=4)
    hparams = {"lr": 1e-2, "batch_size": 8, "weight_decay": 0.0, **QAT.hparam_defaults,
               "bits": 4, "quant_start": quant_start, **extra}
    QAT.validate_hparams(hparams, steps)
    return QAT(model, hparams, steps, torch.Generator().manual_seed(0))


def _batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]


def test_latent_weights_and_scales_train_after_the_switch() -> None:
    algo = _algorithm(quant_start=3)
    for step in (1, 2):
        algo.before_step(step)
        algo.update(_batches(step), step)
        assert not quantized_layers(algo.model) and not algo.selectable(step)
    algo.before_step(3)
    layers = quantized_layers(algo.model)
    assert sorted(layers) == ["features.0", "features.3", "features.6"]
    # Every parameter of the quantized model, scales included, is in the rebuilt optimizer.
    in_optimizer = {id(p) for group in algo.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in algo.model.parameters()} == in_optimizer
    before = {n: p.detach().clone() for n, p in algo.model.named_parameters()}
    for step in (3, 4, 5):
        algo.before_step(step)
        algo.update(_batches(step), step)
        assert algo.selectable(step)
    after = dict(algo.model.named_parameters())
    for name in layers:
        assert not torch.equal(before[f"{name}.weight"], after[f"{name}.weight"]), f"{name}.weight froze"
        assert not torch.equal(before[f"{name}.weight_scale"], after[f"{name}.weight_scale"]), f"{name} scale froze"


def test_the_released_code_pitfall_would_freeze_the_scales() -> None:
    """Control: with the old optimizer kept (QT-DoG's released code) the scales never move."""
    algo = _algorithm(quant_start=1)
    stale = algo.optimizer
    from flatlab.quant import quantize_model

    quantize_model(algo.model, algo.quant_config)
    algo.quantized = True
    scale = algo.model.features[0].weight_scale
    start = scale.detach().clone()
    for step in (1, 2):
        stale.zero_grad()
        algo.loss(*_batches(step)[0]).backward()
        stale.step()
    assert torch.equal(start, scale.detach())


def test_default_quant_start_and_hparam_errors() -> None:
    assert default_quant_start(5000) == 2000 and default_quant_start(400) == 160
    assert _algorithm(quant_start=None, steps=10).quant_start == 4
    from flatlab.errors import FlatlabError

    with pytest.raises(FlatlabError, match="quant_start"):
        _algorithm(quant_start=10, steps=10)
    with pytest.raises(FlatlabError, match="bits must be from 2 to 8"):
        _algorithm(quant_start=2, bits=1)
    with pytest.raises(FlatlabError, match="keep_first_fp"):
        _algorithm(quant_start=2, keep_first_fp="maybe")
    assert _algorithm(quant_start=2, keep_first_fp="true").quant_config.keep_first_fp is True


@pytest.mark.parametrize("argv, needle", [
    (["--bits", "9"], "--bits must be from 2 to 8, got 9"),
    (["--bits", "1"], "--bits must be from 2 to 8, got 1"),
    (["--quant-start", "30", "--steps", "30"], "--quant-start (30) must be smaller than steps (30)"),
    (["--act-bits", "16"], "--act-bits must be from 2 to 8"),
    (["--grad-scale-n", "layer"], "--grad-scale-n must be one of"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, argv: list[str], needle: str) -> None:
    args = ["train", "--algorithm", "qat", "--steps", "30", "--out", str(tmp_path / "r"), "--quiet", *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flatlab: error: ") and needle in err
    assert not (tmp_path / "r" / "model.pt").exists()


def test_bits_flag_is_refused_for_erm(tmp_path: Path, capsys) -> None:
    assert main(["train", "--bits", "4", "--steps", "5", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "unknown hyperparameter 'bits'" in capsys.readouterr().err


def test_qat_run_selects_a_quantized_checkpoint(qat_run: Path, capsys) -> None:
    rows = [json.loads(line) for line in (qat_run / "results.jsonl").read_text().splitlines()]
    assert [(r["step"], r["selectable"], r["quantized"]) for r in rows] == [
        (100, False, False), (200, True, True), (300, True, True), (400, True, True)]
    ckpt = load_checkpoint(qat_run)
    assert ckpt.is_quantized and ckpt.meta["bits"] == 4 and ckpt.meta["act_bits"] is None
    assert ckpt.meta["quant"]["bits"] == 4 and ckpt.meta["quant_start"] == 200
    assert ckpt.meta["step"] >= 200
    model = ckpt.build_model()
    assert sorted(quantized_layers(model)) == ["features.0", "features.3", "features.6"]
    for layer in quantized_layers(model).values():
        codes = layer.weight_codes().reshape(layer.weight.shape[0], -1)
        assert max(len(torch.unique(r)) for r in codes) <= 16
    # Evaluating the checkpoint reproduces the accuracies recorded at selection time.
    assert main(["evaluate", str(qat_run), "--json", "--quiet", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("id_acc", "ood_acc", "val_acc"):
        assert metrics[key] == pytest.approx(ckpt.meta["accuracies"][key], abs=1e-12)
    # The effective model has the FP architecture's parameter names.
    fp_names = [n for n, _ in ckpt.build_initial_model().named_parameters()]
    assert [n for n, _ in ckpt.build_model(effective=True).named_parameters()] == fp_names


class _Stop(Exception):
    pass


_RESUME_RUN = {"steps": 40, "eval_every": 10, "model": "cnn", "model_options": {"width": 4}, "seed": 3,
               "algorithm": "qat", "hparam_flags": {"bits": 3, "quant_start": 20, "act_bits": 4},
               "dataset_options": {"resolution": 8}, "quiet": True}


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qat-resume") / "full"
    train(TrainConfig(out=str(out), **_RESUME_RUN))
    return out


@pytest.mark.parametrize("stop_after", [10, 30])
def test_resume_equals_uninterrupted(uninterrupted_run: Path, tmp_path: Path, monkeypatch, stop_after: int) -> None:
    """Interrupted after the eval at ``stop_after`` (before / after the switch at 20) and rerun."""
    common = _RESUME_RUN

    original = QAT.update

    def crash(self, minibatches, step):
        if step == stop_after + 1:
            raise _Stop  # dies like a kill: state.pt from the last eval stays behind
        return original(self, minibatches, step)

    monkeypatch.setattr(QAT, "update", crash)
    with pytest.raises(_Stop):
        train(TrainConfig(out=str(tmp_path / "cut"), **common))
    monkeypatch.setattr(QAT, "update", original)
    state = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    assert int(state["step"]) == stop_after
    assert any(k.endswith("weight_scale") for k in state["algorithm"]["model"]) == (stop_after >= 20)
    result = train(TrainConfig(out=str(tmp_path / "cut"), **common))
    assert result.resumed_from == stop_after
    a, b = load_checkpoint(uninterrupted_run), load_checkpoint(tmp_path / "cut")
    assert a.meta["step"] == b.meta["step"]
    assert a.state_dict.keys() == b.state_dict.keys()
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    full_rows = (uninterrupted_run / "results.jsonl").read_text().splitlines()
    cut_rows = (tmp_path / "cut" / "results.jsonl").read_text().splitlines()
    strip = ("step_time", "args")
    assert [{k: v for k, v in json.loads(r).items() if k not in strip} for r in full_rows] == \
           [{k: v for k, v in json.loads(r).items() if k not in strip} for r in cut_rows]
    assert any(isinstance(m, QuantLayerMixin) for m in b.build_model().modules())
