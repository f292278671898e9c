"""The CUDA implementations: kernel launches only, no dispatch.

Every function takes CUDA tensors of float32, float16 or bfloat16 (the callers in
:mod:`lightning_approx.kernels.ops` check that through :mod:`~lightning_approx.kernels.dispatch`)
and matches the PyTorch reference it is named after. Inputs in a layout a kernel does not read
(anything but contiguous, or channels-last for 4-d tensors) are made contiguous first.

Launch arguments are passed with the exact C types the kernels declare (``numpy`` scalars:
pointers as uint64, ``la_i64`` as int64, ``int`` as int32, ``float`` as float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_approx.kernels import loader
from lightning_approx.ops.layout import is_channels_last

if TYPE_CHECKING:
    from lightning_approx.ops.conv import ConvGeometry

__all__ = ["KERNELS", "argmax_sum", "channel_norms", "find_live", "gather_scale", "live_channels",
           "patch_accumulate", "patch_grad_argmax", "patch_weight_grad",
           "plane_nonzero_counts", "plane_sq_norms", "sample_channel_norms", "sample_norms", "stochastic_prune"]

THREADS = 256  # LA_THREADS in la_common.cuh
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}  # elements per 16-byte load


def _dtype_kernels(*stems: str) -> list[str]:
    return [f"{stem}_{suffix}" for stem in stems for suffix in _SUFFIX.values()]


# Every kernel each file must define (checked by tests/kernels/test_compile.py).
KERNELS: dict[str, list[str]] = {
    "norms.cu": [*_dtype_kernels("la_sumsq_rows", "la_sumsq_cols"), "la_sumsq_finalize", "la_plane_marginals"],
    "gather.cu": _dtype_kernels("la_gather_scale"),
    "mask.cu": [*_dtype_kernels("la_nonzero_rows", "la_nonzero_cols"), "la_nonzero_finalize", "la_live_summarize",
                "la_live_compact"],
    "prune.cu": _dtype_kernels("la_prune_abssum", "la_prune_apply"),
    "patch.cu": [*_dtype_kernels("la_argmax_sum_rows", "la_argmax_sum_cols", "la_patch_accumulate"),
                 "la_argmax_sum_finalize"],
}

# Bytes of one partial State of each plane operator (la_common.cuh).
_STATE_BYTES = {"sumsq": 4, "nonzero": 4, "argmax_sum": 12}
_PLANE_FILE = {"sumsq": "norms.cu", "nonzero": "mask.cu", "argmax_sum": "patch.cu"}


# --- argument helpers --------------------------------------------------------------------------
def _np() -> Any:
    import numpy  # CuPy depends on NumPy: present wherever the kernels run

    return numpy


def ptr(t: Tensor | None) -> Any:
    """A device pointer argument (``nullptr`` for ``None``)."""
    return _np().uint64(0 if t is None else t.data_ptr())


def i64(v: int) -> Any:
    return _np().int64(v)


def i32(v: int) -> Any:
    return _np().int32(v)


def u64(v: int) -> Any:
    return _np().uint64(v)


def f32(v: float) -> Any:
    return _np().float32(v)


def _device(t: Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _sms(device: int) -> int:
    return loader.device_properties(device)[0]


def _resident(file: str, name: str, device: int, threads: int) -> int:
    return loader.resident_blocks(file, name, device, threads)


def _wave(file: str, name: str, device: int, threads: int = THREADS) -> int:
    """Blocks of ``name`` that fit on the whole device at once: the grid of a grid-stride
    kernel (more would run as a second, partial wave)."""
    return _sms(device) * _resident(file, name, device, threads)


def _empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
           memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Allocates a result the kernels write in full (the tests poison it to prove they do)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=memory_format)


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


# --- plane reductions --------------------------------------------------------------------------
def _plane_reduce(op: str, t: Tensor, out0: Tensor, out1: Tensor | None = None, flag: int = 0,
                  planes: bool = True) -> None:
    """Reduces each (sample, channel) plane of ``t`` (``planes``) or each sample (not
    ``planes``) with operator ``op``; results go to ``out0`` / ``out1`` in (N, C) / (N,) order."""
    file, device = _PLANE_FILE[op], _device(t)
    suffix, vec = _SUFFIX[t.dtype], _VEC[t.dtype]
    n = t.shape[0]
    if not planes:  # per sample: one contiguous row per sample in both memory formats
        x = t if (t.is_contiguous() or is_channels_last(t)) else t.contiguous()
        scheme, rows, length = "rows", n, x.numel() // max(n, 1)
    elif t.dim() == 2:  # (N, C): channels innermost, planes of one element
        x = t.contiguous()
        scheme, c, length = "cols", t.shape[1], 1
    elif is_channels_last(t):
        x = t
        scheme, c, length = "cols", t.shape[1], t.shape[2] * t.shape[3]
    else:
        x = t.contiguous()
        scheme, c = "rows", t.shape[1]
        rows, length = n * c, x.numel() // max(n * c, 1)
    if x.numel() == 0:  # empty planes: sums and counts are 0
        out0.zero_()
        if out1 is not None:
            out1.zero_()
        return
    if scheme == "rows":
        name = f"la_{op}_rows_{suffix}"
        wave = _wave(file, name, device)
        target = wave * (THREADS // 32)  # one (row, piece) per resident warp at least
        chunks = 1 if rows >= target else max(1, min(math.ceil(target / rows), math.ceil(length / 2048)))
        items = rows * chunks
        # Lanes per (row, piece): about 8 loads each, at least 4 lanes (16 bytes x 4 contiguous).
        width = vec if (length % vec == 0 and x.data_ptr() % 16 == 0) else 1
        units = math.ceil(math.ceil(length / chunks) / width)
        group = min(32, max(4, _pow2_at_least(math.ceil(units / 8))))
        per_block = (THREADS // 32) * (32 // group)
        grid = (max(1, min(math.ceil(items / per_block), wave)),)
        partial = _workspace(op, items, x) if chunks > 1 else None
        loader.launch(file, name, device, grid, (THREADS,),
                      (ptr(x), i64(rows), i64(length), i32(chunks), i32(group), ptr(partial), ptr(out0), ptr(out1),
                       i32(flag)))
        if chunks > 1:
            _finalize(op, device, partial, rows, chunks, 1, out0, out1, flag)
        return
    width = vec if (c % vec == 0 and x.data_ptr() % 16 == 0) else 1
    cvecs = c // width
    bx = min(32, _pow2_at_least(cvecs))
    by = THREADS // bx
    xblocks = math.ceil(cvecs / bx)
    name = f"la_{op}_cols_{suffix}"
    target = _wave(file, name, device)  # one block per (sample, piece, channel tile), a full wave at least
    chunks = 1 if xblocks * n >= target else max(1, min(math.ceil(target / (xblocks * n)),
                                                          math.ceil(length / (by * 4))))
    items = n * chunks
    grid = (xblocks, max(1, min(items, 65535)))
    partial = _workspace(op, items * c, x) if chunks > 1 else None
    loader.launch(file, name, device, grid, (bx, by),
                  (ptr(x), i64(n), i64(length), i64(c), i32(chunks), ptr(partial), ptr(out0), ptr(out1), i32(flag)))
    if chunks > 1:
        _finalize(op, device, partial, n, chunks, c, out0, out1, flag)


def _workspace(op: str, states: int, like: Tensor) -> Tensor:
    return torch.empty(states * _STATE_BYTES[op], dtype=torch.uint8, device=like.device)


def _finalize(op: str, device: int, partial: Tensor, outer: int, chunks: int, inner: int, out0: Tensor,
              out1: Tensor | None, flag: int) -> None:
    grid = (max(1, min(math.ceil(outer * inner / THREADS), _sms(device) * 4)),)
    loader.launch(_PLANE_FILE[op], f"la_{op}_finalize", device, grid, (THREADS,),
                  (ptr(partial), i64(outer), i32(chunks), i64(inner), ptr(out0), ptr(out1), i32(flag)))


# --- norms (crs) -------------------------------------------------------------------------------
def sample_norms(t: Tensor) -> Tensor:
    """L2 norm of each sample ``t[n]``, float32 (reference: :func:`lightning_approx.ops.norms.sample_norms`)."""
    out = _empty((t.shape[0],), torch.float32, t.device)
    _plane_reduce("sumsq", t, out, flag=1, planes=False)
    return out


def plane_sq_norms(t: Tensor) -> Tensor:
    """Squared L2 norm of each (sample, channel) plane, (N, C) float32
    (reference: :func:`lightning_approx.ops.norms.plane_sq_norms`)."""
    out = _empty(t.shape[:2], torch.float32, t.device)
    _plane_reduce("sumsq", t, out)
    return out


def sample_channel_norms(t: Tensor) -> tuple[Tensor, Tensor]:
    """Both crs sampling weights of ``dy`` from one pass: per-sample norms (N,) and
    per-channel norms (C,), float32. The norms over all dims but 0, and all dims but 1."""
    sq = plane_sq_norms(t)
    n, c = sq.shape
    per_sample = _empty((n,), torch.float32, t.device)
    per_channel = _empty((c,), torch.float32, t.device)
    if n == 0 or c == 0:
        return per_sample.zero_(), per_channel.zero_()
    device = _device(t)
    row_blocks = max(1, min(math.ceil(n / (THREADS // 32)), _sms(device) * 4))
    col_blocks = max(1, math.ceil(c / THREADS))
    loader.launch("norms.cu", "la_plane_marginals", device, (row_blocks + col_blocks,), (THREADS,),
                  (ptr(sq), i64(n), i64(c), i32(row_blocks), ptr(per_sample), ptr(per_channel)))
    return per_sample, per_channel


def channel_norms(t: Tensor) -> Tensor:
    """L2 norm of each channel ``t[:, c]`` over the batch and positions, (C,) float32."""
    return sample_channel_norms(t)[1]


# --- gather and scale (crs) ---------------------------------------------------------------------
def gather_scale(t: Tensor, idx: Tensor, scale: Tensor | None, dim: int) -> Tensor:
    """``t.index_select(dim, idx) * scale.to(t.dtype)`` (scale along ``dim``) in one pass, in
    ``t``'s memory format (contiguous or channels-last); ``scale=None`` only gathers."""
    dim = dim % t.dim()
    if is_channels_last(t):
        order, fmt = (0, 2, 3, 1), torch.channels_last
    else:
        t = t.contiguous()
        order, fmt = tuple(range(t.dim())), torch.contiguous_format
    k = idx.numel()
    shape = list(t.shape)
    shape[dim] = k
    out = _empty(shape, t.dtype, t.device, fmt)
    if out.numel() == 0:
        return out
    pos = order.index(dim)
    sizes = [t.shape[d] for d in order]
    outer, inner = math.prod(sizes[:pos]), math.prod(sizes[pos + 1:])
    if k * inner >= 2**31:
        raise ValueError(f"gather_scale: a gathered slice of {k * inner} elements is too large for the kernel "
                         "(limit 2^31); use the 'torch' backend for this call")
    idx = idx.to(device=t.device, dtype=torch.int64).contiguous()
    if scale is not None:
        scale = scale.to(device=t.device, dtype=torch.float32).contiguous()
    vec = _VEC[t.dtype]
    width = vec if (inner % vec == 0 and t.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0) else 1
    units = k * inner // width
    bx = min(THREADS, max(1, _pow2_at_least(units)))
    by = THREADS // bx
    device = _device(t)
    cap = _wave("gather.cu", f"la_gather_scale_{_SUFFIX[t.dtype]}", device)
    gx = max(1, min(math.ceil(units / bx), cap))
    gy = max(1, min(math.ceil(outer / by), 65535, max(1, cap // gx)))
    loader.launch("gather.cu", f"la_gather_scale_{_SUFFIX[t.dtype]}", device, (gx, gy), (bx, by),
                  (ptr(t), ptr(idx), ptr(scale), ptr(out), i64(outer), i64(t.shape[dim]), i64(k), i64(inner)))
    return out


# --- stochastic pruning (grad_prune) -----------------------------------------------------------
def prune_quantile(sparsity: float) -> float:
    """Phi^-1((1 + p) / 2): tau / sigma, computed as the reference does (float64 ``ndtri``)."""
    if sparsity <= 0:
        return 0.0
    return float(torch.special.ndtri(torch.tensor((1.0 + sparsity) / 2.0, dtype=torch.float64)))


def stochastic_prune(g: Tensor, sparsity: float, generator: torch.Generator | int | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Unbiased stochastic pruning of ``g`` (reference: :func:`lightning_approx.ops.prune.stochastic_prune`).

    Args:
        g: The gradient, any shape and memory format (the output keeps it).
        sparsity: Target fraction p of zeros for normally distributed entries, in [0, 1).
        generator: A ``torch.Generator`` (one 64-bit seed is drawn from it per call, on its
            device, so a CUDA generator costs no synchronisation), an int seed, or ``None`` for
            PyTorch's default generator of ``g``'s device.

    Returns:
        ``(pruned, nnz)``: the pruned tensor and its number of non-zeros as a 0-d int64 tensor
        on ``g``'s device (reading it as an int synchronises; the reference returns an int).
    """
    x = g if (g.is_contiguous() or is_channels_last(g)) else g.contiguous()
    out = _empty(x.shape, x.dtype, x.device, torch.channels_last if is_channels_last(x) else torch.contiguous_format)
    nnz = torch.zeros((), dtype=torch.int64, device=g.device)
    n = x.numel()
    if n == 0:
        return out, nnz
    device, suffix, vec = _device(g), _SUFFIX[g.dtype], _VEC[g.dtype]
    seed_ptr, seed_value = None, 0
    if isinstance(generator, int) and not isinstance(generator, bool):
        seed_value = generator & (2**64 - 1)
    else:
        where = generator.device if generator is not None else g.device
        drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=where, generator=generator)
        if drawn.is_cuda:  # stays on the device: the kernel reads the seed from memory
            seed_ptr = drawn if drawn.device == g.device else drawn.to(g.device)
        else:
            seed_value = int(drawn)
    abssum, apply = f"la_prune_abssum_{suffix}", f"la_prune_apply_{suffix}"
    parts = max(1, min(math.ceil(n / (THREADS * vec * 2)), _wave("prune.cu", abssum, device), 1024))
    partial = torch.empty(parts, dtype=torch.float32, device=g.device)
    loader.launch("prune.cu", abssum, device, (parts,), (THREADS,), (ptr(x), i64(n), ptr(partial)))
    blocks = max(1, min(math.ceil(n / (THREADS * vec)), _wave("prune.cu", apply, device)))
    loader.launch("prune.cu", apply, device, (blocks,), (THREADS,),
                  (ptr(x), ptr(out), i64(n), ptr(partial), i32(parts), f32(prune_quantile(sparsity)), ptr(seed_ptr),
                   u64(seed_value), u64(0), ptr(nnz)))
    return out, nnz


# --- live slices (relu_mask) --------------------------------------------------------------------
def plane_nonzero_counts(x: Tensor) -> Tensor:
    """Non-zeros of each (sample, channel) plane, (N, C) int64, a plane holding a NaN counted
    as full (reference: :func:`lightning_approx.ops.mask.plane_nonzeros`)."""
    counts = _empty(x.shape[:2], torch.int64, x.device)
    plane = x[0, 0].numel() if x.shape[0] and x.shape[1] else 0
    _plane_reduce("nonzero", x, counts, flag=plane)
    return counts


def _live(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(sample indices (N,), channel indices (C,), stats (4,)) on the device; the first
    stats[0] / stats[1] entries of the index lists are the live ones."""
    n, c = x.shape[0], x.shape[1]
    counts = plane_nonzero_counts(x)
    device = _device(x)
    flags = torch.zeros(n + c, dtype=torch.int32, device=x.device)
    stats = torch.zeros(4, dtype=torch.int64, device=x.device)
    samples = torch.empty(n, dtype=torch.int64, device=x.device)
    channels = torch.empty(c, dtype=torch.int64, device=x.device)
    if n * c:
        grid = (max(1, min(math.ceil(n * c / THREADS), _sms(device) * 4)),)
        loader.launch("mask.cu", "la_live_summarize", device, grid, (THREADS,),
                      (ptr(counts), i64(n), i64(c), ptr(flags), ptr(stats)))
    loader.launch("mask.cu", "la_live_compact", device, (2,), (THREADS,),
                  (ptr(flags), i64(n), i64(c), ptr(samples), ptr(channels), ptr(stats)))
    return samples, channels, stats


def live_channels(x: Tensor) -> Tensor:
    """Indices (int64, increasing) of the channels (dim 1) with a non-zero entry anywhere in the
    batch. One synchronisation (the count sizes the result)."""
    _, channels, stats = _live(x)
    return channels[: int(stats[1])]


def find_live(x: Tensor, restrict: bool = True) -> Any:
    """The live slices of ``x`` and its zero statistics, as
    :func:`lightning_approx.ops.mask.find_live` returns them (a ``LiveSlices``).

    One pass over ``x`` and one 32-byte device-to-host copy (the reference copies the whole
    (N, C) count table).
    """
    from lightning_approx.ops.mask import LiveSlices

    n, c = x.shape[0], x.shape[1]
    samples, channels, stats = _live(x)
    n_live, c_live, nonzero, dead_planes = (int(v) for v in stats.tolist())
    keep_samples = restrict and n_live < n
    keep_channels = restrict and c_live < c
    return LiveSlices(
        samples=samples[:n_live] if keep_samples else None, channels=channels[:c_live] if keep_channels else None,
        n=n, c=c, n_live=n_live if keep_samples else n, c_live=c_live if keep_channels else c,
        elements=x.numel(), zero_elements=x.numel() - nonzero, planes=n * c, dead_planes=dead_planes,
        dead_channels=c - c_live, dead_samples=n - n_live)


# --- patch gradient (Wang & Nelaturu) ----------------------------------------------------------
def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def argmax_sum(dy: Tensor) -> tuple[Tensor, Tensor]:
    """Per (sample, channel) plane of ``dy``: the position of the largest ``|dy|`` (int64, flat
    index ``h * W + w``, the first on ties) and the sum over the plane (float32), both (N, C)."""
    pos = _empty(dy.shape[:2], torch.int64, dy.device)
    sums = _empty(dy.shape[:2], torch.float32, dy.device)
    _plane_reduce("argmax_sum", dy, pos, sums)
    return pos, sums


def patch_accumulate(x: Tensor, pos: Tensor, sums: Tensor, weight_shape: Sequence[int], out_hw: Sequence[int],
                     stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                     dilation: int | Sequence[int] = 1, groups: int = 1,
                     memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """``gW[c] = sum_n sums[n, c] * patch(x_n, pos[n, c])``, float32, shaped ``weight_shape``.

    Args:
        x: The conv input (N, Cin, H, W), contiguous or channels-last.
        pos: (N, Cout) flat output positions ``oy * Wo + ox``.
        sums: (N, Cout) weights of the patches.
        weight_shape: (Cout, Cin / groups, KH, KW).
        out_hw: (Ho, Wo) of the conv output (decodes ``pos``).
        stride: Conv stride.
        padding: Conv padding (integer).
        dilation: Conv dilation.
        groups: Conv groups.
        memory_format: Of the result (``torch.channels_last`` to match a channels-last weight).
    """
    if not (x.is_contiguous() or is_channels_last(x)):
        x = x.contiguous()
    x_cl = int(is_channels_last(x))
    cout, cin_g, kh, kw = (int(v) for v in weight_shape)
    n, cin, h, w = x.shape
    ho, wo = (int(v) for v in out_hw)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    out = _empty((cout, cin_g, kh, kw), torch.float32, x.device, memory_format)
    if out.numel() == 0:
        return out
    if n == 0:
        return out.zero_()
    pos = pos.to(dtype=torch.int64).contiguous()
    sums = sums.to(dtype=torch.float32).contiguous()
    patch = cin_g * kh * kw
    bx = min(THREADS, max(32, _pow2_at_least(patch)))
    by = THREADS // bx
    device = _device(x)
    gx = math.ceil(patch / bx)
    gy = max(1, min(math.ceil(cout / by), 65535))
    out_cl = int(memory_format == torch.channels_last)
    loader.launch("patch.cu", f"la_patch_accumulate_{_SUFFIX[x.dtype]}", device, (gx, gy), (bx, by),
                  (ptr(x), ptr(pos), ptr(sums), ptr(out), i64(n), i64(cin), i64(h), i64(w), i64(cout), i64(ho),
                   i64(wo), i32(cin_g), i32(kh), i32(kw), i32(sh), i32(sw), i32(ph), i32(pw), i32(dh), i32(dw),
                   i32(groups), i32(x_cl), i32(out_cl)))
    return out


def patch_weight_grad(geom: ConvGeometry, x: Tensor, dy: Tensor, weight_shape: Sequence[int], variant: str = "argmax",
                      generator: torch.Generator | None = None) -> Tensor:
    """dL/dW from one input patch per (sample, output channel), shaped like the weight, in
    ``x``'s dtype, contiguous (reference: :func:`lightning_approx.ops.patch.patch_weight_grad`).

    ``"argmax"`` finds the positions and the plane sums in one kernel pass over ``dy``;
    ``"random"`` and ``"fixed"`` take their positions and coefficients from
    :func:`lightning_approx.ops.patch.patch_positions` (the same random stream as the
    reference). The patch accumulation is the kernel in every case.
    """
    if variant == "argmax":
        pos, coef = argmax_sum(dy)
    else:
        from lightning_approx.ops.patch import patch_positions

        pos, coef = patch_positions(dy, variant, generator)
    grad = patch_accumulate(x, pos, coef, weight_shape, dy.shape[2:], geom.stride, geom.padding, geom.dilation,
                            geom.groups)
    return grad.to(x.dtype)


def patch_grad_argmax(geom: ConvGeometry, x: Tensor, dy: Tensor, weight_shape: Sequence[int]) -> Tensor:
    """:func:`patch_weight_grad` with the argmax positions (the paper's kernel)."""
    return patch_weight_grad(geom, x, dy, weight_shape, "argmax")
