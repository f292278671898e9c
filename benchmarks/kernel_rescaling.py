"""KernelRescaling on the real CIFAR-10 subset: wall-clock and test accuracy with and without
it, alone and combined with ``ApproxBackward("crs", sample_ratio=0.5)``, several seeds.

Two models: ResNet-20 on the 32x32 images (3x3 kernels only: no kernel is rescaled, the
low-resolution phase just runs the network on 16x16 images) and the ImageNet-style ResNet-18
(7x7 stride-2 stem, which is rescaled to 3x3) on the images upsampled to 64x64. Each
(model, seed) runs the four variants one after the other, so machine drift hits them alike.
Validation is skipped during fit; the test set is evaluated once at the end, at full
resolution. For the KernelRescaling runs it also measures the test accuracy at the switch:
the low-resolution network on downscaled test images, and the same network with its kernels
rescaled to full size on full-size test images.

    python benchmarks/kernel_rescaling.py --seeds 0 1 2 --json docs/bench/kernel_rescaling_cpu.json
    python benchmarks/kernel_rescaling.py --specs resnet20:32:2 --seeds 0 --limit-train-batches 5   # smoke test

On a shared machine, run one seed at a time when it is idle and merge the results:

    python benchmarks/kernel_rescaling.py --seeds 0 --json /tmp/kr_seed0.json     # ... seeds 1, 2
    python benchmarks/kernel_rescaling.py --merge /tmp/kr_seed*.json --json docs/bench/kernel_rescaling_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from typing_extensions import override

from lightning_approx import ApproxBackward, KernelRescaling
from lightning_approx.classifier import ImageClassifier
from lightning_approx.data.cifar10 import CIFAR10DataModule
from lightning_approx.errors import ConfigError
from lightning_approx.models import MODELS
from lightning_approx.ops.rescale import resize_images
from lightning_approx.runs import write_json
from lightning_approx.schedules import Progress
from lightning_approx.script_args import load_json, positive_count_or_fraction, positive_int, script_main, seed_value
from lightning_approx.summary import RunSummary

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "cifar10-subset"
VARIANTS = ("exact", "kr", "crs", "kr+crs")


class UpsampledCIFAR10(CIFAR10DataModule):
    """CIFAR-10 batches upsampled (bilinear) to ``size`` after augmentation and normalisation,
    so that an ImageNet-style network with a 7x7 stride-2 stem has room to work."""

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = size

    @override
    def transform_batch(self, batch: tuple[torch.Tensor, torch.Tensor],
                        train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().transform_batch(batch, train)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x, y


class PhaseTimer(pl.Callback):
    """Step times by phase (the KernelRescaling scale the step ran at)."""

    def __init__(self) -> None:
        self.times: dict[float, list[float]] = {}
        self._t0 = 0.0
        self._scale = 1.0

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        kr = [cb for cb in trainer.callbacks if isinstance(cb, KernelRescaling)]
        scale = kr[0].scale if kr else 1.0
        self.times.setdefault(scale, []).append(time.perf_counter() - self._t0)


class SwitchProbe(pl.Callback):
    """At the end of the last low-resolution epoch: test accuracy of the low-resolution network
    on downscaled test images, and of the same network shown at full size on full-size images."""

    def __init__(self, data: CIFAR10DataModule) -> None:
        self.data = data
        self.result: dict[str, float] = {}

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (kr,) = [cb for cb in trainer.callbacks if isinstance(cb, KernelRescaling)]
        nxt = kr.scale_at(Progress(epoch=trainer.current_epoch + 1.0, step=trainer.global_step))
        if kr.scale >= 1.0 or nxt == kr.scale:
            return
        self.result = {"scale": kr.scale, "low_res": self._accuracy(pl_module, kr.scale, kr.resize_mode)}
        with kr.full_size():
            self.result["full_res"] = self._accuracy(pl_module, 1.0, kr.resize_mode)

    def _accuracy(self, model: pl.LightningModule, scale: float, mode: str) -> float:
        was_training = model.training
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in self.data.test_dataloader():
                x, y = self.data.transform_batch((batch[0].to(model.device), batch[1].to(model.device)), train=False)
                logits = model(resize_images(x, scale, mode))
                correct += int((logits.argmax(1) == y).sum())
                total += len(y)
        model.train(was_training)
        return correct / total


def train(model_name: str, size: int, epochs: int, variant: str, seed: int, args: argparse.Namespace) -> dict:
    pl.seed_everything(seed, workers=True)
    common = {"data_dir": args.data_dir, "batch_size": args.batch_size, "seed": seed}
    data = UpsampledCIFAR10(size, **common) if size != 32 else CIFAR10DataModule(**common)
    model = ImageClassifier(model=model_name, num_classes=10, lr=args.lr)
    summary, timer = RunSummary(), PhaseTimer()
    callbacks: list[pl.Callback] = [summary, timer]
    probe = None
    if "crs" in variant:
        callbacks.append(ApproxBackward("crs", sample_ratio=0.5, seed=seed))
    if "kr" in variant:
        callbacks.append(KernelRescaling(scale=args.scale, fraction=args.fraction))
        probe = SwitchProbe(data)
        callbacks.append(probe)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, limit_train_batches=args.limit_train_batches)
    trainer.fit(model, datamodule=data)
    (test,) = trainer.test(model, datamodule=data, verbose=False)
    result = summary.result(variant, trainer, test_acc=test["test/acc"])
    return {"model": model_name, "size": size, "epochs": epochs, "variant": variant, "seed": seed,
            "test_acc": result.test_acc, "fit_s": result.wall_clock_s, "backward_work": result.backward_work,
            "step_ms": {str(k): 1000 * statistics.median(v) for k, v in timer.times.items()},
            "steps": {str(k): len(v) for k, v in timer.times.items()},
            "switch": probe.result if probe is not None else None}


def table(runs: list[dict]) -> str:
    lines = ["| model (input) | run | seeds | test acc (%) | Δ acc vs exact | fit wall-clock (s) | wall / exact "
             "| step at low res (ms) | step at full res (ms) | backward work |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["model"], r["size"], r["epochs"]) for r in runs):
        group = [r for r in runs if (r["model"], r["size"], r["epochs"]) == key]
        exact = [r for r in group if r["variant"] == "exact"]
        base_acc = statistics.mean(r["test_acc"] for r in exact) if exact else float("nan")
        base_wall = statistics.mean(r["fit_s"] for r in exact) if exact else float("nan")
        for variant in VARIANTS:
            rs = [r for r in group if r["variant"] == variant]
            if not rs:
                continue
            accs = [100 * r["test_acc"] for r in rs]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            wall = statistics.mean(r["fit_s"] for r in rs)
            low = [v for r in rs for k, v in r["step_ms"].items() if float(k) < 1.0]
            full = [r["step_ms"]["1.0"] for r in rs if "1.0" in r["step_ms"]]
            low_ms = f"{statistics.mean(low):.0f}" if low else "-"
            lines.append(f"| {key[0]} ({key[1]}px, {key[2]} ep) | {variant} | {len(rs)} | {statistics.mean(accs):.2f} "
                         f"± {std:.2f} | {statistics.mean(accs) - 100 * base_acc:+.2f} | {wall:.1f} "
                         f"| {wall / base_wall:.3f} | {low_ms} | {statistics.mean(full):.0f} "
                         f"| {100 * statistics.mean(r['backward_work'] for r in rs):.1f}% |")
    return "\n".join(lines)


def switch_table(runs: list[dict]) -> str:
    lines = ["| model (input) | run | seed | acc before switch, low res (%) | same net rescaled to full size (%) "
             "| final test acc (%) |", "|---|---|---|---|---|---|"]
    for r in runs:
        if r["switch"]:
            s = r["switch"]
            lines.append(f"| {r['model']} ({r['size']}px) | {r['variant']} | {r['seed']} | {100 * s['low_res']:.2f} "
                         f"| {100 * s['full_res']:.2f} | {100 * r['test_acc']:.2f} |")
    return "\n".join(lines)


def model_spec(text: str) -> tuple[str, int, int]:
    """``--specs``: ``model:input size:epochs`` (``resnet20:32:6``) -> ``("resnet20", 32, 6)``."""
    fix = f"write model:input size:epochs, e.g. resnet20:32:6, with a model of {sorted(MODELS)}"
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} has {len(parts)} part(s), not 3; {fix}")
    name, size, epochs = parts
    if name not in MODELS:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown model {name!r}; {fix}")
    if not (size.isdigit() and int(size) > 0 and epochs.isdigit() and int(epochs) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: the input size and epochs must be positive whole numbers; {fix}")
    return name, int(size), int(epochs)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", type=model_spec, default=[("resnet20", 32, 6), ("resnet18", 64, 4)],
                   help="model:input size:epochs for each model measured (default: resnet20:32:6 "
                        "resnet18:64:4)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", nargs="+", type=seed_value, default=[0, 1, 2])
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--fraction", type=float, default=0.5, help="part of the epochs at low resolution")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--limit-train-batches", type=positive_count_or_fraction, default=1.0,
                   help="batches per epoch: a count (10) or a fraction (0.25; 1.0 is all)")
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--json", type=Path)
    p.add_argument("--merge", nargs="+", type=Path, help="print the tables of earlier --json files, run nothing")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if any("kr" in variant for variant in args.variants):
        try:  # built again per run: the callback keeps state across a fit
            KernelRescaling(scale=args.scale, fraction=args.fraction)
        except ConfigError as e:
            raise ConfigError(f"--{e.field}", e.value, e.problem, e.fix) from e
    runs = []
    for model_name, size, epochs in args.specs:
        for seed in args.seeds:
            for variant in args.variants:
                runs.append(train(model_name, size, epochs, variant, seed, args))
                r = runs[-1]
                print(f"{model_name} {variant} seed {seed}: {100 * r['test_acc']:.2f}% in {r['fit_s']:.1f}s "
                      f"step ms {r['step_ms']}", file=sys.stderr, flush=True)
    header = (f"CIFAR-10 subset ({args.data_dir.name}), batch {args.batch_size}, lr {args.lr} cosine, "
              f"KernelRescaling(scale={args.scale}, fraction={args.fraction}), crs = ApproxBackward('crs', "
              f"sample_ratio=0.5), seeds {args.seeds}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"{date.today().isoformat()}")
    print(header)
    print(table(runs))
    print()
    print(switch_table(runs))
    out = {"header": header, "command": " ".join(["python", *sys.argv]), "runs": runs}
    write_json(args.json, out)
    return out


def merge(paths: list[Path], out_path: Path | None) -> dict:
    parts = [load_json("--merge", path, keys=["command", "header", "runs"]) for path in paths]
    for path, part in zip(paths, parts, strict=True):
        if not isinstance(part["runs"], list) or not all(isinstance(r, dict) and r.get("variant") in VARIANTS
                                                         and {"model", "size", "epochs", "seed"} <= r.keys()
                                                         for r in part["runs"]):
            raise ConfigError("--merge", str(path), "has runs that are not this script's (each needs model, size, "
                              f"epochs, seed and a variant of {list(VARIANTS)})",
                              "give files this script wrote with --json")
    runs = sorted((r for part in parts for r in part["runs"]),
                  key=lambda r: (r["model"] != "resnet20", r["model"], r["seed"], VARIANTS.index(r["variant"])))
    for part in parts:
        print(f"{part['command']}\n  {part['header']}")
    print(table(runs))
    print()
    print(switch_table(runs))
    out = {"parts": [{"command": part["command"], "header": part["header"]} for part in parts], "runs": runs}
    write_json(out_path, out)
    return out


if __name__ == "__main__":
    script_main(main)
