"""A model and data that flatlab did not train: the entry point of every measuring command.

``flatlab train`` writes checkpoints that say which model and data they belong to; a user's
``torch.save(model.state_dict(), "r.pt")`` does not. A :class:`ModelSource` says where such a
model comes from and a :class:`DataSource` where its data come from; :func:`load_source` turns
the pair into a :class:`LoadedSource` (the model with its weights, the named data splits, a run
id and the run's provenance), which :func:`flatlab.pipeline.measure_source` measures and
:func:`flatlab.surface.runner.run_surface` maps.

Model: exactly one of

* ``arch``: a torchvision architecture by name (``torchvision.models.get_model(name,
  weights=None, num_classes=N, **model_args)``; nothing is downloaded) or one of flatlab's
  registered models (:data:`flatlab.models.MODELS`, built for the data's input shape). A name
  both know (``resnet18``) is torchvision's: its parameter names are those of a torchvision
  state dict; ``flatlab:NAME`` / ``torchvision:NAME`` choose explicitly;
* ``model_fn``: ``pkg.module:function`` or ``path/to/file.py:function``, called with
  ``model_args`` (and ``num_classes`` when given) and returning an ``nn.Module``.

``weights`` is a file read with ``torch.load(path, map_location="cpu", weights_only=True)``
only (never unpickled): a raw state dict, or a dict holding one under ``"state_dict"`` or
``"model"``. It must fit the model exactly (strict loading); without it the model keeps the
initialisation it was built with (seeded), e.g. weights that ``model_fn`` loads itself.

Data: exactly one of

* ``dataset``: a registered data set (:func:`flatlab.data.build_dataset`: ``rotated-digits``,
  a DomainBed folder with ``data_dir``) with its ``test_envs``, split as ``flatlab train`` splits
  it (:class:`flatlab.data.DomainSplits`: ``source`` = the source domains' in-splits,
  ``source-out`` their held-out parts, ``target`` every sample of the test domains);
* ``data_fn``: ``pkg.module:function`` or ``file.py:function`` returning a mapping of named
  splits (``{"source": ..., "target": ...}``), each a list of ``(x, y)`` batches or a
  ``DataLoader`` (read once, in order). ``source`` is the training set (size m in the bounds),
  ``target`` the test domain; other names are extra domains for the per-domain measures.

The run id (``/runs/<run_id>`` in a results file) is, unless given, the first 16 hex digits of
the SHA-256 of the model source, the weights file's SHA-256, the data source and the loss: the
resume fingerprints of the measures cover their settings but not the model or the data, so the
same weights measured on other data must be another run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatlab.errors import ConfigError, FlatlabError

#: The algorithm recorded for a run flatlab did not train (the report's variant label).
USER_ALGORITHM = "user"

#: A run id given by hand: what a results-file group name can hold, one level deep.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Batch = tuple[Any, torch.Tensor]


# --- importing the user's callables ------------------------------------------------------------

@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The working directory on ``sys.path`` while importing, so ``--model-fn mymodels:build``
    finds ``./mymodels.py`` also from the installed ``flatlab`` script (``python -m`` adds it,
    the console script does not)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _exception_text(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def import_callable(spec: str, key: str) -> Callable[..., Any]:
    """The function ``spec`` names: ``pkg.module:function`` or ``path/to/file.py:function``.

    Args:
        spec: the import path.
        key: the parameter it was given as (``model_fn``, ``data_fn``, ``loss_fn``), which names
            it in errors (the CLI rewrites it into the flag).

    Raises:
        ConfigError: a spec without ``:function``, a module that is missing or fails to import
            (naming the module and the exception), a name the module does not define, or a
            name that is not callable.
    """
    module_part, sep, name = str(spec).rpartition(":")
    if not sep or not module_part or not name or not name.replace(".", "_").isidentifier():
        raise ConfigError(key, f"must be MODULE:FUNCTION or FILE.py:FUNCTION (e.g. mymodels:build_model), got {spec!r}")
    is_file = module_part.endswith(".py") or os.sep in module_part or "/" in module_part
    try:
        if is_file:
            module = _import_file(Path(module_part), key)
        else:
            with _cwd_on_path():
                module = importlib.import_module(module_part)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module failed: one line naming it and why
        raise ConfigError(key, f"names module {module_part}, which cannot be imported ({_exception_text(exc)})") from None
    target: Any = module
    for part in name.split("."):
        if not hasattr(target, part):
            defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                             and getattr(v, "__module__", None) == module.__name__)
            listed = f" (it defines {', '.join(defined[:8])})" if defined else ""
            raise ConfigError(key, f"names {name!r}, which module {module_part} does not define{listed}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(key, f"names {module_part}:{name}, a {type(target).__name__}, not a function")
    return target


def _import_file(path: Path, key: str) -> Any:
    """Import a Python file by path under a name derived from its resolved path (importing it
    twice gives the same module; pickling its objects for worker processes names that module)."""
    if not path.is_file():
        raise ConfigError(key, f"names file {path}, which does not exist")
    resolved = path.resolve()
    name = f"flatlab_user_{re.sub(r'[^0-9A-Za-z_]', '_', resolved.stem)}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(key, f"names file {path}, which Python cannot import (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _file_sha256(spec: str | None) -> str | None:
    """The SHA-256 of the file a ``file.py:function`` spec names (None for a module spec): the
    run's provenance says which code built the model or the data."""
    if not spec:
        return None
    module_part = spec.rpartition(":")[0]
    if not (module_part.endswith(".py") or "/" in module_part or os.sep in module_part):
        return None
    from flatlab.io import sha256_file

    return sha256_file(module_part) if Path(module_part).is_file() else None


