"""Quantized layers (QConv2d, QLinear) and composite quantizers."""
from .modules import QUANTIZERS, QConv2d, QLinear, QuantLayer
from .relu_fold import fold_relus, relu_unless_absorbed

__all__ = ["QConv2d", "QLinear", "QuantLayer", "QUANTIZERS", "fold_relus", "relu_unless_absorbed"]
