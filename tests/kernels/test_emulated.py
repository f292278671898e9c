"""The kernels of cuda_src/ run on the CPU, through the emulator in ``emu/cuda_emu.h``, against
the PyTorch references: the same checks as the GPU tests (``cases.py``), on smaller inputs.

What this proves without a GPU: the launch code (grids, blocks, argument order and C types),
the kernels' indexing, reductions, warp collectives, compaction, rounding and random stream.
What it cannot: timing, memory coalescing, and behaviour that differs on real hardware (the
half / bfloat16 conversions run the portable branches, checked bit-exact here against torch).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels import cases

pytestmark = pytest.mark.usefixtures("emulated")

NORM_SHAPES = [(5, 8, 9, 7), (3, 5, 7, 5), (3, 16, 32, 32), (6, 40), (2, 3, 1, 1)]


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("fmt", cases.FORMATS)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_norms(shape, dtype, fmt):
    cases.check_norms(shape, dtype, fmt, "cpu")


@pytest.mark.parametrize("fmt", cases.FORMATS)
@pytest.mark.parametrize("op", ["sumsq", "nonzero", "argmax_sum"])
def test_split_planes_are_combined_by_the_finalize_pass(emulated, op, fmt):
    # Few, long planes: each is split over several warps / blocks, then combined.
    from lightning_approx.kernels import cuda
    from lightning_approx.ops import mask, norms

    x = cases.make((2, 8, 64, 64), torch.float32, fmt, "cpu")
    if op == "sumsq":
        assert cases.rel_err(cuda.plane_sq_norms(x), norms.plane_sq_norms(x)) <= 2e-5
    elif op == "nonzero":
        x = x.relu()
        assert torch.equal(cuda.plane_nonzero_counts(x), mask.plane_nonzeros(x))
    else:
        pos, sums = cuda.argmax_sum(x)
        flat = x.reshape(2, 8, -1)
        assert torch.equal(pos, flat.abs().argmax(-1)) and cases.rel_err(sums, flat.sum(-1)) <= 2e-5
    scheme = "cols" if fmt == "channels_last" else "rows"
    names = [name for _, name, _, _ in emulated.launches]
    assert names == [f"la_{op}_{scheme}_f32", f"la_{op}_finalize"], names


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("fmt", cases.FORMATS)
@pytest.mark.parametrize("shape", [(5, 8, 9, 7), (4, 6, 3, 5), (7, 33)], ids=str)
def test_gather_scale(shape, dtype, fmt):
    cases.check_gather_scale(shape, dtype, fmt, "cpu")


def test_gather_scale_out_of_range_index_writes_nan():
    from lightning_approx.kernels import cuda

    t = torch.randn(4, 8)
    out = cuda.gather_scale(t, torch.tensor([1, 9]), None, 0)
    assert torch.equal(out[0], t[1]) and torch.isnan(out[1]).all()


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("fmt", cases.FORMATS)
def test_stochastic_prune(dtype, fmt):
    cases.check_stochastic_prune(64 * 97, dtype, fmt, "cpu")


def test_stochastic_prune_unaligned_tail():
    # A view starting one element in: the scalar path, same Philox words per element.
    from lightning_approx.kernels import cuda

    g = torch.randn(1001)
    a, _ = cuda.stochastic_prune(g[1:], 0.7, 5)
    b, _ = cuda.stochastic_prune(g[1:].clone(), 0.7, 5)
    assert torch.equal(a, b)


def test_stochastic_prune_generator():
    cases.check_prune_generator("cpu")


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("fmt", cases.FORMATS)
@pytest.mark.parametrize("geometry", cases.PATCH_GEOMETRIES, ids=lambda g: f"k{g[2][0]}x{g[2][1]}s{g[3][0]}g{g[6]}")
def test_patch_grad(geometry, dtype, fmt):
    cases.check_patch_grad(geometry, dtype, fmt, "cpu")


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
def test_argmax_ties(dtype):
    cases.check_argmax_ties("cpu", dtype)


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
@pytest.mark.parametrize("fmt", cases.FORMATS)
@pytest.mark.parametrize("shape", [(5, 8, 9, 7), (4, 6, 3, 5), (6, 40), (3, 300, 2, 2)], ids=str)
def test_live(shape, dtype, fmt):
    cases.check_live(shape, dtype, fmt, "cpu")


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
def test_live_all_dead(dtype):
    cases.check_live_all_dead("cpu", dtype)


def test_public_ops_reach_the_kernels_when_dispatch_says_cuda(emulated, monkeypatch):
    # The dispatching wrappers in kernels.ops, with the backend forced to "cuda" and the
    # device checks satisfied: every op must launch kernels and match its reference.
    from lightning_approx.kernels import dispatch, ops
    from lightning_approx.ops import mask, norms

    monkeypatch.setattr(dispatch, "kernel_blocker", lambda tensors: None)
    x = cases.make((4, 6, 5, 5), torch.bfloat16, "channels_last", "cpu")
    relu = cases.relu_like((4, 6, 5, 5), torch.float16, "contiguous", "cpu")
    idx, scale = torch.tensor([2, 0, 2]), torch.tensor([0.5, 2.0, 3.0])
    with dispatch.use_backend("cuda"):
        checks = [
            (lambda: ops.sample_norms(x), lambda: norms.sample_norms(x)),
            (lambda: ops.plane_sq_norms(x), lambda: norms.plane_sq_norms(x)),
            (lambda: ops.channel_norms(x), lambda: norms.plane_sq_norms(x).sum(0).sqrt()),
            (lambda: ops.sample_channel_norms(x)[0], lambda: norms.plane_sq_norms(x).sum(1).sqrt()),
            (lambda: ops.gather_scale(x, idx, scale, 1), lambda: cases.gather_scale_reference(x, idx, scale, 1)),
            (lambda: ops.plane_nonzero_counts(relu), lambda: mask.plane_nonzeros(relu)),
            (lambda: ops.live_channels(relu), lambda: mask.find_live(relu).channels),
            (lambda: ops.find_live(relu).samples, lambda: mask.find_live(relu).samples),
        ]
        for got, ref in checks:
            emulated.launches.clear()
            result, expected = got(), ref()
            assert emulated.launches, "no kernel ran"
            assert cases.rel_err(result, expected) <= 2e-5
        emulated.launches.clear()
        pruned, nnz = ops.stochastic_prune(x, 0.5, 3)
        assert emulated.launches and isinstance(nnz, int) and nnz == int((pruned != 0).sum())
        from lightning_approx.ops.conv import ConvGeometry
        from lightning_approx.ops.patch import patch_weight_grad

        geom = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
        dy = cases.make((4, 3, 5, 5), torch.bfloat16, "channels_last", "cpu", seed=2)
        emulated.launches.clear()
        got = ops.patch_grad_argmax(geom, x, dy, torch.Size((3, 6, 3, 3)))
        assert emulated.launches
        ref = patch_weight_grad(geom, x.float(), dy.float(), torch.Size((3, 6, 3, 3)), "argmax", None)
        assert cases.rel_err(got, ref) <= cases.OUT_RTOL[torch.bfloat16]
