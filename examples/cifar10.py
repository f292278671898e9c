"""Train a CNN on CIFAR-10 with an exact or an approximate backward pass, or compare both.

    python examples/cifar10.py compare                                  # exact vs the recommended crs recipe
    python examples/cifar10.py compare --method crs:sample_ratio=0.5    # crs at 0.5 from the first step
    python examples/cifar10.py approx --method crs:sample_ratio=0.25 --epochs 30
    python examples/cifar10.py compare --method relu_mask+crs:sample_ratio=0.5
    python examples/cifar10.py compare --model vgg19_bn --epochs 1 --limit-train-batches 10
    python examples/cifar10.py exact --data-dir ~/data --download       # the full dataset

The default data is the real CIFAR-10 subset bundled in examples/data/cifar10-subset
(5,085 training and 932 test images), so the example runs without a download. The recipe:
SGD with Nesterov momentum, peak learning rate 0.05 (the best of 0.025 / 0.05 / 0.1 for exact
ResNet-20 on the subset), cosine per step, random crop (padding 4) and flip.

The default approximation is the recommended ``crs`` recipe of examples/configs/
cifar10_resnet20_crs_weight_grid_late.yaml: exact for the first 4 of the 8 epochs, then the weight
gradients from a 3x3 grid of output pixels (docs/methods/crs.md). ``--method`` takes any config of
examples/configs/ the same way (its approximation callbacks; this script's flags set the rest).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_approx.classifier import ImageClassifier
from lightning_approx.data.cifar10 import CIFAR10DataModule
from lightning_approx.runs import add_run_arguments, run_modes
from lightning_approx.script_args import script_main
from lightning_approx.summary import RunResult

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "cifar10-subset"
DEFAULT_RECIPE = Path(__file__).resolve().parent / "configs" / "cifar10_resnet20_crs_weight_grid_late.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, epochs=8, batch_size=128, lr=0.05, method=str(DEFAULT_RECIPE))
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--download", action="store_true", help="download the official archive into --data-dir")
    p.add_argument("--model", default="resnet20", help="resnet20, resnet32, resnet56 or vgg19_bn")
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "onecycle"])
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)

    def build() -> tuple[ImageClassifier, CIFAR10DataModule]:
        data = CIFAR10DataModule(data_dir=args.data_dir, batch_size=args.batch_size, download=args.download,
                                 seed=args.seed)
        return ImageClassifier(model=args.model, lr=args.lr, lr_schedule=args.lr_schedule), data

    title = (f"CIFAR-10 ({args.data_dir.name}), {args.model}, batch {args.batch_size}, {args.epochs} epochs, "
             f"seed {args.seed}")
    return run_modes(args, build, title)


def main(argv: list[str] | None = None) -> list[RunResult]:
    """:func:`run`; a bad setting ends it with one line, ``cifar10.py: error: ...``, and exit status 2."""
    return script_main(run, argv)


if __name__ == "__main__":
    main()
