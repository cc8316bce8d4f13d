"""Where a measure gets its model and data: a flatlab checkpoint, or any model and batches.

Every measure's compute function takes a :class:`MeasureContext`. It hands out

* ``model(view)``: the model to measure (``"effective"``: a quantized checkpoint's de-quantized,
  deployed weights; ``"latent"``: the quantized model itself, differentiated through the
  straight-through estimator; identical for a full-precision model), in eval mode, built once
  and shared by the measures of one run (measures never modify it);
* ``initial_model()``: the weights at step 0 (``w0``, for the PAC-Bayes "init" bounds), or None;
* ``batches(split)``: a data split as a list of ``(x, y)`` batches, prepared once per split with
  the run's :class:`MeasurementSettings` (seeded subset of ``max_samples``, ``batch_size``);
* ``split_size(split)``: the split's full size (``m`` in the bounds: the training-set size);
* ``domain_batches(source_part)``: every domain on its own, name -> batches (a checkpoint's
  source domains' in-splits, or held-out splits with ``source_part="out"``, then the target
  domain(s); a user's model: the named splits, or the ``domains`` it was given), each a seeded
  subset of ``max_samples``, and ``target_domains()``: which of those names are targets;
* ``loss_fn`` and ``output_fn``: the loss on ``output_fn(model(x))`` every measure uses
  (default cross-entropy on the output as is; :mod:`flatlab.outputs`);
* ``cache``: objects several measures share (one Hessian operator with its cached graph for
  every curvature measure on the same split, the dense spectrum of ``solver = "dense"``).

:class:`CheckpointContext` reads a flatlab checkpoint (its exact in/out splits);
:class:`SplitsContext` puts a user's model on a registered data set's splits;
:class:`ModelContext` wraps a user's model and named batch lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatlab.errors import FlatlabError
from flatlab.measures.config import MeasureConfig, setting
from flatlab.outputs import OutputFn, check_output_fn, prepare_batches

#: The data splits of a flatlab checkpoint (README, Data splits): the training set, the source domains'
#: held-out parts, every sample of the test domain(s).
SPLITS = ("source", "source-out", "target")


@dataclass(frozen=True, kw_only=True)
class MeasurementSettings(MeasureConfig):
    """Settings every measure of one run shares (the study file's ``[measure]`` keys)."""

    max_samples: int | None = setting(None, "measure on a seeded random subset of N samples of each split "
                                            "(default: the whole split)", minimum=1)
    batch_size: int = setting(256, "samples per forward pass", minimum=1)
    seed: int = setting(0, "seeds the subset, start vectors, probes and noise draws")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto (CUDA when available)")

    def fingerprint_part(self, device: torch.device) -> dict[str, Any]:
        """What these settings contribute to a measure's resume fingerprint."""
        return {"max_samples": self.max_samples, "batch_size": self.batch_size, "seed": self.seed,
                "device": device.type}


ProgressFn = Callable[[], None]


class MeasureContext:
    """Models, data splits and shared caches for the measures of one run (see module docstring)."""

    loss_fn: Callable[..., torch.Tensor] = staticmethod(F.cross_entropy)  # type: ignore[assignment]
    #: Maps the model's output to the tensor ``loss_fn`` takes (:mod:`flatlab.outputs`); None: as is.
    output_fn: OutputFn | None = None

    def __init__(self, settings: MeasurementSettings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.cache: dict[Any, Any] = {}
        #: Called once per operator product (a progress bar); None = silent.
        self.progress: ProgressFn | None = None

    # Subclasses implement these four.
    @property
    def quantized(self) -> bool:
        raise NotImplementedError

    def _build_model(self, view: str) -> nn.Module:
        raise NotImplementedError

    def _build_initial_model(self) -> nn.Module | None:
        raise NotImplementedError

    def _build_batches(self, split: str) -> list[Any]:
        raise NotImplementedError

    def split_size(self, split: str) -> int:
        raise NotImplementedError

    def model(self, view: str = "effective") -> nn.Module:
        if view not in ("effective", "latent"):
            raise FlatlabError(f"model view must be effective or latent, got {view!r}")
        if not self.quantized:
            view = "effective"  # one model: the views coincide
        key = ("model", view)
        if key not in self.cache:
            self.cache[key] = self._build_model(view)
        return self.cache[key]

    def initial_model(self) -> nn.Module | None:
        key = ("initial_model",)
        if key not in self.cache:
            self.cache[key] = self._build_initial_model()
        return self.cache[key]

    def batches(self, split: str) -> list[Any]:
        key = ("batches", split)
        if key not in self.cache:
            self.cache[key] = self._build_batches(split)
        return self.cache[key]

    def domain_batches(self, source_part: str = "in", max_samples: int | None = None) -> dict[str, list[Any]]:
        """Every domain's own batches, by domain name (see the module docstring), built once.

        ``max_samples`` overrides the shared ``settings.max_samples`` for these batches (a
        per-domain measure may want fewer samples per domain than a whole split gets)."""
        if source_part not in ("in", "out"):
            raise FlatlabError(f"source_part must be in or out, got {source_part!r}")
        key = ("domain_batches", source_part, max_samples)
        if key not in self.cache:
            domains = self._build_domain_batches(source_part, max_samples)
            if not domains:
                raise FlatlabError("there are no domains to measure on")
            self.cache[key] = domains
        return self.cache[key]

    def target_domains(self) -> tuple[str, ...]:
        """The names among :meth:`domain_batches` that are target (test) domains."""
        raise NotImplementedError

    def _build_domain_batches(self, source_part: str, max_samples: int | None) -> dict[str, list[Any]]:
        raise NotImplementedError


class _OnDomainSplits(MeasureContext):
    """The batches of a registered data set's splits (``self._splits``, a
    :class:`~flatlab.data.DomainSplits`): ``source``/``source-out``/``target`` with their seeded
    subsets, and every domain alone, shared by checkpoints and user models on those splits."""

    _splits: Any

    def _build_batches(self, split: str) -> list[Any]:
        if split not in SPLITS:
            raise FlatlabError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        s = self.settings
        return self._splits.split_batches(split, s.batch_size, s.max_samples, s.seed, self.device)

    def split_size(self, split: str) -> int:
        return int(self._splits.split_size(split))

    def _build_domain_batches(self, source_part: str, max_samples: int | None) -> dict[str, list[Any]]:
        from flatlab.curvature.per_domain import domain_batches

        s = self.settings
        return domain_batches(self._splits, batch_size=s.batch_size, source_part=source_part, include_target=True,
                              max_samples=s.max_samples if max_samples is None else max_samples, seed=s.seed,
                              device=self.device)

    def target_domains(self) -> tuple[str, ...]:
        names = self._splits.dataset.domains
        return tuple(str(names[e]) for e in self._splits.test_envs)


class CheckpointContext(_OnDomainSplits):
    """A flatlab checkpoint: models rebuilt from it, its exact data splits."""

    def __init__(self, checkpoint: Any, settings: MeasurementSettings, device: torch.device,
                 data_dir: str | None = None) -> None:
        super().__init__(settings, device)
        self.checkpoint = checkpoint
        self._splits = checkpoint.splits(data_dir)

    @property
    def quantized(self) -> bool:
        return bool(self.checkpoint.is_quantized)

    def _build_model(self, view: str) -> nn.Module:
        # Seeded as `flatlab sharpness` always was: building a model draws an initialisation
        # from the global generator before the weights are loaded.
        torch.manual_seed(self.settings.seed)
        return self.checkpoint.build_model(self.device, effective=view == "effective")

    def _build_initial_model(self) -> nn.Module | None:
        return self.checkpoint.build_initial_model(self.device)


class SplitsContext(_OnDomainSplits):
    """A user's model on a registered data set's splits (:class:`~flatlab.data.DomainSplits`):
    the same ``source``/``source-out``/``target`` batches, subsets and per-domain batches as a
    checkpoint trained on those splits gets (:class:`CheckpointContext`), without w0."""

    def __init__(self, model: nn.Module, splits: Any, settings: MeasurementSettings, device: torch.device,
                 loss_fn: Callable[..., torch.Tensor] | None = None, output_fn: OutputFn | None = None) -> None:
        super().__init__(settings, device)
        self._model = model
        self._splits = splits
        if loss_fn is not None:
            self.loss_fn = loss_fn  # type: ignore[assignment]
        self.output_fn = check_output_fn(output_fn)

    @property
    def quantized(self) -> bool:
        return False

    def _build_model(self, view: str) -> nn.Module:
        return self._model.to(self.device).eval()

    def _build_initial_model(self) -> nn.Module | None:
        return None  # a user's model has no recorded step-0 weights


class ModelContext(MeasureContext):
    """Any ``nn.Module`` with named lists of ``(x, y)`` batches (e.g. ``{"source": ...,
    "target": ...}``); ``initial_model`` (w0) and ``train_size`` (m) are optional.

    Batches may be lists or any re-iterable of ``(x, y)`` pairs (a ``DataLoader``): each is read
    once, in order, and its batches moved to the model's device (the model is never moved).
    ``output_fn`` maps the model's output (a dict, a tuple) to the tensor ``loss_fn`` takes.

    Per-domain measures see ``domains`` (name -> batches, e.g. one entry per source domain and
    one for the target) or, when it is not given, the named splits themselves as the domains;
    ``target_domains`` names the targets among them (default: ``"target"`` if present). A user's
    batches are used as given (``max_samples`` does not subsample them).
    """

    def __init__(self, model: nn.Module, data: Mapping[str, Sequence[Any]], *,
                 settings: MeasurementSettings | None = None, initial_model: nn.Module | None = None,
                 train_size: int | None = None, loss_fn: Callable[..., torch.Tensor] | None = None,
                 latent_model: nn.Module | None = None, domains: Mapping[str, Sequence[Any]] | None = None,
                 target_domains: Sequence[str] | None = None, output_fn: OutputFn | None = None) -> None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            raise FlatlabError("the model has no parameters to measure") from None
        super().__init__(settings or MeasurementSettings(device=device.type), device)
        if not data:
            raise FlatlabError("data must name at least one split, e.g. {'source': batches}")
        self._model = model
        self._latent = latent_model
        # Read once and put on the model's device: a DataLoader becomes a fixed list, a list on
        # the right device stays the same batches.
        self._data = {str(k): prepare_batches(v, device, name="data") for k, v in data.items()}
        self._initial = initial_model
        self._train_size = train_size
        self._domains = None if domains is None else {str(k): prepare_batches(v, device, name="domains")
                                                      for k, v in domains.items()}
        names = self._domains if self._domains is not None else self._data
        if target_domains is None:
            self._targets = ("target",) if "target" in names else ()
        else:
            self._targets = tuple(str(t) for t in target_domains)
            unknown = [t for t in self._targets if t not in names]
            if unknown:
                raise FlatlabError(f"target_domains names {unknown[0]!r}, which is not among the domains "
                                   f"({', '.join(names)})")
        if loss_fn is not None:
            self.loss_fn = loss_fn  # type: ignore[assignment]
        self.output_fn = check_output_fn(output_fn)

    @property
    def quantized(self) -> bool:
        return self._latent is not None

    def _build_model(self, view: str) -> nn.Module:
        return (self._latent if view == "latent" and self._latent is not None else self._model).eval()

    def _build_initial_model(self) -> nn.Module | None:
        return self._initial

    def _build_batches(self, split: str) -> list[Any]:
        if split not in self._data:
            raise FlatlabError(f"the data hold no split {split!r}: give it in data (splits given: "
                               f"{', '.join(self._data)})")
        return self._data[split]

    def split_size(self, split: str) -> int:
        if split == "source" and self._train_size is not None:
            return int(self._train_size)
        return int(sum(len(y) for _, y in self.batches(split)))

    def _build_domain_batches(self, source_part: str, max_samples: int | None) -> dict[str, list[Any]]:
        # A user's domains have no in/out parts and are used as given: source_part and
        # max_samples apply to checkpoints only.
        return dict(self._domains if self._domains is not None else self._data)

    def target_domains(self) -> tuple[str, ...]:
        return self._targets


def checkpoint_path(path: str | Path) -> Path:
    """A run folder resolves to its ``model.pt``."""
    p = Path(path)
    return p / "model.pt" if p.is_dir() and (p / "model.pt").exists() else p


__all__ = ["SPLITS", "CheckpointContext", "MeasureContext", "MeasurementSettings", "ModelContext", "SplitsContext",
           "checkpoint_path"]
