"""``relu_mask``: skip the parts of the backward a ReLU's zero pattern makes zero (exact).

After Sarma et al., *Exploiting Activation based Gradient Output Sparsity to Accelerate
Backpropagation in CNNs* (arXiv:2109.07710, 2021), on dense kernels: where a Conv2d / Linear
input ``x`` came straight from a ReLU, the backward's input gradient is discarded wherever
``x == 0`` and the weight gradient gets nothing from those entries. Dense kernels can skip
whole slices only, so this method skips the input
channels that are zero across the whole batch and the samples that are zero everywhere: the
products run on the gathered live part and the results are scattered back into zero-filled
gradients. The parameter gradients (and every gradient upstream of the ReLU) equal the dense
ones.

It claims the ``"input_mask"`` stage: it never computes a product itself, it tells the
:class:`~lightning_approx.methods.pipeline.Pipeline` which slices are live, and the
pipeline runs the ``grad_input`` / ``grad_weight`` estimators (exact, or e.g. ``crs``) on the
restricted tensors. So it composes with any backward method: ``relu_mask + crs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from lightning_approx.kernels import ops as kops
from lightning_approx.methods.base import Method
from lightning_approx.methods.registry import register
from lightning_approx.ops.accounting import recomputing
from lightning_approx.ops.mask import LiveSlices, is_relu_output

if TYPE_CHECKING:
    from lightning_approx.layers import LayerSite


@dataclass
class MaskStats:
    """Zero statistics of one layer's inputs, summed over its training forwards (each found
    when the forward ran) since the last :meth:`ReluMask.reset_stats`.

    Attributes:
        calls: Training forwards counted.
        elements: Input entries seen.
        zero_elements: Of those, entries equal to zero (their backward work is zero).
        planes: (sample, channel) planes seen (for Linear: single entries).
        dead_planes: Planes zero everywhere.
        channels: Input channels seen (one per channel per call).
        dead_channels: Channels zero over the whole batch (skipped when restriction is on).
        samples: Samples seen.
        dead_samples: Samples zero over every channel (skipped when restriction is on).
    """

    calls: int = 0
    elements: int = 0
    zero_elements: int = 0
    planes: int = 0
    dead_planes: int = 0
    channels: int = 0
    dead_channels: int = 0
    samples: int = 0
    dead_samples: int = 0

    def add(self, live: LiveSlices) -> None:
        self.calls += 1
        self.elements += live.elements
        self.zero_elements += live.zero_elements
        self.planes += live.planes
        self.dead_planes += live.dead_planes
        self.channels += live.c
        self.dead_channels += live.dead_channels
        self.samples += live.n
        self.dead_samples += live.dead_samples

    def fractions(self) -> dict[str, float]:
        """Zero entries, dead planes, dead channels and dead samples, each as a fraction."""
        def ratio(a: int, b: int) -> float:
            return a / b if b else 0.0

        return {"zero_elements": ratio(self.zero_elements, self.elements),
                "dead_planes": ratio(self.dead_planes, self.planes),
                "dead_channels": ratio(self.dead_channels, self.channels),
                "dead_samples": ratio(self.dead_samples, self.samples)}


@register
class ReluMask(Method):
    """Exact backward that skips the input channels and samples a ReLU zeroed.

    No hyperparameters: it is exact at every setting (``always_exact``). Layers whose input
    did not come straight from a ReLU (see :func:`~lightning_approx.ops.mask.is_relu_output`)
    run unchanged; grouped convolutions are only counted (gathering channels would break
    their group structure).

    The callback logs :meth:`metrics` every step as ``approx/relu_mask.<fraction>``.

    Attributes:
        stats: Per-layer zero statistics (:class:`MaskStats`), keyed by the layer's name;
            only layers whose input is a ReLU output appear. Cumulative until
            :meth:`reset_stats`.
    """

    name = "relu_mask"
    stages = frozenset({"input_mask"})
    unbiased = True  # exact, so trivially unbiased
    always_exact: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, MaskStats] = {}
        self._window = MaskStats()  # all layers since reset_metrics (one training step)

    def reset_stats(self) -> None:
        """Clears the per-layer :attr:`stats` (the callback never does; they span the fit)."""
        self.stats.clear()

    def metrics(self) -> dict[str, float]:
        """Fractions over all masked layers since :meth:`reset_metrics`: zero entries, dead
        (sample, channel) planes, dead channels and dead samples of their inputs."""
        return self._window.fractions() if self._window.calls else {}

    def reset_metrics(self) -> None:
        self._window = MaskStats()

    def _record(self, site: LayerSite, live: LiveSlices) -> None:
        if recomputing():  # activation checkpointing re-runs the forward: counted once
            return
        self.stats.setdefault(site.name, MaskStats()).add(live)
        self._window.add(live)

    # Why is_exact stays False (the base class's answer for a method without hyperparameters):
    # the pipeline reads is_exact as "the plain layer may run instead", which would skip nothing.
    # Where nothing can be skipped the layer does run the plain op (Pipeline.runs_plain).

    def conv2d_live(self, site: LayerSite, x: Tensor) -> LiveSlices | None:
        """The live slices of a conv input, recorded in :attr:`stats`; ``None`` when its zeros
        mean nothing (not a ReLU output).

        Called in the layer's forward, where ``x.grad_fn`` still tells where ``x`` came from, and
        early enough for the layer to run the plain op when nothing can be skipped
        (:meth:`~lightning_approx.methods.pipeline.Pipeline.runs_plain`).
        """
        if not is_relu_output(x):
            return None
        # Grouped convs: a gathered channel subset no longer splits into equal groups. Detached:
        # the count is no part of the graph, and autograd would otherwise record every op of it.
        live = kops.find_live(x.detach(), restrict=site.geometry.groups == 1)
        self._record(site, live)
        return live

    def linear_live(self, site: LayerSite, x: Tensor) -> LiveSlices | None:
        """As :meth:`conv2d_live` for a Linear input ``(..., in)``, over its ``(N, in)`` rows:
        dead features are input columns zero in every row, dead samples all-zero rows."""
        if not is_relu_output(x):
            return None
        live = kops.find_live(x.detach().reshape(-1, x.shape[-1]))
        self._record(site, live)
        return live