# --- the model -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``arch`` or ``model_fn`` (one of them), and its weights.

    Attributes:
        arch: a torchvision architecture or a flatlab registered model by name
            (``flatlab:NAME`` / ``torchvision:NAME`` to choose where both know it).
        model_fn: ``pkg.module:function`` or ``path/to/file.py:function`` returning an ``nn.Module``.
        model_args: keyword arguments of the architecture or the function.
        num_classes: outputs of the classifier (``arch``: default the data set's class count;
            ``model_fn``: passed as ``num_classes=`` when given).
        weights: a state-dict file (``torch.load(weights_only=True)`` only).
    """

    arch: str | None = None
    model_fn: str | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    weights: str | None = None

    def __post_init__(self) -> None:
        if (self.arch is None) == (self.model_fn is None):
            raise ConfigError("arch", "or model_fn names the model: give exactly one of them"
                              if self.arch is None else "and model_fn exclude each other: give one")
        if not isinstance(self.model_args, Mapping):
            raise ConfigError("model_args", f"must be a mapping of keyword arguments, got {type(self.model_args).__name__}")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
                                             or self.num_classes < 1):
            raise ConfigError("num_classes", f"must be a positive integer, got {self.num_classes!r}")
        if self.model_fn is not None and self.num_classes is not None and "num_classes" in self.model_args:
            raise ConfigError("num_classes", "is given twice (also in model_args): give it once")

    @property
    def name(self) -> str:
        """How the model is recorded (``model`` attribute of the run)."""
        return str(self.arch if self.arch is not None else self.model_fn)


def resolve_arch(arch: str) -> tuple[str, str]:
    """(registry, name): ``"torchvision"`` or ``"flatlab"`` and the architecture's name there.

    Raises:
        ConfigError: a name neither registry knows (listing flatlab's and where torchvision's are).
    """
    import torchvision

    from flatlab.models import MODELS

    prefix, sep, rest = arch.partition(":")
    if sep and prefix in ("torchvision", "flatlab"):
        registry, name = prefix, rest
    else:
        registry, name = "", arch
    known_tv = set(torchvision.models.list_models())
    if registry in ("", "torchvision") and name in known_tv:
        return "torchvision", name
    if registry in ("", "flatlab") and name in MODELS:
        return "flatlab", name
    where = {"torchvision": "torchvision", "flatlab": "flatlab's registry"}.get(registry, "torchvision or flatlab")
    close = sorted(n for n in [*known_tv, *MODELS] if name.lower().replace("-", "_") in n.lower())[:5]
    hint = f"; close: {', '.join(close)}" if close else ""
    raise ConfigError("arch", f"{arch!r} is not an architecture of {where} (flatlab's: {', '.join(sorted(MODELS))}; "
                              f"torchvision's: torchvision.models.list_models()){hint}")


def build_model_of(source: ModelSource, input_shape: tuple[int, ...] | None, num_classes: int | None) -> nn.Module:
    """The untrained model ``source`` describes (call it under a seed: it draws an initialisation).

    Args:
        source: the model source.
        input_shape: (C, H, W) of one sample, which flatlab's registered models are built for.
        num_classes: the data's class count, the default of ``source.num_classes`` for ``arch``.

    Raises:
        ConfigError: an unknown architecture, arguments it does not take, a function that fails
            or does not return an ``nn.Module``.
    """
    kwargs = dict(source.model_args)
    if source.arch is not None:
        registry, name = resolve_arch(source.arch)
        classes = source.num_classes or num_classes
        if classes is None:
            raise ConfigError("num_classes", f"must be given for arch {source.arch} (the data do not say how many "
                                             "classes there are)")
        try:
            if registry == "torchvision":
                import torchvision

                model = torchvision.models.get_model(name, weights=None, num_classes=int(classes), **kwargs)
            else:
                from flatlab.models import build_model

                if input_shape is None:
                    raise ConfigError("arch", f"{source.arch} (a flatlab model) is built for the input shape, which "
                                              "the data did not give")
                model = build_model(name, tuple(input_shape), int(classes), **kwargs)
        except FlatlabError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad keyword or value of the architecture
            raise ConfigError("model_args", f"do not fit {registry} architecture {name} ({_exception_text(exc)})") from None
    else:
        fn = import_callable(str(source.model_fn), "model_fn")
        if source.num_classes is not None:
            kwargs["num_classes"] = source.num_classes
        try:
            model = fn(**kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's function failed: one line
            raise ConfigError("model_fn", f"{source.model_fn} failed when called with {kwargs or 'no arguments'} "
                                          f"({_exception_text(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model_fn", f"{source.model_fn} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in a weights file, read with ``torch.load(weights_only=True)`` only.

    Accepts a raw state dict, or a dict holding one under ``"state_dict"`` or ``"model"`` (as
    training scripts and flatlab checkpoints save them).

    Raises:
        FlatlabError: a missing or unreadable file, pickled objects (refused, never run), or
            anything but a dict of named tensors.
    """
    from flatlab.checkpoint_format import safe_torch_load

    payload = safe_torch_load(path, what="weights file")
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not payload:
        raise FlatlabError(f"{path} holds a {type(payload).__name__}, not a state dict: save "
                           "model.state_dict() (a dict of tensors), or a dict with it under 'state_dict'")
    bad = [k for k, v in payload.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise FlatlabError(f"{path} is not a state dict: entry {bad[0]!r} is a {type(payload[bad[0]]).__name__}, "
                           "not a tensor (save model.state_dict())")
    return payload


def _listed(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_weights_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str, source: ModelSource) -> None:
    """Load ``state_dict`` into ``model`` strictly, or fail with one error naming the first
    missing and unexpected keys (or mismatched shapes) and how to fix it.

    A state dict saved from ``nn.DataParallel`` (every key prefixed ``module.``) is accepted.
    """
    own = model.state_dict()
    state = dict(state_dict)
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shapes):
        model.load_state_dict(state, strict=True)
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_listed(unexpected)}")
    if shapes:
        k = shapes[0]
        parts.append(f"{k} has shape {list(state[k].shape)} in the file but {list(own[k].shape)} in the model")
    fix = ("check --num-classes and --model-args" if shapes and not (missing or unexpected) else
           "check that --arch / --model-fn builds the architecture these weights were saved from")
    if source.arch is not None and ":" not in source.arch and missing and unexpected:
        from flatlab.models import MODELS

        if source.arch in MODELS:
            fix += f" (flatlab's own {source.arch} is --arch flatlab:{source.arch})"
    raise FlatlabError(f"the weights in {path} do not fit model {source.name}: {'; '.join(parts)}: {fix}")


