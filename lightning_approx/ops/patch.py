"""Weight gradients of a conv from one input patch per (sample, output channel)
(Wang & Nelaturu, *Accelerated CNN Training Through Gradient Approximation*, 2019).

The exact weight gradient is a sum over output positions p of ``dY[n, c, p] * patch(x_n, p)``
(the receptive field of p, shape (C_in/groups, kh, kw)). Here each (n, c) uses one position:

- ``"argmax"``: p* = argmax_p |dY[n, c, p]|, weighted by the sum of dY[n, c] over positions
  (what the paper's GPU kernel computes): exact when the receptive fields are alike,
  biased in general;
- ``"random"``: p uniform, weighted by H_out * W_out * dY[n, c, p]: unbiased;
- ``"fixed"``: the centre position, weighted like ``"random"``: deterministic, biased.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_approx.ops.conv import ConvGeometry
from lightning_approx.ops.layout import is_channels_last

VARIANTS = ("argmax", "random", "fixed")


def patch_positions(dy: Tensor, variant: str, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The chosen output position of each (n, c) and its weight.

    Returns:
        ``(position, coefficient)``, both (N, C_out): flat indices into H_out * W_out, and the
        factor the patch at that position is multiplied by.
    """
    n, c, ho, wo = dy.shape
    if variant == "argmax":
        # The plane's max-pool index is its argmax, the first one among ties like argmax(): the
        # pooling kernel is vectorised, 1.1-1.5x faster than argmax() on CPU in NCHW, 2.7-11x in
        # channels-last (ResNet-20's planes, batch 128).
        # (Of several NaNs it points at the last, argmax() at the first; the plane's sum is NaN
        # either way, and so is the estimate.)
        pos = F.adaptive_max_pool2d(dy.abs(), 1, return_indices=True)[1].view(n, c)
        return pos, dy.sum((2, 3))
    if variant == "random":
        pos = torch.randint(ho * wo, (n, c), generator=generator, device=dy.device)
    else:  # fixed: the centre
        pos = torch.full((n, c), (ho // 2) * wo + wo // 2, device=dy.device, dtype=torch.long)
    if is_channels_last(dy):  # read the picked values in place instead of copying dy to (N, C, HW)
        picked = dy.permute(0, 2, 3, 1).reshape(n, ho * wo, c).gather(1, pos.unsqueeze(1)).squeeze(1)
    else:
        picked = dy.reshape(n, c, ho * wo).gather(-1, pos.unsqueeze(-1)).squeeze(-1)
    return pos, picked * (ho * wo)


def patch_weight_grad(geom: ConvGeometry, x: Tensor, dy: Tensor, weight_shape: torch.Size, variant: str,
                      generator: torch.Generator | None) -> Tensor:
    """dL/dW estimated from one patch per (sample, output channel).

    Args:
        geom: The conv's geometry (integer padding; ``x`` is already pre-padded if needed).
        x: The layer input (N, C_in, H, W).
        dy: The gradient of the layer output (N, C_out, H_out, W_out).
        weight_shape: (C_out, C_in / groups, kh, kw).
        variant: ``"argmax"``, ``"random"`` or ``"fixed"``.
        generator: Random stream for ``"random"``.

    Returns:
        The estimate, shaped like the weight (contiguous). Only the N * C_out chosen patches are
        read (never the whole unfolded input): N * C_out * C_in/groups * kh * kw multiply-adds.
    """
    n, cout, _, wo = dy.shape
    _, cin_g, kh, kw = weight_shape
    h, w = x.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
    dev = x.device
    pos, coef = patch_positions(dy, variant, generator)
    # Built as (C_out, tap row, tap column, N): one bag per weight entry (c, i, j) below.
    pos, coef = pos.t(), coef.t().to(x.dtype)
    rows = ((pos // wo) * sh - ph).view(cout, 1, n) + (torch.arange(kh, device=dev) * dh).view(1, kh, 1)
    cols = ((pos % wo) * sw - pw).view(cout, 1, n) + (torch.arange(kw, device=dev) * dw).view(1, kw, 1)
    weights = coef.view(cout, 1, 1, n).expand(cout, kh, kw, n)
    if ph or pw:  # taps in the zero padding read any pixel, with weight 0
        row_inside = ((rows >= 0) & (rows < h)).to(x.dtype).view(cout, kh, 1, n)
        col_inside = ((cols >= 0) & (cols < w)).to(x.dtype).view(cout, 1, kw, n)
        weights = weights * row_inside * col_inside
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    pixel = (torch.arange(n, device=dev) * h + rows).view(cout, kh, 1, n) * w + cols.view(cout, 1, kw, n)
    group = torch.arange(cout, device=dev) // (cout // geom.groups)
    index = pixel * geom.groups + group.view(cout, 1, 1, 1)
    # One row per (pixel, group): that group's input channels at that pixel, a view when x is
    # channels-last. embedding_bag sums each bag's N weighted rows without materialising the
    # patches (gathering them by advanced indexing measured 2-12x slower than the exact product).
    table = x.permute(0, 2, 3, 1).reshape(n * h * w * geom.groups, cin_g)
    grad = F.embedding_bag(index.reshape(cout * kh * kw, n), table, mode="sum",
                           per_sample_weights=weights.reshape(cout * kh * kw, n))
    return grad.view(cout, kh, kw, cin_g).permute(0, 3, 1, 2).contiguous()
