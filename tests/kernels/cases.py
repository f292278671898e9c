"""Checks of every kernel against its PyTorch reference, shared by the GPU tests
(``test_gpu_kernels.py``, real kernels on a CUDA device) and the CPU emulation tests
(``test_emulated.py``, the same kernel code compiled for the host).

Each ``check_*`` takes the device the tensors live on and calls the kernel implementations in
:mod:`lightning_approx.kernels.cuda` directly; the references run on the same tensors. Results
the kernels write in full are poisoned first (see ``poison`` in ``conftest.py``), so an element
a kernel skips shows up as NaN or as the integer sentinel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_approx.kernels import cuda
from lightning_approx.ops import mask, norms

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORMATS = ("contiguous", "channels_last")
INT_POISON = -(2**62)

# Relative error bounds (against the largest reference magnitude).
# Reductions accumulate in float32 from the same T inputs as the reference: only the
# summation order differs.
REDUCE_RTOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
# Results rounded to T at the end: half an ulp of T, plus the float32 accumulation.
OUT_RTOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make(shape: tuple[int, ...], dtype: torch.dtype, fmt: str, device: str | torch.device,
         seed: int = 0) -> Tensor:
    """Fresh random normal values, in ``fmt`` (channels-last applies to 4-d shapes)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if fmt == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def rel_err(got: Tensor, ref: Tensor) -> float:
    """max |got - ref| / max |ref| (infinite when got has a NaN or inf the reference has not)."""
    got, ref = got.double().cpu(), ref.double().cpu()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if not torch.isfinite(got).all() and torch.isfinite(ref).all():
        return math.inf
    scale = ref.abs().max().item() if ref.numel() else 1.0
    return (got - ref).abs().max().item() / max(scale, 1e-30) if ref.numel() else 0.0


# --- norms --------------------------------------------------------------------------------------
def check_norms(shape: tuple[int, ...], dtype: torch.dtype, fmt: str, device: str) -> None:
    t = make(shape, dtype, fmt, device)
    tol = REDUCE_RTOL[dtype]
    assert rel_err(cuda.sample_norms(t), norms.sample_norms(t)) <= tol
    if t.dim() == 4:
        sq = norms.plane_sq_norms(t)
        assert rel_err(cuda.plane_sq_norms(t), sq) <= tol
        per_sample, per_channel = cuda.sample_channel_norms(t)
        assert rel_err(per_sample, sq.sum(1).sqrt()) <= tol
        assert rel_err(per_channel, sq.sum(0).sqrt()) <= tol
        assert rel_err(cuda.channel_norms(t), sq.sum(0).sqrt()) <= tol
    elif t.dim() == 2:
        per_sample, per_channel = cuda.sample_channel_norms(t)
        assert rel_err(per_sample, torch.linalg.vector_norm(t.float(), dim=1)) <= tol
        assert rel_err(per_channel, torch.linalg.vector_norm(t.float(), dim=0)) <= tol


# --- gather and scale --------------------------------------------------------------------------
def gather_scale_reference(t: Tensor, idx: Tensor, scale: Tensor | None, dim: int) -> Tensor:
    """What crs does: ``index_select`` in t's memory format, then ``mul_(scale.to(t.dtype))``."""
    out = t.index_select(dim, idx)
    if scale is not None:
        shape = [1] * t.dim()
        shape[dim] = -1
        out = out * scale.to(t.dtype).view(shape)
    return out


