"""Small problems with known answers, shared by the correctness tests (curvlinops style).

Every case builds, in float64, a model, a loss and a list of batches small enough that the dense
Hessian, exact traces and closed-form surfaces can be computed by brute force; the brute-force
references' flat-parameter view (:func:`flat_parameters`, :func:`flat_loss`) lives here too. The
end of the file holds the inputs of command-line tests: tiny checkpoints, tiny studies, files
that are not results, and the check of a one-line refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn


@dataclass
class Case:
    name: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def _randomized(model: nn.Module, g: torch.Generator, scale: float = 1.0) -> nn.Module:
    """``model`` in eval mode with every parameter drawn from ``scale`` N(0, 1) by ``g`` (in
    parameter order: the cases' numbers depend on it)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model.eval()


def tiny_mlp_case(seed: int = 0, n: int = 40, batch: int = 16) -> Case:
    """MLP 6 -> 5 -> 3 with ReLU, cross-entropy, uneven last batch (weights |B|/N matter)."""
    g = torch.Generator().manual_seed(seed)
    model = _randomized(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double(), g)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Case("tiny-mlp", model, _batches(x, y, batch), nn.functional.cross_entropy)


def tiny_cnn_bn_case(seed: int = 0, n: int = 24, batch: int = 10) -> Case:
    """Conv(1->2) + BatchNorm (eval statistics) + Tanh + pool + Linear(2->3)."""
    g = torch.Generator().manual_seed(seed)
    model = _randomized(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).double(), g)
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(torch.randn(2, generator=g, dtype=torch.float64) * 0.1)
        bn.running_var.copy_(torch.rand(2, generator=g, dtype=torch.float64) + 0.5)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Case("tiny-cnn-bn", model, _batches(x, y, batch), nn.functional.cross_entropy)


def flat_parameters(model: nn.Module) -> tuple[torch.Tensor, Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
    """The brute-force references' view of ``model``: its parameters as one flat (detached) vector,
    and the map from such a vector back to named tensors for ``torch.func.functional_call``."""
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]

    def weights(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: c.view(s) for n, c, s in zip(names, torch.split(flat, sizes), shapes)}

    return torch.cat([p.detach().reshape(-1) for _, p in named]), weights


def flat_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], dict[str, torch.Tensor]],
                         torch.Tensor]:
    """The |B|/N-weighted loss over ``batches`` as a function of a flat parameter vector (what
    flatlab's operators differentiate), with :func:`flat_parameters`' map and vector."""
    flat0, weights = flat_parameters(model)
    n_total = sum(len(y) for _, y in batches)

    def full_loss(flat: torch.Tensor) -> torch.Tensor:
        return sum(loss_fn(torch.func.functional_call(model, weights(flat), (x,)), y) * len(y) / n_total
                   for x, y in batches)

    return full_loss, weights, flat0


