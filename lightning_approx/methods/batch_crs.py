"""``batch_crs``: column-row sampling over the batch, one draw shared by every layer.

Every weight gradient is a sum over the batch, ``dW = sum_n conv_w(x_n, dy_n)``: column-row
sampling (Adelman et al., NeurIPS 2021) over those pairs with equal probabilities keeps
``k`` of the ``n`` samples and scales them by ``n / k``. ``crs`` draws its samples (and its
output channels for the input gradient) afresh in every layer, so each layer's input gradient
adds its own noise to every layer below it; measured on ResNet-20, that compounding inflates
the weights of the lowest layers by up to two orders of magnitude within two epochs
(docs/methods/batch_crs.md).

Here one draw serves the whole network. The gradient entering the model's output layer keeps
the drawn rows, scaled by ``n / k``, and is zero elsewhere. Backpropagation is linear in that
gradient, so the estimate is unbiased. Every layer below then receives zero rows outside the
draw, and computes both of its products on the drawn rows only: no noise is added on the way
down. Batch norm in training mode is the exception: its backward spreads the gradient of the
batch statistics onto the undrawn rows, and the layers below drop it. That makes the estimate
biased, on ResNet-20 by about as much as one draw's noise (docs/methods/batch_crs.md).

The drawn rows are one contiguous block (a random one of ``n / k`` blocks when ``k`` divides
``n``, else a random cyclic window): slices of the batch-major tensors are views, so the draw
costs no gather and no norms. Every row is drawn with probability ``k / n``. Shuffled data
loaders make a block as good as any subset; a batch ordered by class would not be.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_approx.errors import ConfigError
from lightning_approx.methods.base import Hyperparameter, Method
from lightning_approx.methods.registry import register
from lightning_approx.ops.conv import conv2d_grad_input, conv2d_grad_weight, conv2d_grads
from lightning_approx.ops.sampling import row_count, sample_count
from lightning_approx.schedules import Schedule

if TYPE_CHECKING:
    from lightning_approx.layers import LayerSite
    from lightning_approx.methods.pipeline import Pipeline

SAMPLE_RATIO = Hyperparameter(low=0.0, high=1.0, low_open=True, high_open=False, exact_at=1.0,
                              fix="give a fraction of the batch in (0, 1]; 1.0 computes the exact gradients")

AUTO = "auto"
BATCH_NORM = ("drop", "scale")


def undrawn(rows: tuple[slice, ...], n: int) -> tuple[slice, ...]:
    """The complement of the drawn slices in ``range(n)``."""
    if len(rows) == 2:  # a wrapped window: the rows between its two pieces
        return (slice(rows[1].stop, rows[0].start),)
    return tuple(r for r in (slice(0, rows[0].start), slice(rows[0].stop, n)) if r.start < r.stop)


def _zero_outside(t: Tensor, rows: tuple[slice, ...]) -> Tensor:
    """An uninitialised tensor like ``t`` whose undrawn rows are zero (the drawn ones are written next)."""
    out = torch.empty_like(t)
    for r in undrawn(rows, t.shape[0]):
        out[r].zero_()
    return out


class _DrawnRows(torch.autograd.Function):
    """Identity forward (a copy); backward keeps the drawn rows of the gradient, scaled by n / k."""

    @staticmethod
    def forward(ctx, out: Tensor, method: BatchCRS, rows: tuple[slice, ...], k: int) -> Tensor:
        ctx.method, ctx.rows, ctx.k = method, rows, k
        # A copy, not a view: autograd forbids in-place ops (``logits /= t``) on a Function's views.
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        n = grad.shape[0]
        ctx.method._active = (ctx.rows, n)  # the layers below this output read the draw
        kept = _zero_outside(grad, ctx.rows)
        for rows in ctx.rows:
            kept[rows] = grad[rows] * (n / ctx.k)
        return kept, None, None, None


class _BatchNormRows(torch.autograd.Function):
    """Training-mode batch norm whose backward runs on the drawn rows and scales its
    batch-statistics term by n / k there.

    The exact backward is ``dx = g (dy - mean(dy) - x_hat mean(dy x_hat))`` with ``g = gamma *
    invstd``, and its last two terms (the gradient through the batch statistics) reach every
    row. The layers below compute on the drawn rows only, so the undrawn rows' share of those
    terms would be lost; scaling the drawn rows' share by n / k restores it in expectation (to
    first order: the means are themselves estimated from the drawn rows). With no draw (exact
    setting) this is the exact backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, momentum: float, eps: float, method: BatchCRS) -> Tensor:
        out, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                                             momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.method = method
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        n = x.shape[0]
        rows = ctx.method._active[0] if ctx.method._active is not None else (slice(0, n),)
        k = row_count(rows, n)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, invstd = mean.view(shape), invstd.view(shape)
        dims = [0, *range(2, x.dim())]
        # dy is zero outside the draw (everything below the output layer is), so sums over the
        # drawn rows are sums over the batch.
        x_hat = [(x[r] - mean) * invstd for r in rows]
        sum_dy = sum(dy[r].sum(dims) for r in rows)
        sum_dy_x_hat = sum((dy[r] * xh).sum(dims) for r, xh in zip(rows, x_hat, strict=True))
        count = x.numel() // x.shape[1]
        g = invstd if weight is None else weight.view(shape) * invstd
        scale = n / k / count
        grad_x = _zero_outside(x, rows)
        for r, xh in zip(rows, x_hat, strict=True):
            grad_x[r] = g * (dy[r] - scale * (sum_dy.view(shape) + xh * sum_dy_x_hat.view(shape)))
        grad_w = sum_dy_x_hat if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _DrawnRowsBatchNorm2d(nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` (class switched by :meth:`BatchCRS.attach`) whose sampled
    training backward is :class:`_BatchNormRows`."""

    _batch_crs: BatchCRS

    def forward(self, x: Tensor) -> Tensor:
        method = self._batch_crs
        if not (self.training and torch.is_grad_enabled()) or method.is_exact:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average, as nn.BatchNorm2d does
                momentum = 1.0 / float(self.num_batches_tracked)
        stats = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _BatchNormRows.apply(x, self.weight, self.bias, *stats, momentum, self.eps, method)


class _ClassSwitch:
    """A handle that switches a module back to its exact class, like a hook's ``remove()``."""

    def __init__(self, module: nn.Module, exact_cls: type[nn.Module]) -> None:
        self.module, self.exact_cls = module, exact_cls

    def remove(self) -> None:
        self.module.__class__ = self.exact_cls
        self.module.__dict__.pop("_batch_crs", None)


def _output_layer(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if name == AUTO:
        if not layers:
            raise ConfigError("batch_crs.output", name, "the model has no Conv2d/Linear layer",
                              "approximate a model with a classifier layer")
        return layers[-1]
    found = dict(layers).get(name)
    if found is None:
        raise ConfigError("batch_crs.output", name, "is not a Conv2d/Linear layer of the model",
                          f"name the layer the loss is computed from, one of {[n for n, _ in layers][-6:]}")
    return name, found


@register
class BatchCRS(Method):
    """Column-row sampling over the batch with one draw for the whole network.

    Args:
        sample_ratio: Fraction of the batch whose gradients are backpropagated through the
            approximated layers; a float or a schedule. 1.0 is exact.
        output: The layer whose output the loss is computed from, by qualified name; every
            other layer's gradient must flow through it (true of classifiers ending in one
            layer). ``"auto"``: the last Conv2d / Linear in module order.
        batch_norm: What the ``nn.BatchNorm2d`` layers' backward does with the gradient of the
            batch statistics, whose share on the undrawn rows the layers below drop:
            ``"drop"`` (the plain backward; biased) or ``"scale"`` (scale the drawn rows' share
            by n / k: unbiased to first order, but the scaled term compounds through the
            layers; docs/methods/batch_crs.md measures both).
    """

    name = "batch_crs"
    stages = frozenset({"grad_input", "grad_weight"})
    unbiased = True  # exactly without training-mode batch norm; see the module docstring
    hyperparameters: ClassVar[dict[str, Hyperparameter]] = {"sample_ratio": SAMPLE_RATIO}

    def __init__(self, sample_ratio: float | Schedule = 0.5, output: str = AUTO, batch_norm: str = "drop") -> None:
        super().__init__()
        self._set("sample_ratio", sample_ratio)
        if not isinstance(output, str) or not output:
            raise ConfigError("batch_crs.output", output, "must be a layer name",
                              "give the qualified name of the output layer, e.g. 'fc', or 'auto'")
        if batch_norm not in BATCH_NORM:
            raise ConfigError("batch_crs.batch_norm", batch_norm, "unknown choice", f"use one of {list(BATCH_NORM)}")
        self.output = output
        self.batch_norm = batch_norm
        self._active: tuple[tuple[slice, ...], int] | None = None
        self._site: LayerSite | None = None
        self._output_name = output

    def options(self) -> dict:
        return {"output": self.output, "batch_norm": self.batch_norm}

    def check_pipeline(self, pipeline: Pipeline) -> None:
        """Refuses an ``input_mask`` method next to this one (called by
        :class:`~lightning_approx.methods.pipeline.Pipeline`)."""
        masker = pipeline.by_stage.get("input_mask")
        if masker is not None:
            # The mask drops samples that are zero everywhere, so a layer's rows would no longer
            # be the batch's and the draw would address the wrong ones.
            raise ConfigError("method", [m.name for m in pipeline.methods],
                              f"{masker.name!r} removes dead samples from a layer's rows, and batch_crs's draw "
                              "addresses rows of the whole batch", f"use {masker.name!r} with crs, or batch_crs alone")

    # --- the shared draw -------------------------------------------------------------
    def attach(self, model: nn.Module, sites: list[LayerSite]) -> list[RemovableHandle]:
        """Hooks the output layer so its gradient keeps the drawn rows only."""
        self._output_name, layer = _output_layer(model, self.output)
        self._site = sites[0]  # its random stream draws the rows (and is checkpointed with it)
        handles: list = [layer.register_forward_hook(self._mask_output)]
        if self.batch_norm == "scale":
            handles += self._switch_batch_norms(model)
        return handles

    def _switch_batch_norms(self, model: nn.Module) -> list[_ClassSwitch]:
        handles, others = [], []
        for name, module in model.named_modules():
            if type(module) in (nn.BatchNorm2d, _DrawnRowsBatchNorm2d):
                module.__class__ = _DrawnRowsBatchNorm2d
                module._batch_crs = self
                handles.append(_ClassSwitch(module, nn.BatchNorm2d))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):  # 1d, 3d, sync, subclasses
                others.append(name)
        if others:
            warnings.warn(f"batch_crs: batch norm layers {others} are not plain nn.BatchNorm2d, so their backward "
                          "keeps dropping the undrawn rows' share of the batch-statistics gradient: the estimate is "
                          "more biased there (docs/methods/batch_crs.md)", stacklevel=4)
        return handles

    def _mask_output(self, module: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
        if not (module.training and torch.is_grad_enabled()) or self.is_exact:
            return out
        self._active = None  # a new forward: the last backward's draw is spent
        n = out.shape[0]
        k = sample_count(self.value("sample_ratio"), n)
        rows = self._site.draw_window(n, k)
        return _DrawnRows.apply(out, self, rows, k)

    def _rows(self, site: LayerSite, x: Tensor) -> tuple[slice, ...]:
        if self._active is None and self.is_exact:  # nothing was drawn: every row counts
            return (slice(0, x.shape[0]),)
        if self._active is None:
            raise RuntimeError(
                f"batch_crs: layer {site.name!r} ran its backward without a draw from output layer "
                f"{self._output_name!r}: the loss must be computed from that layer's output in this forward. Fix: "
                "name the right layer with BatchCRS(output=...), or use crs, whose draws are per layer")
        rows, n = self._active
        if x.shape[0] != n:
            raise RuntimeError(
                f"batch_crs: layer {site.name!r} sees {x.shape[0]} rows but the output has {n}: the draw "
                "is over the batch, so every approximated layer's first dimension must be the batch. Fix: "
                "exclude that layer, or use crs")
        return rows

    def _computed(self, macs: int, rows: tuple[slice, ...], n: int) -> int:
        return macs * row_count(rows, n) // n

    # --- Conv2d: the products on the drawn rows; zero rows elsewhere ---------------------
    def conv2d_grads(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor
                     ) -> tuple[Tensor, Tensor, int]:
        """Both products in one fused call per slice (oneDNN's fused backward is the cheaper)."""
        rows = self._rows(site, x)
        grad_x, grad_w = _zero_outside(x, rows), None
        for r in rows:
            gx, gw = conv2d_grads(site.geometry, x[r], weight, dy[r])
            grad_x[r] = gx
            grad_w = gw if grad_w is None else grad_w.add_(gw)
        return grad_x, grad_w, 2 * self._computed(site.geometry.macs(x.shape, weight, dy.shape), rows, x.shape[0])

    def conv2d_grad_input(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        rows = self._rows(site, x)
        grad_x = _zero_outside(x, rows)
        for r in rows:
            grad_x[r] = conv2d_grad_input(site.geometry, x[r], weight, dy[r])
        return grad_x, self._computed(site.geometry.macs(x.shape, weight, dy.shape), rows, x.shape[0])

    def conv2d_grad_weight(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        rows = self._rows(site, x)
        grad_w = sum(conv2d_grad_weight(site.geometry, x[r], weight, dy[r]) for r in rows)
        return grad_w, self._computed(site.geometry.macs(x.shape, weight, dy.shape), rows, x.shape[0])

    # --- Linear (x: (N, in), dy: (N, out)) ------------------------------------------------
    def linear_grad_input(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        rows = self._rows(site, x)
        grad_x = _zero_outside(x, rows)
        for r in rows:
            grad_x[r] = dy[r].mm(weight)
        return grad_x, self._computed(x.shape[0] * weight.numel(), rows, x.shape[0])

    def linear_grad_weight(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        rows = self._rows(site, x)
        grad_w = sum(dy[r].t().mm(x[r]) for r in rows)
        return grad_w, self._computed(x.shape[0] * weight.numel(), rows, x.shape[0])
