"""quantize_model: swap a float model's Conv2d / Linear layers for saq.nn.QConv2d / QLinear.

The reference recipe's first/last layer handling is the default: the first conv gets 8-bit weights
and a float (unquantized) input, the last linear gets 8-bit weights and 8-bit inputs, every other
conv/linear (shortcuts included) the target bits. Weights and biases are copied, so a
full-precision checkpoint can be loaded before (into the float model) or after (strict=False for
the new quantizer parameters) conversion.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .nn import QUANTIZERS, QConv2d, QLinear, QuantLayer, fold_relus

__all__ = ["quantize_model", "quantized_layers"]


def _layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear) or isinstance(m, QuantLayer)
    ]


def quantized_layers(model: nn.Module) -> List[Tuple[str, QuantLayer]]:
    """(name, layer) for every saq.nn quantized layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _convert(m: nn.Module, wbits: int, abits: int, **kw) -> nn.Module:
    dev, dt = m.weight.device, m.weight.dtype
    if isinstance(m, nn.Conv2d):
        q = QConv2d(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
            m.groups, m.bias is not None, wbits, abits, padding_mode=m.padding_mode,
            device=dev, dtype=dt, **kw,
        )
    else:
        kw.pop("standardize", None)
        q = QLinear(m.in_features, m.out_features, m.bias is not None, wbits, abits, device=dev, dtype=dt, **kw)
    with torch.no_grad():
        q.weight.copy_(m.weight)
        if m.bias is not None:
            q.bias.copy_(m.bias)
    q.train(m.training)
    return q


def quantize_model(
    model: nn.Module,
    weight_bits: int = 4,
    act_bits: int = 4,
    quantizer: str = "liq",
    per_channel: bool = False,
    first_last_bits: Optional[int] = 8,
    skip: Iterable[str] = (),
    standardize: bool = True,
    signed_activations: bool = False,
    fold_relu: bool = True,
) -> nn.Module:
    """Replace every nn.Conv2d / nn.Linear of ``model`` (in place) by a quantized layer.

    Args:
        weight_bits, act_bits: target bits (2..8, 32 = off) for all layers but the first/last.
        quantizer: "liq" (SAQ reference), "lsq", "lsq+", "pact" or "dorefa".
        per_channel: one weight scale per output channel (LSQ / LSQ+).
        first_last_bits: bits of the first conv's weights (its input stays float) and of the last
            linear's weights and input, as the reference recipe does. None: no special case.
        skip: layer names or fnmatch patterns left in floating point (not quantized, not perturbed
            by SAQ).
        standardize: LIQ weight standardization for convs (the reference's default).
        signed_activations: quantize layer inputs with a signed range (e.g. for transformers).
        fold_relu: let quantized layers fed by a ReLU (as the model's ``relu_fed_layers()`` lists
            them) apply it inside their input quantizer (unsigned LIQ, LSQ / LSQ+, PACT:
            ``QuantLayer.relu_foldable``), so the model skips the ReLU: the
            same numbers (forward and gradients, exactly), one elementwise op fewer per layer.
            See saq/nn/relu_fold.py. Models without ``relu_fed_layers`` are unaffected.
    Returns the same model object.
    """
    if quantizer not in QUANTIZERS:
        raise ValueError(f"saq.quantize_model: unknown quantizer {quantizer!r}; choose one of {QUANTIZERS}")
    layers = [(n, m) for n, m in _layers(model) if not isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("saq.quantize_model: the model has no nn.Conv2d or nn.Linear layer to quantize")
    skip = list(skip)
    convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    first = convs[0] if convs else None
    last = linears[-1] if linears else None
    kw = dict(quantizer=quantizer, per_channel=per_channel, standardize=standardize, signed_activations=signed_activations)
    for name, m in layers:
        if any(fnmatch.fnmatchcase(name, pat) for pat in skip):
            continue
        wb, ab = weight_bits, act_bits
        if first_last_bits is not None and name == first:
            wb, ab = first_last_bits, 32
        elif first_last_bits is not None and name == last:
            wb, ab = first_last_bits, first_last_bits
        _set(model, name, _convert(m, wb, ab, **kw))
    if fold_relu:
        fold_relus(model)
    return model
