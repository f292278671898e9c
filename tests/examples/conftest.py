"""Shared pieces of the example tests: tiny-run overrides for the CLI and a small JPEG folder."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from tests.conftest import CIFAR_SUBSET, REPO, load_script

CONFIGS = REPO / "examples" / "configs"

# Two training steps on the CPU, one validation and one test batch, nothing written but checkpoints.
TINY = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
TINY_CIFAR = ["--data.init_args.data_dir", str(CIFAR_SUBSET), "--data.init_args.batch_size", "16"]
# ImageNet configs: synthetic 32x32 images, fp32 and contiguous memory on the CPU.
TINY_IMAGENET = ["--trainer.precision", "32-true", "--model.channels_last", "false",
                 "--data.init_args.synthetic", "true", "--data.init_args.image_size", "32",
                 "--data.init_args.resize_size", "36", "--data.init_args.batch_size", "4",
                 "--data.init_args.num_workers", "0", "--data.init_args.synthetic_train_size", "8",
                 "--data.init_args.synthetic_val_size", "4"]


def tiny_args(config: Path, tmp_path: Path) -> list[str]:
    """``fit`` arguments that run ``config`` for two steps on the CPU, writing under ``tmp_path``."""
    data = TINY_IMAGENET if config.name.startswith("imagenet") else TINY_CIFAR
    return ["fit", "--config", str(config), *TINY, "--trainer.default_root_dir", str(tmp_path), *data]


def load_example(name: str) -> ModuleType:
    """Imports ``examples/<name>.py`` as a module."""
    return load_script("examples", name)


@pytest.fixture(scope="module")
def cifar10() -> ModuleType:
    """``examples/cifar10.py`` as a module."""
    return load_example("cifar10")


@pytest.fixture(scope="module")
def imagenet() -> ModuleType:
    """``examples/imagenet.py`` as a module."""
    return load_example("imagenet")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """The CLI reads its arguments from ``args``; pytest's own ``sys.argv`` would make it warn."""
    monkeypatch.setattr("sys.argv", ["lightning-approx"])


@pytest.fixture(scope="session")
def jpeg_folder(tmp_path_factory) -> Path:
    """An ImageNet-layout folder: 2 classes, 4 training and 2 validation JPEGs each, 40x48 noise."""
    root = tmp_path_factory.mktemp("imagenet")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("n01440764", "n01443537"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=g)
                img = Image.frombytes("RGB", (48, 40), bytes(pixels.flatten().tolist()))
                img.save(root / split / cls / f"{cls}_{i}.JPEG", quality=90)
    return root
