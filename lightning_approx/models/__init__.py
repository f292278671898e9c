"""CNNs the examples and benchmarks train, by name: CIFAR ResNets, VGG-19-BN and ImageNet ResNets.

Every model uses one ``nn.ReLU`` module per activation (so hooks see each), calls its stem conv
``conv1`` (``features.conv1`` in VGG) and its classifier ``fc`` (``classifier`` in VGG).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lightning_approx.errors import ConfigError
from lightning_approx.models.resnet_cifar import CifarResNet, resnet20, resnet32, resnet56
from lightning_approx.models.resnet_imagenet import ResNet, resnet18, resnet50
from lightning_approx.models.vgg import VGG, vgg19_bn

__all__ = ["MODELS", "VGG", "CifarResNet", "ResNet", "build_model", "resnet18", "resnet20", "resnet32",
           "resnet50", "resnet56", "vgg19_bn"]

# Name -> constructor taking ``num_classes``; the first four expect 32x32 images, the ResNet-18/50 224x224.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg19_bn": vgg19_bn,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Builds a freshly initialised model by name.

    Args:
        name: A key of :data:`MODELS` (``"resnet20"``).
        num_classes: Outputs of the classifier; ``None`` keeps the model's default (10 for the
            CIFAR models, 1000 for the ImageNet ResNets).

    Returns:
        The model, on the CPU, in training mode.

    Raises:
        ConfigError: ``name`` is not a known model, or ``num_classes`` is not a positive int.
    """
    if not isinstance(name, str) or name not in MODELS:  # a list is unhashable: TypeError
        raise ConfigError("model", name, "unknown model", f"use one of {sorted(MODELS)}")
    if num_classes is None:
        return MODELS[name]()
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError("num_classes", num_classes, "must be a positive integer", "give e.g. 10")
    return MODELS[name](num_classes=num_classes)
