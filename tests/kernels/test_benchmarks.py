"""The GPU benchmark scripts: their message on a machine without CUDA, and (through the CPU
emulation of the kernels) every case of the kernel benchmark on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import load_script


def _load(name: str):
    return load_script("benchmarks", name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is present")
@pytest.mark.parametrize("name", ["kernels", "gpu_step_time"])
def test_scripts_exit_with_a_clear_message_without_cuda(name):
    with pytest.raises(SystemExit) as info:
        _load(name).main([])
    assert "needs a CUDA GPU" in str(info.value) and "Nothing was measured" in str(info.value)


def test_kernel_benchmark_cases_run(emulated):
    bench = _load("kernels")
    cases = bench.elementwise_cases(quick=True, device="cpu", shapes=[(4, 8, 5, 6)])
    cases += bench.patch_cases(quick=True, device="cpu", layers=[(8, 6)], batch=3)
    assert len(cases) == 2 * 8 + 2
    for name, build in cases:
        kernel_fn, torch_fn, floor, t = build()
        emulated.launches.clear()
        kernel_fn()
        assert emulated.launches, name
        torch_fn()
        assert floor > 0 and t.device.type == "cpu"


def test_step_time_table_formats_a_workload():
    bench = _load("gpu_step_time")
    times = {"forward": 0.01, "backward": 0.02, "optimizer": 0.001, "step": 0.031, "work": 0.5}
    workload = {"model": "resnet20", "image_size": 32, "batch_size": 256, "precision": "bf16 autocast",
                "memory_format": "channels_last", "cupy": True,
                "medians": {"exact": {**times, "work": 1.0}, "crs": times}, "peak_memory_mib": {"exact": 1, "crs": 2}}
    table = bench.table(workload)
    assert "| crs | 10.00 | 20.00 | 1.00 | 31.00 | 1.000 | 1.000 | 50.0% | 2 |" in table
