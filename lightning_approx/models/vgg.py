"""VGG-19 with batch normalisation (Simonyan & Zisserman 2015, configuration E) for 32x32 images.

The sixteen 3x3 conv layers and five max-pools of configuration E bring a 32x32 image to 1x1;
an adaptive average pool then makes the model accept any input size, and one ``Linear`` layer
replaces the three-layer ImageNet head, as is usual for CIFAR.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["VGG", "VGG19_CFG", "vgg19_bn"]

# Channels of each conv layer; "M" is a 2x2 max-pool.
VGG19_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                    512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    """A VGG network: conv-BN-ReLU layers and max-pools, global average pool, linear classifier.

    The layers of ``features`` are named ``conv1, bn1, relu1, ..., pool1, ...`` (counting convs
    and pools separately), so the stem is ``features.conv1``.

    Args:
        cfg: Output channels of each conv layer, ``"M"`` for a max-pool.
        num_classes: Outputs of the ``classifier`` layer.
    """

    def __init__(self, cfg: tuple[int | str, ...] = VGG19_CFG, num_classes: int = 10) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels, convs, pools = 3, 0, 0
        for v in cfg:
            if v == "M":
                pools += 1
                layers[f"pool{pools}"] = nn.MaxPool2d(kernel_size=2, stride=2)
            else:
                convs += 1
                layers[f"conv{convs}"] = nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1)
                layers[f"bn{convs}"] = nn.BatchNorm2d(int(v))
                layers[f"relu{convs}"] = nn.ReLU(inplace=False)
                in_channels = int(v)
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's VGG initialisation: Kaiming-normal (fan-out) convs, N(0, 0.01) classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg19_bn(num_classes: int = 10) -> VGG:
    """VGG-19 with batch normalisation for 32x32 inputs (20.0M parameters with 10 classes)."""
    return VGG(VGG19_CFG, num_classes)
