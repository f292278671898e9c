"""Shared fixtures: small deterministic models and a real CIFAR-10 subset path."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = REPO / "examples" / "data" / "cifar10-subset"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def load_script(folder: str, name: str) -> ModuleType:
    """Imports ``<folder>/<name>.py`` of the repository (a benchmark or an example) as a module."""
    spec = importlib.util.spec_from_file_location(f"_{folder}_{name}", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
