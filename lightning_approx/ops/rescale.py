"""Kernel rescaling: the numeric core of :class:`~lightning_approx.KernelRescaling`.

The spatial scaling property of convolution: if an image is shown at ``s`` times its size, a
kernel that covers the same region of the scene, ``s`` times smaller, with the same total
weight, gives (approximately) the downscaled output::

    conv(resize(x, s), rescale(k, s)) ≈ resize(conv(x, k), s)

Here a kernel axis of ``n`` taps at scale ``s`` is a set of point weights at known positions,
measured in pixels of the full-resolution input, relative to the point the output pixel is
centred on (:class:`AxisGrid`). Rescaling moves every tap's weight onto the taps of the other
grid nearest to its position, with tent (linear) weights that sum to one, the tent as wide as
the coarser grid's spacing (:func:`resample_matrix`). So it

- preserves the weight sum of every tap (the response to a constant image) and, away from
  the edges of the grid, its centroid (the first moment);
- going down (coarser), splats the full-size kernel onto the smaller grid: bilinear
  "area" resampling, the weights summed rather than averaged (the area-ratio factor);
- going up (finer), interpolates the small kernel linearly onto the larger grid and divides
  by the area ratio, renormalised at the border so no weight falls off the kernel.

Sizes: an axis of ``K`` taps becomes the largest size of the same parity with
``n <= s (K - 1) + 1`` (:func:`rescaled_kernel_size`): every small-grid tap then lies inside
the full kernel's footprint, so the switch back to full size (the step that matters: it turns
the trained low-resolution network into the full-resolution one) loses no weight. 7x7 at
``s = 0.5`` becomes 3x3, 11x11 becomes 5x5.

Strides are kept: a rescaled conv's output is the downscaled version of its full-size output,
and every layer after it runs at ``s`` times the resolution. Padding is chosen so the kernel
stays centred where the downscaled output pixel is (:func:`rescaled_axis`); what integer
padding cannot express (a fraction of a pixel, from strides > 1) goes into the tap positions,
so the resampled weights carry the sub-pixel shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RESIZE_MODES", "AxisGrid", "ConvAxis", "resample_kernel", "resample_matrix", "rescaled_axis",
           "rescaled_kernel_size", "resize_images", "scaled_size"]

RESIZE_MODES = ("bilinear", "bicubic", "area")
_EPS = 1e-9


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class AxisGrid:
    """The taps of one kernel axis: ``size`` taps, ``1 / scale`` full-resolution pixels apart,
    centred ``shift`` (in pixels of this grid) before the output pixel's centre.

    Attributes:
        size: Number of taps.
        scale: Resolution relative to the full-size image (1.0 for the full-size kernel).
        shift: Sub-pixel offset the integer padding could not express, in this grid's pixels.
    """

    size: int
    scale: float
    shift: float = 0.0

    def positions(self) -> list[float]:
        """Tap positions in full-resolution pixels, relative to the output pixel's centre."""
        centre = (self.size - 1) / 2
        return [(j - centre - self.shift) / self.scale for j in range(self.size)]


@dataclass(frozen=True)
class ConvAxis:
    """One spatial axis of a conv at full resolution (dilation 1).

    Attributes:
        kernel: Taps.
        stride: Stride (kept at every scale).
        padding: Zero padding before the first input pixel.
    """

    kernel: int
    stride: int
    padding: int

    def at(self, scale: float) -> tuple[int, int, AxisGrid]:
        """``(kernel, padding, grid)`` of this axis at ``scale`` (see :func:`rescaled_axis`)."""
        return rescaled_axis(self.kernel, self.stride, self.padding, scale)


def rescaled_kernel_size(kernel: int, scale: float) -> int:
    """Taps of a ``kernel``-tap axis at ``scale``: the largest size of the same parity as
    ``kernel`` with ``size <= scale * (kernel - 1) + 1`` (at least 1, or 2 for even kernels).

    Examples: 7 at 0.5 -> 3, 11 at 0.5 -> 5, 7 at 0.75 -> 5, 5 at 0.5 -> 3, 1 -> 1.
    """
    if kernel <= 1 or scale >= 1.0:
        return kernel
    size = math.floor(scale * (kernel - 1) + 1 + _EPS)
    if (size - kernel) % 2:
        size -= 1
    return max(size, 2 - kernel % 2)


