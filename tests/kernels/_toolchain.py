"""Finds the CUDA compilers the compile tests use without a GPU: ``nvcc`` and NVRTC.

NVRTC is ``libnvrtc`` from the ``nvidia-cuda-nvrtc`` wheel (the ``dev`` extra), called through
ctypes: the same compiler CuPy drives at run time, given the same source text and options.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


def find_nvcc() -> str | None:
    """``nvcc`` on PATH, else under ``$CUDA_HOME`` / ``$CUDA_PATH`` / ``/usr/local/cuda``."""
    found = shutil.which("nvcc")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        candidate = Path(root) / "bin" / "nvcc"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_libnvrtc() -> str | None:
    """``libnvrtc`` from an ``nvidia-*`` wheel (``nvidia/cu13/lib`` or ``nvidia/cuda_nvrtc/lib``),
    else a CUDA toolkit's ``lib64``, else the system loader's search path."""
    candidates: list[str] = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")), reverse=True)
        candidates += sorted(glob.glob(os.path.join(root, "*", "bin", "nvrtc64_*.dll")), reverse=True)
    for root in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        candidates += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")), reverse=True)
    candidates = [c for c in candidates if "builtins" not in os.path.basename(c)]
    if candidates:
        return candidates[0]
    return ctypes.util.find_library("nvrtc")


@dataclass
class NvrtcResult:
    ok: bool
    log: str
    binary: bytes


class Nvrtc:
    """A thin ctypes binding of the NVRTC calls a compile check needs."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def supported_archs(self) -> list[int]:
        count = ctypes.c_int()
        self._check(self.lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
        archs = (ctypes.c_int * count.value)()
        self._check(self.lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        return list(archs)

    def compile(self, source: str, name: str, options: tuple[str, ...]) -> NvrtcResult:
        """Compiles ``source``; with a real architecture (``sm_XY``) the binary is a cubin."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            opts = [o.encode() for o in options]
            rc = self.lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            binary = b""
            if rc == 0:
                # A real architecture (sm_XY) yields a cubin, a virtual one (compute_XY) PTX.
                real = any(o.startswith(("--gpu-architecture=sm_", "-arch=sm_")) for o in options)
                get_size, get = ("nvrtcGetCUBINSize", "nvrtcGetCUBIN") if real else ("nvrtcGetPTXSize", "nvrtcGetPTX")
                self._check(getattr(self.lib, get_size)(prog, ctypes.byref(size)), get_size)
                buf = ctypes.create_string_buffer(size.value)
                self._check(getattr(self.lib, get)(prog, buf), get)
                binary = buf.raw
            return NvrtcResult(rc == 0, log.value.decode(errors="replace"), binary)
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))

    def _check(self, rc: int, call: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{call} failed: {self.lib.nvrtcGetErrorString(rc).decode()} ({rc})")
