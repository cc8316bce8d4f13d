"""The training loop: DomainBed's protocol with resumable, atomic outputs.

``train(config)`` writes into ``config.out``:

* ``model.pt``: the checkpoint chosen by training-domain validation (mean source out-accuracy),
  rewritten atomically whenever a selectable evaluation improves on it;
* ``results.jsonl``: one DomainBed-style line per evaluation;
* ``state.pt``: the resume state (model, optimizer, every RNG state, selection so far), saved
  atomically at every evaluation; removed when the run is done;
* ``run.json``: the arguments that define the run (a rerun with other arguments is refused);
* ``done``: an empty file once the run has finished.

Robustness: every argument is validated and the data and initial model are built before the
first write; the folder is locked (``.lock``, naming the holder's pid) for the life of the run;
temporary files a killed run left behind are removed at the next start; ``fresh`` deletes only
the run's own files. The selected model is checked against chance level (:func:`chance_level`).

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
from flatlab.io import (
    atomic_path,
    atomic_write_text,
    check_writable,
    clear_own_files,
    dumps_json,
    os_error_reason,
    remove_stale_temp_files,
    temp_pattern,
)
from flatlab.locks import PidLock
from flatlab.models import build_model, model_options, num_parameters
from flatlab.train.algorithms import get_algorithm
from flatlab.train.hparams import default_model, default_steps, resolve_hparams

#: The files a run folder holds; with their temporary files and the lock, the only ones
#: ``fresh`` deletes.
RUN_FILES = ("model.pt", "results.jsonl", "state.pt", "run.json", "done")

#: The run folder's lock file (held for the life of a run, removed when it ends).
LOCK_FILE = ".lock"


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

    def __post_init__(self) -> None:
        # The scalar checks that need no data: a typo fails at construction, before any work.
        def integer(name: str, value: Any, minimum: int | None) -> None:
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int):
                raise FlatlabError(f"{name} must be an integer, got {value!r}")
            if minimum is not None and value < minimum:
                raise FlatlabError(f"{name} must be at least {minimum}, got {value}")

        integer("steps", self.steps, 1)
        integer("eval_every", self.eval_every, 1)
        integer("seed", self.seed, 0)
        integer("trial_seed", self.trial_seed, 0)
        integer("eval_batch_size", self.eval_batch_size, 1)
        fraction = self.holdout_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
            raise FlatlabError(f"holdout_fraction must lie strictly between 0 and 1 (the share of each domain "
                               f"held out for validation, e.g. 0.2), got {fraction!r}")
        if not str(self.out).strip():
            raise FlatlabError("out (the run folder) must not be empty")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``warnings`` lists problems of the selected model that are not errors, e.g. accuracy at
    chance level on the source domains (``at_chance``, see :func:`chance_level`); each one is
    also written to stderr as ``flatlab: warning: ...``.
    """

    out: Path
    checkpoint: Path
    step: int
    selected: dict[str, Any]
    resumed_from: int
    already_done: bool
    at_chance: bool = False
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChanceCheck:
    """Whether an accuracy is at chance level: ``accuracy <= 1/num_classes + margin``.

    ``margin = max(min_margin, 3 sqrt(p (1 - p) / n))`` with ``p = 1/num_classes``: three
    standard errors of the accuracy of a classifier that guesses uniformly at random on ``n``
    samples (binomial: Var(acc) = p (1 - p) / n), and at least ``min_margin`` so that a constant
    predictor on slightly unbalanced classes also counts.
    """

    accuracy: float
    num_classes: int
    samples: int
    chance: float
    margin: float
    at_chance: bool


def chance_level(accuracy: float, num_classes: int, samples: int, min_margin: float = 0.02) -> ChanceCheck:
    """Test ``accuracy`` (measured on ``samples`` samples of ``num_classes`` classes) against
    chance, as :class:`ChanceCheck` describes. A NaN accuracy is not at chance (not measured).

    Raises:
        ValueError: ``num_classes < 2`` or ``samples < 1``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    chance = 1.0 / num_classes
    margin = max(min_margin, 3.0 * math.sqrt(chance * (1.0 - chance) / samples))
    at = bool(math.isfinite(accuracy) and accuracy <= chance + margin)
    return ChanceCheck(float(accuracy), int(num_classes), int(samples), chance, margin, at)


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
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA when available), checked to exist.

    Raises:
        FlatlabError: an unknown or unsupported device (``meta``, ``xla``, ...), or one this
            machine does not have (``cuda`` without CUDA, ``cuda:3`` on a two-GPU machine, ``mps``
            off Apple silicon).
    """
    text = str(name).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise FlatlabError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FlatlabError(f"device {name!r} was asked for but no CUDA device is available: use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FlatlabError(f"device {name!r} does not exist: this machine has {count} CUDA device(s), "
                               f"cuda:0 to cuda:{count - 1}")
        return device
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise FlatlabError(f"device {name!r} (Apple GPU) is not available on this machine: use cpu")
        return device
    raise FlatlabError(f"device {name!r} is not supported for training or measuring: use cpu, cuda, cuda:N or auto")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl``. A torn last line (the process was killed while
    appending it) is dropped: resuming truncates the log to the saved step anyway. Any other
    line that is not a JSON record with an integer ``step`` means the log was damaged.

    Raises:
        FlatlabError: a damaged line other than the last.
    """
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a record with an integer step")
        except ValueError:  # JSONDecodeError is a ValueError
            if all(not rest.strip() for rest in lines[number:]):
                break  # torn last line
            raise FlatlabError(f"{path} line {number} is not a flatlab record (the log was damaged): start over "
                               "with --fresh or use another --out") from None
        rows.append(row)
    return rows


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()


#: The key of ``run.json`` that records the environment of the run's last start (threads, torch
#: version, device, CPU); not an argument of the run, so not compared with the arguments.
ENVIRONMENT_KEY = "environment"


def _read_run_json(path: Path) -> dict[str, Any] | None:
    """The arguments a run folder records (without its environment record), or None when
    ``run.json`` is damaged (not a JSON object)."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(previous, dict):
        return None
    previous.pop(ENVIRONMENT_KEY, None)
    return previous