def rescaled_axis(kernel: int, stride: int, padding: int, scale: float) -> tuple[int, int, AxisGrid]:
    """Kernel size, padding and tap grid of one conv axis at ``scale``.

    The stride is kept. At full resolution output pixel ``o`` is centred on input position
    ``o * stride + c`` with ``c = (kernel - 1) / 2 - padding``. With inputs and outputs both
    resized by ``s`` (pixel centres aligned, as ``F.interpolate(align_corners=False)`` does),
    the same point of the scene lies at ``o * stride + c_s`` of the small input, with

        c_s = s * c + (stride - 1) * (1 - s) / 2

    The padding is the integer that centres the small kernel closest to ``c_s``; the rest of
    ``c_s`` becomes the grid's ``shift``.

    Args:
        kernel: Taps at full resolution.
        stride: Stride.
        padding: Padding at full resolution.
        scale: Resolution of the input relative to full size, in (0, 1].

    Returns:
        ``(size, padding, grid)`` at ``scale``; ``(kernel, padding, AxisGrid(kernel, 1.0))``
        at scale 1.
    """
    if scale >= 1.0:
        return kernel, padding, AxisGrid(kernel, 1.0, 0.0)
    size = rescaled_kernel_size(kernel, scale)
    centre = scale * ((kernel - 1) / 2 - padding) + (stride - 1) * (1 - scale) / 2
    pad = max(0, _round_half_up((size - 1) / 2 - centre))
    shift = centre - ((size - 1) / 2 - pad)
    return size, pad, AxisGrid(size, scale, shift)


def resample_matrix(src: AxisGrid, dst: AxisGrid) -> Tensor:
    """The linear map from the taps of ``src`` to those of ``dst``, float64 ``(dst.size, src.size)``.

    Column ``j`` spreads tap ``j``'s weight over the ``dst`` taps within one tent width of its
    position (the tent as wide as the coarser grid's spacing), weights normalised to sum to
    one; a tap farther than that from every ``dst`` tap goes whole to the nearest one. Every
    column sums to one, so the kernel's total weight is preserved exactly.
    """
    src_pos = torch.tensor(src.positions(), dtype=torch.float64)
    dst_pos = torch.tensor(dst.positions(), dtype=torch.float64)
    width = max(1.0 / src.scale, 1.0 / dst.scale)
    distance = (dst_pos[:, None] - src_pos[None, :]).abs()
    tent = (1.0 - distance / width).clamp_min(0.0)
    total = tent.sum(0, keepdim=True)
    nearest = torch.zeros_like(tent)
    nearest[distance.argmin(0), torch.arange(src.size)] = 1.0
    return torch.where(total > _EPS, tent / total.clamp_min(_EPS), nearest)


def resample_kernel(weight: Tensor, src: tuple[AxisGrid, AxisGrid], dst: tuple[AxisGrid, AxisGrid]) -> Tensor:
    """A conv weight (or a tensor shaped like one) moved from grids ``src`` to grids ``dst``.

    Args:
        weight: ``(C_out, C_in / groups, kh, kw)`` with ``(kh, kw) == (src[0].size, src[1].size)``.
        src: The (height, width) grids ``weight`` is on.
        dst: The (height, width) grids to move it to.

    Returns:
        A new tensor ``(C_out, C_in / groups, dst[0].size, dst[1].size)`` with ``weight``'s
        dtype, device and memory format (computed in float64 on the CPU-side matrices).
    """
    if tuple(weight.shape[-2:]) != (src[0].size, src[1].size):
        raise ValueError(f"resample_kernel: weight {tuple(weight.shape)} is not on grids of "
                         f"{src[0].size}x{src[1].size} taps")
    mh = resample_matrix(src[0], dst[0]).to(weight.device)
    mw = resample_matrix(src[1], dst[1]).to(weight.device)
    out = torch.einsum("ih,ochw,jw->ocij", mh, weight.detach().double(), mw).to(weight.dtype)
    channels_last = weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(
        memory_format=torch.channels_last)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The image size at ``scale``: each side rounded half up, at least 1."""
    return max(1, _round_half_up(height * scale)), max(1, _round_half_up(width * scale))


def resize_images(x: Tensor, scale: float, mode: str = "bilinear") -> Tensor:
    """Resizes a batch ``(N, C, H, W)`` by ``scale`` (pixel centres aligned).

    Args:
        x: Floating-point images.
        scale: Factor in (0, 1]; 1 returns ``x`` itself.
        mode: ``"bilinear"`` or ``"bicubic"`` (both antialiased, like PIL's resize) or
            ``"area"`` (box average).

    Returns:
        The resized batch, same dtype and device.
    """
    if scale >= 1.0:
        return x
    size = scaled_size(x.shape[-2], x.shape[-1], scale)
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
