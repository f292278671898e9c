"""Every kernel file compiles, without a GPU: with ``nvcc`` for sm_80 and sm_90, and with NVRTC
given exactly the source text and options the loader gives CuPy. A syntax or template error,
or a kernel the Python side launches but the file lacks, fails here.

Skipped, with the reason, only where a compiler is missing: ``nvcc`` (looked up on PATH, then
under ``$CUDA_HOME``, ``$CUDA_PATH`` and ``/usr/local/cuda``), or ``libnvrtc`` (the
``nvidia-cuda-nvrtc`` wheel of the ``dev`` extra).
"""

from __future__ import annotations

import subprocess

import pytest

from lightning_approx.kernels import loader
from lightning_approx.kernels.cuda import KERNELS
from tests.kernels._toolchain import Nvrtc, find_libnvrtc, find_nvcc

ARCHS = ("sm_80", "sm_90")
FILES = [p.name for p in loader.source_files()]


@pytest.fixture(scope="module")
def nvcc() -> str:
    path = find_nvcc()
    if path is None:
        pytest.skip("nvcc not found on PATH, $CUDA_HOME, $CUDA_PATH or /usr/local/cuda (install the CUDA toolkit)")
    return path


@pytest.fixture(scope="module")
def nvrtc() -> Nvrtc:
    path = find_libnvrtc()
    if path is None:
        pytest.skip("libnvrtc not found: pip install nvidia-cuda-nvrtc (part of the dev extra)")
    return Nvrtc(path)


def test_every_source_file_is_declared():
    assert FILES, "no .cu files found"
    assert sorted(KERNELS) == sorted(FILES), "KERNELS in lightning_approx/kernels/cuda.py lists the .cu files"


def test_sources_need_no_cuda_headers():
    # Why NVRTC needs no include path: the inlined sources include no system header at all.
    for file in FILES:
        text = loader.read_source(file)
        assert "#include <" not in text, file
        assert '#include "' not in text, f"{file}: a local header was not inlined"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", FILES)
def test_nvcc_compiles(nvcc, file, arch, tmp_path):
    cubin = tmp_path / f"{file}.{arch}.cubin"
    cmd = [nvcc, "-std=c++17", f"-arch={arch}", "--cubin", "-Werror", "all-warnings", "-Xptxas", "-warn-spills",
           "-o", str(cubin), str(loader.source_dir() / file)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    assert "spill" not in done.stderr, done.stderr
    binary = cubin.read_bytes()
    missing = [k for k in KERNELS[file] if k.encode() + b"\0" not in binary]
    assert not missing, f"{file} lacks kernels {missing}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", FILES)
def test_nvrtc_compiles_with_the_loader_options(nvrtc, file, arch):
    options = loader.nvrtc_options(arch)
    result = nvrtc.compile(loader.read_source(file), file, options)
    assert result.ok, f"NVRTC {'.'.join(map(str, nvrtc.version()))} {' '.join(options)}:\n{result.log}"
    missing = [k for k in KERNELS[file] if k.encode() + b"\0" not in result.binary]
    assert not missing, f"{file} lacks kernels {missing}"


def test_nvrtc_check_catches_a_template_error(nvrtc):
    # The harness itself: a broken instantiation must fail, with NVRTC's message.
    broken = loader.read_source("norms.cu") + "\ntemplate <class T> __device__ T bad() { return T::missing; }\n" \
        'extern "C" __global__ void la_broken(float* p) { p[0] = bad<float>(); }\n'
    result = nvrtc.compile(broken, "broken.cu", loader.nvrtc_options("sm_90"))
    assert not result.ok and "error" in result.log


def test_nvrtc_supports_the_archs(nvrtc):
    supported = nvrtc.supported_archs()
    assert {80, 90} <= set(supported), supported
