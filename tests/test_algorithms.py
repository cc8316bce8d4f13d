"""SAM, SAGM, GAQAT, weight noise, SWA and SWAD against hand-computable truths."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from flatlab.cli import main
from flatlab.models import build_model
from flatlab.quant import quantized_layers
from flatlab.train import get_algorithm
from flatlab.train.gaqat import conflict_fraction, sign_flip_fraction
from flatlab.train.hparams import resolve_hparams
from flatlab.train.noise import lsq_step_width, sample_weight_noise
from flatlab.train.sam import frozen_bn_statistics


def make(name: str, steps: int = 40, seed: int = 0, **flags):
    torch.manual_seed(seed)
    model = build_model("cnn", (1, 8, 8), 10, width=4)
    cls = get_algorithm(name)
    hparams = resolve_hparams("rotated-digits", cls.hparam_defaults, None, {"lr": 1e-2, **flags})
    cls.validate_hparams(hparams, steps)
    return cls(model, hparams, steps, torch.Generator().manual_seed(seed))


def batches(step: int, n: int = 2):
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def run(algo, start: int, stop: int) -> None:
    for step in range(start, stop + 1):
        algo.before_step(step)
        algo.update(batches(step), step)


def test_conflict_and_disorder_on_hand_made_gradients():
    task = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])
    smooth = torch.tensor([-1.0, -1.0, 1.0, 4.0, -0.5])
    assert conflict_fraction(task, smooth) == pytest.approx(3 / 5)  # channels 0, 3, 4 disagree
    seq = [torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 1.0]), torch.tensor([-1.0, -1.0]), torch.tensor([1.0, -1.0])]
    # flips: step1 (ch0), step2 (ch1), step3 (ch0) -> 3 flips over 3 transitions x 2 channels
    assert sign_flip_fraction(seq) == pytest.approx(3 / 6)


def test_gaqat_frozen_task_gradient_is_exactly_zero_for_k_steps():
    algo = make("gaqat", tau=1.0, freeze_interval=4, disorder_window=2)
    run(algo, 1, 4)
    decisions = [d for d in algo.after_evaluation(4, {})["gaqat_decisions"] if d["frozen"]]
    frozen = {d["layer"] for d in decisions}
    assert frozen, "tau = 1 freezes every layer whose disorder is below 1"
    for step in range(5, 9):
        algo.before_step(step)
        algo.update(batches(step), step)
        layers = quantized_layers(algo.model)
        for name in frozen:
            task, smooth, applied = algo.last_scale_parts[name]
            assert torch.equal(applied, 0.5 * smooth)  # the task part contributes exactly nothing
            assert torch.equal(layers[name].weight_scale.grad.flatten(), 0.5 * smooth)
            assert task.abs().sum() > 0  # ... although it was not zero
    # After the K steps the task part is back (unless refrozen at step 8's decision).
    algo.frozen_until.clear()
    algo.before_step(9)
    algo.update(batches(9), 9)
    for name in frozen:
        task, smooth, applied = algo.last_scale_parts[name]
        assert torch.allclose(applied, task + 0.5 * smooth)


def test_gaqat_tau_changes_the_scale_trajectory():
    a = make("gaqat", tau=0.0, freeze_interval=4, disorder_window=2)
    b = make("gaqat", tau=1.0, freeze_interval=4, disorder_window=2)
    run(a, 1, 12)
    run(b, 1, 12)
    sa = torch.cat([m.weight_scale.flatten() for m in quantized_layers(a.model).values()])
    sb = torch.cat([m.weight_scale.flatten() for m in quantized_layers(b.model).values()])
    assert not torch.allclose(sa, sb)


def test_sam_perturbation_has_radius_rho_and_bn_stats_stay():
    algo = make("sam", rho=0.3)
    grads = [torch.randn(5, 3), torch.randn(7)]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    eps = algo.perturbation(grads, norm)
    assert float(torch.sqrt(sum((e ** 2).sum() for e in eps))) == pytest.approx(0.3, rel=1e-6)
    sagm = make("sagm", rho=0.3, alpha=0.01)
    eps = sagm.perturbation(grads, norm)
    for g, e in zip(grads, eps):
        assert torch.allclose(e, g * (0.3 / norm - 0.01))
    model = algo.model.train()
    before = copy.deepcopy(model.state_dict())
    with frozen_bn_statistics(model):
        model(torch.randn(8, 1, 8, 8))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sagm_applies_the_mean_of_both_gradients():
    algo = make("sagm", rho=0.05)
    p = next(algo.model.parameters())
    first, second = {p: torch.ones_like(p)}, {p: 3 * torch.ones_like(p)}
    assert torch.equal(algo.combine(first, second, p), 2 * torch.ones_like(p))
    sam = make("sam")
    assert torch.equal(sam.combine(first, second, p), second[p])


def test_noise_has_the_stated_range_and_variance():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 20000)
    eps = sample_weight_noise(weight, g, bits=4)
    delta = lsq_step_width(weight, 4)  # (4, 1): one step per output channel
    assert torch.all(eps.abs() <= delta / 2)
    assert torch.allclose(eps.var(dim=1), (delta.flatten() ** 2) / 12, rtol=0.05)
    assert torch.allclose(delta.flatten(), 2 * weight.abs().mean(1) / (7 ** 0.5))
    eps = sample_weight_noise(weight, g, amplitude=1e-3)
    assert float(eps.abs().max()) <= 1e-3 and float(eps.var()) == pytest.approx(1e-6 / 3, rel=0.05)


def test_noise_trains_on_clean_weights_after_warmup():
    algo = make("noise", bits=4, quant_start=3)
    run(algo, 1, 5)
    assert all(p.isfinite().all() for p in algo.model.parameters())
    assert set(algo.noisy_weights) == {"features.0", "features.3", "features.6"}


def test_swa_average_equals_mean_of_visited_weights():
    algo = make("swa", swa_start=3)
    seen = []
    for step in range(1, 7):
        algo.before_step(step)
        algo.update(batches(step), step)
        if step >= 3:
            seen.append({n: p.detach().clone() for n, p in algo.model.named_parameters()})
    assert algo.count == 4
    for n in seen[0]:
        assert torch.allclose(algo.avg[n], torch.stack([s[n] for s in seen]).mean(0), atol=1e-6)


def test_swad_loss_valley_on_a_synthetic_loss_curve():
    algo = make("swad", n_converge=3, n_tolerance=3, tolerance_ratio=0.3)
    losses = [3.0, 2.0, 1.0, 0.9, 1.0, 1.1, 1.0, 5.0, 5.0, 5.0, 5.0]
    step = 0
    log = {}
    for loss in losses:
        for _ in range(2):
            step += 1
            algo.before_step(step)
            algo.update(batches(step), step)
        log = algo.after_evaluation(step, {"val_loss": loss})
        if algo.converge_step is not None and log["swad_converge_step"] is None:
            raise AssertionError("converge step must be reported")
    # Window [0.9, 1.0, 1.1] is the first whose minimum comes first: converged at its first segment.
    assert algo.converge_step == 8
    assert algo.threshold == pytest.approx((0.9 + 1.0 + 1.1) / 3 * 1.3)
    assert algo.dead and log["swad_dead"]
    # Segments ending at steps 8, 10, 12, 14 lie in the valley; the 5.0 ones killed it.
    assert algo.final["start"] == 7 and algo.final["end"] == 14 and algo.final["segments"] == 4


def _round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name,flags", [("gaqat", {"freeze_interval": 4, "disorder_window": 2, "tau": 0.6}),
                                        ("swad", {}), ("sam", {"bits": 4, "quant_start": 3}), ("swa", {"swa_start": 2})])
def test_state_round_trip_continues_identically(name, flags):
    a = make(name, **flags)
    run(a, 1, 8)
    state = _round_trip(a.state_dict())
    if name in ("gaqat", "swad"):
        a.after_evaluation(8, {"val_loss": 1.0})
        state = _round_trip(a.state_dict())
    b = make(name, **flags)
    b.load_state_dict(state, 8)
    run(a, 9, 14)
    run(b, 9, 14)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_bad_algorithm_input(tmp_path, capsys):
    cases = [
        (["--algorithm", "sam", "--rho", "0"], "--rho must be positive"),
        (["--algorithm", "gaqat", "--tau", "1.5"], "--tau must lie in [0, 1]"),
        (["--algorithm", "gaqat", "--freeze-interval", "5", "--disorder-window", "10"], "must be at least --disorder-window"),
        (["--algorithm", "gaqat", "--freeze-part", "both"], "--freeze-part"),
        (["--algorithm", "noise", "--noise-amplitude", "-1"], "--noise-amplitude must be positive"),
        (["--algorithm", "erm", "--rho", "0.1"], "unknown hyperparameter 'rho'"),
        (["--algorithm", "sam", "--bits", "9"], "--bits must be from 2 to 8"),
    ]
    for extra, message in cases:
        assert main(["train", "--quiet", "--out", str(tmp_path / "x"), "--steps", "10", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("flatlab: error:") and message in err and err.count("\n") == 1, (extra, err)
