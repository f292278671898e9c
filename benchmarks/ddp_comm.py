"""Gradient communication of ApproxDDPStrategy per method, and the step time it buys, on 2 processes.

Two measurements, both real 2-process Lightning DDP fits (``devices=2``; gloo on CPU, NCCL
on GPU) of :class:`~lightning_approx.classifier.ImageClassifier` on the bundled CIFAR-10
subset:

- ``bytes``: for each model (default ResNet-20 and ResNet-50, their own parameter sets from
  :func:`lightning_approx.models.build_model`) and each configuration (method x ``comm``
  mode), the bytes one rank all-reduces per synchronization, as the strategy counts them
  (:attr:`ApproxDDPStrategy.comm_totals`), against what plain DDP sends;
- ``time``: median training-step time (batch start to batch end on rank 0, so forward,
  backward with the all-reduce, and optimizer) of each configuration on one model.

    python benchmarks/ddp_comm.py bytes --models resnet20 resnet50 --json docs/bench/ddp_comm_bytes.json
    python benchmarks/ddp_comm.py time --model resnet20 --batch-size 32 --json docs/bench/ddp_comm_time.json

Lightning starts rank 1 by running the same command again, so every rank runs every fit of
the list; rank 0 prints the table and writes the JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_approx import ApproxBackward, ApproxDDPStrategy
from lightning_approx.classifier import ImageClassifier
from lightning_approx.data import CIFAR10DataModule
from lightning_approx.runs import write_json
from lightning_approx.script_args import non_negative_int, positive_int, script_main

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "cifar10-subset"

FS = "forward_sampling"
# name -> (ApproxBackward method or None for exact layers, ApproxDDPStrategy arguments)
CONFIGS: dict[str, tuple[Any, dict[str, Any]]] = {
    "exact/dense": (None, {"comm": "dense"}),
    "crs0.5/dense": ({"name": "crs", "sample_ratio": 0.5}, {"comm": "dense"}),
    "crs0.5/sampled0.5": ({"name": "crs", "sample_ratio": 0.5}, {"comm": "sampled", "comm_ratio": 0.5}),
    "crs0.5/sampled0.25": ({"name": "crs", "sample_ratio": 0.5}, {"comm": "sampled", "comm_ratio": 0.25}),
    "grad_prune/sampled0.5": ({"name": "grad_prune"}, {"comm": "sampled", "comm_ratio": 0.5}),
    "fs0.5/selected": ({"name": FS, "sample_ratio": 0.5}, {"comm": "selected"}),
    "fs0.5w/selected": ({"name": FS, "sample_ratio": 0.5, "rank_by": "weight"}, {"comm": "selected"}),
    "fs0.34w/selected": ({"name": FS, "sample_ratio": 0.34, "rank_by": "weight"}, {"comm": "selected"}),
    "fs0.5w/dense": ({"name": FS, "sample_ratio": 0.5, "rank_by": "weight"}, {"comm": "dense"}),
    "fs0.5w/sampled0.5": ({"name": FS, "sample_ratio": 0.5, "rank_by": "weight"},
                          {"comm": "sampled", "comm_ratio": 0.5}),
}
BYTES_CONFIGS = ["exact/dense", "crs0.5/dense", "crs0.5/sampled0.5", "crs0.5/sampled0.25", "grad_prune/sampled0.5",
                 "fs0.5/selected", "fs0.5w/selected", "fs0.34w/selected", "fs0.5w/sampled0.5"]
TIME_CONFIGS = ["exact/dense", "crs0.5/dense", "crs0.5/sampled0.5", "fs0.5w/dense", "fs0.5w/selected"]


class Classifier(ImageClassifier):
    """ImageClassifier that resizes its input (CIFAR images are 32x32; ResNet-50 expects more)."""

    def __init__(self, image_size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return super().forward(x)


class StepTimer(Callback):
    """Seconds from each training batch's start to its end."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.times.append(time.perf_counter() - self._t0)


