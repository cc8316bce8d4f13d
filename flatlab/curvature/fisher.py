r"""The empirical Fisher of a model's data-set loss, as a linear operator.

With :math:`\ell_i(w)` the loss of sample :math:`i` alone (``loss_fn`` on a one-sample batch)
and :math:`g_i = \nabla \ell_i(w)` its gradient,

.. math:: F = \frac1N \sum_{i=1}^N g_i g_i^\top, \qquad F v = \frac1N \sum_i g_i\,(g_i^\top v).

For a mean-reduction loss :math:`L_B = \frac{1}{|B|} \sum_{i \in B} \ell_i` (cross-entropy,
squared error with one target per sample), :math:`\nabla L = \frac1N \sum_i g_i`.

**It is not the Fisher.** The Fisher information takes the expectation over labels drawn from
the *model*, :math:`\frac1N \sum_i \mathbb E_{y \sim p(\cdot|x_i)}[\nabla \log p(y|x_i)
\nabla \log p(y|x_i)^\top]` (for cross-entropy it equals the GGN, see
:mod:`flatlab.curvature.ggn`); the empirical Fisher plugs in the *observed* labels instead. The two
agree only when the model's predictive distribution matches the data's, and they can differ
badly elsewhere: at an interpolating minimum every :math:`g_i = 0`, so :math:`F = 0` while
:math:`G = H` need not be, and away from a minimum :math:`F` is dominated by the mean gradient
(:math:`F \succeq \bar g \bar g^\top`, :math:`\bar g = \nabla L`), a direction that says nothing
about curvature (Kunstner, Balles, Hennig 2019, "Limitations of the empirical Fisher
approximation"). The field still reports it because it is what Adam-style preconditioners, K-FAC
variants and many "Fisher" sharpness and pruning scores actually compute (it needs only
per-sample gradients, no sampling from the model and no second derivatives), so comparing with
that literature needs the same quantity. :math:`F` is positive semi-definite of rank at most
:math:`N`.

Per-sample gradients come from ``torch.func.vmap(torch.func.grad(...))`` over chunks of
``sample_chunk`` samples (memory ``sample_chunk x dim`` values), or from a loop of one-sample
backward passes (``loop``: any model, including custom ``autograd.Function`` quantizers that
torch.func cannot transform; ``auto`` falls back to it). Per-sample gradients are undefined when
BatchNorm normalizes by batch statistics (samples interact), so such a model is refused in that
mode. When all :math:`N` gradients fit in ``cache_bytes`` they are kept as one ``N x dim`` matrix
:math:`\Gamma` and a product is :math:`\frac1N \Gamma^\top (\Gamma v)`: two matrix-vector
products, no pass through the network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils._pytree import tree_map

from flatlab.curvature.operator import (
    Batch,
    CurvatureOperator,
    LossFn,
    OutputFn,
    batch_size,
    uses_batch_statistics,
)
from flatlab.errors import FlatlabError

EMPIRICAL_FISHER_METHODS = ("auto", "vmap", "loop")
DEFAULT_EMPIRICAL_FISHER_METHOD = "vmap"
#: Memory per chunk of per-sample gradients when ``sample_chunk`` is not given.
DEFAULT_CHUNK_BYTES = 512 * 1024**2


def _take(tree: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor in ``tree`` (first dimension)."""
    return tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t, tree)


