"""Pre-activation ResNet-20 for 32x32 inputs: the network of the SAQ reference CIFAR recipe.

Parameter names follow the SAQ reference code (``conv``, ``layer{1,2,3}.{i}.bn1/conv1/bn2/conv2``,
``layer{k}.0.downsample``, ``bn``, ``fc``) so its full-precision checkpoints load directly.
"""
import torch
from torch import nn

from ..nn.relu_fold import relu_unless_absorbed

__all__ = ["PreActBasicBlock", "PreActResNet", "preact_resnet20"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    ``shortcut_after_preact=True`` (the first block of each stage, the reference's "half_preact")
    takes the shortcut after the first BN-ReLU, so a stage's input is normalized once for both
    branches; otherwise the shortcut is the raw input ("both_preact"). ``downsample`` is a bare
    1x1 conv (no BN), used when the stride or the width changes.

    Input [B, cin, H, W] float; output [B, cout, H/stride, W/stride].
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut_after_preact: bool = False):
        super().__init__()
        self.shortcut_after_preact = shortcut_after_preact
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def relu_fed_layers(self):
        """The layers that alone read a ReLU's output (saq/nn/relu_fold.py): conv2; conv1 (and
        the downsample) unless that ReLU's output is also the shortcut."""
        names = ["conv2"]
        if not self.shortcut_after_preact:
            names.append("conv1")
        elif self.downsample is not None:
            names += ["conv1", "downsample"]
        return names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu_unless_absorbed: the ReLU is skipped where the quantized layers reading its output
        # apply it themselves (quantize_model's fold_relu); the numbers are the same.
        if self.shortcut_after_preact:
            if self.downsample is None:  # the ReLU's output is the shortcut too
                x = self.relu1(self.bn1(x))
            else:
                x = relu_unless_absorbed(self.bn1(x), self.relu1, self.conv1, self.downsample)
            residual = x
        else:
            residual = x
            # Not in place: x is also the shortcut.
            x = relu_unless_absorbed(self.bn1(x), torch.relu, self.conv1)
        out = self.conv2(relu_unless_absorbed(self.bn2(self.conv1(x)), self.relu2, self.conv2))
        if self.downsample is not None:
            residual = self.downsample(residual)
        return out + residual


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 32x32 images: depth = 6n + 2.

    conv3x3(in_chans -> 16w), three stages of n blocks with widths 16w, 32w, 64w (strides 1, 2, 2),
    final BN + ReLU, global average pool, linear(64w -> num_classes).

    Input [B, in_chans, 32, 32] float (any H, W divisible by 4 works: the pool is global).
    Output [B, num_classes] logits.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3,
                 width: int = 1):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"PreActResNet: depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv = _conv3x3(in_chans, widths[0])
        cin = widths[0]
        for k, (cout, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = [PreActBasicBlock(cin, cout, stride, shortcut_after_preact=True)]
            blocks += [PreActBasicBlock(cout, cout) for _ in range(n - 1)]
            setattr(self, f"layer{k}", nn.Sequential(*blocks))
            cin = cout
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init with fan_out, as in the reference code.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def relu_fed_layers(self):
        """Module names of the layers that alone read a ReLU's output (saq/nn/relu_fold.py)."""
        return [f"layer{k}.{i}.{n}" for k in (1, 2, 3)
                for i, blk in enumerate(getattr(self, f"layer{k}")) for n in blk.relu_fed_layers()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def preact_resnet20(num_classes: int = 10, in_chans: int = 3, **kw) -> PreActResNet:
    """Pre-act ResNet-20 (3 stages x 3 blocks, widths 16/32/64). Input [B, in_chans, 32, 32]."""
    return PreActResNet(depth=20, num_classes=num_classes, in_chans=in_chans, **kw)
