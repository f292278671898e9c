"""Memory-layout helpers: what a channels-last tensor needs to stay channels-last, fast."""

from __future__ import annotations

import torch
from torch import Tensor


def is_channels_last(t: Tensor) -> bool:
    """Whether ``t`` is a 4-d tensor laid out channels-last (and not also contiguous, as a
    tensor with one channel or one pixel is)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def select_channels(t: Tensor, idx: Tensor) -> Tensor:
    """``t.index_select(1, idx)`` in ``t``'s memory format; differentiable.

    On a channels-last tensor ``index_select`` over dim 1 is a strided gather whose result
    falls back to the contiguous layout (and so does every op after it); gathering columns of
    the ``(NHW, C)`` view keeps channels-last and is 4-6x faster (measured on the 2-core CPU,
    128x16x32x32; forward plus backward about 3.5x).
    """
    if not is_channels_last(t):
        return t.index_select(1, idx)
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(-1, c).index_select(1, idx).view(n, h, w, -1).permute(0, 3, 1, 2)


def take_rows(t: Tensor, rows: tuple[slice, ...], dim: int) -> Tensor:
    """``t``'s slices ``rows`` along ``dim``, concatenated (a view when there is one slice)."""
    parts = [t.narrow(dim, r.start, r.stop - r.start) for r in rows]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def channel_window(t: Tensor, rows: tuple[slice, ...]) -> Tensor:
    """``t[:, rows]`` (slices of dim 1) as one dense tensor in ``t``'s memory format (the
    products need it dense); differentiable.

    A channels-last tensor is sliced as its ``(NHW, C)`` view, so the backward is a plain copy
    into zeros of that view; the gradient of a 4-d channel slice goes through a strided 4-d copy
    that made ``forward_sampling``'s backward slower than exact's (docs/benchmarks.md).
    """
    if not is_channels_last(t):
        return take_rows(t, rows, 1).contiguous()
    n, c, h, w = t.shape
    window = take_rows(t.permute(0, 2, 3, 1).reshape(-1, c), rows, 1).contiguous()
    return window.view(n, h, w, -1).permute(0, 3, 1, 2)


def batch_sum(t: Tensor) -> Tensor:
    """``t.sum(0, keepdim=True)`` in ``t``'s memory format, reduced over ``t``'s flat
    ``(N, rest)`` view: over a channels-last 4-d tensor the reduction along dim 0 is strided, and
    much slower."""
    n = t.shape[0]
    if is_channels_last(t):
        _, c, h, w = t.shape
        return t.permute(0, 2, 3, 1).reshape(n, -1).sum(0).view(1, h, w, c).permute(0, 3, 1, 2)
    return t.reshape(n, -1).sum(0).view(1, *t.shape[1:])
