"""Composes methods into one backward pass and runs the stages nobody claims exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lightning_approx.errors import ConfigError
from lightning_approx.methods.base import STAGES, Method
from lightning_approx.ops.conv import conv2d_grad_input, conv2d_grad_weight
from lightning_approx.schedules import Progress

if TYPE_CHECKING:
    from lightning_approx.layers import LayerSite


class Pipeline:
    """Methods whose stages do not overlap, applied together.

    Args:
        methods: The methods; each stage may be claimed by at most one of them.

    Raises:
        ConfigError: Two methods claim the same stage (for example ``crs`` and
            ``bernoulli_crs`` both estimate the weight gradient), or the list is empty.
    """

    def __init__(self, methods: list[Method]) -> None:
        if not methods:
            raise ConfigError("method", methods, "no method given", "name at least one method, e.g. 'crs'")
        self.methods = list(methods)
        self.by_stage: dict[str, Method] = {}
        for method in self.methods:
            for stage in method.stages:
                other = self.by_stage.get(stage)
                if other is not None:
                    raise ConfigError(
                        "method", [m.name for m in self.methods],
                        f"{other.name!r} and {method.name!r} both replace the {stage} stage, so they cannot "
                        "be combined", "keep one of them, or combine methods that replace different stages "
                        f"(stages: {', '.join(STAGES)})")
                self.by_stage[stage] = method

    def update(self, progress: Progress) -> None:
        for method in self.methods:
            method.update(progress)

    @property
    def is_exact(self) -> bool:
        """Whether every method currently computes exact gradients, so the plain layer can run."""
        return all(m.is_exact for m in self.methods)

    @property
    def forward_method(self) -> Method | None:
        return self.by_stage.get("forward")

    def values(self) -> dict[str, float]:
        """Current hyperparameter values, keyed ``"<method>.<field>"``."""
        return {f"{m.name}.{k}": v for m in self.methods for k, v in m.values().items()}

    def to_config(self) -> list[dict]:
        return [m.to_config() for m in self.methods]

    def __repr__(self) -> str:
        return f"Pipeline({self.methods!r})"

    # --- backward ------------------------------------------------------------------------
    def conv2d_backward(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor,
                        needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        need_x, need_w, need_b = needs
        macs = site.geometry.macs(x.shape, weight, dy.shape)
        pruner = self.by_stage.get("grad_output")
        if pruner is not None:
            dy = pruner.conv2d_grad_output(site, dy)
        grad_x = grad_w = grad_b = None
        computed = 0
        if need_x:
            method = self.by_stage.get("grad_input")
            if method is None:
                grad_x, done = conv2d_grad_input(site.geometry, x, weight, dy), macs
            else:
                grad_x, done = method.conv2d_grad_input(site, x, weight, dy)
            computed += done
        if need_w:
            method = self.by_stage.get("grad_weight")
            if method is None:
                grad_w, done = conv2d_grad_weight(site.geometry, x, weight, dy), macs
            else:
                grad_w, done = method.conv2d_grad_weight(site, x, weight, dy)
            computed += done
        if need_b:
            grad_b = dy.sum((0, 2, 3))  # cheap: always exact
        site.work.add(exact=macs * (need_x + need_w), computed=computed)
        return grad_x, grad_w, grad_b

    def linear_backward(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor,
                        needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``x``: (N, in) and ``dy``: (N, out), leading dimensions already flattened."""
        need_x, need_w, need_b = needs
        macs = x.shape[0] * weight.shape[0] * weight.shape[1]
        pruner = self.by_stage.get("grad_output")
        if pruner is not None:
            dy = pruner.linear_grad_output(site, dy)
        grad_x = grad_w = grad_b = None
        computed = 0
        if need_x:
            method = self.by_stage.get("grad_input")
            if method is None:
                grad_x, done = dy.mm(weight), macs
            else:
                grad_x, done = method.linear_grad_input(site, x, weight, dy)
            computed += done
        if need_w:
            method = self.by_stage.get("grad_weight")
            if method is None:
                grad_w, done = dy.t().mm(x), macs
            else:
                grad_w, done = method.linear_grad_weight(site, x, weight, dy)
            computed += done
        if need_b:
            grad_b = dy.sum(0)
        site.work.add(exact=macs * (need_x + need_w), computed=computed)
        return grad_x, grad_w, grad_b
