"""Runs the kernels of ``cuda_src/`` on the CPU: each ``.cu`` is compiled with the host C++
compiler against ``emu/cuda_emu.h`` into a shared library, and :func:`launch` stands in for
:func:`lightning_approx.kernels.loader.launch`.

So the Python launch code (grid and block shapes, argument order and C types) and the kernel
code (indexing, reductions, warp collectives, rounding) are checked against the PyTorch
references without a GPU. The tensors are CPU tensors: an emulated kernel reads and writes
host memory through the same raw pointers.

Every launch also checks each argument's type against the kernel's C signature (parsed from
the preprocessed source), and the block size against the kernels' launch bound.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_approx.kernels import loader

EMU_DIR = Path(__file__).resolve().parent / "emu"
_SIGNATURE = re.compile(r'extern\s+"C"\s+void\s+(la_\w+)\s*\(([^)]*)\)', re.S)
MAX_THREADS = 256  # LA_THREADS: every kernel's __launch_bounds__


def find_cxx() -> str | None:
    """The host C++ compiler (``g++`` or ``clang++``)."""
    return shutil.which("g++") or shutil.which("clang++")


def c_type_to_numpy(ctype: str) -> type:
    """The numpy scalar type whose bytes the kernel parameter ``ctype`` reads."""
    ctype = " ".join(ctype.replace("const", " ").split())
    if "*" in ctype:
        return np.uint64
    table = {"la_i64": np.int64, "long long": np.int64, "la_u64": np.uint64, "unsigned long long": np.uint64,
             "int": np.int32, "unsigned int": np.uint32, "float": np.float32}
    if ctype not in table:
        raise ValueError(f"kernel parameter type {ctype!r} has no launch mapping")
    return table[ctype]


def _param_type(param: str) -> str:
    """``"const float* x"`` -> ``"const float*"``."""
    param = " ".join(param.replace("__restrict__", " ").split())
    name = re.search(r"(\w+)$", param)
    assert name is not None, param
    return param[: name.start()].strip()


@dataclass
class KernelLib:
    """One compiled ``.cu``: its kernels and their C parameter types."""

    lib: ctypes.CDLL
    signatures: dict[str, list[str]]


class Emulator:
    """Compiles the kernel files for the CPU on first use (cached by content hash)."""

    def __init__(self, build_dir: Path, cxx: str) -> None:
        self.build_dir = build_dir
        self.cxx = cxx
        self.libs: dict[str, KernelLib] = {}
        self.launches: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = []

    def _flags(self) -> list[str]:
        return ["-std=c++17", "-x", "c++", f"-I{EMU_DIR}", f"-I{loader.source_dir()}", "-include", "cuda_emu.h"]

    def signatures(self, file: str) -> dict[str, list[str]]:
        """kernel name -> C parameter types, from the preprocessed source."""
        src = loader.source_dir() / file
        out = subprocess.run([self.cxx, "-E", "-P", *self._flags(), str(src)], check=True, capture_output=True,
                             text=True).stdout
        return {m.group(1): [_param_type(p) for p in m.group(2).split(",") if p.strip()]
                for m in _SIGNATURE.finditer(out)}

    def library(self, file: str) -> KernelLib:
        if file in self.libs:
            return self.libs[file]
        sigs = self.signatures(file)
        folder = loader.source_dir()
        digest = hashlib.sha256()
        for path in [*sorted(folder.glob("*.cuh")), folder / file, EMU_DIR / "cuda_emu.h"]:
            digest.update(path.read_bytes())
        stem = f"{Path(file).stem}_{digest.hexdigest()[:16]}"
        so = self.build_dir / f"{stem}.so"
        if not so.exists():
            lines = ['#include "cuda_emu.h"', f'#include "{folder / file}"', "",
                     "static dim3 emu_grid, emu_block;", "static char emu_error[512];",
                     'extern "C" void emu_configure(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
                     "unsigned bz) {",
                     "    emu_grid.x = gx; emu_grid.y = gy; emu_grid.z = gz;",
                     "    emu_block.x = bx; emu_block.y = by; emu_block.z = bz;", "}",
                     'extern "C" const char* emu_last_error() { return emu_error; }']
            for name, types in sigs.items():
                aliases = "".join(f"    using P{i} = {t};\n" for i, t in enumerate(types))
                call = ", ".join(f"*reinterpret_cast<P{i}*>(a[{i}])" for i in range(len(types)))
                lines.append(f'extern "C" int emu_{name}(void** a) {{\n{aliases}'
                             f"    try {{ emu::launch(emu_grid, emu_block, [=] {{ {name}({call}); }}); return 0; }}\n"
                             "    catch (const std::exception& e) { snprintf(emu_error, sizeof emu_error, \"%s\", "
                             "e.what()); return 1; }\n}")
            cpp = self.build_dir / f"{stem}.cpp"
            cpp.write_text("\n".join(lines) + "\n")
            subprocess.run([self.cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", f"-I{EMU_DIR}", f"-I{folder}",
                            str(cpp), "-o", str(so)], check=True, capture_output=True, text=True)
        lib = ctypes.CDLL(str(so))
        lib.emu_last_error.restype = ctypes.c_char_p
        self.libs[file] = KernelLib(lib, sigs)
        return self.libs[file]

    def launch(self, file: str, name: str, device: int, grid: Sequence[int], block: Sequence[int],
               args: Sequence[Any]) -> None:
        """Same contract as :func:`lightning_approx.kernels.loader.launch`, run on the CPU."""
        kl = self.library(file)
        if name not in kl.signatures:
            raise AssertionError(f"{file} has no kernel {name!r} (has {sorted(kl.signatures)})")
        types = kl.signatures[name]
        if len(args) != len(types):
            raise AssertionError(f"{name}: {len(args)} arguments for {len(types)} parameters {types}")
        for i, (arg, ctype) in enumerate(zip(args, types, strict=True)):
            want = c_type_to_numpy(ctype)
            if type(arg) is not want:
                raise AssertionError(f"{name} argument {i} ({ctype}): got {type(arg).__name__}, "
                                     f"expected {want.__name__}")
        grid3 = (*tuple(int(g) for g in grid), 1, 1)[:3]
        block3 = (*tuple(int(b) for b in block), 1, 1)[:3]
        threads = block3[0] * block3[1] * block3[2]
        assert 0 < threads <= MAX_THREADS and threads % 32 == 0, f"{name}: block {block3}"
        assert all(g >= 1 for g in grid3) and grid3[1] <= 65535 and grid3[2] <= 65535, f"{name}: grid {grid3}"
        self.launches.append((file, name, grid3, block3))
        kl.lib.emu_configure(*[ctypes.c_uint(v) for v in (*grid3, *block3)])
        holders = [np.array([arg]) for arg in args]  # keep the argument bytes alive during the call
        argv = (ctypes.c_void_p * max(1, len(args)))(*[h.ctypes.data for h in holders])
        if getattr(kl.lib, f"emu_{name}")(argv) != 0:
            raise RuntimeError(f"{name}: {kl.lib.emu_last_error().decode()}")
