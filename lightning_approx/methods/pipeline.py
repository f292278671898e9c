"""Composes methods into one backward pass and runs the stages nobody claims exactly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from lightning_approx.errors import ConfigError
from lightning_approx.methods.base import STAGES, Method
from lightning_approx.ops.conv import conv2d_grad_input, conv2d_grad_weight, conv2d_grads
from lightning_approx.ops.fidelity import fidelity
from lightning_approx.schedules import Progress

if TYPE_CHECKING:
    from lightning_approx.layers import LayerSite
    from lightning_approx.ops.mask import LiveSlices

# A modifier stage: the method claiming it says which slices of the layer input are live, and
# the pipeline runs the grad_input / grad_weight stages on those slices only (relu_mask).
INPUT_MASK = "input_mask"
_PRODUCTS = frozenset({"grad_input", "grad_weight"})  # the stages Method.replaces speaks for


class Pipeline:
    """Methods whose stages do not overlap, applied together.

    Args:
        methods: The methods; each stage may be claimed by at most one of them.

    Stages run in this order in a layer's backward: ``grad_output`` (transform dy), then
    ``input_mask`` (restrict x, W and dy to the live slices of x), then ``grad_input`` and
    ``grad_weight`` on the restricted tensors. A method claiming ``forward`` replaces the
    whole op and composes with nothing.

    Raises:
        ConfigError: ``methods`` is not a list of :class:`Method` objects or is empty, two
            methods claim the same stage (for example ``crs`` and ``bernoulli_crs`` both
            estimate the weight gradient), a ``forward`` method is combined with any other
            method, or a method refuses another (``batch_crs`` with ``relu_mask``).
    """

    def __init__(self, methods: list[Method]) -> None:
        if isinstance(methods, (str, Method)) or not isinstance(methods, Sequence):
            raise ConfigError("method", methods, "Pipeline takes a list of Method objects",
                              "give e.g. Pipeline([CRS()]), or build it from names and mappings with "
                              "lightning_approx.surgery.make_pipeline('crs')")
        if not methods:
            raise ConfigError("method", methods, "no method given", "name at least one method, e.g. 'crs'")
        for i, method in enumerate(methods):
            if not isinstance(method, Method):
                raise ConfigError(f"method[{i}]", method, "is not a Method object",
                                  f"build it with lightning_approx.methods.build_method({method!r}), or pass the "
                                  "whole list to lightning_approx.surgery.make_pipeline")
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
        forward = self.by_stage.get("forward")
        others = [m for m in self.methods if m is not forward]
        if forward is not None and others:
            # The forward method runs its own (smaller) op and autograd differentiates that op,
            # so the backward stages of any other method would silently never run.
            replaced = ", ".join(f"{m.name!r} ({'/'.join(sorted(m.stages))})" for m in others)
            raise ConfigError(
                "method", [m.name for m in self.methods],
                f"{forward.name!r} replaces the whole training op of each layer (its backward is autograd's "
                f"on the sampled op), so {replaced} would never run",
                f"use {forward.name!r} alone, or drop it and combine methods that change the backward only "
                "(e.g. relu_mask + crs)")
        for method in self.methods:
            # A method that refuses some partners (batch_crs next to an input mask) says so now,
            # when the callback is built, rather than when fit patches the model.
            check = getattr(method, "check_pipeline", None)
            if check is not None:
                check(self)

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
    # Stage order: the grad_output transform (e.g. grad_prune) first, so the bias gradient and
    # both products see the transformed dy; then the input mask (relu_mask) restricts x, W and
    # dy to the live slices it found in the forward; then the grad_input / grad_weight
    # estimators (exact where no method claims them) run on the restricted tensors, and the
    # mask scatters their results back.
    def conv2d_live(self, site: LayerSite, x: Tensor) -> LiveSlices | None:
        """The live slices of a conv input ``x`` by the ``input_mask`` method, found in the
        layer's forward: ``x.grad_fn`` tells only there whether ``x`` is a ReLU output, and the
        layer can still choose the plain op (:meth:`runs_plain`). ``None`` without such a method
        or when ``x``'s zeros mean nothing."""
        masker = self.by_stage.get(INPUT_MASK)
        return None if masker is None else masker.conv2d_live(site, x)

    def linear_live(self, site: LayerSite, x: Tensor) -> LiveSlices | None:
        """As :meth:`conv2d_live` for a Linear input ``(..., in)``; the slices index the rows of
        its ``(N, in)`` view."""
        masker = self.by_stage.get(INPUT_MASK)
        return None if masker is None else masker.linear_live(site, x)

    def runs_plain(self, site: LayerSite, live: LiveSlices | None, weight: Tensor) -> bool:
        """Whether the plain layer's own backward is this pipeline's backward for this forward:
        no fidelity probe is due, an input mask (if any) found nothing to skip, and every other
        method is at an exact setting (e.g. ``relu_mask+crs`` while crs's schedule is at 1.0) or
        computes none of its products at this layer (``patch_grad`` on the layers it leaves
        exact). The layer then runs the plain op, which skips the custom op's overhead."""
        if site.probe or (live is not None and live.restricts):
            return False
        masker = self.by_stage.get(INPUT_MASK)
        return all(m is masker or m.is_exact or (m.stages <= _PRODUCTS and not m.replaces(site, weight))
                   for m in self.methods)

    def conv2d_backward(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor,
                        needs: tuple[bool, bool, bool], live: LiveSlices | None = None
                        ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The three gradients of a conv; ``live`` comes from :meth:`conv2d_live`."""
        return self._backward(_CONV2D, site, x, weight, dy, needs, live)

    def linear_backward(self, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor,
                        needs: tuple[bool, bool, bool], live: LiveSlices | None = None
                        ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``x``: (N, in) and ``dy``: (N, out), leading dimensions already flattened; ``live``
        comes from :meth:`linear_live`."""
        return self._backward(_LINEAR, site, x, weight, dy, needs, live)

    def _backward(self, op: _Op, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor,
                  needs: tuple[bool, bool, bool], live: LiveSlices | None
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        need_x, need_w, need_b = needs
        macs = op.macs(site, x, weight, dy)
        dy_exact = dy
        pruner = self.by_stage.get("grad_output")
        pruned_zeros = 0.0
        if pruner is not None:
            dy = getattr(pruner, f"{op.name}_grad_output")(site, dy)
            pruned_zeros = getattr(pruner, "last_zero_fraction", 0.0)
        grad_b = dy.sum(op.bias_dims) if need_b else None  # cheap: always exact
        parts = need_x + need_w

        def products(x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor | None, Tensor | None, int]:
            return self._products(op, site, x, weight, dy, need_x, need_w)

        grad_x, grad_w, computed = _on_live(live, x, weight, dy, need_x, need_w, products)
        site.work.add(exact=macs * parts, computed=computed, zero=_zero_macs(live, pruned_zeros, macs) * parts)
        if site.probe:
            _record_fidelity(site, grad_x, grad_w, lambda: op.grad_input(site, x, weight, dy_exact),
                             lambda: op.grad_weight(site, x, weight, dy_exact))
        return grad_x, grad_w, grad_b

    def _products(self, op: _Op, site: LayerSite, x: Tensor, weight: Tensor, dy: Tensor, need_x: bool,
                  need_w: bool) -> tuple[Tensor | None, Tensor | None, int]:
        """The two products, each by the method claiming its stage or exactly."""
        macs = op.macs(site, x, weight, dy)  # of the (possibly restricted) tensors
        # The stages a method computes at this layer; the others run exactly.
        claimed = {stage: m for stage in ("grad_input", "grad_weight")
                   if (m := self.by_stage.get(stage)) is not None and m.replaces(site, weight)}
        if need_x and need_w and not claimed:
            # Both products exact: one fused call (oneDNN's fused conv backward beats the two halves).
            grad_x, grad_w = op.grad_both(site, x, weight, dy)
            return grad_x, grad_w, 2 * macs
        both = claimed.get("grad_input")
        fused = getattr(both, f"{op.name}_grads", None)
        if need_x and need_w and fused is not None and both is claimed.get("grad_weight"):
            return fused(site, x, weight, dy)  # one method computes both products in one call
        grads: list[Tensor | None] = [None, None]
        computed = 0
        for i, (needed, stage, exact) in enumerate(((need_x, "grad_input", op.grad_input),
                                                    (need_w, "grad_weight", op.grad_weight))):
            if not needed:
                continue
            method = claimed.get(stage)
            if method is None:
                grads[i], done = exact(site, x, weight, dy), macs
            else:
                grads[i], done = getattr(method, f"{op.name}_{stage}")(site, x, weight, dy)
            computed += done
        return grads[0], grads[1], computed


@dataclass(frozen=True)
class _Op:
    """What differs between the Conv2d and the Linear backward."""

    name: str  # prefix of the method hooks: conv2d_grad_input, linear_live, ...
    macs: Callable[[LayerSite, Tensor, Tensor, Tensor], int]
    grad_input: Callable[[LayerSite, Tensor, Tensor, Tensor], Tensor]
    grad_weight: Callable[[LayerSite, Tensor, Tensor, Tensor], Tensor]
    grad_both: Callable[[LayerSite, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    bias_dims: tuple[int, ...]


_CONV2D = _Op("conv2d", lambda site, x, w, dy: site.geometry.macs(x.shape, w, dy.shape),
              lambda site, x, w, dy: conv2d_grad_input(site.geometry, x, w, dy),
              lambda site, x, w, dy: conv2d_grad_weight(site.geometry, x, w, dy),
              lambda site, x, w, dy: conv2d_grads(site.geometry, x, w, dy), (0, 2, 3))
_LINEAR = _Op("linear", lambda site, x, w, dy: x.shape[0] * w.numel(), lambda site, x, w, dy: dy.mm(w),
              lambda site, x, w, dy: dy.t().mm(x), lambda site, x, w, dy: (dy.mm(w), dy.t().mm(x)), (0,))


def _record_fidelity(site: LayerSite, grad_x: Tensor | None, grad_w: Tensor | None,
                     exact_x: Callable[[], Tensor], exact_w: Callable[[], Tensor]) -> None:
    """Compares the gradients just computed with exact ones of the same dy (probe steps)."""
    site.fidelity = {}
    for part, grad, exact in (("input", grad_x, exact_x), ("weight", grad_w, exact_w)):
        if grad is not None:
            site.fidelity.update({f"{part}.{k}": v for k, v in fidelity(grad, exact()).items()})
    site.probe = False


_Products = Callable[[Tensor, Tensor, Tensor], tuple[Tensor | None, Tensor | None, int]]


def _on_live(live: LiveSlices | None, x: Tensor, weight: Tensor, dy: Tensor, need_x: bool, need_w: bool,
             products: _Products) -> tuple[Tensor | None, Tensor | None, int]:
    """Runs ``products`` on the live slices of ``x`` (and the matching weight columns and dy
    rows) and scatters the gradients back; on the full tensors when nothing is skipped."""
    if live is None or not live.restricts:
        return products(x, weight, dy)
    if live.empty:  # the input is zero everywhere: both gradients are zero, nothing to run
        grad_x = x.new_zeros(x.shape) if need_x else None
        grad_w = weight.new_zeros(weight.shape) if need_w else None
        return grad_x, grad_w, 0
    grad_x, grad_w, computed = products(live.restrict_input(x), live.restrict_weight(weight),
                                        live.restrict_grad_output(dy))
    if grad_x is not None:
        grad_x = live.expand_input(grad_x, x.shape)
    if grad_w is not None:
        grad_w = live.expand_weight(grad_w, weight.shape)
    return grad_x, grad_w, computed


def _zero_macs(live: LiveSlices | None, pruned_zeros: float, macs: int) -> int:
    """MACs of one backward product that multiply zeros known before it runs.

    Every entry of x (or of dy) takes part in about the same number of MACs of either product
    (exactly for 1x1 stride-1 convs and Linear, up to border effects otherwise), so a tensor's
    zero fraction is its share of the MACs: zeros of a ReLU input (weight-gradient terms, and
    input-gradient entries the ReLU discards) and zeros of a pruned dy. Where both apply, the
    larger share is counted (their zeros overlap; counting both could exceed the total).
    """
    masked = 0.0 if live is None else live.zero_fraction
    return round(macs * max(masked, pruned_zeros))