# --- the data ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataSource:
    """Where the data come from: a registered ``dataset`` with its ``test_envs``, or ``data_fn``.

    Attributes:
        dataset: a registered data set name (``rotated-digits``, ``PACS``, ``folder``, ...).
        test_envs: the test domain(s), by index or name.
        data_dir: the root folder of a data set read from disk.
        dataset_options: options of the data set (e.g. ``{"resolution": 16}``).
        trial_seed: seeds the in/out split (DomainBed's ``trial_seed``).
        holdout_fraction: share of each domain held out as ``source-out``.
        data_fn: ``pkg.module:function`` or ``file.py:function`` returning named splits.
        data_args: keyword arguments of ``data_fn``.
    """

    dataset: str | None = None
    test_envs: tuple[str, ...] = ()
    data_dir: str | None = None
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    trial_seed: int = 0
    holdout_fraction: float = 0.2
    data_fn: str | None = None
    data_args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.data_fn is None):
            raise ConfigError("dataset", "or data_fn names the data: give exactly one of them"
                              if self.dataset is None else "and data_fn exclude each other: give one")
        if self.dataset is not None and not self.test_envs:
            raise ConfigError("test_envs", f"must name the test domain(s) of {self.dataset} (an index or a name)")
        if self.data_fn is not None and self.test_envs:
            raise ConfigError("test_envs", "applies to a registered dataset; a data_fn names its own splits "
                                           "(source, target, ...)")


