"""Zero patterns of ReLU outputs, and the live slices of a layer input the backward must touch.

A tensor that comes straight out of a ReLU is zero exactly where the ReLU's backward
multiplies the incoming gradient by zero. So for a Conv2d / Linear whose input ``x`` is a
ReLU output, two parts of its backward are zero by construction:

- the input gradient ``dL/dx`` is discarded wherever ``x == 0`` (the ReLU masks it);
- the weight gradient ``dL/dW`` receives nothing from the entries ``x == 0`` (those products
  multiply by zero).

Dense kernels cannot skip single zeros, but they can skip whole slices: an input channel that
is zero over the whole batch, and a sample whose input is zero everywhere. This module finds
those slices (:func:`find_live`), gathers the live part of the tensors and scatters results
back into zero-filled full-size gradients (:class:`LiveSlices`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_approx.ops.layout import is_channels_last

__all__ = ["LiveSlices", "find_live", "is_relu_output", "plane_nonzeros"]


def is_relu_output(x: Tensor) -> bool:
    """Whether ``x`` was produced by an op whose backward zeroes the gradient wherever ``x == 0``.

    Accepted autograd nodes:

    - ``ReluBackward*`` (``nn.ReLU``, ``F.relu``, ``torch.relu_``): the backward keeps the
      gradient where the result is > 0;
    - ``ThresholdBackward*`` with ``threshold >= 0`` (``nn.Threshold``): the output is zero
      only where the input was <= threshold, where the gradient is zeroed;
    - ``HardtanhBackward*`` with ``min_val >= 0`` (``nn.ReLU6`` is ``hardtanh(x, 0, 6)``).

    Not accepted, on purpose: ``LeakyReluBackward`` (its name contains "Relu", but a zero
    output at ``x == 0`` gets the slope, not zero), and anything between the ReLU and the
    layer (pooling, dropout, padding), because then ``x`` is no longer the ReLU's result.
    """
    node = x.grad_fn
    if node is None:
        return False
    name = type(node).__name__
    if name.startswith("ReluBackward"):
        return True
    if name.startswith("ThresholdBackward"):
        threshold = getattr(node, "_saved_threshold", None)
        return threshold is not None and float(threshold) >= 0
    if name.startswith("HardtanhBackward"):
        low = getattr(node, "_saved_min_val", None)
        return low is not None and float(low) >= 0
    return False


@dataclass
class LiveSlices:
    """The slices of a layer input ``x`` (shape ``(N, C, ...)``) that carry non-zeros.

    Attributes:
        samples: Indices of the samples (dim 0) with a non-zero entry; ``None`` when all are
            kept (nothing dead, or restriction disabled).
        channels: Indices of the channels (dim 1; input features for Linear) with a non-zero
            entry in some sample; ``None`` when all are kept.
        n: Samples of ``x``.
        c: Channels of ``x``.
        n_live: Samples kept (``n`` when ``samples`` is ``None``).
        c_live: Channels kept.
        elements: Entries of ``x``.
        zero_elements: Entries of ``x`` equal to zero.
        planes: ``n * c`` (sample, channel) planes.
        dead_planes: Planes that are zero everywhere (not skippable by a dense kernel unless
            the whole channel or the whole sample is dead; reported to size the potential).
        dead_channels: Channels zero over the whole batch.
        dead_samples: Samples zero over every channel.
    """

    samples: Tensor | None
    channels: Tensor | None
    n: int
    c: int
    n_live: int
    c_live: int
    elements: int
    zero_elements: int
    planes: int
    dead_planes: int
    dead_channels: int
    dead_samples: int

    @property
    def zero_fraction(self) -> float:
        """Fraction of the entries of ``x`` that are zero (element level)."""
        return self.zero_elements / self.elements if self.elements else 0.0

    @property
    def kept_fraction(self) -> float:
        """Fraction of the (sample, channel) planes the restricted products still run on."""
        return (self.n_live * self.c_live) / self.planes if self.planes else 1.0

    @property
    def restricts(self) -> bool:
        """Whether any slice is skipped."""
        return self.samples is not None or self.channels is not None

    @property
    def empty(self) -> bool:
        """Whether nothing is live: every gradient this input touches is zero."""
        return self.n_live == 0 or self.c_live == 0

    def restrict_input(self, x: Tensor) -> Tensor:
        """``x[samples][:, channels]`` (a gather; unchanged dims are not copied)."""
        if self.samples is not None:
            x = x.index_select(0, self.samples)
        if self.channels is not None:
            x = x.index_select(1, self.channels)
        return x

    def restrict_weight(self, weight: Tensor) -> Tensor:
        """The weight's input-channel columns (dim 1) of the live channels."""
        return weight if self.channels is None else weight.index_select(1, self.channels)

    def restrict_grad_output(self, dy: Tensor) -> Tensor:
        """The rows (dim 0) of ``dy`` of the live samples."""
        return dy if self.samples is None else dy.index_select(0, self.samples)

    def expand_input(self, grad: Tensor, shape: torch.Size) -> Tensor:
        """Scatters a gradient of the restricted input into a zero-filled tensor of ``shape``.

        The zeros are exact for the network: they sit where the ReLU's backward multiplies
        by zero anyway.
        """
        if self.channels is not None:
            full = grad.new_zeros((grad.shape[0], shape[1], *grad.shape[2:]))
            grad = full.index_copy_(1, self.channels, grad)
        if self.samples is not None:
            full = grad.new_zeros(shape)
            grad = full.index_copy_(0, self.samples, grad)
        return grad

    def expand_weight(self, grad: Tensor, shape: torch.Size) -> Tensor:
        """Scatters a weight gradient over the live channels into zeros of ``shape``; the dead
        channels' columns are exactly zero (every product there multiplies by zero)."""
        if self.channels is None:
            return grad
        return grad.new_zeros(shape).index_copy_(1, self.channels, grad)


