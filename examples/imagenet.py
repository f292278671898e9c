"""Train ResNet-18 or ResNet-50 on ImageNet with an exact or an approximate backward pass, or compare both.

    python examples/imagenet.py compare --data-dir /data/imagenet --epochs 90      # exact vs crs@0.5
    python examples/imagenet.py approx --data-dir /data/imagenet --model resnet50 --method relu_mask
    python examples/imagenet.py compare --synthetic --limit-train-batches 20       # throughput, no data

The data folder has the standard layout, ``<data-dir>/train/<class>/*.JPEG`` and
``<data-dir>/val/<class>/*.JPEG``; images are decoded with Pillow in --num-workers processes
(random resized crop and flip for training, resize and center crop for validation).
``--synthetic`` serves random images instead and measures throughput (images/s in the table;
no accuracy). On a GPU the runs use 16-bit mixed precision and channels-last memory; on the
CPU 32-bit (``--precision bf16-mixed`` is the faster choice on CPUs with bfloat16 units).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lightning_approx.classifier import ImageClassifier
from lightning_approx.data.imagenet import ImageNetDataModule
from lightning_approx.errors import ConfigError
from lightning_approx.runs import add_run_arguments, run_modes
from lightning_approx.summary import RunResult


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, epochs=1, batch_size=64)
    p.add_argument("--data-dir", type=Path, help="folder holding train/ and val/ (not needed with --synthetic)")
    p.add_argument("--synthetic", action="store_true", help="random images: measure throughput without data")
    p.add_argument("--synthetic-size", type=int, default=1_281_167, help="training images per epoch with --synthetic")
    p.add_argument("--num-classes", type=int, default=1000, help="classes with --synthetic (a folder's are counted)")
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--image-size", type=int, default=224, help="side of the training and validation crops")
    p.add_argument("--resize-size", type=int, help="shorter side before the validation crop (default: size * 8/7)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--precision", default="auto", help="auto (16-mixed on GPU, 32-true on CPU), bf16-mixed, ...")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    precision = ("16-mixed" if gpu else "32-true") if args.precision == "auto" else args.precision
    resize = args.resize_size or round(args.image_size * 8 / 7)

    def build() -> tuple[ImageClassifier, ImageNetDataModule]:
        data = ImageNetDataModule(data_dir=args.data_dir, batch_size=args.batch_size, num_workers=args.num_workers,
                                  image_size=args.image_size, resize_size=resize, synthetic=args.synthetic,
                                  synthetic_train_size=args.synthetic_size,
                                  synthetic_val_size=args.batch_size, num_classes=args.num_classes, seed=args.seed)
        data.setup("fit")  # checks the folder's layout now, and counts its classes
        model = ImageClassifier(model=args.model, num_classes=data.num_classes, lr=args.lr,
                                weight_decay=args.weight_decay, label_smoothing=0.1, channels_last=gpu)
        return model, data

    source = "synthetic" if args.synthetic else str(args.data_dir)
    title = (f"ImageNet ({source}), {args.model}, {args.image_size}px, batch {args.batch_size}, "
             f"{args.epochs} epochs, precision {precision}, {'GPU' if gpu else 'CPU'}, seed {args.seed}")
    # Synthetic images carry no labels worth learning: skip validation and test, report throughput.
    no_eval = {"limit_val_batches": 0} if args.synthetic else {}
    try:
        return run_modes(args, build, title, test=not args.synthetic, precision=precision, **no_eval)
    except ConfigError as e:
        print(f"imagenet.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