def _materialise(name: str, split: Any, spec: str) -> list[Batch]:
    """A split as a list of ``(x, y)`` batches (a DataLoader is read once, in order)."""
    if isinstance(split, torch.Tensor) or not hasattr(split, "__iter__"):
        raise ConfigError("data_fn", f"{spec} gave split {name!r} as a {type(split).__name__}: give a list of "
                                     "(x, y) batches or a DataLoader")
    batches: list[Batch] = []
    for i, batch in enumerate(split):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[1], torch.Tensor):
            raise ConfigError("data_fn", f"{spec} gave batch {i} of split {name!r} as a {type(batch).__name__}: "
                                         "each batch must be a pair (x, y) with y a tensor of labels")
        batches.append((batch[0], batch[1]))
    if not batches or sum(len(y) for _, y in batches) == 0:
        raise ConfigError("data_fn", f"{spec} gave an empty split {name!r}")
    return batches


def _subset(batches: list[Batch], max_samples: int | None, seed: int, split: str, batch_size: int) -> list[Batch]:
    """A seeded random subset of ``max_samples`` samples of a user's split (the batches as given
    when it holds no more), re-batched at ``batch_size``; the same draw as a built-in split's."""
    import numpy as np

    from flatlab.data import seed_hash

    total = sum(len(y) for _, y in batches)
    if max_samples is None or max_samples >= total:
        return batches
    if not all(isinstance(x, torch.Tensor) for x, _ in batches):
        raise ConfigError("max_samples", "needs tensor inputs x to take a subset: leave it out, or subsample in the data_fn")
    rng = np.random.RandomState(seed_hash("subset", seed, split))
    chosen = torch.as_tensor(np.sort(rng.choice(total, size=max_samples, replace=False)))
    x_all = torch.cat([x for x, _ in batches])[chosen]
    y_all = torch.cat([y for _, y in batches])[chosen]
    return [(x_all[i:i + batch_size], y_all[i:i + batch_size]) for i in range(0, len(y_all), batch_size)]


def _to(batches: list[Batch], device: torch.device) -> list[Batch]:
    return [(x.to(device) if isinstance(x, torch.Tensor) else x, y.to(device)) for x, y in batches]