class EmpiricalFisherOperator(CurvatureOperator):
    r"""The empirical Fisher :math:`F = \frac1N \sum_i g_i g_i^\top` (see the module docstring)
    w.r.t. chosen parameters, as a scipy ``LinearOperator`` and a torch product.

    Args:
        model, data, loss_fn, params, mode, output_fn, progress, cache_bytes, dropout_seed: see
            :class:`~flatlab.curvature.operator.CurvatureOperator`. ``cache_bytes`` bounds the
            ``N x dim`` matrix of per-sample gradients kept between products.
        method: ``auto``, ``vmap`` or ``loop``.
        sample_chunk: samples whose gradients are held at once (default: as many as fit in
            :data:`DEFAULT_CHUNK_BYTES`, at most 256).

    Raises:
        FlatlabError: a model with BatchNorm that uses batch statistics in ``mode``.
    """

    kind: ClassVar[str] = "empirical-fisher"
    methods: ClassVar[tuple[str, ...]] = EMPIRICAL_FISHER_METHODS
    default_method: ClassVar[str] = DEFAULT_EMPIRICAL_FISHER_METHOD
    fallbacks: ClassVar[dict[str, str]] = {"vmap": "loop"}

    def __init__(self, model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None,
                 params: str | Sequence[str] = "all", *, method: str = "auto", mode: str = "eval",
                 output_fn: OutputFn | None = None, progress: Callable[[], Any] | None = None,
                 cache_bytes: int | None = None, dropout_seed: int | None = None,
                 sample_chunk: int | None = None, notes: Sequence[str] | None = None) -> None:
        if sample_chunk is not None and (isinstance(sample_chunk, bool) or int(sample_chunk) != sample_chunk
                                         or sample_chunk < 1):
            raise FlatlabError(f"sample_chunk must be a positive integer, got {sample_chunk!r}")
        if uses_batch_statistics(model, mode):
            raise FlatlabError(f"the empirical Fisher needs per-sample gradients, which BatchNorm does not define when "
                               f"it normalizes by batch statistics (mode={mode!r}, or track_running_stats=False): "
                               "use mode='eval' with running statistics, or kind 'ggn' / 'hessian'")
        super().__init__(model, data, loss_fn, params, method=method, mode=mode, output_fn=output_fn,
                         progress=progress, cache_bytes=cache_bytes, dropout_seed=dropout_seed, notes=notes)
        self._chunk_setting = sample_chunk
        element = torch.finfo(self.torch_dtype).bits // 8 if self.torch_dtype.is_floating_point else 4
        self.sample_chunk = (int(sample_chunk) if sample_chunk is not None
                             else max(1, min(256, DEFAULT_CHUNK_BYTES // (self.dim * element))))
        self._gradient_bytes = self.num_samples * self.dim * element

    def options(self) -> dict[str, Any]:
        return {**super().options(), "sample_chunk": self._chunk_setting}

    # -- per-sample gradients --------------------------------------------------------------------
    def per_sample_gradients(self) -> Iterator[list[torch.Tensor]]:
        r"""Chunks of per-sample gradients :math:`g_i`, each a list (one tensor per parameter, shaped
        ``(c, *parameter.shape)``) for ``c <= sample_chunk`` consecutive samples, in data order.
        Call inside :meth:`evaluation` (products do)."""
        for x, y, _ in self.batches():
            size = batch_size(y)
            for start in range(0, size, self.sample_chunk):
                stop = min(size, start + self.sample_chunk)
                xs, ys = _take(x, start, stop), _take(y, start, stop)
                if self.method == "vmap":
                    yield self._vmap_gradients(xs, ys)
                else:
                    yield self._loop_gradients(xs, ys, stop - start)

    def _vmap_gradients(self, x: Any, y: Any) -> list[torch.Tensor]:
        from torch.func import grad, vmap

        names = self.param_names

        def one_sample_loss(weights: dict[str, torch.Tensor], xi: Any, yi: Any) -> torch.Tensor:
            x1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, xi)
            y1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, yi)
            return self.loss_value(self.functional_outputs(weights, x1), y1)

        weights = {n: p.detach() for n, p in zip(names, self.params)}
        randomness = "different" if self.mode == "train" else "error"
        # Outside no_grad the gradients of a restricted operator would carry an outer graph (they
        # depend on the other parameters, which require grad); torch.func.grad ignores the outer no_grad.
        with torch.no_grad():
            grads = vmap(grad(one_sample_loss), in_dims=(None, 0, 0), randomness=randomness)(weights, x, y)
        return [grads[n] for n in names]

    def _loop_gradients(self, x: Any, y: Any, count: int) -> list[torch.Tensor]:
        rows: list[list[torch.Tensor]] = [[] for _ in self.params]
        for i in range(count):
            with torch.enable_grad():
                loss = self.loss_value(self.outputs(_take(x, i, i + 1)), _take(y, i, i + 1))
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for row, g, p in zip(rows, grads, self.params):
                row.append(torch.zeros_like(p) if g is None else g)
        return [torch.stack(row) for row in rows]

    # -- products --------------------------------------------------------------------------------
    def _build_cache(self) -> bool:
        if self._gradient_bytes > self.cache_bytes:
            return False
        matrix = torch.empty((self.num_samples, self.dim), dtype=self.torch_dtype, device=self.device)
        row = 0
        for chunk in self.per_sample_gradients():
            count = chunk[0].shape[0]
            matrix[row: row + count] = torch.cat([g.reshape(count, -1) for g in chunk], dim=1)
            row += count
        self._stamp_cache(matrix)
        return True

    def _product(self, pieces: list[torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        scale = 1.0 / self.num_samples
        if self._cache_usable():
            if self._cache is not None or self._build_cache():
                v = torch.cat([p.reshape(-1) for p in pieces])
                flat = out if out is not None else torch.empty(self.dim, dtype=self.torch_dtype, device=self.device)
                # F v = Gamma^T (Gamma v) / N
                return torch.mv(self._cache.T, torch.mv(self._cache, v), out=flat).mul_(scale)
            self._cache_refused = True
        flat, acc = self._zero_output(out)
        for chunk in self.per_sample_gradients():
            count = chunk[0].shape[0]
            dots = sum(g.reshape(count, -1) @ vi.reshape(-1) for g, vi in zip(chunk, pieces))
            for a, g in zip(acc, chunk):
                a.add_(torch.tensordot(dots, g, dims=1), alpha=scale)
        return flat


__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_EMPIRICAL_FISHER_METHOD", "EMPIRICAL_FISHER_METHODS",
           "EmpiricalFisherOperator"]
