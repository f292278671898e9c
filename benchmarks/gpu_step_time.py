"""Training-step time on one GPU, exact against every method at its default rate.

    python benchmarks/gpu_step_time.py                                   # ResNet-20 and ResNet-50
    python benchmarks/gpu_step_time.py --json docs/bench/gpu_step_time_h100.json
    python benchmarks/gpu_step_time.py --models resnet20 --methods crs topk --backends auto torch
    python benchmarks/gpu_step_time.py --methods crs crs:probabilities=uniform batch_crs   # with settings

Two workloads, both with synthetic data, bfloat16 autocast and channels-last model and input:
ResNet-20 on CIFAR-sized images (32 px, batch 256) and ResNet-50 at 224 px (batch 128). Every
variant (the plain model, "exact", and the model patched with each method) trains its own copy
of the same network on the same batch; the variants run interleaved, one step each per round,
so clock and thermal drifts hit them alike. Forward, backward and optimizer time come from CUDA
events (one synchronisation per round); the table gives medians over the timed rounds and
ratios to exact. ``--backends`` runs each method under several kernel backends
(:mod:`lightning_approx.kernels.dispatch`): ``auto`` uses the CUDA kernels where they are wired
in, ``torch`` the PyTorch references.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from datetime import date
from pathlib import Path

import torch
from torch import nn

from lightning_approx.runs import write_json
from lightning_approx.script_args import script_main

WORKLOADS = {  # model -> (image size, batch size, classes)
    "resnet20": (32, 256, 10),
    "resnet50": (224, 128, 1000),
}


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                 f"(torch {torch.__version__}). Nothing was measured.")


def _variants(model_name: str, methods: list[str], backends: list[str]) -> dict[str, tuple[nn.Module, str | None]]:
    from lightning_approx import approximate
    from lightning_approx.methods import parse_spec
    from lightning_approx.models import build_model

    _, _, classes = WORKLOADS[model_name]
    base = build_model(model_name, num_classes=classes).to("cuda", memory_format=torch.channels_last)
    variants: dict[str, tuple[nn.Module, str | None]] = {"exact": (base, None)}
    for method in methods:
        for backend in backends:
            model = copy.deepcopy(base)
            approximate(model, parse_spec(method), seed=0)
            key = method if len(backends) == 1 else f"{method} [{backend}]"
            variants[key] = (model, backend)
    return variants


def run_workload(model_name: str, args: argparse.Namespace) -> dict:
    from lightning_approx.kernels import dispatch, loader
    from lightning_approx.surgery import patched_sites

    torch.manual_seed(0)
    size, batch, classes = WORKLOADS[model_name]
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device="cuda")
    variants = _variants(model_name, args.methods, args.backends)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, (m, _) in variants.items()}
    loss_fn = nn.CrossEntropyLoss()
    parts = ("forward", "backward", "optimizer", "step")
    times: dict[str, dict[str, list[float]]] = {k: {p: [] for p in (*parts, "work")} for k in variants}
    for round_ in range(args.warmup + args.steps):
        events = {}
        for key, (model, backend) in variants.items():
            model.train()
            for site in patched_sites(model):
                site.work.reset()
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            with dispatch.use_backend(backend or "auto"):
                marks[0].record()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = loss_fn(model(x), y)
                marks[1].record()
                loss.backward()
                marks[2].record()
                optimizers[key].step()
                optimizers[key].zero_grad(set_to_none=True)
                marks[3].record()
            events[key] = marks
            sites = patched_sites(model)
            exact = sum(s.work.exact for s in sites)
            times[key]["work"].append(sum(s.work.computed for s in sites) / exact if exact else 1.0)
        torch.cuda.synchronize()
        if round_ < args.warmup:
            continue
        for key, m in events.items():
            rec = times[key]
            rec["forward"].append(m[0].elapsed_time(m[1]) / 1e3)
            rec["backward"].append(m[1].elapsed_time(m[2]) / 1e3)
            rec["optimizer"].append(m[2].elapsed_time(m[3]) / 1e3)
            rec["step"].append(m[0].elapsed_time(m[3]) / 1e3)
    medians = {k: {p: statistics.median(v[-args.steps:]) for p, v in rec.items()} for k, rec in times.items()}
    peaks = {}
    for key, (model, backend) in variants.items():  # one more step each, for the peak memory
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with dispatch.use_backend(backend or "auto"):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
            loss.backward()
        optimizers[key].zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peaks[key] = torch.cuda.max_memory_allocated() / 2**20
    del variants, optimizers
    torch.cuda.empty_cache()
    return {"model": model_name, "image_size": size, "batch_size": batch, "precision": "bf16 autocast",
            "memory_format": "channels_last", "cupy": loader.cupy_available(), "medians": medians,
            "peak_memory_mib": peaks}


def table(workload: dict) -> str:
    med = workload["medians"]
    ex = med["exact"]
    lines = [f"{workload['model']}, {workload['image_size']} px, batch {workload['batch_size']}, "
             f"{workload['precision']}, {workload['memory_format']}"
             + ("" if workload["cupy"] else " (CuPy missing: every method ran its PyTorch reference ops)"),
             "| variant | forward ms | backward ms | optimizer ms | step ms | bwd / exact | step / exact "
             "| backward work | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, m in med.items():
        lines.append(f"| {key} | {1e3 * m['forward']:.2f} | {1e3 * m['backward']:.2f} | {1e3 * m['optimizer']:.2f} | "
                     f"{1e3 * m['step']:.2f} | {m['backward'] / ex['backward']:.3f} | {m['step'] / ex['step']:.3f} | "
                     f"{100 * m['work']:.1f}% | {workload['peak_memory_mib'][key]:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from lightning_approx import METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--methods", nargs="+", default=sorted(METHODS),
                   help="registered method names, with settings as step_time.py takes them "
                        "(crs:probabilities=uniform; default: every method at its defaults)")
    p.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "torch", "cuda"],
                   help="kernel backends each method runs under")
    p.add_argument("--steps", type=int, default=30, help="timed rounds (median over them)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first (compilation, cuDNN autotuning)")
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    require_cuda("benchmarks/gpu_step_time.py")
    from lightning_approx.methods import parse_spec

    unknown = sorted({cfg["name"] for spec in args.methods for cfg in parse_spec(spec)} - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; registered: {sorted(METHODS)}")
    torch.backends.cudnn.benchmark = True
    result = {"benchmark": "gpu_step_time", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": date.today().isoformat(), "steps": args.steps, "warmup": args.warmup,
              "command": " ".join(sys.argv), "workloads": []}
    for model_name in args.models:
        workload = run_workload(model_name, args)
        result["workloads"].append(workload)
        print(table(workload))
        print()
    print(f"{result['device']}, torch {result['torch']}, median of {args.steps} interleaved steps after "
          f"{args.warmup} warm-up")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    script_main(main)