# --- model + data ------------------------------------------------------------------------------

@dataclass
class LoadedSource:
    """A user's model with its weights and data, ready to measure (:func:`load_source`).

    Exactly one of ``splits`` (a registered data set, split as training splits it) and
    ``named_batches`` (a ``data_fn``'s splits) is set.
    """

    model: nn.Module
    model_source: ModelSource
    data_source: DataSource
    run_id: str
    run_attrs: dict[str, Any]
    splits: Any = None
    named_batches: dict[str, list[Batch]] | None = None
    loss_fn: Callable[..., torch.Tensor] | None = None
    #: Maps the model's output to the tensor ``loss_fn`` takes (:mod:`flatlab.outputs`); None: as is.
    output_fn: Callable[[Any], torch.Tensor] | None = None

    @property
    def split_names(self) -> list[str]:
        from flatlab.data import SPLIT_NAMES

        return list(SPLIT_NAMES) if self.splits is not None else list(self.named_batches or {})

    def split_batches(self, split: str, batch_size: int, max_samples: int | None, seed: int,
                      device: torch.device | str = "cpu") -> list[Batch]:
        """A named split as batches on ``device`` (a seeded subset of ``max_samples``).

        Raises:
            FlatlabError: a split the data do not hold.
        """
        device = torch.device(device)
        if self.splits is not None:
            return self.splits.split_batches(split, batch_size, max_samples, seed, device)
        assert self.named_batches is not None
        if split not in self.named_batches:
            raise FlatlabError(f"the data of {self.data_source.data_fn} hold no split {split!r} (its splits: "
                               f"{', '.join(self.named_batches)}): return it from the data_fn")
        return _to(_subset(self.named_batches[split], max_samples, seed, split, batch_size), device)

    def context(self, settings: Any, device: torch.device) -> Any:
        """The :class:`~flatlab.measures.context.MeasureContext` the measures read, on ``device``."""
        from flatlab.measures.context import ModelContext, SplitsContext

        model = self.model.to(device).eval()
        if self.splits is not None:
            return SplitsContext(model, self.splits, settings, device, loss_fn=self.loss_fn,
                                 output_fn=self.output_fn)
        assert self.named_batches is not None
        s = settings
        data = {name: _to(_subset(b, s.max_samples, s.seed, name, s.batch_size), device)
                for name, b in self.named_batches.items()}
        # m in the bounds is the size of the whole training set, also when a subset is measured.
        train_size = sum(len(y) for _, y in self.named_batches["source"]) if "source" in self.named_batches else None
        return ModelContext(model, data, settings=settings, train_size=train_size, loss_fn=self.loss_fn,
                            output_fn=self.output_fn)


