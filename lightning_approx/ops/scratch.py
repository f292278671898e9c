"""Buffers that every layer and every step reuse for a backward's short-lived temporaries.

With glibc's default settings a Linux process hands large freed blocks back to the system, so
every large temporary a training step allocates comes back as fresh pages, and each page faults
when it is first written. The sampled backwards copy operands dense before their products (a
window of ``dy``'s channels, a padded copy of ``x``), and those copies made them fault on 1.6-3
times as many pages per step as the exact backward, which cost them about 0.05 of the step on
the 2-core CPU (docs/benchmarks.md, "Scratch buffers"). A copy that is dead when the product
reading it returns can live in one buffer instead, written again by the next layer.

Only on CPU and outside autograd: CUDA's caching allocator already keeps freed blocks, and a
tensor made under autograd (a double backward) may be saved by the graph and must not be
overwritten.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_approx.ops.layout import is_channels_last


def dense_strides(size: Sequence[int], channels_last: bool) -> tuple[int, ...]:
    """The strides of a dense tensor of ``size``, contiguous or (4-d only) channels-last."""
    if channels_last:
        _, c, h, w = size
        return (h * w * c, 1, w * c, c)
    strides, step = [], 1
    for extent in reversed(size):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def empty_dense(size: Sequence[int], like: Tensor) -> Tensor:
    """A new uninitialised dense tensor of ``size`` with ``like``'s dtype, device and memory
    format (channels-last when ``like`` is and ``size`` is 4-d)."""
    fmt = torch.channels_last if len(size) == 4 and is_channels_last(like) else torch.contiguous_format
    return torch.empty(size, dtype=like.dtype, device=like.device, memory_format=fmt)


class Scratch:
    """Named buffers, one per slot, dtype and thread, grown to the largest request.

    A tensor from :meth:`empty` is valid until the next request for the same slot on the same
    thread: callers take it for a temporary that no one holds after the call that reads it.
    Copies and pickles of a ``Scratch`` start empty (the buffers are a cache, not state).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, int], Tensor] = {}

    def empty(self, slot: str, size: Sequence[int], like: Tensor) -> Tensor:
        """What :func:`empty_dense` gives; on CPU with autograd off, as a view of ``slot``'s buffer."""
        if like.device.type != "cpu" or torch.is_grad_enabled():
            return empty_dense(size, like)
        channels_last = len(size) == 4 and is_channels_last(like)
        key = (slot, like.dtype, threading.get_ident())
        numel = math.prod(size)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=like.dtype)
        return buffer.as_strided(size, dense_strides(size, channels_last))

    def clear(self) -> None:
        """Frees every buffer (they are made again on the next request)."""
        self._buffers.clear()

    def __len__(self) -> int:
        return len(self._buffers)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
