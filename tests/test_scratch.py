"""Scratch buffers: reused only where no one can hold the tensor, and never a source of stale
values in the gradients that use them."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_approx import approximate, restore
from lightning_approx.methods import CRS
from lightning_approx.ops.conv import pad_into
from lightning_approx.ops.layout import is_channels_last
from lightning_approx.ops.scratch import Scratch, dense_strides
from lightning_approx.surgery import patched_sites

CL = torch.channels_last


@pytest.mark.parametrize("size,channels_last", [((2, 3, 4, 5), False), ((2, 3, 4, 5), True), ((6, 7), False),
                                                ((2, 1, 4, 5), True)])
def test_dense_strides_are_torchs(size, channels_last):
    fmt = CL if channels_last else torch.contiguous_format
    assert dense_strides(size, channels_last) == torch.empty(size, memory_format=fmt).stride()


def test_a_slot_is_one_buffer_reused_and_grown_on_cpu_without_autograd():
    scratch, like = Scratch(), torch.zeros(1, 3, 2, 2).contiguous(memory_format=CL)
    with torch.no_grad():
        a = scratch.empty("a", (2, 3, 4, 5), like)
        b = scratch.empty("a", (1, 3, 4, 5), like)
        other = scratch.empty("b", (1, 3, 4, 5), like)
        grown = scratch.empty("a", (4, 3, 4, 5), like)
    assert a.data_ptr() == b.data_ptr() != other.data_ptr()
    assert is_channels_last(a) and is_channels_last(grown) and grown.shape == (4, 3, 4, 5)
    assert len(scratch) == 2
    scratch.clear()
    assert len(scratch) == 0


def test_under_autograd_every_tensor_is_new():
    """A graph may save the tensor (a double backward), so it must never be overwritten."""
    scratch, like = Scratch(), torch.zeros(2, 2)
    a, b = scratch.empty("a", (2, 2), like), scratch.empty("a", (2, 2), like)
    assert a.data_ptr() != b.data_ptr() and len(scratch) == 0


def test_each_thread_gets_its_own_buffer():
    scratch, like, ptrs = Scratch(), torch.zeros(1), []

    def take() -> None:
        with torch.no_grad():
            ptrs.append(scratch.empty("a", (64,), like).data_ptr())

    take()
    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    assert ptrs[0] != ptrs[1] and len(scratch) == 2


def test_copies_and_pickles_start_empty():
    scratch = Scratch()
    with torch.no_grad():
        scratch.empty("a", (1024,), torch.zeros(1))
    assert len(pickle.loads(pickle.dumps(scratch))) == 0
    assert len(copy.deepcopy(scratch)) == 0
    assert len(scratch) == 1


@pytest.mark.parametrize("pad", [(1, 1, 1, 1), (0, 2, 3, 0), (-1, 1, -2, 1), (2, -1, 0, -3)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_pad_into_is_f_pad(pad, channels_last):
    x = torch.randn(2, 3, 5, 6)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    expected = F.pad(x, pad)
    out = torch.full_like(expected, float("nan"))  # a reused buffer holds old values
    torch.testing.assert_close(pad_into(out, x, pad), expected, rtol=0, atol=0)


@pytest.mark.parametrize("options", [dict(), dict(grads="weight", weight_window="pixel_grid", sample_ratio=1 / 9)],
                         ids=["windows", "pixel_grid"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_stale_buffers_never_reach_the_gradients(options, channels_last):
    """The same draws give the same gradients when the buffers hold NaNs from before; restore
    frees them."""
    torch.manual_seed(0)
    fmt = CL if channels_last else torch.contiguous_format
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).to(memory_format=fmt)
    x = torch.randn(6, 4, 7, 7).contiguous(memory_format=fmt)
    method = CRS(**{"sample_ratio": 0.5, "probabilities": "uniform", **options})
    approximate(model, method, exclude=None)
    for site in patched_sites(model):
        site.generator(torch.device("cpu"))  # the windows' stream, made now so its state can be replayed
    states = [site.rng_state() for site in patched_sites(model)]

    def grads() -> list[torch.Tensor]:
        for site, state in zip(patched_sites(model), states, strict=True):
            site.set_rng_state(state)
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    first = grads()
    assert len(method.scratch) > 0  # the backward used its buffers
    for buffer in method.scratch._buffers.values():
        buffer.fill_(float("nan"))
    for a, b in zip(first, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    restore(model)
    assert len(method.scratch) == 0