def check_gather_scale(shape: tuple[int, ...], dtype: torch.dtype, fmt: str, device: str) -> None:
    t = make(shape, dtype, fmt, device)
    g = torch.Generator().manual_seed(1)
    for dim in range(t.dim()):
        size = t.shape[dim]
        k = max(1, size // 2 + 1)
        idx = torch.randint(0, size, (k,), generator=g)
        idx[0] = idx[-1]  # a repeat, as draws with replacement give
        idx = idx.to(device)
        scale = (torch.rand(k, generator=g) * 4 + 0.1).to(device)
        for s in (scale, None):
            got = cuda.gather_scale(t, idx, s, dim)
            ref = gather_scale_reference(t, idx, s, dim)
            assert torch.equal(got, ref), f"dim {dim}, scale {s is not None}: {rel_err(got, ref)}"
            if fmt == "channels_last" and t.dim() == 4:
                assert got.is_contiguous(memory_format=torch.channels_last)
            else:
                assert got.is_contiguous()


# --- stochastic pruning ------------------------------------------------------------------------
def check_stochastic_prune(n: int, dtype: torch.dtype, fmt: str, device: str, sparsity: float = 0.8) -> None:
    from lightning_approx.ops.prune import prune_threshold
    from lightning_approx.ops.prune import stochastic_prune as reference

    shape = (n // 64, 4, 4, 4) if fmt == "channels_last" else (n,)
    g = make(shape, dtype, fmt, device, seed=3)
    out, nnz = cuda.stochastic_prune(g, sparsity, 1234)
    assert out.shape == g.shape and out.dtype == g.dtype
    if fmt == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    gd, od = g.double().cpu().flatten(), out.double().cpu().flatten()
    assert torch.isfinite(od).all()
    tau = prune_threshold(g, sparsity).item()  # float32, as the reference computes it
    tau_t = torch.tensor(tau, dtype=dtype).double().item()  # the threshold and magnitude written in T
    margin = OUT_RTOL[dtype] * tau  # the kernel's tau differs in the last bits (summation order)
    big = gd.abs() >= tau_t + margin
    small = gd.abs() < tau_t - margin
    assert torch.equal(od[big], gd[big]), "entries above tau must pass through unchanged"
    small_out = od[small]
    assert bool(((small_out == 0) | ((small_out.abs() - tau_t).abs() <= margin)).all()), \
        "entries below tau must become 0 or +-tau"
    assert bool((small_out * gd[small] >= 0).all()), "a rounded entry keeps its sign"
    assert int(nnz) == int((od != 0).sum())
    # Statistics: every small entry is kept with p = |g| / tau, independently.
    p = (gd[small].abs() / tau).clamp(0, 1)
    expected_nnz = int((~small).sum()) + p.sum().item()
    std = p.mul(1 - p).sum().sqrt().item()
    slack = int((~small & ~big).sum())  # entries within the margin of tau may go either way
    assert abs(int(nnz) - expected_nnz) <= 6 * std + slack + 2, (int(nnz), expected_nnz, std)
    # Unbiased: E[out] = g (up to tau's rounding to T), so the sums agree within the noise.
    var = (gd[small].abs() * tau - gd[small] ** 2).clamp_min(0).sum().item()
    bias = OUT_RTOL[dtype] * gd[small].abs().sum().item()
    assert abs(od.sum().item() - gd.sum().item()) <= 6 * math.sqrt(var) + bias + slack * tau
    # The reference realises the same sparsity, within the binomial noise of both draws.
    gen = torch.Generator(device=g.device).manual_seed(5)
    _, ref_nnz = reference(g, sparsity, gen)
    assert abs(int(nnz) - ref_nnz) <= 9 * std + slack + 2, (int(nnz), ref_nnz, std)
    # Reproducible per seed, different across seeds; sparsity 0 keeps everything.
    again, _ = cuda.stochastic_prune(g, sparsity, 1234)
    assert torch.equal(again, out)
    other, _ = cuda.stochastic_prune(g, sparsity, 99)
    assert not torch.equal(other, out)
    same, nnz0 = cuda.stochastic_prune(g, 0.0, 1)
    assert torch.equal(same, g) and int(nnz0) == int((g != 0).sum())
    zeros, nnz_zero = cuda.stochastic_prune(torch.zeros_like(g), sparsity, 1)
    assert int(nnz_zero) == 0 and not zeros.any()


def check_prune_generator(device: str, dtype: torch.dtype = torch.float32) -> None:
    g = make((4096,), dtype, "contiguous", device, seed=5)
    gen = torch.Generator(device=device).manual_seed(7)
    a, _ = cuda.stochastic_prune(g, 0.9, gen)
    b, _ = cuda.stochastic_prune(g, 0.9, gen)  # the generator advanced: a new draw
    assert not torch.equal(a, b)
    gen.manual_seed(7)
    a2, _ = cuda.stochastic_prune(g, 0.9, gen)
    assert torch.equal(a, a2)


# --- patch gradient ----------------------------------------------------------------------------
PATCH_GEOMETRIES = [  # (cin, cout, kernel, stride, padding, dilation, groups)
    (8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (8, 12, (3, 1), (2, 1), (0, 2), (1, 2), 2),
    (8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8),  # depthwise
    (3, 16, (7, 7), (2, 2), (3, 3), (1, 1), 1),  # a stem
    (16, 8, (1, 1), (1, 1), (0, 0), (1, 1), 1),
]


def check_patch_grad(geometry: tuple, dtype: torch.dtype, fmt: str, device: str, n: int = 5,
                     hw: tuple[int, int] = (9, 7)) -> None:
    from lightning_approx.ops.conv import ConvGeometry
    from lightning_approx.ops.patch import patch_weight_grad as reference

    cin, cout, kernel, stride, padding, dilation, groups = geometry
    geom = ConvGeometry(stride, padding, dilation, groups)
    weight_shape = torch.Size((cout, cin // groups, *kernel))
    x = make((n, cin, *hw), dtype, fmt, device, seed=11)
    w = make(tuple(weight_shape), torch.float32, "contiguous", "cpu", seed=12)
    ho, wo = F.conv2d(x.float().cpu(), w, stride=stride, padding=padding, dilation=dilation, groups=groups).shape[2:]
    dy = make((n, cout, ho, wo), dtype, fmt, device, seed=13)
    # argmax: the reference on the same values in float32 (the kernel sums in float32)
    grad = cuda.patch_accumulate(x, *cuda.argmax_sum(dy), weight_shape, (ho, wo), stride, padding, dilation, groups)
    ref = reference(geom, x.float(), dy.float(), weight_shape, "argmax", None)
    assert grad.shape == ref.shape
    assert rel_err(grad, ref) <= REDUCE_RTOL[dtype] * 10, rel_err(grad, ref)
    out = cuda.patch_weight_grad(geom, x, dy, weight_shape, "argmax")
    assert out.dtype == dtype and out.is_contiguous() and rel_err(out, ref) <= OUT_RTOL[dtype]
    assert torch.equal(cuda.patch_grad_argmax(geom, x, dy, weight_shape), out)
    # random and fixed: positions and coefficients from the reference's own stream
    for variant in ("random", "fixed"):
        got = cuda.patch_weight_grad(geom, x, dy, weight_shape, variant, torch.Generator(device=device).manual_seed(4))
        want = reference(geom, x, dy, weight_shape, variant, torch.Generator(device=device).manual_seed(4))
        assert rel_err(got, want.float()) <= 4 * OUT_RTOL[dtype], (variant, rel_err(got, want))


def check_argmax_ties(device: str, dtype: torch.dtype) -> None:
    """torch.argmax's rules: the first maximum on ties, NaN above everything."""
    dy = torch.ones(2, 3, 4, 5, dtype=dtype, device=device)
    dy[0, 1, 2, 3] = -2.0  # |.| is largest here
    dy[1, 2, 1, 1] = float("nan")
    dy[1, 2, 3, 4] = 100.0
    pos, sums = cuda.argmax_sum(dy)
    ref = dy.float().reshape(2, 3, -1).abs().argmax(-1)
    assert torch.equal(pos.cpu(), ref.cpu())
    assert pos[0, 0] == 0 and pos[0, 1] == 2 * 5 + 3 and pos[1, 2] == 1 * 5 + 1
    assert torch.isnan(sums[1, 2]) and sums[0, 0] == 20


# --- live slices ---------------------------------------------------------------------------------
def relu_like(shape: tuple[int, ...], dtype: torch.dtype, fmt: str, device: str) -> Tensor:
    """A ReLU output with a dead channel, a dead sample, -0.0 entries and (not a ReLU's) a NaN."""
    x = make(shape, torch.float32, "contiguous", "cpu", seed=21).relu_()
    if len(shape) >= 2 and shape[1] > 2:
        x[:, 1] = 0
        x[:, -1] = -0.0  # a zero: not live
    if shape[0] > 2:
        x[2] = 0
    x.view(-1)[0] = float("nan")  # its plane counts as full (plane_nonzeros)
    x = x.to(device=device, dtype=dtype)
    if fmt == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def check_live(shape: tuple[int, ...], dtype: torch.dtype, fmt: str, device: str) -> None:
    x = relu_like(shape, dtype, fmt, device)
    counts = cuda.plane_nonzero_counts(x)
    assert torch.equal(counts.cpu(), mask.plane_nonzeros(x).cpu())
    for restrict in (True, False):
        got, ref = cuda.find_live(x, restrict), mask.find_live(x, restrict)
        for field in ("n", "c", "n_live", "c_live", "elements", "zero_elements", "planes", "dead_planes",
                      "dead_channels", "dead_samples"):
            assert getattr(got, field) == getattr(ref, field), field
        for field in ("samples", "channels"):
            a, b = getattr(got, field), getattr(ref, field)
            assert (a is None) == (b is None), field
            if a is not None:
                assert a.device == x.device and torch.equal(a.cpu(), b.cpu()), field
    live = cuda.live_channels(x)
    ref = (mask.plane_nonzeros(x).sum(0) > 0).nonzero().flatten()
    assert torch.equal(live.cpu(), ref.cpu())


def check_live_all_dead(device: str, dtype: torch.dtype) -> None:
    x = torch.zeros(3, 4, 5, 5, dtype=dtype, device=device)
    got = cuda.find_live(x)
    assert got.empty and got.n_live == 0 and got.c_live == 0 and got.dead_planes == 12
    assert cuda.live_channels(x).numel() == 0
