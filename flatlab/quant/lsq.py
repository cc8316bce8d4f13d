r"""LSQ fake quantization (Esser et al. 2019) with a straight-through estimator.

For a tensor :math:`x`, a positive step size (scale) :math:`s` and integer limits
:math:`Q_n, Q_p`:

.. math::

    \bar x = \operatorname{round}(\operatorname{clip}(x / s, -Q_n, Q_p)), \qquad \hat x = \bar x\, s.

Backward (straight-through for ``round``):

.. math::

    \frac{\partial \hat x}{\partial x} = \mathbb 1[-Q_n \le x/s \le Q_p], \qquad
    \frac{\partial \hat x}{\partial s} = \begin{cases} -x/s + \operatorname{round}(x/s) & \text{inside} \\
    -Q_n & x/s < -Q_n \\ Q_p & x/s > Q_p \end{cases}

and the scale gradient is multiplied by :math:`g = 1/\sqrt{N Q_p}`, with :math:`N` the number of
elements the scale serves (per channel: the channel's elements) or, as an option, the whole
tensor's count (QT-DoG's released code). Signed weights use :math:`Q_n = 2^{b-1}`,
:math:`Q_p = 2^{b-1}-1`; unsigned activations :math:`Q_n = 0`, :math:`Q_p = 2^b - 1`.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def signed_range(bits: int) -> tuple[int, int]:
    """(Qn, Qp) of signed b-bit codes: codes lie in [-Qn, Qp]."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    """(Qn, Qp) of unsigned b-bit codes: codes lie in [0, Qp]."""
    return 0, 2**bits - 1


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (the scale's shape)."""
    if grad.shape == shape:
        return grad
    if len(shape) == 0:
        return grad.sum()
    lead = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(lead))) if lead > 0 else grad
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad.reshape(shape)


def _scale_grad(grad: torch.Tensor, r: torch.Tensor, grad_x: torch.Tensor, v: torch.Tensor,
                shape: torch.Size) -> torch.Tensor:
    """sum(grad * r - grad_x * v) reduced to the scale's ``shape`` (differentiable; double backward)."""
    if shape.numel() == 1:
        return (torch.dot(grad.reshape(-1), r.reshape(-1)) - torch.dot(grad_x.reshape(-1), v.reshape(-1))).reshape(shape)
    return _sum_to(grad * r - grad_x * v, shape)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` down to the scale's ``shape``: one row sum per channel for shape (C, 1, ..., 1)."""
    if shape.numel() == 1:
        return t.sum().reshape(shape)
    if len(shape) == t.dim() and shape[0] == t.shape[0] and all(n == 1 for n in shape[1:]):
        return t.reshape(t.shape[0], -1).sum(1).reshape(shape)
    return _reduce_to(t, shape)


class LSQFunction(torch.autograd.Function):
    r"""``round(clip(x / s, -qn, qp)) * s`` with LSQ's gradients for ``x`` and ``s``.

    Written for few passes over the tensor (fake quantization of ~11M ResNet-18 weights per step
    is memory-bound). With ``w_hat = round(clip(x/s)) s`` (the output) the scale gradient is

    .. math::

        \frac{\partial L}{\partial s} = g \sum \mathrm{grad}\,(r - v\,\mathbb 1[\text{inside}])
        = \frac{g}{s} \sum \mathrm{grad}\,(\hat w - x\,\mathbb 1[\text{inside}])

    (outside the range ``r`` is -Qn or Qp; inside it is round(v)), so the backward pass needs only
    ``x`` (the input), ``s`` and the output, not ``v = x/s`` or ``r``. When no element is clipped
    (the usual case for 8-bit weights, checked with one min/max pass on CPU) the forward pass is
    divide, round in place, multiply in place, the input gradient is ``grad`` itself (no mask) and
    the scale gradient is one row sum of ``grad (w_hat - x)``; ``w_hat - x`` is formed with a single
    rounding, so it is more accurate than subtracting two large per-element products. Otherwise a
    bool mask of the inside elements is saved. On other devices the min/max check (a host sync)
    is skipped and the masked path is used. Under a double backward (Hessian-vector products,
    ``create_graph=True``) ``v = x/s`` is recomputed from the inputs so that it is differentiated
    through.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, qn: int, qp: int,
                grad_scale: float) -> torch.Tensor:
        v = x / scale
        inside: torch.Tensor | None = None
        all_inside = False
        if v.device.type == "cpu" and v.numel() > 0:
            lo, hi = torch.aminmax(v)
            all_inside = bool(lo >= -qn) and bool(hi <= qp)
        if all_inside:
            out = v.round_().mul_(scale)
        else:
            clipped = v.clamp(-qn, qp)
            inside = clipped.eq(v)
            del v
            out = clipped.round_().mul_(scale)
        ctx.save_for_backward(x, scale, out, inside)
        ctx.range = (qn, qp)
        ctx.grad_scale = grad_scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, out, inside = ctx.saved_tensors
        grad_x = grad_out if inside is None else torch.where(inside, grad_out, 0.0)
        grad_s = None
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():  # create_graph: keep v = x/s in the graph
                qn, qp = ctx.range
                with torch.no_grad():
                    r = torch.round(torch.clamp(x / scale, -qn, qp))
                grad_s = _scale_grad(grad_out, r, grad_x, x / scale, scale.shape) * ctx.grad_scale
            else:
                if inside is None:
                    t = (out - x).mul_(grad_out)
                else:
                    t = (grad_out * out).addcmul_(grad_x, x, value=-1)
                grad_s = _sum_to(t, scale.shape).div_(scale).mul_(ctx.grad_scale)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_s, None, None, None


def lsq_quantize(x: torch.Tensor, scale: torch.Tensor, qn: int, qp: int, grad_scale: float) -> torch.Tensor:
    """LSQ fake quantization of ``x`` with a scale broadcastable to ``x`` (see module docstring)."""
    return LSQFunction.apply(x, scale, qn, qp, grad_scale)


def lsq_codes(x: torch.Tensor, scale: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """The integer codes ``round(clip(x / s, -qn, qp))`` as int64 (no gradient)."""
    with torch.no_grad():
        return torch.round(torch.clamp(x / scale, -qn, qp)).to(torch.int64)


def grad_scale_factor(n_elements: int, qp: int) -> float:
    """LSQ's scale-gradient factor g = 1 / sqrt(N * Qp)."""
    return 1.0 / math.sqrt(max(1, n_elements) * qp)


def init_scale(x: torch.Tensor, qp: int, per_channel: bool) -> torch.Tensor:
    """LSQ's initial step size s = 2 mean(|x|) / sqrt(Qp), per output channel (dim 0) or per tensor.

    Returns a tensor of shape (C, 1, ..., 1) per channel, or (1,) per tensor. A channel of zeros
    gets a tiny positive scale so that x / s stays finite.
    """
    with torch.no_grad():
        if per_channel:
            mean_abs = x.detach().abs().reshape(x.shape[0], -1).mean(dim=1)
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            s = (2.0 * mean_abs / math.sqrt(qp)).reshape(shape)
        else:
            s = (2.0 * x.detach().abs().mean() / math.sqrt(qp)).reshape(1)
        return s.clamp_min(torch.finfo(x.dtype).tiny ** 0.5 if x.is_floating_point() else 1e-8)
