"""The training loop: DomainBed's protocol with resumable, atomic outputs.

``train(config)`` writes into ``config.out``:

* ``model.pt``: the checkpoint chosen by training-domain validation (mean source out-accuracy),
  rewritten atomically whenever a selectable evaluation improves on it;
* ``results.jsonl``: one DomainBed-style line per evaluation;
* ``state.pt``: the resume state (model, optimizer, every RNG state, selection so far), saved
  atomically at every evaluation; removed when the run is done;
* ``run.json``: the arguments that define the run (a rerun with other arguments is refused);
* ``done``: an empty file once the run has finished.

Killed at any point (SIGKILL included) and rerun with the same arguments, the run continues from
``state.pt`` and ends bit-for-bit as an uninterrupted run would on the same machine.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from flatlab import __version__
from flatlab.checkpoint import safe_torch_load, save_checkpoint
from flatlab.data import DomainSplits, build_dataset, resolve_domains
from flatlab.errors import FlatlabError
from flatlab.evaluate import evaluate_models
from flatlab.io import atomic_path, atomic_write_text, dumps_json
from flatlab.models import build_model, model_options, num_parameters
from flatlab.train.algorithms import get_algorithm
from flatlab.train.hparams import default_model, default_steps, resolve_hparams

RUN_FILES = ("model.pt", "results.jsonl", "state.pt", "run.json", "done")


@dataclass
class TrainConfig:
    """Everything that defines a training run (see ``flatlab train --help``).

    ``seed`` seeds initialisation, minibatch sampling and algorithm noise; ``trial_seed`` seeds
    the in/out split (DomainBed); it defaults to ``seed``. ``hparams_seed`` is always 0:
    flatlab uses the documented defaults, not DomainBed's random hyperparameter search.
    """

    dataset: str = "rotated-digits"
    test_envs: list[str] = field(default_factory=lambda: ["0"])
    algorithm: str = "erm"
    model: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    steps: int | None = None
    eval_every: int | None = None
    seed: int = 0
    trial_seed: int | None = None
    holdout_fraction: float = 0.2
    hparams_json: dict[str, Any] | None = None
    hparam_flags: dict[str, Any] = field(default_factory=dict)
    out: str = "runs/run"
    device: str = "cpu"
    fresh: bool = False
    quiet: bool = False
    eval_batch_size: int = 512
    pretrained: str | None = None


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path
    step: int
    selected: dict[str, Any]
    resumed_from: int
    already_done: bool


def _rng_state(generators: dict[str, torch.Generator], device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()[1]),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(json.loads(state["numpy"]), dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(json.loads(state["python"])), None))
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FlatlabError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlatlabError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run. See the module docstring for the files it writes.

    Raises:
        FlatlabError: bad arguments, a folder holding another run, or a non-finite loss.
    """
    out = Path(config.out)
    device = resolve_device(config.device)
    dataset = build_dataset(config.dataset, data_dir=config.data_dir, **config.dataset_options)
    test_envs = resolve_domains(dataset, config.test_envs)
    trial_seed = config.seed if config.trial_seed is None else config.trial_seed
    model_name = config.model or default_model(dataset.name)
    opts = model_options(model_name, **config.model_options)
    algo_cls = get_algorithm(config.algorithm)
    steps = config.steps if config.steps is not None else default_steps(dataset.name)
    if steps < 1:
        raise FlatlabError(f"--steps must be at least 1, got {steps}")
    eval_every = config.eval_every or max(1, min(100, steps // 10))
    if eval_every < 1:
        raise FlatlabError(f"--eval-every must be at least 1, got {eval_every}")
    hparams = resolve_hparams(dataset.name, algo_cls.hparam_defaults, config.hparams_json, config.hparam_flags)
    algo_cls.validate_hparams(hparams, steps)

    args = {
        "dataset": dataset.name,
        "dataset_options": dataset.options,
        "data_dir": str(Path(config.data_dir).resolve()) if config.data_dir else None,
        "test_envs": test_envs,
        "algorithm": algo_cls.name,
        "model": model_name,
        "model_options": opts,
        "steps": steps,
        "checkpoint_freq": eval_every,
        "seed": config.seed,
        "trial_seed": trial_seed,
        "hparams_seed": 0,
        "holdout_fraction": config.holdout_fraction,
        "pretrained": str(Path(config.pretrained).resolve()) if config.pretrained else None,
        "hparams": hparams,
    }
    run_json = out / "run.json"
    out.mkdir(parents=True, exist_ok=True)
    # The lock comes first: --fresh must not delete the files of a run another trainer is writing.
    lock = _lock_run_folder(out)
    try:
        if config.fresh:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        if run_json.exists():
            previous = json.loads(run_json.read_text())
            if previous != args:
                diff = sorted(k for k in set(previous) | set(args) if previous.get(k) != args.get(k))
                raise FlatlabError(f"{out} holds a run with other arguments (differs in: {', '.join(diff)}): "
                                   "use another --out, or --fresh to start over")
            if (out / "done").exists():
                return _finished_result(out, already_done=True)
        elif any((out / n).exists() for n in RUN_FILES):
            raise FlatlabError(f"{out} holds files of another run but no run.json: use another --out or --fresh")
        return _train_locked(config, out, device, dataset, test_envs, trial_seed, model_name, opts, algo_cls,
                             steps, eval_every, hparams, args, run_json)
    finally:
        lock.close()


def _lock_run_folder(out: Path):
    """An exclusive lock on OUT/.lock for the life of the run: two trainers never share a folder."""
    import fcntl

    handle = open(out / ".lock", "a+")  # noqa: SIM115 - held until the run ends
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise FlatlabError(f"another `flatlab train` is running in {out}: wait for it or use another --out") from None
    return handle


def _train_locked(config: TrainConfig, out: Path, device: torch.device, dataset: Any, test_envs: list[int],
                  trial_seed: int, model_name: str, opts: dict[str, Any], algo_cls: Any, steps: int,
                  eval_every: int, hparams: dict[str, Any], args: dict[str, Any], run_json: Path) -> TrainResult:
    atomic_write_text(run_json, json.dumps(args, indent=1, sort_keys=True))

    splits = DomainSplits(dataset, test_envs, trial_seed, config.holdout_fraction)
    source_envs = splits.source_envs
    for e in source_envs:
        if len(splits.in_idx[e]) == 0 or len(splits.out_idx[e]) == 0:
            raise FlatlabError(f"source domain {dataset.domains[e]} ({dataset.domain_size(e)} samples) leaves an empty "
                               f"{'training' if len(splits.in_idx[e]) == 0 else 'held-out'} split at holdout fraction "
                               f"{config.holdout_fraction}: add data or change --holdout-fraction")

    seed_everything(config.seed)
    model = build_model(model_name, dataset.input_shape, dataset.num_classes, **opts)
    if config.pretrained:
        from flatlab.models import load_pretrained

        load_pretrained(model, config.pretrained)
    model = model.to(device)
    w0 = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    generators = {f"env{e}": torch.Generator().manual_seed(config.seed * 1000 + e) for e in source_envs}
    generators["augment"] = torch.Generator().manual_seed(config.seed * 1000 + 999)
    algo_generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + 998)
    algorithm = algo_cls(model, hparams, steps, algo_generator)

    start_step, best = 0, {"val_acc": -math.inf, "step": None}
    state_path = out / "state.pt"
    results_path = out / "results.jsonl"
    if state_path.exists():
        state = safe_torch_load(state_path, what="resume state")
        start_step = int(state["step"])
        algorithm.load_state_dict(state["algorithm"], start_step)
        algo_generator.set_state(state["algo_generator"])
        _set_rng_state(state["rng"], generators, device)
        best = {"val_acc": float(state["best_val_acc"]), "step": state["best_step"]}
        w0 = state["w0"]
        rows = [r for r in _read_results(results_path) if r["step"] <= start_step and not r.get("final_average")]
        atomic_write_text(results_path, "".join(dumps_json(r) + "\n" for r in rows))
    else:
        results_path.unlink(missing_ok=True)
        (out / "model.pt").unlink(missing_ok=True)

    batch_size = hparams["batch_size"]
    steps_per_epoch = min(len(splits.in_idx[e]) for e in source_envs) / batch_size
    base_meta = {
        "dataset": dataset.name,
        "dataset_options": dataset.options,
        "data_dir": args["data_dir"],
        "data_hash": dataset.fingerprint(),
        "domains": list(dataset.domains),
        "num_classes": dataset.num_classes,
        "input_shape": list(dataset.input_shape),
        "test_envs": test_envs,
        "test_env_names": [dataset.domains[e] for e in test_envs],
        "holdout_fraction": config.holdout_fraction,
        "model": model_name,
        "model_options": opts,
        "algorithm": algo_cls.name,
        "hparams": hparams,
        "seed": config.seed,
        "trial_seed": trial_seed,
        "hparams_seed": 0,
        "steps": steps,
        "train_size": splits.split_size("source"),
    }

    bar = tqdm(total=steps, initial=start_step, disable=config.quiet, file=sys.stderr,
               desc=f"train {algo_cls.name}", unit="step", dynamic_ncols=True)
    # train() once up front: models with frozen BatchNorm (ResNets) apply it in their train().
    algorithm.model.train()
    last_loss = float("nan")
    t_last = time.perf_counter()
    losses: list[float] = []
    def draw_minibatches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One minibatch per source domain from its in-split (augmented where the data set does)."""
        minibatches = []
        for e in source_envs:
            pick = torch.randint(len(splits.in_idx[e]), (batch_size,), generator=generators[f"env{e}"])
            x, y = dataset.load(e, splits.in_idx[e][pick.numpy()], augment=True, generator=generators["augment"])
            minibatches.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
        return minibatches

    for step in range(start_step + 1, steps + 1):
        algorithm.before_step(step)
        minibatches = draw_minibatches()
        stats = algorithm.update(minibatches, step)
        last_loss = stats["loss"]
        if not math.isfinite(last_loss):
            bar.close()
            kept = f"the last good checkpoint is {out / 'model.pt'}" if (out / "model.pt").exists() else "no checkpoint was written yet"
            raise FlatlabError(f"the training loss became {last_loss} at step {step}; training stopped and {kept}: "
                               "lower --lr or check the data")
        losses.append(last_loss)
        bar.update(1)
        if step % eval_every == 0 or step == steps:
            step_time = (time.perf_counter() - t_last) / max(1, len(losses))
            metrics = evaluate_models(algorithm.model, splits, config.eval_batch_size, device)
            row: dict[str, Any] = {"step": step, "epoch": step / steps_per_epoch,
                                   "loss": float(np.mean(losses)), "step_time": step_time}
            row.update({k: v for k, v in metrics.items() if k.startswith("env")})
            row.update({k: metrics[k] for k in ("id_acc", "ood_acc", "source_acc", "val_acc")})
            row.update(stats.get("log", {}) if isinstance(stats.get("log"), dict) else {})
            metrics["val_loss"] = float(np.mean([metrics[f"env{e}_out_loss"] for e in source_envs]))
            row["val_loss"] = metrics["val_loss"]
            row.update(algorithm.after_evaluation(step, metrics))
            row["selectable"] = algorithm.selectable(step)
            row["hparams"] = hparams
            row["args"] = {**args, "output_dir": str(out), "test_envs": test_envs, "flatlab_version": __version__}
            if row["selectable"] and metrics["val_acc"] > best["val_acc"]:
                best = {"val_acc": metrics["val_acc"], "step": step}
                meta = {**base_meta, **algorithm.checkpoint_meta(), "step": step,
                        "selection": {"method": "training-domain validation", "val_acc": metrics["val_acc"]},
                        "accuracies": {k: metrics[k] for k in ("id_acc", "ood_acc", "source_acc", "val_acc")},
                        "num_params": num_parameters(model)}
                save_checkpoint(out / "model.pt", algorithm.model, w0, meta)
            _append_line(results_path, dumps_json(row))
            state = {"step": step, "algorithm": algorithm.state_dict(), "algo_generator": algo_generator.get_state(),
                     "rng": _rng_state(generators, device), "best_val_acc": best["val_acc"],
                     "best_step": best["step"], "w0": w0}
            with atomic_path(state_path, suffix=".pt") as tmp:
                torch.save(state, tmp)
            bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{metrics['val_acc']:.3f}", ood=f"{metrics['ood_acc']:.3f}")
            losses = []
            t_last = time.perf_counter()
    bar.close()
    if best["step"] is None:
        raise FlatlabError("no evaluation was eligible for model selection: check --eval-every and the schedule")
    averaged = algorithm.final_model(lambda n: [b for _ in range(n) for b in draw_minibatches()])
    if averaged is not None:
        # Weight averaging (SWA/SWAD): the averaged model replaces the selected one.
        metrics = evaluate_models(averaged, splits, config.eval_batch_size, device)
        meta = {**base_meta, **algorithm.checkpoint_meta(), "step": steps,
                "selection": {"method": f"{algo_cls.name} weight average", "val_acc": metrics["val_acc"]},
                "accuracies": {k: metrics[k] for k in ("id_acc", "ood_acc", "source_acc", "val_acc")},
                "num_params": num_parameters(averaged), **algorithm.after_training_meta()}
        save_checkpoint(out / "model.pt", averaged, w0, meta)
        row = {"step": steps, "epoch": steps / steps_per_epoch, "final_average": True,
               **{k: v for k, v in metrics.items() if k.startswith("env")},
               **{k: metrics[k] for k in ("id_acc", "ood_acc", "source_acc", "val_acc")},
               "hparams": hparams, "args": {**args, "output_dir": str(out), "flatlab_version": __version__}}
        _append_line(results_path, dumps_json(row))
    atomic_write_text(out / "done", "")
    state_path.unlink(missing_ok=True)
    return _finished_result(out, already_done=False, resumed_from=start_step)


def _finished_result(out: Path, already_done: bool, resumed_from: int = 0) -> TrainResult:
    from flatlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "model.pt")
    return TrainResult(out=out, checkpoint=out / "model.pt", step=int(ckpt.meta["step"]),
                       selected=dict(ckpt.meta.get("accuracies", {})), resumed_from=resumed_from,
                       already_done=already_done)


__all__ = ["TrainConfig", "TrainResult", "resolve_device", "seed_everything", "train"]
