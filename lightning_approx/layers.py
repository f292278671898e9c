"""The swapped-in layers.

A patched layer is the user's own ``nn.Conv2d`` / ``nn.Linear`` object with its class
switched to a subclass whose training forward routes through a method's backward. Nothing
else about the object changes: the same ``Parameter`` objects, hooks, ``state_dict`` keys,
device and dtype, and ``isinstance(layer, nn.Conv2d)`` still holds. So optimizers, DDP and
checkpoints never notice, and :func:`~lightning_approx.surgery.restore` only switches the
class back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lightning_approx.errors import check_seed
from lightning_approx.methods.pipeline import Pipeline
from lightning_approx.ops.accounting import WorkCounter, recomputing
from lightning_approx.ops.conv import ConvGeometry
from lightning_approx.ops.layout import is_channels_last
from lightning_approx.ops.mask import LiveSlices
from lightning_approx.ops.sampling import draw_rows


def layer_seed(seed: int, index: int) -> int:
    """The seed of layer ``index``'s random streams: ``seed * 1_000_003 + index``, reduced modulo
    2**64 where that leaves the range ``torch.Generator`` takes (``[-2**63, 2**64)``); inside it,
    as it always was, so a seed keeps its draws."""
    value = seed * 1_000_003 + index
    return value if -(2**63) <= value < 2**64 else value % 2**64


@dataclass(eq=False)
class LayerSite:
    """Everything a method needs to know about one patched layer.

    Attributes:
        name: Qualified name in the model (``"layer1.0.conv1"``).
        index: Position among the patched layers; seeds this layer's random stream.
        pipeline: The methods applied (shared by all layers patched together).
        geometry: Conv hyperparameters (``None`` for Linear).
        seed: Base seed of the random streams.
        work: Backward MACs since the last reset.
        probe: When set, the next backward also computes the exact gradients and records
            their :attr:`fidelity` (costs one exact backward of this layer).
        fidelity: ``{"weight.cos", "weight.rel_err", "input.cos", "input.rel_err"}`` of the
            last probed backward.
    """

    name: str
    index: int
    pipeline: Pipeline
    geometry: ConvGeometry | None
    seed: int
    work: WorkCounter = field(default_factory=WorkCounter)
    probe: bool = False
    fidelity: dict[str, float] = field(default_factory=dict)
    _generators: dict[torch.device, torch.Generator] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # A bad seed would otherwise fail at the first backward, inside Generator.manual_seed.
        self.seed = check_seed("seed", self.seed)

    def generator(self, device: torch.device) -> torch.Generator:
        """This layer's random stream on ``device`` (one per device, created on first use)."""
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(layer_seed(self.seed, self.index))
            self._generators[device] = gen
        return gen

    def draw_window(self, n: int, k: int) -> tuple[slice, ...]:
        """k of ``range(n)`` with equal probabilities, as one window (:func:`draw_rows`). Drawn
        from this layer's host stream on every device: the slices are host values, so a GPU
        never waits for the draw."""
        return draw_rows(n, k, self.generator(torch.device("cpu")))

    def rng_state(self) -> dict[str, Tensor]:
        return {str(dev): gen.get_state() for dev, gen in self._generators.items()}

    def set_rng_state(self, states: dict[str, Tensor]) -> None:
        for dev, state in states.items():
            self.generator(torch.device(dev)).set_state(state)


def _apply(function: type[torch.autograd.Function], x: Tensor, weight: Tensor, bias: Tensor | None,
           site: LayerSite, live: LiveSlices | None) -> Tensor:
    """``function.apply`` on the operands autocast would give conv2d / linear (both run in its
    lower precision), with autocast off inside: a custom autograd Function is not autocast, so
    its backward would otherwise meet a low-precision ``x`` next to a float32 weight. Without
    autocast it is a plain call (entering a disabled autocast region costs time every step)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return function.apply(x, weight, bias, site, live)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return function.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), site,
                              live)


def _like(dy: Tensor, x: Tensor) -> Tensor:
    """``dy`` made dense in ``x``'s memory format: oneDNN converts mixed layouts on every call."""
    if is_channels_last(x):
        return dy.contiguous(memory_format=torch.channels_last)
    return dy.contiguous()