def fit(model_name: str, config: str, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """One 2-process fit of ``steps`` batches; returns rank 0's view of it."""
    method, comm = CONFIGS[config]
    pl.seed_everything(0)
    num_classes = args.num_classes if args.num_classes else None
    kwargs = {"model": model_name, "lr": 0.05, "lr_schedule": "none"}
    if num_classes:
        kwargs["num_classes"] = num_classes
    else:  # the model's own classifier (10 for CIFAR ResNets, 1000 for ResNet-50): its parameter set
        kwargs["num_classes"] = 1000 if model_name in ("resnet18", "resnet50") else 10
    module = Classifier(image_size=args.image_size.get(model_name, 32), **kwargs)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if method is not None:
        callbacks.append(ApproxBackward(method, log_per_layer=False))
    strategy = ApproxDDPStrategy(block_size=args.block_size, log_comm=False, **comm)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=2, strategy=strategy, max_epochs=1,
                         limit_train_batches=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    data = CIFAR10DataModule(DATA, batch_size=args.batch_size, seed=0)
    trainer.fit(module, data)
    totals = strategy.comm_totals
    params = sum(p.numel() for p in module.parameters())
    syncs = max(totals.syncs, 1)
    return {"model": model_name, "config": config, "method": method, "strategy": comm,
            "comm_mode": strategy.comm_mode, "parameters": params, "syncs": totals.syncs,
            "bytes_per_sync": totals.sent / syncs, "dense_bytes_per_sync": totals.dense / syncs,
            "fraction": totals.fraction, "step_times": timer.times, "rank": trainer.global_rank}


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__, "python": platform.python_version(),
            "backend": "nccl" if torch.cuda.is_available() else "gloo", "date": date.today().isoformat()}


def run_bytes(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for model_name in args.models:
        for config in args.configs or BYTES_CONFIGS:
            row = fit(model_name, config, args, args.steps)
            row.pop("step_times")
            rows.append(row)
    return rows


def run_time(args: argparse.Namespace) -> list[dict[str, Any]]:
    configs = args.configs or TIME_CONFIGS
    times: dict[str, list[float]] = {c: [] for c in configs}
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeats):  # rounds over the configurations, so load drifts hit all alike
        for config in configs:
            row = fit(args.model, config, args, args.warmup + args.steps)
            times[config] += row.pop("step_times")[args.warmup:]
            rows[config] = row
    for config, row in rows.items():
        ts = sorted(times[config])
        row.update(step_time_median=statistics.median(ts), step_time_p25=ts[len(ts) // 4],
                   step_time_p75=ts[(3 * len(ts)) // 4], timed_steps=len(ts))
    base = rows[configs[0]]["step_time_median"]
    for row in rows.values():
        row["step_time_vs_first"] = row["step_time_median"] / base
    return list(rows.values())


def table(rows: list[dict[str, Any]], part: str) -> str:
    if part == "bytes":
        lines = ["| model | parameters | method / comm | bytes per step (one rank) | of dense DDP | reduction |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['parameters']:,} | {r['config']} | {r['bytes_per_sync']:,.0f} | "
                         f"{r['fraction']:.3f} | {100 * (1 - r['fraction']):.1f}% |")
    else:
        lines = ["| method / comm | median step (s) | p25-p75 (s) | vs first | bytes of dense |",
                 "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['config']} | {r['step_time_median']:.4f} | {r['step_time_p25']:.4f}-"
                         f"{r['step_time_p75']:.4f} | {r['step_time_vs_first']:.3f} | {r['fraction']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["bytes", "time"])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet50"], help="bytes: the models")
    parser.add_argument("--model", default="resnet20", help="time: the model")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="default: all of the part's")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="per rank")
    parser.add_argument("--steps", type=positive_int, default=3,
                        help="bytes: synchronizations per fit; time: timed steps")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="time: untimed steps first")
    parser.add_argument("--repeats", type=positive_int, default=2, help="time: rounds over the configurations")
    parser.add_argument("--block-size", type=positive_int, default=1024)
    parser.add_argument("--resnet50-size", type=positive_int, default=64,
                        help="input size of ResNet-50/18 (upsampled)")
    parser.add_argument("--num-classes", type=non_negative_int, default=0, help="0: each model's own classifier size")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per process")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.image_size = {"resnet50": args.resnet50_size, "resnet18": args.resnet50_size}
    torch.set_num_threads(args.threads)
    rows = run_bytes(args) if args.part == "bytes" else run_time(args)
    if rows[0]["rank"] != 0:
        return
    print(table(rows, args.part))
    if args.json:
        record = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]), "machine": machine(),
                  "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows}
        write_json(args.json, record)


if __name__ == "__main__":
    script_main(main)
