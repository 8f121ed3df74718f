"""Model zoo of the training package, no torchvision needed.

Every model is built from plain ``nn.Conv2d``, ``nn.Linear`` and ``nn.BatchNorm2d`` (or
``nn.LayerNorm`` for the ViT), so ``saq.quantize_model`` can swap them for quantized modules.
Each has a first conv (kept at 8-bit weights, float input by the quantizer) and a last linear.

    >>> model = get_model("preact_resnet20", num_classes=100)
    >>> model(torch.randn(2, *default_input_size("preact_resnet20"))).shape
    torch.Size([2, 100])
"""
from typing import Callable, Dict, Tuple

from torch import nn

from .digits_cnn import DigitsCNN, digits_cnn
from .mobilenetv2 import MobileNetV2, MobileNetV2Cifar, mobilenetv2, mobilenetv2_cifar
from .preact_resnet import PreActResNet, preact_resnet20
from .resnet import ResNet, resnet18, resnet50
from .vit import VisionTransformer, vit_tiny

__all__ = ["MODEL_NAMES", "get_model", "default_input_size", "DigitsCNN", "MobileNetV2",
           "MobileNetV2Cifar", "PreActResNet", "ResNet", "VisionTransformer"]

# name -> (constructor, default input (C, H, W))
_REGISTRY: Dict[str, Tuple[Callable[..., nn.Module], Tuple[int, int, int]]] = {
    "preact_resnet20": (preact_resnet20, (3, 32, 32)),
    "resnet18": (resnet18, (3, 224, 224)),
    "resnet50": (resnet50, (3, 224, 224)),
    "mobilenetv2_cifar": (mobilenetv2_cifar, (3, 32, 32)),
    "mobilenetv2": (mobilenetv2, (3, 224, 224)),
    "vit_tiny": (vit_tiny, (3, 224, 224)),
    "digits_cnn": (digits_cnn, (1, 8, 8)),
}
MODEL_NAMES: Tuple[str, ...] = tuple(_REGISTRY)


def _lookup(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"saq.models: name={name!r} is not a known model; valid names: "
                         f"{', '.join(MODEL_NAMES)}")
    return _REGISTRY[name]


def get_model(name: str, num_classes: int, **kw) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way linear head, freshly initialized (float32,
    CPU, train mode).

    ``kw`` goes to the constructor: ``in_chans`` for every model; ``img_size``, ``patch_size``,
    ``dim``, ``depth``, ``num_heads`` for vit_tiny; ``width`` for preact_resnet20 / digits_cnn;
    ``zero_init_residual`` for resnet18/50 (default False) and mobilenetv2 / mobilenetv2_cifar
    (default True: see saq/models/mobilenetv2.py); ``dropout`` for mobilenetv2.
    The model takes [B, C, H, W] float input, see ``default_input_size``, and returns
    [B, num_classes] logits. Raises ValueError for an unknown name or a bad num_classes.
    """
    ctor, _ = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"saq.models.get_model: num_classes must be a positive int, "
                         f"got {num_classes!r}")
    return ctor(num_classes=num_classes, **kw)


def default_input_size(name: str) -> Tuple[int, int, int]:
    """(C, H, W) of the input model ``name`` is built for by default, e.g. (3, 32, 32) for
    preact_resnet20, (3, 224, 224) for resnet18, (1, 8, 8) for digits_cnn. For vit_tiny built with
    another img_size / in_chans, the input follows those arguments instead."""
    return _lookup(name)[1]
