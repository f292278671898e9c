"""Conv2d geometry and the exact halves of its backward pass.

The approximate backwards call these on smaller tensors (a subset of samples or of output
channels), so the saved work is real: the kernels run on fewer rows, not on zero-filled
full-size tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_approx.ops.layout import is_channels_last

_aten = torch.ops.aten


@dataclass(frozen=True)
class ConvGeometry:
    """The hyperparameters of a 2-d convolution with integer padding.

    String paddings ("same", "valid") and padding modes other than zeros are turned into an
    explicit :func:`torch.nn.functional.pad` of the input plus an integer padding, because
    ``convolution_backward`` takes integer padding only.
    """

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pre_pad: tuple[int, int, int, int] | None = None  # (left, right, top, bottom) for F.pad
    pad_mode: str = "constant"

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        kh, kw = conv.kernel_size
        dilation = tuple(conv.dilation)
        pre_pad = None
        pad_mode = "constant"
        if conv.padding == "valid":
            padding = (0, 0)
        elif conv.padding == "same":
            total = [dilation[0] * (kh - 1), dilation[1] * (kw - 1)]
            padding = (total[0] // 2, total[1] // 2)
            extra_h, extra_w = total[0] % 2, total[1] % 2
            if extra_h or extra_w:  # asymmetric: put the odd pixel on the bottom/right, as torch does
                pre_pad = (0, extra_w, 0, extra_h)
        else:
            padding = tuple(conv.padding)
        if conv.padding_mode != "zeros":
            # Non-zero padding modes pad the input explicitly, as nn.Conv2d itself does.
            ph, pw = padding
            pre_pad = (pw + (pre_pad[0] if pre_pad else 0), pw + (pre_pad[1] if pre_pad else 0),
                       ph + (pre_pad[2] if pre_pad else 0), ph + (pre_pad[3] if pre_pad else 0))
            pad_mode = conv.padding_mode
            padding = (0, 0)
        return cls(tuple(conv.stride), padding, dilation, conv.groups, pre_pad, pad_mode)

    def prepare_input(self, x: Tensor) -> Tensor:
        """Applies the explicit pre-padding (autograd handles its backward exactly)."""
        if self.pre_pad is None:
            return x
        return F.pad(x, self.pre_pad, mode=self.pad_mode)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The convolution of an already pre-padded input."""
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def macs(self, x_shape: torch.Size, weight: Tensor, y_shape: torch.Size) -> int:
        """Multiply-accumulates of the forward pass (each half of the backward costs the same)."""
        n, _, ho, wo = y_shape
        cout, cin_g, kh, kw = weight.shape
        return n * cout * ho * wo * cin_g * kh * kw


def _backward(geom: ConvGeometry, x: Tensor, weight: Tensor, dy: Tensor,
              mask: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    return _aten.convolution_backward(
        dy, x, weight, None, geom.stride, geom.padding, geom.dilation, False, (0, 0), geom.groups, mask)


def conv2d_grad_input(geom: ConvGeometry, x: Tensor, weight: Tensor, dy: Tensor) -> Tensor:
    """dL/dx of a conv; ``weight`` and ``dy`` may hold a subset of the output channels."""
    return _backward(geom, x, weight, dy, (True, False, False))[0]


def conv2d_grad_weight(geom: ConvGeometry, x: Tensor, weight: Tensor, dy: Tensor) -> Tensor:
    """dL/dW of a conv; ``x`` and ``dy`` may hold a subset of the batch."""
    return _backward(geom, x, weight, dy, (False, True, False))[1]


def conv2d_grads(geom: ConvGeometry, x: Tensor, weight: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """dL/dx and dL/dW of a conv from one fused call (cheaper than the two halves on CPU)."""
    grad_x, grad_w, _ = _backward(geom, x, weight, dy, (True, True, False))
    return grad_x, grad_w


def conv2d_grad_weight_on_grid(geom: ConvGeometry, x: Tensor, weight: Tensor, dy: Tensor,
                               step: tuple[int, int], offset: tuple[int, int]) -> Tensor:
    """dL/dW of a conv from the output pixels ``(offset + step * (i, j))`` only: a strided sub-grid
    of ``dy``, in every sample.

    The sub-grid is itself a conv with stride ``step * stride``, over ``x`` shifted by ``offset *
    stride`` pixels. Torch pads symmetrically, so ``x`` is padded (or cropped) explicitly: one copy of
    ``x``, after which the product runs on ``1 / (step_h * step_w)`` of the output pixels.
    """
    (sh, sw), (a, b) = step, offset
    (st_h, st_w), (p_h, p_w) = geom.stride, geom.padding
    dy_grid = dy[:, :, a::sh, b::sw]
    if dy_grid.numel() == 0:  # more grid steps than output rows or columns: this offset holds none
        return torch.zeros_like(weight)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    # The grid's first output reads x from row a*st_h - p_h (negative: padding): start xs there.
    xs = F.pad(x, (p_w - b * st_w, p_w, p_h - a * st_h, p_h)).contiguous(memory_format=fmt)
    grid = replace(geom, stride=(sh * st_h, sw * st_w), padding=(0, 0), pre_pad=None)
    return conv2d_grad_weight(grid, xs, weight, dy_grid.contiguous(memory_format=fmt))