class _Conv2dFunction(torch.autograd.Function):
    # ``live``: the live slices of x the pipeline's input_mask method found in the forward
    # (``Pipeline.conv2d_live``); ``None`` without one, or where x's zeros mean nothing.
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, site: LayerSite,
                live: LiveSlices | None = None) -> Tensor:
        ctx.site = site
        ctx.live = live
        ctx.save_for_backward(x, weight)
        return site.geometry.forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        site = ctx.site
        grads = site.pipeline.conv2d_backward(site, x, weight, _like(dy, x), ctx.needs_input_grad[:3], ctx.live)
        return (*grads, None, None)


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, site: LayerSite,
                live: LiveSlices | None = None) -> Tensor:
        ctx.site = site
        ctx.live = live
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        gx, gw, gb = ctx.site.pipeline.linear_backward(ctx.site, x2, weight, dy2, ctx.needs_input_grad[:3], ctx.live)
        return (gx.view(x.shape) if gx is not None else None), gw, gb, None, None


def _count_exact(site: LayerSite, macs: int, x: Tensor, weight: Tensor, live: LiveSlices | None = None) -> None:
    # The plain layer runs the exact backward: count it as computed in full, and the share of
    # its MACs that multiply a ReLU input's zeros as zero (as the pipeline's backward does).
    if recomputing():
        return
    parts = int(x.requires_grad) + int(weight.requires_grad)
    zero = 0 if live is None else round(macs * live.zero_fraction)
    site.work.add(exact=macs * parts, computed=macs * parts, zero=zero * parts)


class ApproxConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose training backward is computed by ``approx_site.pipeline``.

    Never constructed directly: :func:`~lightning_approx.surgery.approximate` switches the
    class of an existing ``nn.Conv2d`` and attaches ``approx_site``.
    """

    approx_site: LayerSite

    def forward(self, x: Tensor) -> Tensor:
        site = self.approx_site
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        pipeline = site.pipeline
        if pipeline.is_exact:
            y = super().forward(x)
            _count_exact(site, site.geometry.macs(x.shape, self.weight, y.shape), x, self.weight)
            return y
        # Found before prepare_input: its explicit padding would hide where x came from. The
        # padding keeps the zero pattern (zeros or copies of x), so the slices stay valid.
        live = pipeline.conv2d_live(site, x)
        if pipeline.runs_plain(site, live, self.weight):
            y = super().forward(x)
            _count_exact(site, site.geometry.macs(x.shape, self.weight, y.shape), x, self.weight, live)
            return y
        x = site.geometry.prepare_input(x)
        if pipeline.forward_method is not None:
            return pipeline.forward_method.conv2d_forward(site, x, self.weight, self.bias)
        return _apply(_Conv2dFunction, x, self.weight, self.bias, site, live)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approx={self.approx_site.pipeline!r}"


class ApproxLinear(nn.Linear):
    """An ``nn.Linear`` whose training backward is computed by ``approx_site.pipeline``."""

    approx_site: LayerSite

    def forward(self, x: Tensor) -> Tensor:
        site = self.approx_site
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        pipeline = site.pipeline
        if pipeline.is_exact:
            _count_exact(site, x.numel() // x.shape[-1] * self.weight.numel(), x, self.weight)
            return super().forward(x)
        if pipeline.forward_method is not None:
            return pipeline.forward_method.linear_forward(site, x, self.weight, self.bias)
        live = pipeline.linear_live(site, x)
        if pipeline.runs_plain(site, live, self.weight):
            _count_exact(site, x.numel() // x.shape[-1] * self.weight.numel(), x, self.weight, live)
            return super().forward(x)
        return _apply(_LinearFunction, x, self.weight, self.bias, site, live)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approx={self.approx_site.pipeline!r}"


# exact class -> patched class; patching only ever maps these exact types.
PATCHED_CLASS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: ApproxConv2d, nn.Linear: ApproxLinear}
EXACT_CLASS: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in PATCHED_CLASS.items()}
