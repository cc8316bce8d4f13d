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
    """sum(grad * r - grad_x * v) reduced to the scale's ``shape``.

    Per tensor: two dot products (no temporaries). Per channel (shape (C, 1, ..., 1)): one
    multiply, one fused multiply-subtract, one row sum (a batched matmul is slower on CPU here).
    """
    if shape.numel() == 1:
        return (torch.dot(grad.reshape(-1), r.reshape(-1)) - torch.dot(grad_x.reshape(-1), v.reshape(-1))).reshape(shape)
    t = (grad * r).addcmul_(grad_x, v, value=-1)
    if len(shape) == t.dim() and shape[0] == t.shape[0] and all(n == 1 for n in shape[1:]):
        return t.reshape(t.shape[0], -1).sum(1).reshape(shape)
    return _reduce_to(t, shape)


class LSQFunction(torch.autograd.Function):
    """``round(clip(x / s, -qn, qp)) * s`` with LSQ's gradients for ``x`` and ``s``.

    The backward pass uses d w_hat/ds = round(clip(v)) - v * 1[inside] (v = x/s): outside the
    range round(clip(v)) is -Qn or Qp, inside it is round(v). So the scale gradient is
    g * (sum(grad * r) - sum(grad_x * v)) with grad_x = grad * 1[inside], which needs far fewer
    passes over the tensor than the case-by-case formula. Under a double backward (Hessian-vector
    products, ``create_graph=True``) ``v`` is recomputed from the inputs so that it is
    differentiated through.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, qn: int, qp: int,
                grad_scale: float) -> torch.Tensor:
        v = x / scale
        r = v.clamp(-qn, qp)
        inside = v.eq(r)
        r.round_()
        ctx.save_for_backward(x, scale, r, inside, v)
        ctx.grad_scale = grad_scale
        return r * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, r, inside, v = ctx.saved_tensors
        grad_x = torch.where(inside, grad_out, 0.0)  # faster than multiplying by a bool mask
        grad_s = None
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():  # create_graph: keep v = x/s in the graph
                v = x / scale
            grad_s = _scale_grad(grad_out, r, grad_x, v, scale.shape) * ctx.grad_scale
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