def plane_nonzeros(x: Tensor) -> Tensor:
    """Non-zero entries of each (sample, channel) plane of ``x`` (``(N, C, ...)``), as ``(N, C)`` int64.

    ``ceil(min(|x|, 1))`` is 1 for every non-zero (denormals included) and 0 for zeros;
    summed over a contiguous view it is several times faster on CPU than ``count_nonzero``
    or ``(x != 0).sum`` (which build a bool tensor first). The sum runs in at least float32,
    exact for planes below 2**24 entries. A NaN propagates to its plane's sum, and such a
    plane is counted as full, so it stays live and its NaN reaches the gradients as in the
    dense backward.
    """
    n, c = x.shape[0], x.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    if is_channels_last(x):
        planes = x.permute(0, 2, 3, 1).reshape(n, -1, c)  # (N, H*W, C) view: no copy to NCHW
        counts = planes.abs().clamp_max_(1).ceil_().sum(1, dtype=acc)
    else:
        counts = x.reshape(n * c, -1).abs().clamp_max_(1).ceil_().sum(1, dtype=acc).view(n, c)
    plane = x[0, 0].numel() if n and c else 0
    return counts.nan_to_num_(nan=float(plane)).long()


def find_live(x: Tensor, restrict: bool = True) -> LiveSlices:
    """Counts the zeros of ``x`` (``(N, C, ...)``) and finds its live samples and channels.

    One pass over ``x`` (:func:`plane_nonzeros`) and one small device-to-host copy of
    the ``(N, C)`` counts: the gather needs the live counts as Python ints to shape its
    output, so on a GPU this is one synchronisation per layer backward.

    Args:
        x: The layer input; dim 0 samples, dim 1 channels (features for Linear).
        restrict: Whether skipped slices may be reported (``False``: count only, e.g. for
            grouped convolutions whose channel structure must stay intact).

    Returns:
        The live slices and the zero statistics.
    """
    n, c = x.shape[0], x.shape[1]
    per_plane = plane_nonzeros(x).cpu()  # (N, C)
    plane_live = per_plane > 0
    sample_live = plane_live.any(1)
    channel_live = plane_live.any(0)
    n_live, c_live = int(sample_live.sum()), int(channel_live.sum())
    samples = channels = None
    if restrict and n_live < n:
        samples = sample_live.nonzero().flatten().to(x.device)
    if restrict and c_live < c:
        channels = channel_live.nonzero().flatten().to(x.device)
    return LiveSlices(
        samples=samples, channels=channels, n=n, c=c,
        n_live=n_live if samples is not None else n, c_live=c_live if channels is not None else c,
        elements=x.numel(), zero_elements=x.numel() - int(per_plane.sum()), planes=n * c,
        dead_planes=int((~plane_live).sum()), dead_channels=c - c_live, dead_samples=n - n_live)