def _read_environment(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8")).get(ENVIRONMENT_KEY)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return record if isinstance(record, dict) else {}


@dataclass
class _RunPlan:
    """Everything a run needs, built and validated before the first write."""

    device: torch.device
    dataset: Any
    test_envs: list[int]
    trial_seed: int
    model_name: str
    opts: dict[str, Any]
    algo_cls: Any
    steps: int
    eval_every: int
    hparams: dict[str, Any]
    args: dict[str, Any]
    splits: DomainSplits
    model: torch.nn.Module


def _plan_run(config: TrainConfig) -> _RunPlan:
    """Validate every argument and build the data, splits and initial model (seeded), writing
    nothing: a refused input leaves no trace."""
    device = resolve_device(config.device)
    dataset = build_dataset(config.dataset, data_dir=config.data_dir, **config.dataset_options)
    test_envs = resolve_domains(dataset, config.test_envs)
    trial_seed = config.seed if config.trial_seed is None else config.trial_seed
    model_name = config.model or default_model(dataset.name)
    opts = model_options(model_name, **config.model_options)
    algo_cls = get_algorithm(config.algorithm)
    steps = config.steps if config.steps is not None else default_steps(dataset.name)
    if steps < 1:
        raise FlatlabError(f"steps must be at least 1, got {steps}")
    eval_every = config.eval_every or max(1, min(100, steps // 10))
    hparams = resolve_hparams(dataset.name, algo_cls.hparam_defaults, config.hparams_json, config.hparam_flags)
    algo_cls.validate_hparams(hparams, steps)
    if config.pretrained is not None and not Path(config.pretrained).is_file():
        what = "is a folder" if Path(config.pretrained).is_dir() else "does not exist"
        raise FlatlabError(f"pretrained weights file {config.pretrained} {what}: give the path of a local "
                           "weights file (flatlab never downloads weights)")
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
    splits = DomainSplits(dataset, test_envs, trial_seed, config.holdout_fraction)
    for e in splits.source_envs:
        if len(splits.in_idx[e]) == 0 or len(splits.out_idx[e]) == 0:
            raise FlatlabError(f"source domain {dataset.domains[e]} ({dataset.domain_size(e)} samples) leaves an empty "
                               f"{'training' if len(splits.in_idx[e]) == 0 else 'held-out'} split at holdout fraction "
                               f"{config.holdout_fraction}: add data or change the holdout fraction")
    # The initial weights: seeded here, right before the model is built, as they always were.
    seed_everything(config.seed)
    model = build_model(model_name, dataset.input_shape, dataset.num_classes, **opts)
    if config.pretrained:
        from flatlab.models import load_pretrained

        load_pretrained(model, config.pretrained)
    return _RunPlan(device=device, dataset=dataset, test_envs=test_envs, trial_seed=trial_seed,
                    model_name=model_name, opts=opts, algo_cls=algo_cls, steps=steps, eval_every=eval_every,
                    hparams=hparams, args=args, splits=splits, model=model)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run. See the module docstring for the files it writes.

    Every argument is validated, and the data, splits and initial model are built, before the
    first write: a refused input creates nothing. The run folder is then locked
    (:class:`flatlab.locks.PidLock` on ``OUT/.lock``, naming the holder's pid; a stale lock of a
    dead trainer is broken), temporary files that killed runs left are removed, and:

    * ``fresh``: the folder's own files (:data:`RUN_FILES`, their temporary files) are deleted;
      a folder holding anything else is refused (:func:`flatlab.io.clear_own_files`);
    * a folder whose ``run.json`` records other arguments is refused, unless that run never saved
      a model or resume state (it failed before its first evaluation): then it is replaced.

    Raises:
        FlatlabError: bad arguments, an unwritable or busy folder, a folder holding another run,
            or a non-finite loss.
    """
    out = Path(config.out)
    plan = _plan_run(config)
    check_writable(out, "folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlatlabError(f"cannot write {out}: {os_error_reason(exc)}") from None
    # The lock comes first: --fresh must not delete the files of a run another trainer is writing.
    lock = PidLock(out / LOCK_FILE, busy_message=f"another `flatlab train` is running in {out}{{holder}}: "
                                                 "wait for it or use another output folder").acquire()
    try:
        remove_stale_temp_files(out, RUN_FILES)
        if config.fresh:
            clear_own_files(out, (*RUN_FILES, LOCK_FILE), [temp_pattern(n) for n in RUN_FILES], keep=(LOCK_FILE,))
        run_json = out / "run.json"
        saved = any((out / n).exists() for n in ("state.pt", "model.pt", "done"))
        if run_json.exists():
            previous = _read_run_json(run_json)
            if previous is None and saved:
                raise FlatlabError(f"{run_json} is damaged (not a JSON object of run arguments): "
                                   "start over with fresh=True (flatlab train --fresh) or use another output folder")
            if previous is not None and previous != plan.args and saved:
                diff = sorted(k for k in set(previous) | set(plan.args) if previous.get(k) != plan.args.get(k))
                raise FlatlabError(f"{out} holds a run with other arguments (differs in: {', '.join(diff)}): "
                                   "use another --out, or --fresh to start over")
            if previous == plan.args and (out / "done").exists():
                return _finished_result(out, already_done=True)
            # Otherwise: the same run resumes, or a run that never saved anything is replaced.
        elif any((out / n).exists() for n in RUN_FILES):
            raise FlatlabError(f"{out} holds files of another run but no run.json: use another --out or --fresh")
        return _train_locked(config, out, plan, run_json)
    finally:
        lock.release()


def _train_locked(config: TrainConfig, out: Path, plan: _RunPlan, run_json: Path) -> TrainResult:
    device, dataset, test_envs, trial_seed = plan.device, plan.dataset, plan.test_envs, plan.trial_seed
    model_name, opts, algo_cls, steps = plan.model_name, plan.opts, plan.algo_cls, plan.steps
    eval_every, hparams, args, splits = plan.eval_every, plan.hparams, plan.args, plan.splits
    from flatlab.environment import environment, environment_note

    here = environment(device)
    if (out / "state.pt").exists():
        # Floating-point sums depend on the thread count, torch build, device and CPU: a resume
        # under another environment does not end bit for bit as an uninterrupted run would.
        note = environment_note(_read_environment(run_json), here, f"resuming {out}")
        if note:
            sys.stderr.write(f"flatlab: note: {note}\n")
    atomic_write_text(run_json, json.dumps({**args, ENVIRONMENT_KEY: here}, indent=1, sort_keys=True))
    source_envs = splits.source_envs
    model = plan.model.to(device)
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
        try:
            start_step = int(state["step"])
            algorithm.load_state_dict(state["algorithm"], start_step)
            algo_generator.set_state(state["algo_generator"])
            _set_rng_state(state["rng"], generators, device)
            best = {"val_acc": float(state["best_val_acc"]), "step": state["best_step"]}
            w0 = state["w0"]
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            detail = " ".join(str(exc).split())[:120] or type(exc).__name__
            raise FlatlabError(f"{state_path} is not a resume state of this run ({detail}): start over with "
                               "--fresh or use another --out") from None
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
            if (out / "model.pt").exists():
                kept = f"the last good checkpoint is {out / 'model.pt'}"
                fix = "lower --lr and start over with --fresh (or use another --out), or check the data"
            else:
                kept = "no checkpoint was written yet"
                fix = "lower --lr and rerun, or check the data"
            raise FlatlabError(f"the training loss became {last_loss} at step {step}; training stopped and {kept}: {fix}")
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
        raise FlatlabError("no evaluation was eligible for model selection: check eval_every and the schedule")
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
    selected = dict(ckpt.meta.get("accuracies", {}))
    warnings: list[str] = []
    at_chance = False
    source_acc, num_classes, n = selected.get("source_acc"), ckpt.meta.get("num_classes"), ckpt.meta.get("train_size")
    if isinstance(source_acc, (int, float)) and isinstance(num_classes, int) and num_classes >= 2 \
            and isinstance(n, int) and n > 0:
        check = chance_level(float(source_acc), num_classes, n)
        if check.at_chance:
            at_chance = True
            warnings.append(f"the selected model of {out} is at chance level on its own training domains "
                            f"(source accuracy {check.accuracy:.3f}, chance {check.chance:.3f} for {num_classes} "
                            "classes): training diverged or did not learn; lower the learning rate or train longer")
    for text in warnings:
        sys.stderr.write(f"flatlab: warning: {text}\n")
    return TrainResult(out=out, checkpoint=out / "model.pt", step=int(ckpt.meta["step"]), selected=selected,
                       resumed_from=resumed_from, already_done=already_done, at_chance=at_chance,
                       warnings=tuple(warnings))


__all__ = ["RUN_FILES", "ChanceCheck", "TrainConfig", "TrainResult", "chance_level", "resolve_device",
           "seed_everything", "train"]
