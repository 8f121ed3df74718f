"""Quantized layers (QConv2d, QLinear) and composite quantizers."""
from .modules import QUANTIZERS, QConv2d, QLinear, QuantLayer

__all__ = ["QConv2d", "QLinear", "QuantLayer", "QUANTIZERS"]
