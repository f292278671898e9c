#!/usr/bin/env bash
# The device check, in one short run (the GPU machine lent to some tasks; docs/kernels.md):
# the GPU tests, the kernel benchmark (quick) and the training-step benchmark on ResNet-20.
# Run from the repository root. The device image lacks omegaconf: carry its wheel and
# antlr4-python3-runtime's in .whl/ (see the device README), which this script installs first.
# Results go to $OUT (default: ./gpu_check_out), one log and two JSON files.
set -uo pipefail
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
fi
{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)"
    python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gpu_kernels.py tests/test_crs.py
    python3 benchmarks/kernels.py --quick --json "$out/kernels_gpu.json"
    python3 benchmarks/gpu_step_time.py --models resnet20 --steps 20 --warmup 5 \
        --methods crs crs:probabilities=uniform crs:sample_ratio=0.25,probabilities=uniform batch_crs forward_sampling \
            forward_sampling:selection=uniform crs:sample_ratio=0.111,probabilities=uniform,grads=weight,weight_window=pixel_grid \
        --json "$out/gpu_step_time_gpu.json"
} 2>&1 | tee "$out/gpu_check.log"
