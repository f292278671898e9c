"""ImageNet ResNets (He et al. 2016), architecturally identical to torchvision's.

ResNet-18 (basic blocks) and ResNet-50 (bottlenecks, stride on the 3x3 conv: "ResNet v1.5") for
224x224 images. Parameter and buffer names match torchvision's, so its state dicts load
unchanged; the only difference is one ``nn.ReLU`` module per use instead of one shared module,
so that forward hooks see every activation exactly once.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50"]


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN projection shortcut ("option B"), when the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    Args:
        in_channels: Input channels.
        planes: Output channels (``expansion`` is 1).
        stride: Stride of the first conv.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_channels, planes, stride)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection.

    Args:
        in_channels: Input channels.
        planes: Channels of the 3x3 conv; the block outputs ``4 * planes``.
        stride: Stride of the 3x3 conv.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)
        self.relu3 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """ImageNet ResNet: 7x7 stride-2 stem, 3x3 max-pool, four stages, global average pool, ``fc``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: Blocks per stage (``(2, 2, 2, 2)`` for ResNet-18).
        num_classes: Outputs of ``fc``.
        zero_init_residual: Start each residual branch at zero (last BN weight 0), as in
            Goyal et al. 2017; off by default, as in torchvision.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int],
                 num_classes: int = 1000, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.in_channels = 64
        self.layer1 = self._stage(block, 64, layers[0], stride=1)
        self.layer2 = self._stage(block, 128, layers[1], stride=2)
        self.layer3 = self._stage(block, 256, layers[2], stride=2)
        self.layer4 = self._stage(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.reset_parameters(zero_init_residual)

    def _stage(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
               stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(block(self.in_channels, planes, stride if i == 0 else 1))
            self.in_channels = planes * block.expansion
        return nn.Sequential(*layers)

    def reset_parameters(self, zero_init_residual: bool = False) -> None:
        """torchvision's initialisation: Kaiming-normal (fan-out) convs, BN to identity; the
        ``fc`` layer keeps PyTorch's default initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 (11,689,512 parameters with 1000 classes)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, zero_init_residual)


def resnet50(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 v1.5 (25,557,032 parameters with 1000 classes)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, zero_init_residual)
