"""Backend selection and the loader's source lookup, on the CPU."""

from __future__ import annotations

import pytest
import torch

from lightning_approx import ConfigError
from lightning_approx.kernels import dispatch, loader, ops
from lightning_approx.kernels.dispatch import BackendUnavailableError, get_backend, set_backend, use_backend
from lightning_approx.ops import mask, norms


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    set_backend(None)
    yield
    set_backend(None)


def test_default_is_auto():
    assert get_backend() == "auto"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, " Torch ")
    assert get_backend() == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "gpu")
    with pytest.raises(ConfigError, match=rf"{dispatch.ENV_VAR}='gpu': unknown backend.*auto, torch, cuda"):
        get_backend()


def test_set_backend_overrides_the_environment(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    set_backend("torch")
    assert get_backend() == "torch"
    set_backend(None)
    assert get_backend() == "cuda"
    with pytest.raises(ConfigError, match="backend='CUDA!'"):
        set_backend("CUDA!")


def test_use_backend_restores_on_exit_and_on_error():
    with use_backend("torch"):
        assert get_backend() == "torch"
        with use_backend("cuda"):
            assert get_backend() == "cuda"
        assert get_backend() == "torch"
    assert get_backend() == "auto"
    with pytest.raises(RuntimeError), use_backend("cuda"):
        raise RuntimeError("inside")
    assert get_backend() == "auto"


def test_backend_is_visible_from_other_threads():
    # Autograd runs CUDA backwards on its own threads: a thread-local setting would be lost.
    import threading

    seen = []
    with use_backend("torch"):
        t = threading.Thread(target=lambda: seen.append(get_backend()))
        t.start()
        t.join()
    assert seen == ["torch"]


def _inputs():
    x = torch.randn(4, 6, 5, 5)
    relu = torch.relu(x)
    relu[:, 2] = 0
    return x, relu


def test_auto_runs_the_reference_on_cpu_tensors():
    x, relu = _inputs()
    assert dispatch.select("sample_norms", x) == "torch"
    assert torch.equal(ops.sample_norms(x), norms.sample_norms(x))
    assert torch.equal(ops.plane_sq_norms(x), norms.plane_sq_norms(x))
    per_sample, per_channel = ops.sample_channel_norms(x)
    sq = norms.plane_sq_norms(x)
    assert torch.allclose(per_sample, sq.sum(1).sqrt()) and torch.allclose(per_channel, sq.sum(0).sqrt())
    assert torch.allclose(ops.channel_norms(x), sq.sum(0).sqrt())
    idx, scale = torch.tensor([3, 0, 3]), torch.tensor([0.5, 2.0, 1.5])
    expected = x.index_select(0, idx) * scale.view(-1, 1, 1, 1)
    assert torch.equal(ops.gather_scale(x, idx, scale, 0), expected)
    cl = x.contiguous(memory_format=torch.channels_last)
    for dim in (0, 1):
        out = ops.gather_scale(cl, idx, None, dim)
        assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, x.index_select(dim, idx))
    assert torch.equal(ops.plane_nonzero_counts(relu), mask.plane_nonzeros(relu))
    live = ops.find_live(relu)
    assert torch.equal(live.channels, torch.tensor([0, 1, 3, 4, 5]))
    assert torch.equal(ops.live_channels(relu), torch.tensor([0, 1, 3, 4, 5]))


def test_auto_runs_the_reference_for_unsupported_dtypes():
    assert dispatch.kernel_blocker((torch.randn(2, dtype=torch.float64),)) is not None


def test_forced_cuda_on_a_cpu_tensor_raises_the_documented_error():
    x, _ = _inputs()
    with use_backend("cuda"), pytest.raises(BackendUnavailableError) as info:
        ops.sample_norms(x)
    err = info.value
    assert isinstance(err, ConfigError) and err.field == "backend" and err.value == "cuda"
    message = str(err)
    assert "sample_norms cannot run the CUDA kernels" in message and "tensor on cpu" in message
    assert "Fix:" in message and "'auto'" in message and "'torch'" in message and dispatch.ENV_VAR in message


def test_forced_cuda_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError, match=rf"^{dispatch.ENV_VAR}='cuda': find_live cannot run"):
        ops.find_live(torch.zeros(2, 3))


def test_forced_cuda_without_cupy_names_cupy(monkeypatch):
    # The tensor check comes first; fake a CUDA tensor to reach the CuPy check.
    monkeypatch.setattr(loader, "_import_cupy", lambda: (None, "ModuleNotFoundError: No module named 'cupy'"))

    class FakeCuda:
        is_cuda = True
        dtype = torch.float32

        def is_floating_point(self):
            return True

    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="CuPy does not import"):
        dispatch.select("gather_scale", FakeCuda())


def test_forced_torch_never_needs_cupy(monkeypatch):
    monkeypatch.setattr(loader, "_import_cupy", lambda: (_ for _ in ()).throw(AssertionError("imported")))
    with use_backend("torch"):
        assert dispatch.select("sample_norms", torch.zeros(1)) == "torch"


# --- loader ------------------------------------------------------------------------------------
def test_loader_finds_the_repository_sources():
    folder = loader.source_dir()
    names = {p.name for p in loader.source_files()}
    assert {"norms.cu", "gather.cu", "prune.cu", "patch.cu", "mask.cu"} <= names
    assert (folder / "la_common.cuh").is_file()


def test_loader_inlines_local_headers_with_line_directives():
    text = loader.read_source("norms.cu")
    assert '#line 1 "la_common.cuh"' in text
    assert "struct LaSumSq" in text
    # After the header, numbering resumes at the line after the #include in norms.cu.
    original = (loader.source_dir() / "norms.cu").read_text().splitlines()
    include_line = next(i for i, line in enumerate(original, 1) if line.startswith('#include "la_common.cuh"'))
    assert f'#line {include_line + 1} "norms.cu"' in text


def test_loader_source_override(monkeypatch, tmp_path):
    (tmp_path / "only.cu").write_text('#include "h.cuh"\nint b;\n')
    (tmp_path / "h.cuh").write_text("int a;\n")
    monkeypatch.setenv(loader.SOURCE_ENV, str(tmp_path))
    assert loader.source_dir() == tmp_path
    assert loader.read_source("only.cu") == '#line 1 "h.cuh"\nint a;\n\n#line 2 "only.cu"\nint b;\n'


def test_loader_without_sources_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(loader.SOURCE_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setattr(loader, "_PACKAGE_DIR", tmp_path / "pkg")
    with pytest.raises(FileNotFoundError, match=f"set {loader.SOURCE_ENV}"):
        loader.source_dir()


def test_nvrtc_options_are_the_loader_options_plus_cupys():
    opts = loader.nvrtc_options("sm_90")
    assert opts[: len(loader._OPTIONS)] == loader._OPTIONS
    assert opts == ("-std=c++17", "-ftz=true", "-arch=sm_90")


def test_wheel_build_hook_adds_the_source_package():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    from pathlib import Path

    from setuptools.command.build_py import build_py

    from lightning_approx.kernels._build import CUDA_PACKAGE, BuildPyWithCudaSources

    config = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"][CUDA_PACKAGE] == "cuda_src"
    assert set(config["package-data"][CUDA_PACKAGE]) == {"*.cu", "*.cuh"}
    assert config["cmdclass"]["build_py"] == "lightning_approx.kernels._build.BuildPyWithCudaSources"
    assert issubclass(BuildPyWithCudaSources, build_py)
