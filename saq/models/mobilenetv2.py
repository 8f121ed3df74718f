"""MobileNetV2: the ImageNet network (torchvision parameter names) and the CIFAR variant of the
SAQ reference code (its parameter names: ``conv1, bn1, layers.{i}.conv1..bn3/shortcut, conv2,
bn2, linear``).

``zero_init_residual`` (default True): the last BatchNorm of every block with a shortcut starts
with gamma 0, so each such block starts as its shortcut. Quantized from scratch, MobileNetV2 needs
it: a block's input is signed (a linear bottleneck plus the shortcut), and the unsigned
activation quantizers of the reference recipe clip it to [0, clip]; BatchNorm then normalizes a
narrow quantized tensor, and the gradient grows about 3x per block going backwards (at init, W4A4
LIQ: largest gradient 4e5 against 1.6 in float; 8 with the zero init), enough to overflow within
a few steps. Loading pretrained weights replaces the init; ``zero_init_residual=False`` is the
reference code's initialization.
"""
from typing import List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["InvertedResidual", "MobileNetV2", "MobileNetV2Cifar", "mobilenetv2",
           "mobilenetv2_cifar"]

# (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper.
_IMAGENET_CFG: List[Tuple[int, int, int, int]] = [
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]
# CIFAR: the stem stride and the stride of the 24-channel stage are 1 instead of 2, so a 32x32
# input reaches the last stage at 4x4 (the reference code's change).
_CIFAR_CFG: List[Tuple[int, int, int, int]] = [
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:
    # A Sequential (not a named module) so names match torchvision's Conv2dNormActivation: .0/.1.
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """ImageNet block: [1x1 expand-BN-ReLU6] - 3x3 depthwise-BN-ReLU6 - 1x1 project-BN, plus the
    identity when stride 1 and cin == cout. [B, cin, H, W] -> [B, cout, H/s, W/s]."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(cin, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """ImageNet MobileNetV2 (width 1.0), torchvision layout: ``features`` (stem conv3x3/2 to 32,
    17 inverted residuals, conv1x1 to 1280), global average pool, ``classifier`` (dropout, linear).

    Input [B, in_chans, 224, 224] float (any size >= 32 works). Output [B, num_classes] logits.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.2,
                 zero_init_residual: bool = True):
        super().__init__()
        cin = 32
        features: List[nn.Module] = [_conv_bn_relu6(in_chans, cin, stride=2)]
        for t, c, n, s in _IMAGENET_CFG:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(_conv_bn_relu6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # see the module docstring
            for m in self.modules():
                if isinstance(m, InvertedResidual) and m.use_res_connect:
                    nn.init.zeros_(m.conv[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class MobileNetV2CifarBlock(nn.Module):
    """CIFAR block of the reference code: 1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1
    project-BN. Stride 1 adds a shortcut (identity, or 1x1 conv + BN when cin != cout); stride 2
    has none. [B, cin, H, W] -> [B, cout, H/s, W/s]."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        hidden = expansion * cin
        self.conv1 = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 for 32x32 images (reference recipe): stem conv3x3/1 to 32, the 17 blocks with
    the 24-channel stage at stride 1, conv1x1 to 1280, global average pool, linear.

    Input [B, in_chans, 32, 32] float -> [B, num_classes] logits.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, zero_init_residual: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks, cin = [], 32
        for t, c, n, s in _CIFAR_CFG:
            for i in range(n):
                blocks.append(MobileNetV2CifarBlock(cin, c, t, s if i == 0 else 1))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(cin, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)
        if zero_init_residual:  # see the module docstring
            for b in self.layers:
                if b.stride == 1:
                    nn.init.zeros_(b.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(self.layers(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def mobilenetv2(num_classes: int = 1000, in_chans: int = 3, **kw) -> MobileNetV2:
    """ImageNet MobileNetV2, 3.5 M parameters at 1000 classes. Input [B, in_chans, 224, 224]."""
    return MobileNetV2(num_classes=num_classes, in_chans=in_chans, **kw)


def mobilenetv2_cifar(num_classes: int = 10, in_chans: int = 3, **kw) -> MobileNetV2Cifar:
    """CIFAR MobileNetV2 of the SAQ reference recipe. Input [B, in_chans, 32, 32]."""
    return MobileNetV2Cifar(num_classes=num_classes, in_chans=in_chans, **kw)
