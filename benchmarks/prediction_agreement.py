"""How far apart two trained classifiers' test accuracies are, and how much of that the test set's
size alone explains.

Time-to-accuracy compares an approximate run with the exact run of the same seed. Two runs that
differ in nothing but floating-point rounding already end at different accuracies, and part of
that difference is the finite test set: on ``n`` images, two models that each get a different
few images right differ in accuracy by ``(right_only_a - right_only_b)``, whose standard deviation
from sampling the test set is ``sqrt((p_a + p_b - (p_a - p_b)**2) / n)`` with ``p_a``, ``p_b``
the shares of images only one of them gets right. This loads pairs of
:class:`~lightning_approx.classifier.ImageClassifier` checkpoints (as ``lightning-approx fit``
writes them), predicts the CIFAR-10 subset's test images with each, and prints both
accuracies, how often the predictions differ, and that standard deviation.

    python benchmarks/prediction_agreement.py --checkpoints a.ckpt b.ckpt [c.ckpt d.ckpt ...] --json out.json
"""

from __future__ import annotations

import argparse
import math
import sys
from datetime import date
from pathlib import Path

import torch
from torch import Tensor

from lightning_approx.classifier import ImageClassifier
from lightning_approx.data.cifar10 import CIFAR10DataModule
from lightning_approx.errors import ConfigError
from lightning_approx.runs import write_json
from lightning_approx.script_args import script_main

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "cifar10-subset"


def agreement(pred_a: Tensor, pred_b: Tensor, labels: Tensor) -> dict[str, float]:
    """The two accuracies, the shares of images only one model gets right, how often the
    predictions differ, and the standard deviation of the accuracy difference from sampling
    ``len(labels)`` test images (all in percent)."""
    right_a, right_b = pred_a == labels, pred_b == labels
    n = labels.numel()
    only_a = (right_a & ~right_b).sum().item() / n
    only_b = (right_b & ~right_a).sum().item() / n
    return {"images": n, "acc_a": 100 * right_a.sum().item() / n, "acc_b": 100 * right_b.sum().item() / n,
            "right_only_a": 100 * only_a, "right_only_b": 100 * only_b,
            "predictions_differ": 100 * (pred_a != pred_b).sum().item() / n,
            "delta_sd_from_test_set": 100 * math.sqrt((only_a + only_b - (only_a - only_b) ** 2) / n)}


@torch.no_grad()
def predict(checkpoint: Path, data: CIFAR10DataModule) -> tuple[Tensor, Tensor]:
    """Test-set predictions of a checkpoint, in the memory format it trained in, and the labels."""
    model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    preds, labels = [], []
    for batch in data.test_dataloader():
        x, y = data.transform_batch(batch, train=False)
        if model.hparams.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        preds.append(model(x).argmax(1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", type=Path, required=True, help="pairs: a1 b1 a2 b2 ...")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if len(args.checkpoints) % 2:
        p.error(f"--checkpoints takes pairs; got {len(args.checkpoints)} paths: add the missing one or drop one")
    for path in args.checkpoints:  # all of them before the first is evaluated
        if not path.is_file():
            raise ConfigError("--checkpoints", str(path), "no such file" if not path.exists() else "is not a file",
                              "give checkpoints (.ckpt) of ImageClassifier runs, e.g. from lightning-approx fit")
    data = CIFAR10DataModule(data_dir=args.data_dir, batch_size=256)
    data.setup("test")
    pairs = []
    for a, b in zip(args.checkpoints[::2], args.checkpoints[1::2], strict=True):
        (pred_a, labels), (pred_b, _) = predict(a, data), predict(b, data)
        pairs.append({"a": str(a), "b": str(b), **agreement(pred_a, pred_b, labels)})
    print("| a | b | acc a (%) | acc b (%) | predictions differ (%) | right only in a / b (%) | "
          "SD of the difference from the test set (points) |")
    print("|---|---|---|---|---|---|---|")
    for r in pairs:
        print(f"| {r['a']} | {r['b']} | {r['acc_a']:.2f} | {r['acc_b']:.2f} | {r['predictions_differ']:.1f} | "
              f"{r['right_only_a']:.1f} / {r['right_only_b']:.1f} | {r['delta_sd_from_test_set']:.2f} |")
    result = {"benchmark": "prediction_agreement", "date": date.today().isoformat(), "torch": torch.__version__,
              "command": " ".join(["python", *sys.argv]), "pairs": pairs}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    script_main(main)
