"""Training-step time, exact vs approximate, in one process.

Every variant trains its own copy of the same model on the same batch; the variants run
interleaved, one step each per round, so drifts in machine load hit all of them alike. Each
step is split into forward, backward and optimizer time; the table reports medians over the
timed rounds and ratios to the plain ``nn`` layers ("exact").

    python benchmarks/step_time.py                                   # ResNet-20, batch 128
    python benchmarks/step_time.py --variants crs:sample_ratio=0.5 crs:sample_ratio=0.25
    python benchmarks/step_time.py --json out.json --compare docs/bench/step_time_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from lightning_approx import approximate
from lightning_approx.methods import parse_spec
from lightning_approx.models import build_model
from lightning_approx.surgery import patched_sites

DEFAULT_VARIANTS = ["crs:sample_ratio=0.5", "crs:sample_ratio=0.25"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    base = build_model(args.model, num_classes=args.num_classes).to(device, memory_format=memory_format)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    variants = {"exact": (base, None)}
    for spec in args.variants:
        model = copy.deepcopy(base)
        approximate(model, parse_spec(spec), seed=0)
        variants[spec] = (model, spec)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, (m, _) in variants.items()}
    times = {k: {"forward": [], "backward": [], "optimizer": [], "step": [], "work": []} for k in variants}
    loss_fn = nn.CrossEntropyLoss()
    for round_ in range(args.warmup + args.steps):
        for key, (model, _) in variants.items():
            model.train()
            for site in patched_sites(model):
                site.work.reset()
            sync(device)
            t0 = time.perf_counter()
            loss = loss_fn(model(x), y)
            sync(device)
            t1 = time.perf_counter()
            loss.backward()
            sync(device)
            t2 = time.perf_counter()
            optimizers[key].step()
            optimizers[key].zero_grad(set_to_none=True)
            sync(device)
            t3 = time.perf_counter()
            if round_ >= args.warmup:
                rec = times[key]
                rec["forward"].append(t1 - t0)
                rec["backward"].append(t2 - t1)
                rec["optimizer"].append(t3 - t2)
                rec["step"].append(t3 - t0)
                sites = patched_sites(model)
                exact = sum(s.work.exact for s in sites)
                rec["work"].append(sum(s.work.computed for s in sites) / exact if exact else 1.0)
    medians = {k: {part: statistics.median(v) for part, v in rec.items()} for k, rec in times.items()}
    return {
        "benchmark": "step_time",
        "model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
        "memory_format": "channels_last" if args.channels_last else "contiguous",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "date": date.today().isoformat(),
        "steps": args.steps, "warmup": args.warmup, "command": " ".join(sys.argv),
        "medians": medians,
    }


def table(result: dict, reference: dict | None = None) -> str:
    med = result["medians"]
    ex = med["exact"]
    lines = ["| variant | forward (ms) | backward (ms) | step (ms) | fwd / exact | bwd / exact | step / exact "
             "| backward work |" + (" step vs saved |" if reference else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if reference else "")]
    for key, m in med.items():
        row = (f"| {key} | {1e3 * m['forward']:.1f} | {1e3 * m['backward']:.1f} | {1e3 * m['step']:.1f} | "
               f"{m['forward'] / ex['forward']:.3f} | {m['backward'] / ex['backward']:.3f} | "
               f"{m['step'] / ex['step']:.3f} | {100 * m['work']:.1f}% |")
        if reference:
            ref = reference["medians"].get(key)
            row += f" {m['step'] / ref['step']:.3f} |" if ref else " - |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels-last memory format")
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS,
                   help="method[:key=value,...], several joined by '+'")
    p.add_argument("--steps", type=int, default=30, help="timed rounds (median over them)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--compare", type=Path, help="a saved result to compare step times against")
    args = p.parse_args(argv)
    result = run(args)
    reference = json.loads(args.compare.read_text()) if args.compare else None
    print(f"{result['model']}, batch {result['batch_size']}, {result['memory_format']}, {result['device']}, "
          f"{result['threads']} threads, "
          f"torch {result['torch']}, median of {result['steps']} steps after {result['warmup']} warm-up")
    print(table(result, reference))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
