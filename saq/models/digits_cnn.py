"""A small CNN for the 8x8 single-channel scikit-learn digits: the project's default model."""
import torch
from torch import nn

from ..nn.relu_fold import relu_unless_absorbed

__all__ = ["DigitsCNN", "digits_cnn"]


class DigitsCNN(nn.Module):
    """conv3x3(in_chans -> w)-BN-ReLU, conv3x3(w -> 2w)-BN-ReLU, conv3x3/2(2w -> 2w)-BN-ReLU,
    global average pool, linear(2w -> num_classes), with w = width (default 32).

    ``conv1`` is the first layer and ``fc`` the last (a quantizer keeps them at 8-bit weights;
    the first conv sees the float input).

    Input [B, in_chans, 8, 8] float (normalized pixels) -> [B, num_classes] logits.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def relu_fed_layers(self):
        """Layers that alone read a ReLU's output (saq/nn/relu_fold.py)."""
        return ["conv2", "conv3"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = relu_unless_absorbed(self.bn1(self.conv1(x)), self.relu, self.conv2)
        x = relu_unless_absorbed(self.bn2(self.conv2(x)), self.relu, self.conv3)
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_cnn(num_classes: int = 10, in_chans: int = 1, **kw) -> DigitsCNN:
    """DigitsCNN, 56.6 k parameters at 10 classes. Input [B, in_chans, 8, 8]."""
    return DigitsCNN(num_classes=num_classes, in_chans=in_chans, **kw)
