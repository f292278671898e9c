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

VARIANTS = ("argmax", "random", "fixed")


def patch_positions(dy: Tensor, variant: str, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The chosen output position of each (n, c) and its weight.

    Returns:
        ``(position, coefficient)``, both (N, C_out): flat indices into H_out * W_out, and the
        factor the patch at that position is multiplied by.
    """
    n, c, ho, wo = dy.shape
    flat = dy.reshape(n, c, ho * wo)
    if variant == "argmax":
        return flat.abs().argmax(-1), flat.sum(-1)
    if variant == "random":
        pos = torch.randint(ho * wo, (n, c), generator=generator, device=dy.device)
    else:  # fixed: the centre
        pos = torch.full((n, c), (ho // 2) * wo + wo // 2, device=dy.device, dtype=torch.long)
    return pos, flat.gather(-1, pos.unsqueeze(-1)).squeeze(-1) * (ho * wo)


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
        The estimate, shaped like the weight. Only the N * C_out chosen patches are gathered
        (never the whole unfolded input): N * C_out * C_in/groups * kh * kw multiply-adds.
    """
    n, cout = dy.shape[:2]
    _, cin_g, kh, kw = weight_shape
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
    pos, coef = patch_positions(dy, variant, generator)
    wo = dy.shape[3]
    oh, ow = pos // wo, pos % wo
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    dev = x.device
    rows = (oh * sh).unsqueeze(-1) + torch.arange(kh, device=dev) * dh  # (N, C_out, kh)
    cols = (ow * sw).unsqueeze(-1) + torch.arange(kw, device=dev) * dw  # (N, C_out, kw)
    # output channel c reads the input channels of its group
    first = (torch.arange(cout, device=dev) // (cout // geom.groups)) * cin_g  # (C_out,)
    channels = first.unsqueeze(-1) + torch.arange(cin_g, device=dev)  # (C_out, cin_g)
    patches = xp[torch.arange(n, device=dev).view(n, 1, 1, 1, 1),
                 channels.view(1, cout, cin_g, 1, 1),
                 rows.view(n, cout, 1, kh, 1),
                 cols.view(n, cout, 1, 1, kw)]  # (N, C_out, cin_g, kh, kw)
    return torch.einsum("nc,ncikl->cikl", coef.to(patches.dtype), patches)
