"""Train a CNN on CIFAR-10 with an exact or an approximate backward pass, or compare both.

    python examples/cifar10.py compare                                  # exact vs crs@0.5
    python examples/cifar10.py approx --method crs:sample_ratio=0.25 --epochs 30
    python examples/cifar10.py compare --method relu_mask+crs:sample_ratio=0.5
    python examples/cifar10.py exact --data-dir ~/data --download       # the full dataset

The default data is the real CIFAR-10 subset bundled in examples/data/cifar10-subset
(5,085 training and 932 test images), so the example runs without a download.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from lightning_approx import ApproxBackward
from lightning_approx.classifier import ImageClassifier
from lightning_approx.data.cifar10 import CIFAR10DataModule
from lightning_approx.methods import parse_spec, spec_label
from lightning_approx.summary import RunResult, RunSummary, format_table

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "cifar10-subset"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="compare", choices=["compare", "exact", "approx"],
                   help="compare: exact then approximate with the same seed (default)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--download", action="store_true", help="download the official archive into --data-dir")
    p.add_argument("--model", default="resnet20", help="resnet20, resnet32, resnet56 or vgg19_bn")
    p.add_argument("--method", default="crs:sample_ratio=0.5",
                   help="method[:key=value,...], several joined by '+' (see lightning_approx.METHODS)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train-batches", type=float, default=1.0, help="fraction (or count) of batches")
    p.add_argument("--val-every", type=int, default=0, help="validate every N epochs (0: only at the end)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    return p.parse_args(argv)


def train(args: argparse.Namespace, method: str | None) -> RunResult:
    """One run: exact when ``method`` is None, else with ApproxBackward(method spec)."""
    pl.seed_everything(args.seed, workers=True)
    data = CIFAR10DataModule(data_dir=args.data_dir, batch_size=args.batch_size, download=args.download,
                             seed=args.seed)
    model = ImageClassifier(model=args.model, lr=args.lr)
    summary = RunSummary()
    callbacks: list[pl.Callback] = [summary]
    name = "exact"
    if method is not None:
        configs = parse_spec(method)
        callbacks.append(ApproxBackward(configs, seed=args.seed))
        name = spec_label(configs)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, callbacks=callbacks, enable_progress_bar=args.progress,
                         enable_model_summary=False, limit_train_batches=args.limit_train_batches,
                         num_sanity_val_steps=0, check_val_every_n_epoch=args.val_every or max(1, args.epochs))
    trainer.fit(model, datamodule=data)
    (test,) = trainer.test(model, datamodule=data, verbose=False)
    return summary.result(name, trainer, test_acc=test["test/acc"])


def main(argv: list[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    runs = {"compare": [None, args.method], "exact": [None], "approx": [args.method]}[args.mode]
    results = []
    for method in runs:
        results.append(train(args, method))
        print(f"finished {results[-1].name}: test acc {100 * results[-1].test_acc:.2f}%", file=sys.stderr)
    print(f"\nCIFAR-10 ({args.data_dir.name}), {args.model}, batch {args.batch_size}, {args.epochs} epochs, "
          f"seed {args.seed}")
    print(format_table(results, baseline="exact" if args.mode == "compare" else None))
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2))
    return results


if __name__ == "__main__":
    main()