class Quadratic(nn.Module):
    """f(w) = 1/2 (w - c)^T A (w - c), independent of the data: a model whose loss surface,
    Hessian (A) and local flatness are known in closed form."""

    def __init__(self, a: torch.Tensor, center: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("center", center)
        self.w = nn.Parameter(center.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One "logit" per sample carrying the quadratic; the loss_fn below reads it.
        d = self.w - self.center
        return (0.5 * d @ self.a @ d).expand(x.shape[0]).unsqueeze(1)


def quadratic_case(n_params: int = 8, seed: int = 0) -> Case:
    """Quadratic with a known positive-definite A and a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_params, n_params, generator=g, dtype=torch.float64))
    eig = torch.logspace(1, -2, n_params, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    model = Quadratic(a, torch.randn(n_params, generator=g, dtype=torch.float64))
    x = torch.zeros(6, 1, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)

    def loss_fn(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return out.mean()

    return Case("quadratic", model, _batches(x, y, 4), loss_fn)


def linear_regression_case(n: int = 12, k: int = 3, batch: int = 5, seed: int = 0) -> Case:
    """Least squares at its interpolating minimum: ``nn.Linear(k, 1, bias=False)`` holding w*,
    targets y = X w*, loss 1/2 mean (x.w - y)^2. On any subset S of the samples
    L_S(w* + delta) = 1/2 delta^T A_S delta with A_S = X_S^T X_S / |S| exactly, so sharpness over
    subsets (m-sharpness) and the layer's Hessian (A = X^T X / N) have closed forms."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(k, 1, bias=False).double()
    # Isotropic inputs: few samples per subset, so the subsets' top eigenvectors point apart.
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    w_star = torch.randn(k, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(w_star.reshape(1, k))
    y = x @ w_star

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out.reshape(-1) - target).pow(2).mean()

    return Case("linear-regression", model.eval(), _batches(x, y, batch), loss_fn)


def relu_two_layer_case(seed: int = 0, n: int = 30, batch: int = 10, d_in: int = 4, hidden: int = 6,
                        classes: int = 3) -> Case:
    """Linear(d_in -> hidden) -> ReLU -> Linear(hidden -> classes), no BatchNorm, cross-entropy:
    the network whose layer rescaling (:func:`rescale_relu_layers`) leaves the function unchanged."""
    g = torch.Generator().manual_seed(seed)
    model = _randomized(nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes)).double(), g)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return Case("relu-two-layer", model, _batches(x, y, batch), nn.functional.cross_entropy)


def rescale_relu_layers(model: nn.Sequential, a: float, first: int = 0, second: int = 2) -> nn.Sequential:
    """A copy of ``model`` with layer ``first`` (weight and bias) scaled by ``a > 0`` and layer
    ``second``'s weight by ``1 / a``: the same function when a ReLU sits between them
    (relu(a z) = a relu(z)); the ``second`` layer's bias is unchanged."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        out[first].weight.mul_(a)
        if out[first].bias is not None:
            out[first].bias.mul_(a)
        out[second].weight.div_(a)
    return out

# -- Pairs of models with a known line between them (barriers) ------------------------------------

@dataclass
class ModelPair:
    """Two models of one architecture, data and a loss: the endpoints of a line."""

    name: str
    model1: nn.Module
    model2: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_regression_pair(seed: int = 0, n: int = 30, d: int = 4, o: int = 2, batch: int = 8) -> ModelPair:
    """Two affine maps x -> W x + b with MSE: the loss on the line is a convex quadratic in alpha."""
    g = torch.Generator().manual_seed(seed)
    m1 = _randomized(nn.Linear(d, o).double(), g)
    m2 = _randomized(nn.Linear(d, o).double(), g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, o, generator=g, dtype=torch.float64)
    return ModelPair("linear-regression", m1, m2, _batches(x, y, batch), nn.functional.mse_loss)


def deep_linear_pair(seed: int = 0, n: int = 30, d: int = 4, h: int = 3, o: int = 2, batch: int = 8,
                     flipped: bool = False, noise: float = 0.0) -> ModelPair:
    """Two-layer linear nets x -> V U x (no biases) with MSE: on the line the product
    V(a) U(a) is quadratic in alpha, so the loss is a quartic (non-convex in general).

    ``flipped``: model 2 is (-U, -V), the same function as model 1, and y = V U x, so both ends
    fit the data and the midpoint is the zero map. With ``noise = 0`` both ends have loss 0 and
    the barrier is mean(y^2) at alpha = 1/2; ``noise > 0`` adds Gaussian noise of that scale to
    model 2's weights and to y (a generic quartic that still has a barrier). Not flipped: two
    random nets and random targets.
    """
    g = torch.Generator().manual_seed(seed)

    def net() -> nn.Module:
        return _randomized(nn.Sequential(nn.Linear(d, h, bias=False), nn.Linear(h, o, bias=False)).double(), g)

    m1, m2 = net(), net()
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if flipped:
        with torch.no_grad():
            for p, q in zip(m2.parameters(), m1.parameters()):
                p.copy_(-q + noise * torch.randn(q.shape, generator=g, dtype=torch.float64))
            y = m1(x)
            y = y + noise * torch.randn(y.shape, generator=g, dtype=torch.float64)
    else:
        y = torch.randn(n, o, generator=g, dtype=torch.float64)
    return ModelPair("deep-linear" + ("-flipped" if flipped else ""), m1, m2, _batches(x, y, batch),
                     nn.functional.mse_loss)


def fit_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.05) -> None:
    """Full-batch Adam on cross-entropy (deterministic: no sampling)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def relu_mlp_pair(seed: int = 0, n: int = 40, d: int = 5, h: int = 7, classes: int = 3, batch: int = 16,
                  batchnorm: bool = False, train_steps: int = 0) -> ModelPair:
    """Two independently initialised ReLU MLPs d -> h -> classes (optionally with BatchNorm1d
    after the hidden linear layer, its running statistics random), cross-entropy.

    ``train_steps > 0``: each model is then fitted to the data by full-batch Adam (two different
    minima of one problem, the setting of a barrier), labels depending on the inputs.
    """
    g = torch.Generator().manual_seed(seed)

    def net() -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(d, h)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers += [nn.ReLU(), nn.Linear(h, classes)]
        model = _randomized(nn.Sequential(*layers).double(), g)
        if batchnorm:
            bn = model[1]
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(h, generator=g, dtype=torch.float64))
                bn.running_var.copy_(torch.rand(h, generator=g, dtype=torch.float64) + 0.5)
        return model

    m1, m2 = net(), net()
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if train_steps > 0:
        teacher = torch.randn(d, classes, generator=g, dtype=torch.float64)
        y = (x @ teacher).argmax(1)
        for m in (m1, m2):
            fit_classifier(m, x, y, train_steps)
    else:
        y = torch.randint(0, classes, (n,), generator=g)
    return ModelPair("relu-mlp" + ("-bn" if batchnorm else ""), m1, m2, _batches(x, y, batch),
                     nn.functional.cross_entropy)


