"""ImageNet ResNet-18 / ResNet-50, parameter names and shapes identical to torchvision's.

A torchvision ``resnet18``/``resnet50`` state_dict loads with ``load_state_dict(strict=True)``.
ResNet-50 is the "v1.5" variant (stride on the 3x3 conv of the bottleneck), like torchvision.
"""
from typing import List, Type, Union

import torch
from torch import nn

from ..nn.relu_fold import relu_unless_absorbed

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. [B, cin, H, W] -> [B, planes, H/s, W/s]."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def relu_fed_layers(self):
        """Layers that alone read a ReLU's output (saq/nn/relu_fold.py)."""
        return ["conv2"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = relu_unless_absorbed(self.bn1(self.conv1(x)), self.relu, self.conv2)
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here), 1x1 expand x4, each with BN, + shortcut, ReLU.

    [B, cin, H, W] -> [B, 4 * planes, H/s, W/s].
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def relu_fed_layers(self):
        """Layers that alone read a ReLU's output (saq/nn/relu_fold.py)."""
        return ["conv2", "conv3"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = relu_unless_absorbed(self.bn1(self.conv1(x)), self.relu, self.conv2)
        out = relu_unless_absorbed(self.bn2(self.conv2(out)), self.relu, self.conv3)
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet ResNet: conv7x7/2 (64) - BN - ReLU - maxpool3x3/2 - 4 stages (64, 128, 256, 512
    planes; strides 1, 2, 2, 2) - global average pool - fc.

    Input [B, in_chans, 224, 224] float (any size >= 32 works: the pool is adaptive).
    Output [B, num_classes] logits.
    """

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int],
                 num_classes: int = 1000, in_chans: int = 3, zero_init_residual: bool = False):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block starts as the identity.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def relu_fed_layers(self):
        """Module names of the layers that alone read a ReLU's output (saq/nn/relu_fold.py)."""
        return [f"layer{k}.{i}.{n}" for k in (1, 2, 3, 4)
                for i, blk in enumerate(getattr(self, f"layer{k}")) for n in blk.relu_fed_layers()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, in_chans: int = 3, **kw) -> ResNet:
    """ResNet-18 (BasicBlock x [2, 2, 2, 2]), 11.7 M parameters at 1000 classes."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans, **kw)


def resnet50(num_classes: int = 1000, in_chans: int = 3, **kw) -> ResNet:
    """ResNet-50 v1.5 (Bottleneck x [3, 4, 6, 3]), 25.6 M parameters at 1000 classes."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, **kw)
