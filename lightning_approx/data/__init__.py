"""Datasets, LightningDataModules and hand-written image transforms for the examples.

* :mod:`lightning_approx.data.cifar10`: CIFAR-10 from its original Python files (md5-checked,
  optional download) and :class:`CIFAR10DataModule` with batched on-device augmentation.
* :mod:`lightning_approx.data.imagenet`: ImageNet-style folders decoded with Pillow,
  :class:`ImageNetDataModule`, and a synthetic mode for throughput measurements.
* :mod:`lightning_approx.data.transforms`: crops, flips, resizes and normalisation.
"""

from __future__ import annotations

from lightning_approx.data.cifar10 import CIFAR10, CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule
from lightning_approx.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    ImageNetDataModule,
    SyntheticImageDataset,
)

__all__ = ["CIFAR10", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR10DataModule",
           "ImageFolderDataset", "ImageNetDataModule", "SyntheticImageDataset"]
