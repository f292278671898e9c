"""CIFAR ResNets of He et al. 2016 ("Deep Residual Learning", section 4.2): ResNet-20/32/56.

Three stages of ``n`` basic blocks with 16, 32 and 64 channels on 32x32 inputs (depth ``6n + 2``),
and "option A" shortcuts: a parameter-free identity that subsamples with stride 2 and pads the
new channels with zeros, so ResNet-20 has the paper's 0.27M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "ShortcutA", "resnet20", "resnet32", "resnet56"]


class ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero padding of the extra channels.

    Args:
        in_channels: Channels of the block input.
        out_channels: Channels of the block output (``>= in_channels``).
        stride: Spatial subsampling factor (1 or 2).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        # Split the zero channels evenly on both sides, as the reference implementation does.
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (the first conv may downsample).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first conv.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        # Separate ReLU modules (not one reused, not functional) so forward hooks see each one once.
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ShortcutA(in_channels, out_channels, stride)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of depth ``6 * blocks_per_stage + 2`` for 32x32 images.

    Args:
        blocks_per_stage: Basic blocks in each of the three stages (3 for ResNet-20).
        num_classes: Outputs of the final ``fc`` layer.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self.reset_parameters()

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan-in) conv and linear weights (He et al. 2015), BN to identity, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (0.27M parameters with 10 classes)."""
    return CifarResNet(3, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (0.46M parameters with 10 classes)."""
    return CifarResNet(5, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (0.85M parameters with 10 classes)."""
    return CifarResNet(9, num_classes)
