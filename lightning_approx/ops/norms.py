"""Norms over slices of activations, computed as single passes over contiguous memory.

``torch.linalg.vector_norm`` over several dimensions of an NCHW tensor can be orders of
magnitude slower than the same reduction on a flattened view (measured: 16 ms against
0.07 ms for a 128x16x32x32 tensor on the 2-core CPU), so these helpers always reduce over
one contiguous dimension of a view.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_approx.ops.layout import is_channels_last


def _acc(t: Tensor) -> torch.dtype:
    """Accumulation dtype: at least float32 (half-precision sums lose the small planes)."""
    return torch.promote_types(t.dtype, torch.float32)


def _nhwc_view(t: Tensor) -> Tensor | None:
    """(N, H, W, C) view of a channels-last 4-d tensor, else None."""
    if is_channels_last(t):
        return t.permute(0, 2, 3, 1)
    return None


def sample_norms(t: Tensor) -> Tensor:
    """L2 norm of each sample ``t[n]`` (all other dimensions), in at least float32."""
    nhwc = _nhwc_view(t)
    flat = (nhwc if nhwc is not None else t.contiguous()).reshape(t.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1, dtype=_acc(t))


def plane_sq_norms(t: Tensor) -> Tensor:
    """Squared L2 norm of each (sample, channel) plane of a 4-d tensor: shape (N, C), at least float32.

    One pass gives both sampling weights crs needs from ``dy``: summing over channels gives
    the per-sample norms, over samples the per-channel norms.
    """
    n, c = t.shape[:2]
    nhwc = _nhwc_view(t)
    if nhwc is not None:
        # A strided vector_norm over the positions is about 5x slower here than squaring the
        # (N, HW, C) view and summing it (measured on the 2-core CPU, 128x16x32x32).
        return nhwc.reshape(n, -1, c).to(_acc(t)).square().sum(1)
    return torch.linalg.vector_norm(t.contiguous().view(n * c, -1), dim=1, dtype=_acc(t)).square().view(n, c)
