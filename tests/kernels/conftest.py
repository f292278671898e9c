"""Fixtures of the kernel tests: poisoned result buffers, and the CPU emulation of the kernels."""

from __future__ import annotations

import pytest
import torch

from lightning_approx.kernels import cuda, loader
from tests.kernels.cases import INT_POISON


@pytest.fixture
def poison(monkeypatch):
    """Every result buffer a kernel should write in full starts as NaN (floats) or a huge
    negative sentinel (integers), so an element the kernel skips cannot pass as a result."""
    real = cuda._empty

    def poisoned(shape, dtype, device, memory_format=torch.contiguous_format):
        out = real(shape, dtype, device, memory_format)
        return out.fill_(float("nan") if dtype.is_floating_point else INT_POISON)

    monkeypatch.setattr(cuda, "_empty", poisoned)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    from tests.kernels._emulator import Emulator, find_cxx

    cxx = find_cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++ or clang++) to build the CPU emulation of the kernels")
    return Emulator(tmp_path_factory.mktemp("kernel_emulation"), cxx)


@pytest.fixture(params=[2, 5], ids=["sms2", "sms5"])
def emulated(request, emulator, monkeypatch, poison):
    """Kernel launches run in the CPU emulator on CPU tensors, as on a device with 2 or 5
    multiprocessors holding 2 blocks each (small grids: the grid-stride loops and the split
    reductions both run)."""
    monkeypatch.setattr(loader, "launch", emulator.launch)
    monkeypatch.setattr(cuda, "_device", lambda t: 0)
    monkeypatch.setattr(cuda, "_sms", lambda device: request.param)
    monkeypatch.setattr(cuda, "_resident", lambda file, name, device, threads: 2)
    emulator.launches.clear()
    return emulator
