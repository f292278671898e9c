"""The public kernel ops: each runs the CUDA kernel or the PyTorch reference, as the backend
setting (:mod:`lightning_approx.kernels.dispatch`) decides for its arguments.

Same signatures and results as the references (up to float summation order, and for the
random ops up to the random stream: the kernels draw from Philox keyed by a seed taken from
the generator, so they match the references in distribution, not bit for bit):

=========================  ===============================================================
op                         PyTorch reference
=========================  ===============================================================
``sample_norms``           :func:`lightning_approx.ops.norms.sample_norms`
``plane_sq_norms``         :func:`lightning_approx.ops.norms.plane_sq_norms`
``sample_channel_norms``   ``plane_sq_norms(t)`` summed over channels / samples, square-rooted
``channel_norms``          ``sample_channel_norms(t)[1]``
``gather_scale``           ``index_select`` in the input's memory format, then ``mul_`` by
                           ``scale.to(t.dtype)`` along ``dim`` (what crs does to its operands)
``stochastic_prune``       :func:`lightning_approx.ops.prune.stochastic_prune`
``patch_weight_grad``      :func:`lightning_approx.ops.patch.patch_weight_grad`
``patch_grad_argmax``      ``patch_weight_grad(..., "argmax", None)``
``plane_nonzero_counts``   :func:`lightning_approx.ops.mask.plane_nonzeros`
``find_live``              :func:`lightning_approx.ops.mask.find_live`
``live_channels``          the channel indices of ``find_live`` (all of them when none is dead)
=========================  ===============================================================

Wire them in at the call sites (``from lightning_approx.kernels import ops as kops``); the
modules under :mod:`lightning_approx.ops` stay the pure-PyTorch references these fall back to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_approx.kernels import cuda
from lightning_approx.kernels.dispatch import select
from lightning_approx.ops.layout import is_channels_last, select_channels

if TYPE_CHECKING:
    from lightning_approx.ops.conv import ConvGeometry

__all__ = ["channel_norms", "find_live", "gather_scale", "live_channels", "patch_grad_argmax", "patch_weight_grad",
           "plane_nonzero_counts", "plane_sq_norms", "sample_channel_norms", "sample_norms", "stochastic_prune"]


# --- norms (crs) -------------------------------------------------------------------------------
def sample_norms(t: Tensor) -> Tensor:
    """L2 norm of each sample ``t[n]`` over all other dimensions, in at least float32."""
    if select("sample_norms", t) == "cuda":
        return cuda.sample_norms(t)
    from lightning_approx.ops.norms import sample_norms as reference

    return reference(t)


def plane_sq_norms(t: Tensor) -> Tensor:
    """Squared L2 norm of each (sample, channel) plane of a 4-d tensor, (N, C), at least float32."""
    if select("plane_sq_norms", t) == "cuda":
        return cuda.plane_sq_norms(t)
    from lightning_approx.ops.norms import plane_sq_norms as reference

    return reference(t)


def sample_channel_norms(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample norms (N,) and per-channel norms (C,) of ``t`` (4-d, or 2-d ``(N, C)``)
    from one pass: the two crs sampling weights that come from ``dy``."""
    if select("sample_channel_norms", t) == "cuda":
        return cuda.sample_channel_norms(t)
    if t.dim() == 2:
        acc = torch.promote_types(t.dtype, torch.float32)
        return (torch.linalg.vector_norm(t, dim=1, dtype=acc), torch.linalg.vector_norm(t, dim=0, dtype=acc))
    from lightning_approx.ops.norms import plane_sq_norms as reference

    sq = reference(t)
    return sq.sum(1).sqrt(), sq.sum(0).sqrt()


def channel_norms(t: Tensor) -> Tensor:
    """L2 norm of each channel ``t[:, c]`` over the batch and the positions, (C,)."""
    return sample_channel_norms(t)[1]


# --- gather and scale (crs) ---------------------------------------------------------------------
def gather_scale(t: Tensor, idx: Tensor, scale: Tensor | None, dim: int) -> Tensor:
    """``t.index_select(dim, idx)`` multiplied along ``dim`` by ``scale.to(t.dtype)``, in ``t``'s
    memory format (contiguous or channels-last).

    Args:
        t: The tensor to gather from.
        idx: Indices along ``dim`` (any integer dtype), with repeats allowed.
        scale: One factor per index (``idx.numel()`` values), or ``None`` to gather only.
        dim: The gathered dimension.
    """
    if select("gather_scale", t) == "cuda":
        return cuda.gather_scale(t, idx, scale, dim)
    dim = dim % t.dim()
    channels_last = is_channels_last(t)
    if channels_last and dim == 0:
        out = t.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    elif channels_last and dim == 1:
        out = select_channels(t, idx)
    else:
        out = t.index_select(dim, idx)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
    if scale is not None:
        shape = [1] * t.dim()
        shape[dim] = -1
        out = out.mul_(scale.to(t.dtype).view(shape))
    return out


