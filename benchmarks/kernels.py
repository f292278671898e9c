"""Each CUDA kernel's time against its memory-traffic floor, on one GPU.

    python benchmarks/kernels.py                      # every kernel, ResNet-sized tensors
    python benchmarks/kernels.py --quick --json docs/bench/kernels_h100.json

For every op and shape: the median over many runs (CUDA events, L2 flushed before each run)
of the kernel path and of the PyTorch reference; the bytes the op cannot avoid moving (its
inputs read once, its outputs written once); the bandwidth that implies; and that bandwidth as
a fraction of a measured device-to-device copy (``Tensor.copy_`` of 1 GiB, read + write). An
op at 1.0 runs at copy speed; the target is 0.7 or more on the large tensors.

The events bracket only GPU work: a 256 MiB memset runs first, so the host has queued the op
before the GPU reaches the start event. The host time of one call (Python and launches, no
waiting) is reported on its own: it is what a small layer pays per training step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
from torch import Tensor

from lightning_approx.runs import write_json
from lightning_approx.script_args import script_main

# A case builds its tensors and returns (kernel call, reference call, floor bytes, a tensor to describe).
Case = Callable[[], tuple[Callable[[], object], Callable[[], object], int, Tensor]]


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    layout: str
    floor_bytes: int
    kernel_us: float
    torch_us: float
    host_us: float
    gb_s: float
    copy_fraction: float
    speedup: float


def require_gpu(script: str) -> None:
    """Exits with a message where no CUDA GPU (or no CuPy) is available."""
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                 f"(torch {torch.__version__}). Nothing was measured.")
    from lightning_approx.kernels import loader

    if not loader.cupy_available():
        sys.exit(f"{script} needs CuPy to compile the kernels ({loader.cupy_import_error()}). Install it with "
                 "pip install 'lightning-approx[cuda]' (cupy-cuda12x; use cupy-cuda13x with a CUDA 13 driver).")


class Timer:
    """Median GPU time of a callable, L2 flushed before every run."""

    def __init__(self, repeats: int, warmup: int) -> None:
        self.repeats = repeats
        self.warmup = warmup
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def gpu_us(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for start, end in zip(starts, ends, strict=True):
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))

    def host_us(self, fn: Callable[[], object]) -> float:
        samples = []
        for _ in range(self.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        return 1e6 * statistics.median(samples)


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = timer.gpu_us(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6) / 1e9


def _torch_backend(fn: Callable, *args: object) -> Callable[[], object]:
    from lightning_approx.kernels.dispatch import use_backend

    def run_reference() -> object:
        with use_backend("torch"):
            return fn(*args)

    return run_reference


def elementwise_cases(quick: bool, device: str = "cuda", shapes: list[tuple[int, ...]] | None = None
                      ) -> list[tuple[str, Case]]:
    """Norms, gathers, pruning, plane argmax and non-zero counts on ResNet-sized activations."""
    from lightning_approx.kernels import cuda
    from lightning_approx.kernels import ops as kops

    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
    # ResNet-50 at 224 px, batch 128, and ResNet-20 at 32 px, batch 256 (layer inputs / output gradients).
    if shapes is None:
        shapes = [(128, 256, 56, 56), (128, 512, 28, 28), (128, 1024, 14, 14), (128, 2048, 7, 7),
                  (256, 16, 32, 32), (256, 64, 8, 8)]
        if quick:
            shapes = [shapes[0], shapes[2], shapes[4]]
    cases: list[tuple[str, Case]] = []
    for dtype in dtypes:
        for shape in shapes:
            for fmt in (torch.contiguous_format, torch.channels_last):
                def make(shape=shape, dtype=dtype, fmt=fmt) -> Tensor:
                    return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)

                def norms(make=make):
                    t = make()
                    return (lambda: cuda.sample_norms(t), _torch_backend(kops.sample_norms, t), t.nbytes, t)

                def both_norms(make=make):
                    t = make()
                    return (lambda: cuda.sample_channel_norms(t), _torch_backend(kops.sample_channel_norms, t),
                            t.nbytes, t)

                def gather(make=make, dim=0):
                    t = make()
                    k = t.shape[dim] // 2
                    idx = torch.randint(0, t.shape[dim], (k,), device=device)
                    scale = torch.rand(k, device=device)
                    moved = 2 * t.nbytes * k // t.shape[dim]  # k slices read, k slices written
                    return (lambda: cuda.gather_scale(t, idx, scale, dim),
                            _torch_backend(kops.gather_scale, t, idx, scale, dim), moved, t)

                def prune(make=make):
                    t = make()
                    gen = torch.Generator(device=device).manual_seed(0)
                    return (lambda: cuda.stochastic_prune(t, 0.9, gen),
                            _torch_backend(kops.stochastic_prune, t, 0.9, gen), 2 * t.nbytes, t)

                def argmax(make=make):
                    t = make()

                    def reference() -> object:
                        flat = t.reshape(t.shape[0], t.shape[1], -1)
                        return flat.abs().argmax(-1), flat.sum(-1, dtype=torch.float32)

                    return lambda: cuda.argmax_sum(t), reference, t.nbytes, t

                def nonzero(make=make):
                    t = make().relu_()
                    return (lambda: cuda.plane_nonzero_counts(t), _torch_backend(kops.plane_nonzero_counts, t),
                            t.nbytes, t)

                def live(make=make):
                    t = make().relu_()
                    return lambda: cuda.find_live(t), _torch_backend(kops.find_live, t), t.nbytes, t

                cases += [("sample_norms", norms), ("sample_channel_norms", both_norms),
                          ("gather_scale dim0 k=N/2", gather),
                          ("gather_scale dim1 k=C/2", lambda make=make: gather(make, 1)),
                          ("stochastic_prune p=0.9", prune), ("argmax_sum", argmax), ("plane_nonzero_counts", nonzero),
                          ("find_live (1 sync)", live)]
    return cases


def patch_cases(quick: bool, device: str = "cuda", layers: list[tuple[int, int]] | None = None,
                batch: int = 128) -> list[tuple[str, Case]]:
    """The patch weight gradient of ResNet-50's 3x3 convs (bfloat16, batch 128), argmax variant."""
    from lightning_approx.kernels import cuda
    from lightning_approx.ops.conv import ConvGeometry
    from lightning_approx.ops.patch import patch_weight_grad

    geom = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
    if layers is None:
        layers = [(64, 56), (128, 28), (256, 14), (512, 7)]
        if quick:
            layers = layers[1:3]
    cases: list[tuple[str, Case]] = []
    for channels, hw in layers:
        for fmt in (torch.contiguous_format, torch.channels_last):
            def case(channels=channels, hw=hw, fmt=fmt):
                x = torch.randn(batch, channels, hw, hw, device=device, dtype=torch.bfloat16)
                x = x.contiguous(memory_format=fmt)
                dy = torch.randn_like(x)
                ws = torch.Size((channels, channels, 3, 3))
                moved = x.nbytes + dy.nbytes + 4 * ws.numel()  # x and dy read once, a float32 gradient written
                return (lambda: cuda.patch_grad_argmax(geom, x, dy, ws),
                        lambda: patch_weight_grad(geom, x, dy, ws, "argmax", None), moved, x)

            cases.append((f"patch_grad_argmax 3x3 C={channels}", case))
    return cases


