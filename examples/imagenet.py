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
from pathlib import Path

import torch

from lightning_approx.classifier import ImageClassifier
from lightning_approx.data.imagenet import ImageNetDataModule
from lightning_approx.runs import add_run_arguments, run_modes
from lightning_approx.script_args import non_negative_int, positive_int, script_main
from lightning_approx.summary import RunResult

# Lightning's precision settings ("auto" is this script's: 16-mixed on a GPU, 32-true on the CPU).
PRECISIONS = ["auto", "16-mixed", "bf16-mixed", "32-true", "16-true", "bf16-true", "64-true"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, epochs=1, batch_size=64)
    p.add_argument("--data-dir", type=Path, help="folder holding train/ and val/ (not needed with --synthetic)")
    p.add_argument("--synthetic", action="store_true", help="random images: measure throughput without data")
    p.add_argument("--synthetic-size", type=positive_int, default=1_281_167,
                   help="training images per epoch with --synthetic")
    p.add_argument("--num-classes", type=positive_int, default=1000,
                   help="classes with --synthetic (a folder's are counted)")
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--image-size", type=positive_int, default=224, help="side of the training and validation crops")
    p.add_argument("--resize-size", type=positive_int,
                   help="shorter side before the validation crop, at least --image-size (default: size * 8/7)")
    p.add_argument("--num-workers", type=non_negative_int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (16-mixed on GPU, 32-true on CPU), bf16-mixed, ...")
    args = p.parse_args(argv)
    if args.resize_size is not None and args.resize_size < args.image_size:
        p.error(f"argument --resize-size: {args.resize_size} is smaller than --image-size {args.image_size}, so the "
                f"validation crop would be padded with black borders; give at least {args.image_size}, e.g. "
                f"{round(args.image_size * 8 / 7)} (image size * 8/7, the default)")
    return args


def run(argv: list[str] | None = None) -> list[RunResult]:
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
    return run_modes(args, build, title, test=not args.synthetic, precision=precision, **no_eval)


def main(argv: list[str] | None = None) -> list[RunResult]:
    """:func:`run`; a bad setting ends it with one line, ``imagenet.py: error: ...``, and exit status 2."""
    return script_main(run, argv)


if __name__ == "__main__":
    main()