# --- stochastic pruning (grad_prune) -----------------------------------------------------------
def stochastic_prune(g: Tensor, sparsity: float, generator: torch.Generator | int | None = None
                     ) -> tuple[Tensor, int]:
    """Unbiased stochastic pruning: entries with ``|g| < tau`` become ``tau * sign(g)`` with
    probability ``|g| / tau``, else 0, where ``tau = Phi^-1((1 + p) / 2) * sqrt(pi / 2) * mean|g|``.

    Args:
        g: The gradient.
        sparsity: The target fraction p of zeros, in [0, 1).
        generator: The random stream (a ``torch.Generator`` on ``g``'s device), an int seed,
            or ``None`` for PyTorch's default generator.

    Returns:
        ``(pruned, non_zeros)`` as the reference returns them; ``non_zeros`` is a Python int,
        so on a GPU this synchronises once (the reference does too). The kernel alone,
        :func:`lightning_approx.kernels.cuda.stochastic_prune`, returns it as a 0-d device
        tensor instead.
    """
    if select("stochastic_prune", g) == "cuda":
        pruned, nnz = cuda.stochastic_prune(g, sparsity, generator)
        return pruned, int(nnz)
    from lightning_approx.ops.prune import stochastic_prune as reference

    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator(device=g.device).manual_seed(generator)
    return reference(g, sparsity, generator)


# --- patch gradient (Wang & Nelaturu) ----------------------------------------------------------
def patch_weight_grad(geom: ConvGeometry, x: Tensor, dy: Tensor, weight_shape: torch.Size, variant: str,
                      generator: torch.Generator | None) -> Tensor:
    """dL/dW of a conv from one input patch per (sample, output channel), shaped like the weight.

    Args:
        geom: The conv's geometry (``x`` already pre-padded where the geometry needs it).
        x: The layer input (N, C_in, H, W).
        dy: The gradient of the layer output (N, C_out, H_out, W_out).
        weight_shape: (C_out, C_in / groups, kh, kw).
        variant: ``"argmax"``, ``"random"`` or ``"fixed"``.
        generator: Random stream for ``"random"``.
    """
    if select("patch_weight_grad", x, dy) == "cuda":
        return cuda.patch_weight_grad(geom, x, dy, weight_shape, variant, generator)
    from lightning_approx.ops.patch import patch_weight_grad as reference

    return reference(geom, x, dy, weight_shape, variant, generator)


def patch_grad_argmax(geom: ConvGeometry, x: Tensor, dy: Tensor, weight_shape: torch.Size) -> Tensor:
    """:func:`patch_weight_grad` with the argmax positions (Wang & Nelaturu's GPU kernel): in
    one pass over ``dy`` the position of the largest ``|dy[n, c]|`` and the plane sum, then the
    patch accumulation."""
    return patch_weight_grad(geom, x, dy, weight_shape, "argmax", None)


# --- live slices (relu_mask) --------------------------------------------------------------------
def plane_nonzero_counts(x: Tensor) -> Tensor:
    """Non-zero entries of each (sample, channel) plane of ``x`` (``(N, C, ...)``), (N, C) int64;
    a plane holding a NaN counts as full."""
    if select("plane_nonzero_counts", x) == "cuda":
        return cuda.plane_nonzero_counts(x)
    from lightning_approx.ops.mask import plane_nonzeros as reference

    return reference(x)


def find_live(x: Tensor, restrict: bool = True) -> Any:
    """The live samples and channels of ``x`` and its zero statistics (a ``LiveSlices``)."""
    if select("find_live", x) == "cuda":
        return cuda.find_live(x, restrict)
    from lightning_approx.ops.mask import find_live as reference

    return reference(x, restrict)


def live_channels(x: Tensor) -> Tensor:
    """Increasing int64 indices of the channels (dim 1) of ``x`` with a non-zero entry
    anywhere in the batch, on ``x``'s device."""
    if select("live_channels", x) == "cuda":
        return cuda.live_channels(x)
    from lightning_approx.ops.mask import plane_nonzeros

    return (plane_nonzeros(x).sum(0) > 0).nonzero().flatten()