def run(args: argparse.Namespace) -> dict:
    import cupy

    timer = Timer(args.repeats, args.warmup)
    copy = copy_bandwidth(timer)
    rows: list[Row] = []
    for name, build in elementwise_cases(args.quick) + patch_cases(args.quick):
        if args.only and not any(o in name for o in args.only):
            continue
        kernel_fn, torch_fn, floor, t = build()
        kernel_us = timer.gpu_us(kernel_fn)
        try:
            torch_us = timer.gpu_us(torch_fn)
        except ImportError:  # a reference not written yet
            torch_us = float("nan")
        host_us = timer.host_us(kernel_fn)
        gbs = floor / (kernel_us * 1e-6) / 1e9
        layout = "channels_last" if (t.dim() == 4 and not t.is_contiguous()) else "contiguous"
        row = Row(name, "x".join(map(str, t.shape)), str(t.dtype).replace("torch.", ""), layout, floor, kernel_us,
                  torch_us, host_us, gbs, gbs / copy, torch_us / kernel_us)
        rows.append(row)
        print(f"  {name:28s} {row.shape:18s} {row.dtype:8s} {layout:13s} {kernel_us:9.1f} us  "
              f"{row.copy_fraction:.2f} of copy", file=sys.stderr)
        del kernel_fn, torch_fn, t
        torch.cuda.empty_cache()
    return {"benchmark": "kernels", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cupy": cupy.__version__, "date": date.today().isoformat(), "repeats": args.repeats,
            "copy_gb_s": copy, "command": " ".join(sys.argv), "rows": [asdict(r) for r in rows]}


def table(result: dict) -> str:
    lines = [f"{result['device']}: device-to-device copy {result['copy_gb_s']:.0f} GB/s; median of "
             f"{result['repeats']} runs, L2 flushed before each",
             "| op | shape | dtype | layout | floor MB | kernel us | GB/s | of copy | torch us | speedup | host us |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['layout']} | {r['floor_bytes'] / 1e6:.1f} | "
                     f"{r['kernel_us']:.1f} | {r['gb_s']:.0f} | {r['copy_fraction']:.2f} | {r['torch_us']:.1f} | "
                     f"{r['speedup']:.2f} | {r['host_us']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50, help="timed runs per op (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (the first one compiles)")
    p.add_argument("--quick", action="store_true", help="bfloat16 only, fewer shapes")
    p.add_argument("--only", nargs="*", help="run the ops whose names contain one of these")
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    require_gpu("benchmarks/kernels.py")
    result = run(args)
    print(table(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    script_main(main)
