"""What every sharpness measure shares: which parameters are "weights", seeded noise that can be
drawn again bit for bit (common random numbers), and counting correct predictions over batches.

Conventions (docs/measures.md section 4): noise goes on *every* parameter of the model; norms
(||w||^2, ||w - w0||^2) and omega (the number of weights) use *weights only*: parameters that are
neither biases nor the affine parameters of a normalization layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from flatlab.errors import FlatlabError
from flatlab.outputs import as_tensor_output

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

_NORM_LAYERS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def weight_names(model: nn.Module) -> list[str]:
    """Names of the parameters that count as weights: no biases, no normalization affines."""
    norm_prefixes = [name + "." for name, mod in model.named_modules() if isinstance(mod, _NORM_LAYERS)]
    names = []
    for name, _ in model.named_parameters():
        if name == "bias" or name.endswith(".bias"):
            continue
        if any(name.startswith(prefix) for prefix in norm_prefixes):
            continue
        names.append(name)
    return names


def weight_vector(model: nn.Module, names: Sequence[str] | None = None) -> Tensor:
    """The named parameters (default: :func:`weight_names`) as one flat float64 vector."""
    params = dict(model.named_parameters())
    chosen = weight_names(model) if names is None else list(names)
    if not chosen:
        raise FlatlabError("the model has no weights (only biases or normalization parameters)")
    return torch.cat([params[n].detach().reshape(-1).double() for n in chosen])


def aligned_weight_vectors(model: nn.Module, initial: nn.Module) -> tuple[Tensor, Tensor]:
    """(w, w0) over the weights of ``model``, matched by name in ``initial``.

    Raises:
        FlatlabError: if the initial model lacks a weight or holds it in another shape.
    """
    names = weight_names(model)
    init_params = dict(initial.named_parameters())
    own = dict(model.named_parameters())
    for name in names:
        if name not in init_params or init_params[name].shape != own[name].shape:
            raise FlatlabError(f"the initial weights do not match the model at {name!r}: "
                               "pass the initial model of the same architecture")
    w = torch.cat([own[n].detach().reshape(-1).double() for n in names])
    w0 = torch.cat([init_params[n].detach().reshape(-1).double().to(w.device) for n in names])
    return w, w0


def noise_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for noise draw ``index`` of ``stream``: equal inputs, equal draws."""
    import hashlib

    digest = hashlib.sha256(f"flatlab/{stream}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_normal(params: Sequence[Tensor], seed: int) -> list[Tensor]:
    """Standard normal tensors shaped like ``params``, from one seeded generator per device."""
    generators: dict[torch.device, torch.Generator] = {}
    out = []
    for p in params:
        gen = generators.get(p.device)
        if gen is None:
            gen = torch.Generator(device=p.device)
            gen.manual_seed(seed)
            generators[p.device] = gen
        out.append(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype))
    return out


class NoiseBank:
    """K seeded noise draws over a list of tensors, cached while they fit ``cache_bytes``.

    Draw ``k`` is the same tensor every time it is asked for (common random numbers), cached or
    regenerated from its seed.
    """

    def __init__(self, like: Sequence[Tensor], count: int, seed: int, stream: str,
                 cache_bytes: int = 1 << 28) -> None:
        self.like = list(like)
        self.count = int(count)
        self.seed = int(seed)
        self.stream = stream
        size = sum(t.numel() * t.element_size() for t in self.like)
        self._cache: dict[int, list[Tensor]] | None = {} if size * self.count <= cache_bytes else None

    def draw(self, index: int) -> list[Tensor]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        noise = seeded_normal(self.like, noise_seed(self.seed, self.stream, index))
        if self._cache is not None:
            self._cache[index] = noise
        return noise


@torch.no_grad()
def count_correct(model: nn.Module, batches: Iterable[Batch]) -> tuple[int, int]:
    """(number of correct argmax predictions, number of samples)."""
    correct, count = 0, 0
    for x, y in batches:
        correct += int((as_tensor_output(model(x), None).argmax(1) == y).sum())
        count += len(y)
    return correct, count


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn) -> float:
    """The sample-weighted mean of ``loss_fn`` (mean reduction) over all batches."""
    total, count = 0.0, 0
    for x, y in batches:
        total += float(loss_fn(as_tensor_output(model(x), None), y)) * len(y)
        count += len(y)
    if count == 0:
        raise FlatlabError("no samples to measure on: the batch list is empty")
    return total / count


def num_classes_of(model: nn.Module, batches: Sequence[Batch], measure: str = "accuracy-based sharpness") -> int:
    """The number of logits the model produces (the chance level is 1 / this); FlatlabError,
    naming ``measure``, for a model without accuracy (:func:`flatlab.outputs.require_classifier`)."""
    from flatlab.outputs import require_classifier

    return require_classifier(model, batches, measure)


def check_batches(batches: Sequence[Batch]) -> int:
    """The number of samples in ``batches``; FlatlabError if there are none."""
    if not batches or sum(len(y) for _, y in batches) == 0:
        raise FlatlabError("no samples to measure on: the batch list is empty")
    return int(sum(len(y) for _, y in batches))


__all__ = [
    "Batch",
    "LossFn",
    "NoiseBank",
    "aligned_weight_vectors",
    "check_batches",
    "count_correct",
    "mean_loss",
    "noise_seed",
    "num_classes_of",
    "seeded_normal",
    "weight_names",
    "weight_vector",
]
