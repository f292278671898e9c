"""Finds the CUDA sources, compiles them through CuPy (NVRTC) and launches their kernels.

Sources: ``cuda_src/*.cu`` at the top of the repository. A wheel or sdist ships them as the
package data ``lightning_approx/_cuda_src`` (pyproject's ``build_py`` hook,
:mod:`lightning_approx.kernels._build`); an editable install or a checkout reads the
repository's ``cuda_src/``. ``LIGHTNING_APPROX_CUDA_SRC`` points elsewhere (a developer's copy).

Compilation: on the first launch of a kernel of a file on a device, the file is read, its
local ``#include "...cuh"`` lines are inlined (so CuPy's on-disk cache key, which hashes the
source text, changes whenever a header does), and :class:`cupy.RawModule` compiles it with
NVRTC for that device's architecture; the module is cached per (file, device). The kernels
include no CUDA header, so NVRTC needs no include path: :func:`nvrtc_options` is the whole
option list, and ``tests/kernels/test_compile.py`` compiles with exactly these options.

Launch: on PyTorch's current stream of the tensor's device (wrapped as a
``cupy.cuda.ExternalStream``), with raw device pointers, so no tensor is copied or converted
and the kernels order correctly with PyTorch's own work. Memory comes from PyTorch's caching
allocator (the callers allocate with ``torch.empty``); CuPy allocates nothing.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["SOURCE_ENV", "CompileError", "cupy_available", "cupy_import_error", "device_properties",
           "get_kernel", "launch", "nvrtc_options", "read_source", "resident_blocks", "source_dir", "source_files"]

SOURCE_ENV = "LIGHTNING_APPROX_CUDA_SRC"

# The options the loader gives CuPy. CuPy appends ``-ftz=true`` (float32 denormals flush to
# zero; NVRTC honours the last occurrence, so this cannot be undone from here) and the current
# device's architecture (``-arch=sm_XY``, or ``compute_XY`` where its NVRTC predates the device):
# :func:`nvrtc_options` spells out the complete list NVRTC receives.
_OPTIONS: tuple[str, ...] = ("-std=c++17",)
_CUPY_ADDS: tuple[str, ...] = ("-ftz=true",)

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # lightning_approx/
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)


class CompileError(RuntimeError):
    """A kernel file did not compile, or a kernel is missing from it."""


def source_dir() -> Path:
    """The folder holding the ``.cu`` files.

    Order: ``$LIGHTNING_APPROX_CUDA_SRC``; the installed package data
    ``lightning_approx/_cuda_src`` (wheels, sdists); the repository's ``cuda_src/`` next to the
    package (checkouts, editable installs).

    Raises:
        FileNotFoundError: None of them holds a ``.cu`` file.
    """
    override = os.environ.get(SOURCE_ENV)
    candidates = [Path(override)] if override else []
    candidates += [_PACKAGE_DIR / "_cuda_src", _PACKAGE_DIR.parent / "cuda_src"]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.cu")):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no CUDA sources (*.cu) found; looked in {looked}. Fix: reinstall lightning-approx (a wheel ships "
        f"them as lightning_approx/_cuda_src), or set {SOURCE_ENV} to the repository's cuda_src/ folder")


def source_files() -> list[Path]:
    """Every kernel file (``*.cu``), sorted."""
    return sorted(source_dir().glob("*.cu"))


def read_source(name: str) -> str:
    """The text of ``name`` (e.g. ``"norms.cu"``) with its local headers inlined.

    Each header is inlined once (its ``#pragma once`` would do the same) and framed by
    ``#line`` directives, so compiler messages still name the right file and line.
    """
    folder = source_dir()
    seen: set[str] = set()

    def expand(file: str) -> str:
        text = (folder / file).read_text()

        def include(match: re.Match[str]) -> str:
            header = match.group(1)
            if not (folder / header).is_file():
                return match.group(0)  # not ours: leave it to the compiler
            if header in seen:
                return ""
            seen.add(header)
            line = text.count("\n", 0, match.start()) + 2
            return f'#line 1 "{header}"\n{expand(header)}\n#line {line} "{file}"'

        return _INCLUDE.sub(include, text)

    return expand(name)


def nvrtc_options(arch: str) -> tuple[str, ...]:
    """The complete NVRTC option list for one architecture (``"sm_90"``, ``"compute_80"``), in
    the order CuPy passes it: the loader's options, ``-ftz=true``, the architecture."""
    return (*_OPTIONS, *_CUPY_ADDS, f"-arch={arch}")


# --- CuPy ------------------------------------------------------------------------------------
@functools.cache
def _import_cupy() -> tuple[Any, str | None]:
    try:
        import cupy
    except Exception as err:  # ImportError, or a CUDA library CuPy cannot load
        return None, f"{type(err).__name__}: {err}"
    return cupy, None


def cupy_available() -> bool:
    """Whether CuPy imports (the kernels' compiler and launcher)."""
    return _import_cupy()[0] is not None


def cupy_import_error() -> str | None:
    """Why CuPy did not import, or ``None`` when it did."""
    return _import_cupy()[1]


_modules: dict[tuple[str, int], Any] = {}
_functions: dict[tuple[str, str, int], Any] = {}
_streams: dict[tuple[int, int], Any] = {}
_lock = threading.Lock()


def _module(file: str, device: int) -> Any:
    key = (file, device)
    module = _modules.get(key)
    if module is None:
        cupy, _ = _import_cupy()
        with _lock:
            module = _modules.get(key)
            if module is None:
                with cupy.cuda.Device(device):
                    module = cupy.RawModule(code=read_source(file), options=_OPTIONS, backend="nvrtc")
                    try:
                        module.compile()
                    except Exception as err:
                        raise CompileError(f"{file} did not compile for device {device} with NVRTC options "
                                           f"{' '.join(_OPTIONS)}: {err}") from err
                _modules[key] = module
    return module


def get_kernel(file: str, name: str, device: int) -> Any:
    """The compiled kernel ``name`` of ``file`` on CUDA device ``device`` (compiled on first use)."""
    key = (file, name, device)
    fn = _functions.get(key)
    if fn is None:
        module = _module(file, device)
        cupy, _ = _import_cupy()
        try:
            with cupy.cuda.Device(device):  # get_function loads the kernel on the current device
                fn = module.get_function(name)
        except Exception as err:
            raise CompileError(f"kernel {name!r} not found in {file}: {err}") from err
        _functions[key] = fn
    return fn


def _stream(device: int) -> Any:
    ptr = torch.cuda.current_stream(device).cuda_stream
    key = (device, ptr)
    stream = _streams.get(key)
    if stream is None:
        cupy, _ = _import_cupy()
        stream = _streams[key] = cupy.cuda.ExternalStream(ptr, device)
    return stream


_resident: dict[tuple[str, str, int, int], int] = {}


def resident_blocks(file: str, name: str, device: int, threads: int) -> int:
    """Blocks of ``threads`` threads of kernel ``name`` one multiprocessor holds at once (the
    CUDA occupancy calculator, from the kernel's registers and shared memory)."""
    key = (file, name, device, threads)
    blocks = _resident.get(key)
    if blocks is None:
        kernel = get_kernel(file, name, device)
        cupy, _ = _import_cupy()
        with cupy.cuda.Device(device):
            function = kernel.kernel  # the RawKernel's cupy.cuda.Function on the current device
            blocks = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(function.ptr, threads, 0)
        blocks = _resident[key] = max(1, int(blocks))
    return blocks


@functools.cache
def device_properties(device: int) -> tuple[int, int]:
    """(multiprocessor count, compute capability as 10 * major + minor) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.major * 10 + props.minor


def launch(file: str, name: str, device: int, grid: Sequence[int], block: Sequence[int], args: Sequence[Any]) -> None:
    """Launches ``name`` from ``file`` on PyTorch's current stream of ``device``.

    Args:
        file: Kernel file, e.g. ``"norms.cu"``.
        name: ``extern "C"`` kernel name.
        device: CUDA device index.
        grid: Grid size (x[, y[, z]]).
        block: Block size (x[, y[, z]]).
        args: Kernel arguments, already typed as the kernel declares them (numpy scalars: see
            ``ptr``, ``i64``, ``i32``, ``f32``, ``u64`` in :mod:`lightning_approx.kernels.cuda`).
    """
    kernel = get_kernel(file, name, device)
    cupy, _ = _import_cupy()
    with cupy.cuda.Device(device), _stream(device):
        kernel(tuple(grid), tuple(block), tuple(args))
