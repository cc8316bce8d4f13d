r"""Relative flatness of one layer (Petzka et al., NeurIPS 2021; docs/measures.md section 8).

Definition
----------
For a linear layer with weight matrix :math:`W \in \mathbb R^{d \times n}` (``nn.Linear``
with ``out_features = d``, ``in_features = n``; row :math:`w_s` holds the :math:`n` weights into
output unit :math:`s`) and the loss :math:`L` on the measurement set (the given batches,
weighted :math:`|B|/N`):

.. math::

    \kappa_{\mathrm{Tr}}(W) = \sum_{s, s' = 1}^{d} \langle w_s, w_{s'} \rangle
        \operatorname{Tr}(H_{s, s'}), \qquad
    H_{s, s'} = \frac{\partial^2 L}{\partial w_s\, \partial w_{s'}} \in \mathbb R^{n \times n}.

Petzka et al. apply it to the feature layer: the classifier acting on the penultimate
representation, the default here (the model's last ``nn.Linear``). Larger = sharper.

Matrix form. With :math:`G = W W^\top` (so :math:`G_{ss'} = \langle w_s, w_{s'}\rangle`) and
:math:`H_W` the layer's :math:`dn \times dn` Hessian in row-major order (index :math:`(s, i)
\mapsto s n + i`, PyTorch's flattening of the weight),
:math:`(G \otimes I_n)_{(s,i),(s',i')} = G_{ss'} \delta_{ii'}`, hence

.. math::

    \operatorname{Tr}\big((G \otimes I_n) H_W\big)
      = \sum_{s,s'} G_{ss'} \sum_i (H_W)_{(s',i),(s,i)}
      = \sum_{s,s'} G_{ss'} \operatorname{Tr}(H_{s', s}) = \kappa_{\mathrm{Tr}}(W)

(:math:`\operatorname{Tr} H_{s',s} = \operatorname{Tr} H_{s,s'}^\top`). With
:math:`R = G^{1/2}` (symmetric, from an eigendecomposition) :math:`G \otimes I = (R \otimes I)^2`
and, by the cyclic property,

.. math::

    \kappa_{\mathrm{Tr}}(W) = \operatorname{Tr}(M), \qquad M = (R \otimes I)\, H_W\, (R \otimes I).

Estimators
----------
* ``exact`` (layers with :math:`dn` up to ``exact_max_size``): the layer's dense float64
  Hessian from :math:`dn` Hessian-vector products
  (:func:`flatlab.curvature.dense_hessian` restricted to the weight), then the double sum.
  Standard error 0.
* ``hutchinson`` / ``hutch++``: the stochastic trace of :math:`M`, one restricted
  Hessian-vector product per application (:math:`M v = \operatorname{vec}(R\, V')`,
  :math:`V' = \operatorname{mat}(H_W \operatorname{vec}(R\, \operatorname{mat}(v)))`).
  For Rademacher :math:`z`, :math:`\mathbb E[z^\top M z] = \operatorname{Tr} M = \kappa`:
  unbiased. (The naive :math:`\sum_{ss'} G_{ss'} z_s^\top H_{ss'} z_{s'}` with one probe
  :math:`z` is not: :math:`\mathbb E[z_s z_{s'}^\top] = \delta_{ss'} I` keeps only the diagonal
  blocks.) :math:`M` is symmetric, and positive semi-definite whenever :math:`H_W` is (e.g.
  cross-entropy on the classifier layer, which is convex in :math:`W`), so the project's
  Hutchinson and Hutch++ estimators (:mod:`flatlab.curvature.trace`) apply as they are, with
  their standard errors (Hutch++'s is that of its Hutchinson part).
* ``auto``: ``exact`` when :math:`dn \le` ``exact_max_size``, otherwise ``hutch++``.

Closed form for the classifier with cross-entropy: logits :math:`W \varphi_i + b`,
softmax :math:`p_i`, so :math:`\partial^2 \ell_i / \partial W_{sa} \partial W_{s'b} =
(\operatorname{diag} p_i - p_i p_i^\top)_{ss'} \varphi_{ia} \varphi_{ib}` and

.. math::

    \kappa_{\mathrm{Tr}}(W) = \frac1N \sum_i \|\varphi_i\|^2
        \sum_{s,s'} G_{ss'} (\operatorname{diag} p_i - p_i p_i^\top)_{ss'}

(a test checks the estimators against it).

Invariance (why relative flatness exists). For a ReLU network, scale the feature layer by
:math:`a > 0` and the layer before it (weights and bias) by :math:`1/a`: the features become
:math:`\varphi / a` and the function is unchanged. The loss as a function of the new weight
:math:`W' = a W` is :math:`L'(W') = L(W'/a)`, so :math:`H_{W'} = H_W / a^2` while
:math:`G' = a^2 G`: :math:`\kappa_{\mathrm{Tr}}` is unchanged, whereas :math:`\operatorname{Tr}
H_W` alone changes by :math:`1/a^2`. The stochastic estimate is invariant too for a fixed seed
(:math:`R' = a R`, so :math:`M' = M`). Rescaling single feature neurons by different factors
(columns of :math:`W`) does change :math:`\kappa_{\mathrm{Tr}}` in general; only the layer-wise
rescaling is claimed and tested.

Layers: ``nn.Linear`` only (and subclasses, such as flatlab's quantized linear layers, whose
Hessian is then taken with respect to their latent weight through the straight-through
estimator; measure the effective model for the deployed weights). Petzka et al. define the
measure on the feature layer; convolutions are refused with an error naming the linear layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator
from torch import nn

from flatlab.checks import coerce_int_fields
from flatlab.curvature.dense import dense_hessian
from flatlab.curvature.hvp import HessianOperator
from flatlab.curvature.trace import hutchinson_trace, hutchpp_trace
from flatlab.errors import FlatlabError
from flatlab.outputs import OutputFn, model_device, prepare_batches
from flatlab.sharpness.perturb import Batch, LossFn

RELATIVE_FLATNESS_METHODS = ("auto", "exact", "hutchinson", "hutch++")
#: Largest d * n for which ``auto`` builds the layer's dense Hessian (d * n HVPs, (dn)^2 floats).
DEFAULT_EXACT_MAX_SIZE = 2048


@dataclass(frozen=True)
class RelativeFlatnessConfig:
    r"""Settings of :func:`relative_flatness` (validated on construction).

    Attributes:
        layer: qualified module name of the ``nn.Linear`` layer (``None``: the model's last
            ``nn.Linear``, the classifier acting on the features).
        method: ``auto``, ``exact``, ``hutchinson`` or ``hutch++`` (module docstring).
        exact_max_size: largest :math:`d n` that ``auto`` computes exactly (and that
            ``exact`` accepts).
        num_products: Hessian-vector products of a stochastic estimate (at least 2; Hutch++
            at least 3).
        seed: seeds the probes.
    """

    layer: str | None = None
    method: str = "auto"
    exact_max_size: int = DEFAULT_EXACT_MAX_SIZE
    num_products: int = 99
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise FlatlabError(f"layer must be a module name or None (the last Linear layer), got {self.layer!r}")
        if self.method not in RELATIVE_FLATNESS_METHODS:
            raise FlatlabError(f"method must be one of {', '.join(RELATIVE_FLATNESS_METHODS)}, got {self.method!r}")
        coerce_int_fields(self, (("exact_max_size", 1), ("num_products", 2), ("seed", 0)))
        if self.method == "hutch++" and self.num_products < 3:
            raise FlatlabError(f"num_products must be at least 3 for hutch++, got {self.num_products}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RelativeFlatnessResult:
    r"""Relative flatness of one layer with its standard error.

    Attributes:
        kappa: :math:`\kappa_{\mathrm{Tr}}(W)`.
        stderr: standard error (0 for ``exact``).
        method: ``exact``, ``hutchinson`` or ``hutch++`` (what ran).
        layer: the layer's module name; ``weight_name`` its weight's parameter name.
        layer_shape: :math:`(d, n)`.
        products: Hessian-vector products over the whole set (``exact``: :math:`dn` columns).
        gram_trace: :math:`\operatorname{Tr} G = \sum_s \|w_s\|^2`, for reference.
        layer_hessian_trace: :math:`\operatorname{Tr} H_W` (``exact`` only, else ``None``):
            the non-invariant curvature that :math:`\kappa` reweights.
        num_samples: samples in the measurement set.
        config: the settings.
    """

    kappa: float
    stderr: float
    method: str
    layer: str
    weight_name: str
    layer_shape: tuple[int, int]
    products: int
    gram_trace: float
    layer_hessian_trace: float | None
    num_samples: int
    config: RelativeFlatnessConfig = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "config"}
        out["layer_shape"] = list(self.layer_shape)
        out["config"] = self.config.to_dict()
        return out


def _names(model: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, kind)]


def find_linear_layer(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Linear]:
    """The named ``nn.Linear`` layer (default: the last one in module order).

    Raises:
        FlatlabError: no such module (the message lists the Linear and Conv layers), or the
            module is not a Linear layer.
    """
    linears = _names(model, nn.Linear)
    convs = _names(model, nn.modules.conv._ConvNd)

    def available() -> str:
        lin = ", ".join(repr(n) for n in linears) or "none"
        conv = ", ".join(repr(n) for n in convs) or "none"
        return f"Linear layers: {lin}; Conv layers (not supported): {conv}"

    modules = dict(model.named_modules())
    if layer is None:
        if not linears:
            raise FlatlabError(f"relative flatness needs an nn.Linear layer and the model has none ({available()})")
        return linears[-1], modules[linears[-1]]
    if layer not in modules or layer == "":
        raise FlatlabError(f"the model has no layer named {layer!r} ({available()})")
    module = modules[layer]
    if not isinstance(module, nn.Linear):
        raise FlatlabError(f"layer {layer!r} is a {type(module).__name__}: relative flatness is computed for "
                           f"nn.Linear layers only, the feature layer of Petzka et al. ({available()})")
    return layer, module


def _batch_len(y: Any) -> int:
    return int(y.shape[0]) if isinstance(y, torch.Tensor) and y.dim() > 0 else len(y)


def kappa_from_layer_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    r""":math:`\sum_{s,s'} \langle w_s, w_{s'}\rangle \operatorname{Tr}(H_{s,s'})` from a
    :math:`d \times n` weight and its :math:`dn \times dn` Hessian (row-major), in float64."""
    w = weight.detach().to("cpu", torch.float64).reshape(weight.shape[0], -1)
    d, n = w.shape
    blocks = hessian.detach().to("cpu", torch.float64).reshape(d, n, d, n)
    block_traces = torch.einsum("aibi->ab", blocks)  # Tr(H_{s,s'}) for every pair
    return float((w @ w.T * block_traces).sum())


class _ScaledLayerHessian(LinearOperator):
    """:math:`M = (R \\otimes I) H_W (R \\otimes I)` with :math:`R = (W W^\\top)^{1/2}`."""

    def __init__(self, op: HessianOperator, gram: np.ndarray) -> None:
        values, vectors = np.linalg.eigh(0.5 * (gram + gram.T))
        self.root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
        self.op = op
        self.d = gram.shape[0]
        super().__init__(dtype=np.dtype(np.float64), shape=op.shape)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        v = np.asarray(x, dtype=np.float64).reshape(self.d, -1)
        hv = self.op.matvec((self.root @ v).reshape(-1)).reshape(self.d, -1)
        return (self.root @ hv).reshape(-1)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)  # symmetric


def relative_flatness(model: nn.Module, batches: Sequence[Batch],
                      config: RelativeFlatnessConfig | None = None, *,
                      loss_fn: LossFn = F.cross_entropy,
                      output_fn: OutputFn | None = None) -> RelativeFlatnessResult:
    r""":math:`\kappa_{\mathrm{Tr}}(W)` of one linear layer on ``batches`` (see the module docstring).

    Args:
        model: any ``nn.Module``; evaluated in eval mode, left unchanged.
        batches: ``(x, y)`` batches of the measurement set (Petzka et al.: the training set): a
            list or a DataLoader (read once), moved batch by batch to the model's device.
        config: settings (default :class:`RelativeFlatnessConfig()`: last Linear, ``auto``).
        loss_fn: mean-reduction loss (default cross-entropy); any loss (regression too).
        output_fn: maps the model's output to the tensor ``loss_fn`` takes (default: as is).

    Raises:
        FlatlabError: unknown or non-Linear layer, a frozen weight, empty data, or ``exact`` on a
            layer larger than ``exact_max_size``.
    """
    config = RelativeFlatnessConfig() if config is None else config
    if not isinstance(config, RelativeFlatnessConfig):
        raise FlatlabError(f"config must be a RelativeFlatnessConfig, got {type(config).__name__}")
    layer, module = find_linear_layer(model, config.layer)
    weight_name = f"{layer}.weight" if layer else "weight"
    if not module.weight.requires_grad:
        raise FlatlabError(f"the weight of layer {layer!r} is frozen (requires_grad is false): nothing to differentiate")
    batches = prepare_batches(batches, model_device(model), name="batches")
    num_samples = sum(_batch_len(y) for _, y in batches)
    if num_samples == 0:
        raise FlatlabError("no samples to measure on: the batch list is empty")
    weight = module.weight.detach()
    d, n = int(weight.shape[0]), int(weight.shape[1])
    size = d * n
    w64 = weight.to("cpu", torch.float64)
    gram = (w64 @ w64.T).numpy()
    method = config.method
    if method == "auto":
        method = "exact" if size <= config.exact_max_size else "hutch++"
    if method == "exact":
        if size > config.exact_max_size:
            raise FlatlabError(f"the exact method is limited to layers of exact_max_size = {config.exact_max_size} "
                               f"weights; layer {layer!r} has {d} x {n} = {size}: use method hutch++ or raise "
                               "exact_max_size")
        # detach: dense_hessian's result can carry the weights' requires_grad through torch.func
        hessian = dense_hessian(model, batches, loss_fn, params=[weight_name], max_params=size,
                                output_fn=output_fn).detach()
        kappa = kappa_from_layer_hessian(weight, hessian)
        stderr, products, h_trace = 0.0, size, float(torch.trace(hessian))
    else:
        op = HessianOperator(model, batches, loss_fn, params=[weight_name], output_fn=output_fn)
        estimate = (hutchpp_trace if method == "hutch++" else hutchinson_trace)(
            _ScaledLayerHessian(op, gram), num_products=config.num_products, seed=config.seed)
        kappa, stderr, products, h_trace = estimate.trace, estimate.stderr, estimate.products, None
    return RelativeFlatnessResult(
        kappa=float(kappa), stderr=float(stderr), method=method, layer=layer, weight_name=weight_name,
        layer_shape=(d, n), products=int(products), gram_trace=float(np.trace(gram)),
        layer_hessian_trace=h_trace, num_samples=int(num_samples), config=config,
    )


__all__ = [
    "DEFAULT_EXACT_MAX_SIZE",
    "RELATIVE_FLATNESS_METHODS",
    "RelativeFlatnessConfig",
    "RelativeFlatnessResult",
    "find_linear_layer",
    "kappa_from_layer_hessian",
    "relative_flatness",
]
