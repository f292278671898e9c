"""``patch_grad``: conv weight gradients from one input patch per (sample, output channel)
(Wang & Nelaturu 2019). The estimator is in :mod:`lightning_approx.ops.patch`."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from lightning_approx.errors import ConfigError
from lightning_approx.kernels import ops as kops
from lightning_approx.methods.base import Hyperparameter, Method
from lightning_approx.methods.registry import register
from lightning_approx.ops.conv import conv2d_grad_weight
from lightning_approx.ops.patch import VARIANTS

if TYPE_CHECKING:
    from lightning_approx.layers import LayerSite


@register
class PatchGrad(Method):
    """Approximates the weight gradient of selected convs from one patch per (n, c); their
    input gradient and every other layer stay exact.

    Args:
        variant: ``"argmax"`` (the paper's GPU kernel: patch at the largest |dY|, weighted by
            the sum of dY; biased), ``"random"`` (uniform position, scaled by H_out*W_out;
            unbiased) or ``"fixed"`` (centre position; biased).
        every: Approximate every ``every``-th patched layer (by its index among the patched
            layers: 0, every, 2*every, ...); 1 approximates all eligible convs.
        min_kernel: Only convs whose kernel is at least this size in both dimensions are
            approximated (a 1x1 conv has one position per patch: nothing to save).
    """

    name = "patch_grad"
    stages = frozenset({"grad_weight"})
    unbiased = False
    hyperparameters: ClassVar[dict[str, Hyperparameter]] = {}

    def __init__(self, variant: str = "argmax", every: int = 2, min_kernel: int = 3) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"{self.name}.variant", variant, "unknown variant", f"use one of {list(VARIANTS)}")
        for field, value in (("every", every), ("min_kernel", min_kernel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{self.name}.{field}", value, "must be a whole number >= 1",
                                  "give e.g. every=2 (every other conv) or min_kernel=3")
        self.variant, self.every, self.min_kernel = variant, every, min_kernel
        self.unbiased = variant == "random"  # per instance: depends on the variant

    def options(self) -> dict:
        return {"variant": self.variant, "every": self.every, "min_kernel": self.min_kernel}

    def selects(self, site: LayerSite, weight: Tensor) -> bool:
        """Whether this layer's weight gradient is approximated."""
        kh, kw = weight.shape[2:]
        return site.index % self.every == 0 and min(kh, kw) >= self.min_kernel

    def replaces(self, site: LayerSite, weight: Tensor) -> bool:
        return weight.dim() == 4 and self.selects(site, weight)  # Linear weight gradients stay exact

    def conv2d_grad_weight(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        geom = site.geometry
        macs = geom.macs(x.shape, weight, dy.shape)
        if not self.selects(site, weight):
            return conv2d_grad_weight(geom, x, weight, dy), macs
        grad = kops.patch_weight_grad(geom, x, dy, weight.shape, self.variant, site.generator(x.device))
        return grad, dy.shape[0] * weight.numel()

    def linear_grad_weight(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, int]:
        return dy.t().mm(x), x.shape[0] * weight.numel()