# -- Models with several domains (per-domain curvature) -------------------------------------------

@dataclass
class DomainCase:
    """One model and, per domain name, its batches."""

    name: str
    model: nn.Module
    domains: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def multi_domain_mlp_case(seed: int = 0, n: int = 30, batch: int = 12) -> DomainCase:
    """The tiny tanh MLP of :func:`tiny_mlp_case` (53 parameters) and three domains whose inputs
    are shifted and scaled differently (different Hessians), uneven last batches."""
    base = tiny_mlp_case(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    domains = {}
    for name, shift, scale in (("a", 0.0, 1.0), ("b", 1.0, 0.5), ("c", -0.5, 2.0)):
        x = shift + scale * torch.randn(n, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
        domains[name] = _batches(x, y, batch)
    return DomainCase("multi-domain-mlp", base.model, domains, nn.functional.cross_entropy)


def disjoint_domains_case(seed: int = 0, d: int = 6, n: int = 20, batch: int = 8) -> DomainCase:
    """A linear model x -> w^T x (no bias, one output) with MSE and two domains whose inputs live
    on disjoint coordinates (the first half, the second half). The Hessian of domain D is
    H_D = 2 X_D^T X_D / N_D, supported on its own block of w: the blocks are disjoint, so the top
    eigenspaces of the two domains are orthogonal (overlap 0)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    half = d // 2
    domains = {}
    for name, cols in (("first", slice(0, half)), ("second", slice(half, d))):
        x = torch.zeros(n, d, dtype=torch.float64)
        # Different scales per coordinate: distinct eigenvalues within each block.
        x[:, cols] = torch.randn(n, half, generator=g, dtype=torch.float64) * torch.linspace(1.0, 2.0, half,
                                                                                            dtype=torch.float64)
        y = torch.randn(n, 1, generator=g, dtype=torch.float64)
        domains[name] = _batches(x, y, batch)
    return DomainCase("disjoint-domains", model.eval(), domains, nn.functional.mse_loss)
# --- tiny flatlab checkpoints (untrained) -------------------------------------------------------
# For tests of what commands accept, refuse and write: nothing about them depends on training.

def tiny_meta() -> tuple[dict, torch.nn.Module]:
    """Metadata and an untrained model of a valid checkpoint (rotated digits at 8x8, MLP width 4)."""
    from flatlab.data import build_dataset
    from flatlab.models import build_model, model_options

    ds = build_dataset("rotated-digits", resolution=8)
    opts = model_options("mlp", width=4, depth=1)
    torch.manual_seed(0)
    model = build_model("mlp", ds.input_shape, ds.num_classes, **opts)
    meta = {"dataset": ds.name, "dataset_options": ds.options, "data_dir": None, "data_hash": ds.fingerprint(),
            "domains": list(ds.domains), "num_classes": ds.num_classes, "input_shape": list(ds.input_shape),
            "test_envs": [0], "test_env_names": [ds.domains[0]], "holdout_fraction": 0.2, "model": "mlp",
            "model_options": opts, "algorithm": "erm", "hparams": {}, "seed": 0, "trial_seed": 0,
            "hparams_seed": 0, "steps": 1, "step": 1, "bits": None, "quant": None, "accuracies": {}}
    return meta, model


def write_tiny_checkpoint(path: Path, quantized: bool = False, **meta_changes) -> Path:
    """A flatlab checkpoint of an untrained tiny MLP; ``meta_changes`` edit its metadata (a value
    of ``...`` removes the key)."""
    from flatlab.checkpoint import save_checkpoint

    meta, model = tiny_meta()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    if quantized:
        from flatlab.quant import QuantConfig, quantize_model

        config = QuantConfig(bits=4)
        model = quantize_model(model, config)
        meta.update(algorithm="qat", bits=4, act_bits=None, quant=config.to_dict())
    for key, value in meta_changes.items():
        if value is ...:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_checkpoint(path, model, w0, meta)
    return path


def write_raw_checkpoint(path: Path, meta: object) -> Path:
    """A file in the checkpoint format whose metadata is ``meta`` (anything, e.g. a string)."""
    _, model = tiny_meta()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"format": "flatlab-checkpoint", "format_version": 1, "meta": meta, "state_dict": state,
                "w0": state}, path)
    return path
def interpolating_mse_case(seed: int = 0, n: int = 30, batch: int = 12) -> Case:
    """MLP 4 -> 5 -> 2 (Tanh) with squared error against its own outputs: an interpolating
    minimum (every residual zero), where the GGN equals the Hessian and the empirical Fisher is 0."""
    g = torch.Generator().manual_seed(seed)
    model = _randomized(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double(), g)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    return Case("interpolating-mse", model, _batches(x, y, batch), nn.functional.mse_loss)


class OldStyleSquare(torch.autograd.Function):
    """x**2 as an autograd.Function without setup_context or jvp: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class OldStyleMLP(nn.Module):
    """Linear(3 -> 4), the old-style square, Linear(4 -> 3): a model only autograd differentiates."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(OldStyleSquare.apply(self.first(x)))


def old_style_case(seed: int = 0, n: int = 14, batch: int = 5) -> Case:
    g = torch.Generator().manual_seed(seed)
    model = _randomized(OldStyleMLP().double(), g, scale=0.5)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Case("old-style", model, _batches(x, y, batch), nn.functional.cross_entropy)


# --- tiny studies, files that are not results, one-line refusals ---------------------------------

def data_model_sections(width: int = 16) -> str:
    """The [data] and [model] sections of the test studies: an MLP of depth 1 on 8x8 rotated
    digits, test domain 0 (width 8 is the architecture of the session fixture ``mlp_run``)."""
    return f"""
[data]
dataset = "rotated-digits"
test_envs = [0]
options = {{ resolution = 8 }}

[model]
name = "mlp"
options = {{ width = {width}, depth = 1 }}
"""


#: The [data] and [model] sections of most test studies (width 16).
DATA_MODEL = data_model_sections()

#: A one-job study (ERM for 10 steps, seed 0) that a test completes with its measurement sections.
ERM_STUDY = DATA_MODEL + '\n[train]\nsteps = 10\nseeds = [0]\n\n[[algorithms]]\nalgorithm = "erm"\n\n'

#: A one-job study with a curvature measurement: ERM at lr 0.01, the top eigenvalue on 50 samples.
CURVATURE_STUDY = DATA_MODEL + """
[train]
steps = 10
seeds = [0]
hparams = { lr = 0.01 }

[[algorithms]]
algorithm = "erm"

[measure]
max_samples = 50

[measure.curvature]
top_k = 1
"""

#: Two ERM variants (fp, fpb) x 2 seeds, an ensemble of the fp seeds and three [[barriers]]
#: entries, on mlp_run's architecture (width 8): the session runs can stand in for its training jobs.
BARRIER_STUDY = """
[study]
name = "bar17"
""" + data_model_sections(width=8) + """
[train]
steps = 60
seeds = [0, 1]
trial_seed = 0

[[algorithms]]
label = "fp"
algorithm = "erm"

[[algorithms]]
label = "fpb"
algorithm = "erm"
hparams = { lr = 0.002 }

[[ensembles]]
name = "eoq"
variant = "fp"

[[barriers]]
name = "fp-fpb"
between = ["fp", "fpb"]
points = 3
max_samples = 40

[[barriers]]
name = "fp-fpb-fine"
between = ["fp", "fpb"]
points = 5
max_samples = 40
seeds = [0]

[[barriers]]
name = "members"
members = "eoq"
points = 3
max_samples = 40
"""


def write_study(folder: Path, text: str, name: str = "study.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def one_error_line(capsys: pytest.CaptureFixture[str], skip_warnings: bool = False) -> str:
    """The one line a refused command wrote to stderr, ``flatlab: error: ...``, with no traceback.
    ``skip_warnings`` passes over Python warning lines (a library's notes, not the refusal)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    if skip_warnings:
        lines = [line for line in lines if "Warning" not in line and "warnings.warn" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("flatlab: error: ") and "Traceback" not in err, err
    return lines[0]


def refused_study(folder: Path, capsys: pytest.CaptureFixture[str], text: str, *flags: str,
                  skip_warnings: bool = False) -> str:
    """``flatlab sweep FLAGS`` on a study file holding ``text`` must exit 2 with one error line that
    names the file, and create no output folder: the line, for the caller's words."""
    from flatlab.cli import main

    study = write_study(folder, text)
    out = folder / "out"
    assert main(["sweep", str(study), *flags, "--out", str(out)]) == 2
    line = one_error_line(capsys, skip_warnings)
    assert str(study) in line, line
    assert not out.exists()
    return line


def write_non_results(folder: Path) -> list[tuple[Path, str]]:
    """Files every reader of results files must refuse, each with the words of its refusal: a text
    file, someone else's HDF5 file, and flatlab results files without runs (no /runs, an empty one)."""
    import h5py
    import numpy as np

    text = folder / "notes.txt"
    text.write_text("not hdf5")
    foreign = folder / "other.h5"
    with h5py.File(foreign, "w") as fh:
        fh["weights"] = np.arange(3)
    no_runs, empty_runs = folder / "no-runs.h5", folder / "empty-runs.h5"
    for path in (no_runs, empty_runs):
        with h5py.File(path, "w") as fh:
            fh.attrs["schema_version"] = 1
            if path == empty_runs:
                fh.create_group("runs")
    return [(text, "not a flatlab results file"), (foreign, "not a flatlab results file"), (no_runs, "no runs"),
            (empty_runs, "no runs")]
