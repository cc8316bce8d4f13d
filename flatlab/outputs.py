"""Any model, any batches: what every measure does before it computes a loss or an accuracy.

A measure sees a model through three conventions, shared by the curvature operators
(:mod:`flatlab.curvature`), the sharpness measures (:mod:`flatlab.sharpness`), the loss surfaces
(:mod:`flatlab.surface`) and :func:`flatlab.pipeline.measure_model`:

* **Outputs.** ``output_fn`` maps the model's raw output (a dict, a tuple, a model-specific
  object) to the tensor ``loss_fn`` takes, e.g. ``output_fn=lambda out: out["logits"]``;
  ``None`` takes the output as it is. :func:`with_output_fn` gives the model with it applied.
* **Batches.** Data are ``(x, y)`` batches: a list, or any re-iterable of them (a
  ``DataLoader``), read once into a list by :func:`prepare_batches`, each batch moved to the
  model's device as it is read. A list already on that device is returned as it is, so results
  on lists do not change. The model itself is never moved.
* **Classifiers.** Accuracy is defined for outputs of shape ``(B, C)`` with ``C >= 2`` and
  integer targets of shape ``(B,)`` (:func:`is_classification`); for anything else (regression,
  sequence outputs) it is undefined. Measures that need it (:data:`ACCURACY_MEASURES`) refuse
  such a model with :func:`require_classifier`; the loss-based ones work on any model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from flatlab.errors import ConfigError, FlatlabError

#: Model output -> the tensor a loss takes (logits, predictions).
OutputFn = Callable[[Any], Tensor]

#: The measures whose definition is an accuracy drop: they need a classifier.
ACCURACY_MEASURES = ("pacbayes", "magnitude", "worst_case")
#: What works on the loss alone, for the refusal's message.
LOSS_MEASURES_TEXT = ("the curvature measures (top_eigenvalues, trace, density, per_layer, per_domain), "
                      "local_flatness, sharpness (fixed radius), relative_flatness and loss surfaces "
                      "(surface_of_model, which records the loss only)")


def check_output_fn(output_fn: Any) -> OutputFn | None:
    """``output_fn`` itself, or ConfigError if it is neither None nor callable."""
    if output_fn is not None and not callable(output_fn):
        raise ConfigError("output_fn", f"must be callable (model output -> tensor) or None, "
                                       f"got {type(output_fn).__name__}")
    return output_fn


def as_tensor_output(out: Any, output_fn: OutputFn | None) -> Tensor:
    """``output_fn(out)`` (or ``out``), checked to be a tensor with a message saying what to pass."""
    value = out if output_fn is None else output_fn(out)
    if not isinstance(value, Tensor):
        raise FlatlabError(f"the model's output{' after output_fn' if output_fn is not None else ''} is a "
                           f"{type(value).__name__}, not a tensor: pass output_fn, which maps the model's output "
                           "to the tensor loss_fn takes (e.g. output_fn=lambda out: out['logits'])")
    return value


class OutputAdapter(nn.Module):
    """``model`` whose forward returns ``output_fn(model(x))``.

    The wrapped model is a submodule (its parameters are the adapter's, in the same order), so
    code that perturbs ``model``'s parameters and calls the adapter sees the perturbation.
    """

    def __init__(self, model: nn.Module, output_fn: OutputFn) -> None:
        super().__init__()
        self.model = model
        self.output_fn = output_fn

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return as_tensor_output(self.model(*args, **kwargs), self.output_fn)


def with_output_fn(model: nn.Module, output_fn: OutputFn | None) -> nn.Module:
    """``model`` itself for ``output_fn=None`` (so default results are bit for bit unchanged),
    otherwise an :class:`OutputAdapter` around it."""
    if output_fn is None:
        return model
    return OutputAdapter(model, check_output_fn(output_fn))  # type: ignore[arg-type]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _move(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, Tensor):
        return tree.to(device)  # no copy when already there
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, tree)


def prepare_batches(data: Iterable[Any], device: torch.device | str | None = None, *,
                    name: str = "data") -> list[Any]:
    """``data`` as a list of ``(x, y)`` batches on ``device`` (None: where they are).

    A list or tuple whose batches are already pairs on ``device`` comes back as the same batch
    objects (its results do not change); any other iterable (a ``DataLoader``, whose batches are
    lists ``[x, y]``) is read once, in order, and each batch is moved as it is read.

    Raises:
        ConfigError (``name``): not an iterable of ``(x, y)`` pairs, or a single tensor.
    """
    if isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise ConfigError(name, f"must be (x, y) batches: a list or a DataLoader, got {type(data).__name__}")
    target = None if device is None else torch.device(device)
    out: list[Any] = []
    for batch in data:
        try:
            x, y = batch
        except (TypeError, ValueError):
            raise ConfigError(name, f"must hold (x, y) pairs; a batch is a {type(batch).__name__}") from None
        if target is not None:
            x, y = _move(x, target), _move(y, target)
        # Keep the caller's own tuple where nothing changed: identical batches, identical results.
        out.append(batch if isinstance(batch, tuple) and x is batch[0] and y is batch[1] else (x, y))
    return out


def is_classification(outputs: Tensor, y: Any) -> bool:
    """Whether accuracy is defined: outputs ``(B, C)`` with ``C >= 2`` and integer targets ``(B,)``."""
    return (isinstance(y, Tensor) and outputs.dim() == 2 and outputs.shape[1] >= 2 and y.dim() == 1
            and not y.dtype.is_floating_point and not y.dtype.is_complex and y.dtype != torch.bool
            and y.shape[0] == outputs.shape[0])


def correct_count(outputs: Tensor, y: Tensor) -> Tensor:
    """The number of correct argmax predictions (a tensor, so callers can sum on the device)."""
    return (outputs.argmax(1) == y).sum()


def describe_outputs(outputs: Tensor, y: Any) -> str:
    """"outputs of shape (B, 1) with float32 targets", for messages."""
    shape = "(B" + "".join(f", {s}" for s in outputs.shape[1:]) + ")"
    kind = f"{str(y.dtype).replace('torch.', '')} targets" if isinstance(y, Tensor) else f"{type(y).__name__} targets"
    return f"outputs of shape {shape} with {kind}"


@torch.no_grad()
def require_classifier(model: nn.Module, batches: Sequence[Any], measure: str) -> int:
    """The number of classes C of ``model`` (already adapted by :func:`with_output_fn`) on the
    first batch, evaluated in eval mode (the model's modes and buffers are left as they were);
    FlatlabError if its accuracy is undefined (see :func:`is_classification`)."""
    if not batches:
        raise FlatlabError("no samples to measure on: the batch list is empty")
    x, y = batches[0]
    with preserved_modes(model):  # eval: a train-mode forward would move BatchNorm statistics
        outputs = model.eval()(x)
    if not isinstance(outputs, Tensor):
        outputs = as_tensor_output(outputs, None)
    if not is_classification(outputs, y):
        raise FlatlabError(f"{measure} needs a classifier's accuracy (outputs of shape (B, C) with C >= 2 and "
                           f"integer class targets); this model gives {describe_outputs(outputs, y)}. On a model "
                           f"without accuracy use the measures of the loss alone: {LOSS_MEASURES_TEXT}")
    return int(outputs.shape[1])


@contextmanager
def preserved_modes(*models: nn.Module | None) -> Iterator[None]:
    """Within the block measures may put the models in eval mode; on exit every module's own
    train/eval flag is what it was (``model.train(flag)`` would set all submodules alike)."""
    modes = [(mod, mod.training) for model in models if model is not None for mod in model.modules()]
    try:
        yield
    finally:
        for mod, training in modes:
            mod.training = training


__all__ = ["ACCURACY_MEASURES", "LOSS_MEASURES_TEXT", "OutputAdapter", "OutputFn", "as_tensor_output",
           "check_output_fn", "correct_count", "describe_outputs", "is_classification", "model_device",
           "prepare_batches", "preserved_modes", "require_classifier", "with_output_fn"]