@torch.no_grad()
def evaluate_source(source: LoadedSource, batch_size: int = 512, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Loss and accuracy of a user's model: on a registered data set every domain's in/out split
    and the summary numbers (:func:`flatlab.evaluate.evaluate_models`); on a ``data_fn``'s data
    ``<split>_acc`` and ``<split>_loss`` per named split (batches as given), plus ``ood_acc``
    (= ``target_acc``) when there is a ``target`` split.

    Raises:
        FlatlabError: a bad batch size.
    """
    import torch.nn.functional as F

    from flatlab.evaluate import check_batch_size, evaluate_models
    from flatlab.outputs import as_tensor_output, correct_count, is_classification

    check_batch_size(batch_size)
    model = source.model.to(device).eval()
    if source.splits is not None:
        return evaluate_models(model, source.splits, batch_size, device)
    loss = source.loss_fn or F.cross_entropy
    out: dict[str, Any] = {}
    for name, batches in (source.named_batches or {}).items():
        total, correct, count, labelled = 0.0, 0, 0, True
        for x, y in _to(batches, torch.device(device)):
            logits = as_tensor_output(model(x), source.output_fn)
            total += float(loss(logits, y)) * len(y)  # a mean-reduction loss, weighted by the batch size
            if labelled and is_classification(logits, y):
                correct += int(correct_count(logits, y))
            else:
                labelled = False  # a regressor: accuracy is undefined
            count += len(y)
        out[f"{name}_acc"] = correct / count if labelled else float("nan")
        out[f"{name}_loss"] = total / count
    if "target_acc" in out:  # the name the report and evaluate_models give the test domain's accuracy
        out["ood_acc"] = out["target_acc"]
    return out


def check_model_choice(checkpoint: str | None, model: ModelSource | None, data: DataSource | None,
                       user_only: Sequence[str] = ()) -> None:
    """A measuring command takes a flatlab checkpoint or a user's model with its data: not both,
    not neither, not a model without data.

    Args:
        checkpoint: the checkpoint path given, if any.
        model, data: the user's model and data, if given.
        user_only: parameters given that only a user's model takes (``run_id``, ``loss_fn``).

    Raises:
        FlatlabError: naming the fix.
    """
    if checkpoint is not None and model is not None:
        raise FlatlabError(f"give a checkpoint ({checkpoint}) or your own model (--arch/--model-fn), not both: "
                           "a flatlab checkpoint already holds its model and data")
    if checkpoint is None and model is None:
        raise FlatlabError("give a flatlab checkpoint (CKPT), or your own model with --arch NAME or "
                           "--model-fn MODULE:FUNCTION (with --weights FILE and --dataset or --data-fn)")
    if checkpoint is not None and data is not None:
        what = "data_fn" if data.data_fn is not None else "dataset"
        raise ConfigError(what, "gives the data of a model given by arch or model_fn: a checkpoint is measured "
                                "on its own data (--data-dir if they moved)")
    if checkpoint is not None and user_only:
        raise ConfigError(user_only[0], "applies to a model given by arch or model_fn, not to a checkpoint")
    if model is not None and data is None:
        raise FlatlabError(f"model {model.name} needs data: --dataset NAME --test-env DOMAIN (a built-in or "
                           "DomainBed data set), or --data-fn MODULE:FUNCTION")


def check_run_id(run_id: str) -> str:
    """A run id given by hand: letters, digits, ``.``, ``-`` and ``_``.

    Raises:
        ConfigError: anything else (a ``/`` would nest the run's groups).
    """
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
        raise ConfigError("run_id", f"must be letters, digits, '.', '-' and '_' (starting with a letter or digit), "
                                    f"got {run_id!r}")
    return run_id


def derived_run_id(identity: Mapping[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of ``identity`` (as sorted JSON)."""
    text = json.dumps(dict(identity), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def load_source(model: ModelSource, data: DataSource, *, seed: int = 0, run_id: str | None = None,
                loss_fn: str | None = None, output_fn: str | None = None) -> LoadedSource:
    """Build the model, load its weights and data, and name the run.

    Args:
        model: where the model comes from.
        data: where the data come from.
        seed: seeds the model's construction (its initialisation where no weights are loaded).
        run_id: the run's name in a results file (default: derived, see the module docstring).
        loss_fn: ``pkg.module:function`` of a mean-reduction loss ``loss(outputs, y)`` (default
            cross-entropy).
        output_fn: ``pkg.module:function`` mapping the model's output to the tensor the loss
            takes (e.g. a dict's logits; default: the output as is).

    Raises:
        FlatlabError: a bad source, module, function, weights file or data (one line each).
    """
    if run_id is not None:
        check_run_id(run_id)
    loss = import_callable(loss_fn, "loss_fn") if loss_fn else None
    outputs = import_callable(output_fn, "output_fn") if output_fn else None
    splits = None
    named: dict[str, list[Batch]] | None = None
    attrs: dict[str, Any] = {"algorithm": USER_ALGORITHM}
    if data.dataset is not None:
        from flatlab.data import DomainSplits, build_dataset, resolve_domains

        dataset = build_dataset(data.dataset, data_dir=data.data_dir, **dict(data.dataset_options))
        test_envs = resolve_domains(dataset, list(data.test_envs))
        splits = DomainSplits(dataset, test_envs, data.trial_seed, data.holdout_fraction)
        input_shape: tuple[int, ...] | None = tuple(dataset.input_shape)
        num_classes: int | None = int(dataset.num_classes)
        data_identity: dict[str, Any] = {"dataset": dataset.name, "dataset_options": dataset.options,
                                         "test_envs": test_envs, "trial_seed": data.trial_seed,
                                         "holdout_fraction": data.holdout_fraction, "data_hash": dataset.fingerprint()}
        attrs.update(data_identity, domains=list(dataset.domains),
                     data_dir=str(Path(data.data_dir).resolve()) if data.data_dir else None)
    else:
        fn = import_callable(str(data.data_fn), "data_fn")
        try:
            made = fn(**dict(data.data_args))
        except Exception as exc:  # noqa: BLE001 - the user's function failed: one line
            raise ConfigError("data_fn", f"{data.data_fn} failed when called ({_exception_text(exc)})") from None
        if not isinstance(made, Mapping) or not made:
            raise ConfigError("data_fn", f"{data.data_fn} returned a {type(made).__name__}: return a mapping of "
                                         "named splits, e.g. {'source': batches, 'target': batches}")
        named = {str(k): _materialise(str(k), v, str(data.data_fn)) for k, v in made.items()}
        if "source" not in named:
            raise ConfigError("data_fn", f"{data.data_fn} returned splits {', '.join(named)} but no 'source' "
                                         "(the training set every measure defaults to)")
        first = named["source"][0][0]
        input_shape = tuple(first.shape[1:]) if isinstance(first, torch.Tensor) else None
        num_classes = None  # labels need not show every class: --num-classes says
        data_identity = {"data_fn": data.data_fn, "data_args": dict(data.data_args),
                         "data_fn_sha256": _file_sha256(data.data_fn),
                         "split_sizes": {k: sum(len(y) for _, y in v) for k, v in named.items()}}
        attrs.update(data_identity)
    with torch.random.fork_rng(devices=[]):  # a seeded build that leaves the caller's generator alone
        torch.manual_seed(seed)
        net = build_model_of(model, input_shape, num_classes)
    weights_sha = None
    if model.weights is not None:
        from flatlab.io import sha256_file

        state = read_state_dict(model.weights)
        load_weights_into(net, state, model.weights, model)
        weights_sha = sha256_file(model.weights)
    net = net.eval()
    model_identity = {"model": model.name, "arch": model.arch, "model_fn": model.model_fn,
                      "model_fn_sha256": _file_sha256(model.model_fn), "model_args": dict(model.model_args),
                      "num_classes": model.num_classes or (num_classes if model.arch is not None else None),
                      "weights_sha256": weights_sha,
                      "init_seed": None if weights_sha else seed}  # no weights: the seed made the model
    attrs.update(model_identity,
                 weights=str(Path(model.weights).resolve()) if model.weights is not None else None,
                 loss_fn=loss_fn or "cross_entropy", num_params=sum(p.numel() for p in net.parameters()))
    given = run_id is not None
    identity = {**model_identity, **data_identity, "loss_fn": loss_fn}
    if output_fn:  # only when given: the run ids derived before output_fn existed stay the same
        identity["output_fn"] = output_fn
        attrs["output_fn"] = output_fn
    run_id = run_id or derived_run_id(identity)
    attrs.update(run_id_source="given" if given else "derived (model, weights, data, loss)")
    from flatlab.results import versions

    attrs["versions"] = versions()
    return LoadedSource(model=net, model_source=model, data_source=data, run_id=run_id,
                        run_attrs={k: v for k, v in attrs.items() if v is not None},
                        splits=splits, named_batches=named, loss_fn=loss, output_fn=outputs)


__all__ = [
    "USER_ALGORITHM",
    "DataSource",
    "LoadedSource",
    "ModelSource",
    "build_model_of",
    "check_model_choice",
    "check_run_id",
    "derived_run_id",
    "evaluate_source",
    "import_callable",
    "load_source",
    "load_weights_into",
    "read_state_dict",
    "resolve_arch",
]
