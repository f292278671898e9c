"""What ``ApproxBackward`` costs in a real Lightning fit when it saves nothing: training epochs of
the plain model against the same model with the callback at each method's exact setting, in one
process. Any other setting times the epochs a recipe samples, paired with exact's.

``step_time.py`` times the patched layers outside Lightning. This one adds everything the
callback does in a fit: its per-batch hooks (schedule updates, work counters, logged metrics),
the patched layers' forward, and whatever hooks a method attaches to the model (``batch_crs``
masks the output's gradient). Each round runs one short fit (``--limit-train-batches``) per
variant, in an order shuffled every round, from the same initial weights and batches; the timed
interval is the training epoch (``on_train_epoch_start`` to ``on_train_epoch_end``), so Trainer
setup and the callback's one-time patching at fit start are not in it. The fits have no logger and
Lightning's default ``log_every_n_steps`` (50). The table gives each variant's median epoch time
and the median of its per-round ratio to the plain fit's, with a distribution-free 95% confidence
interval (at least 6 timed rounds).

    python benchmarks/fit_overhead.py                                          # every exact setting, ResNet-20
    python benchmarks/fit_overhead.py --variants crs:sample_ratio=1.0 --rounds 8 --json out.json
    python benchmarks/fit_overhead.py --variants batch_crs:sample_ratio=0.5 --rounds 14    # a recipe's sampled epochs
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
from typing_extensions import override

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import median_ci, round_orders

from lightning_approx.classifier import ImageClassifier
from lightning_approx.data.cifar10 import CIFAR10DataModule
from lightning_approx.models import MODELS
from lightning_approx.runs import approx_callbacks, check_spec, write_json
from lightning_approx.script_args import (
    non_negative_int,
    positive_count_or_fraction,
    positive_int,
    script_main,
)

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "cifar10-subset"
# Every method with an exact setting, and relu_mask, whose gradients are always exact.
EXACT_SETTINGS = [
    "crs:sample_ratio=1.0", "bernoulli_crs:sample_ratio=1.0", "topk:sample_ratio=1.0",
    "forward_sampling:sample_ratio=1.0", "grad_prune:sparsity=0.0", "batch_crs:sample_ratio=1.0", "relu_mask",
]


class EpochTimer(pl.Callback):
    """Seconds of each training epoch, batches and every callback's per-batch hooks included."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._t0)


def fit_once(args: argparse.Namespace, variant: str, data: CIFAR10DataModule) -> float:
    """One short fit of ``variant`` (``"exact"``: no callback); returns its epoch's seconds."""
    pl.seed_everything(args.seed, verbose=False)
    model = ImageClassifier(model=args.model, lr=0.05, lr_schedule="cosine", channels_last=args.channels_last)
    callbacks, _ = approx_callbacks(None if variant == "exact" else variant, args.seed)
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, limit_train_batches=args.limit_train_batches,
                         callbacks=[timer, *callbacks])
    trainer.fit(model, data)
    return timer.seconds[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    variants = ["exact", *args.variants]
    data = CIFAR10DataModule(data_dir=args.data_dir, batch_size=args.batch_size, seed=args.seed)
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for i, order in enumerate(round_orders(variants, args.warmup + args.rounds, seed=args.seed)):
        for variant in order:
            t = fit_once(args, variant, data)
            if i >= args.warmup:
                seconds[variant].append(t)
    rows = {}
    for variant in variants:
        ratios = [v / e for v, e in zip(seconds[variant], seconds["exact"], strict=True)]
        lo, hi = median_ci(ratios) if len(ratios) >= 6 else (float("nan"), float("nan"))
        rows[variant] = {"epoch_s": statistics.median(seconds[variant]), "ratio": statistics.median(ratios),
                         "ci_low": lo, "ci_high": hi}
    return {"model": args.model, "batch_size": args.batch_size, "limit_train_batches": args.limit_train_batches,
            "memory_format": "channels_last" if args.channels_last else "contiguous", "rounds": args.rounds,
            "warmup": args.warmup, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "date": date.today().isoformat(),
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "rows": rows, "seconds": seconds}


def table(result: dict[str, Any]) -> str:
    lines = ["| variant | epoch (s) | epoch / plain fit, paired [95% CI] |", "|---|---|---|"]
    for variant, row in result["rows"].items():
        lines.append(f"| {variant} | {row['epoch_s']:.2f} | {row['ratio']:.3f} "
                     f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=EXACT_SETTINGS,
                   help="method[:key=value,...], several joined by '+' (default: every exact setting)")
    p.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--limit-train-batches", type=positive_count_or_fraction, default=20,
                   help="batches per timed epoch")
    p.add_argument("--rounds", type=positive_int, default=6, help="timed rounds (6 or more give an interval)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count())
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    for spec in args.variants:  # every spec checked before the first fit
        check_spec("--variants", spec)
    torch.set_num_threads(args.threads)
    result = run(args)
    write_json(args.json, result)
    print(f"{result['model']}, batch {result['batch_size']}, {result['limit_train_batches']} batches per epoch, "
          f"{result['memory_format']}, {result['threads']} threads, torch {result['torch']}, median of "
          f"{result['rounds']} rounds after {result['warmup']} warm-up")
    print(table(result))
    return result


if __name__ == "__main__":
    script_main(main)
