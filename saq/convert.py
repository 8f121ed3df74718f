"""quantize_model: swap a float model's Conv2d / Linear layers for saq.nn.QConv2d / QLinear.

The reference recipe's first/last layer handling is the default: the first conv gets 8-bit weights
and a float (unquantized) input, the last linear gets 8-bit weights and 8-bit inputs, every other
conv/linear (shortcuts included) the target bits. A model without convs (an MLP) treats its first
linear as the first layer (a single linear is first and last: 8-bit weights, float input). The
quantized layers take over the float layers'
weight and bias Parameters (tied weights stay tied), so a full-precision checkpoint can be loaded
before (into the float model) or after (strict=False for the new quantizer parameters) conversion.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, List, Optional, Tuple

import torch.nn as nn

from .nn import QUANTIZERS, QConv2d, QLinear, QuantLayer, fold_relus

__all__ = ["quantize_model", "quantized_layers"]


def _layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear) or isinstance(m, QuantLayer)
    ]


def _aliases(model: nn.Module) -> dict:
    """id(module) -> every name it is registered under (a module shared by two attributes)."""
    out: dict = {}
    for n, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(n)
    return out


def quantized_layers(model: nn.Module) -> List[Tuple[str, QuantLayer]]:
    """(name, layer) for every saq.nn quantized layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# Modules whose forward may read their child Linears' weights directly (PyTorch's fused
# inference path of the Transformer layers): a quantized child would be bypassed there.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


def _refuse_unconvertible(model: nn.Module, layers, skip) -> None:
    """Layers whose conversion would silently change or bypass the model: refused by name."""
    import torch.nn.utils.parametrize as P

    names = {id(m): n for n, m in layers}
    for n, m in model.named_modules():
        if isinstance(m, _READS_CHILD_WEIGHTS):
            inner = [c for c, sub in m.named_modules() if id(sub) in names
                     and not any(fnmatch.fnmatchcase(names[id(sub)], pat) for pat in skip)]
            if inner:
                raise ValueError(
                    f"saq.quantize_model: {n or 'the model'} is an nn.{type(m).__name__}, whose fused "
                    f"inference path reads its Linears' weights directly (a quantized "
                    f"{n + '.' if n else ''}{inner[0]} would be bypassed in eval); skip them "
                    f"(skip=['{n + '.' if n else ''}*']) or build the block from plain nn.Linear layers "
                    f"(as saq.models.vit does)")
    # old-style hooks leave a plain tensor as .weight; torch.nn.utils.parametrize makes the layer
    # a subclass that the type test of _layers would pass over silently
    parametrized = [(n, m) for n, m in model.named_modules()
                    if isinstance(m, (nn.Conv2d, nn.Linear)) and P.is_parametrized(m)]
    for n, m in list(layers) + parametrized:
        if any(fnmatch.fnmatchcase(n, pat) for pat in skip):
            continue
        if P.is_parametrized(m) or not isinstance(m.weight, nn.Parameter):
            raise ValueError(
                f"saq.quantize_model: {n}'s weight is reparametrized (weight_norm, spectral_norm, "
                f"pruning or torch.nn.utils.parametrize); fold it first "
                f"(torch.nn.utils.parametrize.remove_parametrizations, remove_weight_norm, "
                f"remove_spectral_norm, prune.remove) or skip the layer")


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
    # the same Parameter objects, not copies: weights tied across layers stay tied, and an
    # optimizer that already holds them keeps training them
    q.weight = m.weight
    if m.bias is not None:
        q.bias = m.bias
    q.train(m.training)
    # hooks registered on the float layer keep firing (their handles still remove them)
    for name in _HOOK_DICTS:
        if getattr(m, name, None):
            setattr(q, name, getattr(m, name))
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
        first_last_bits: bits of the first conv's weights (its input stays float; the first
            linear in a model without convs) and of the last linear's weights and input, as the
            reference recipe does. None: no special case.
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
    every = _layers(model)
    layers = [(n, m) for n, m in every if not isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("saq.quantize_model: the model has no nn.Conv2d or nn.Linear layer to quantize"
                         + (" (it is quantized already)" if every else ""))
    skip = list(skip)
    aliases = _aliases(model)
    # a layer registered under several names is skipped when any of them matches
    skipped = {id(m) for n, m in layers
               if any(fnmatch.fnmatchcase(a, pat) for a in aliases[id(m)] for pat in skip)}
    _refuse_unconvertible(model, [(n, m) for n, m in layers if id(m) not in skipped], skip)
    # first and last over every conv/linear, quantized ones too: a second call (after a skip)
    # must not give a middle layer the first-layer treatment
    convs = [n for n, m in every if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in every if isinstance(m, nn.Linear)]
    # module order; the reference code's first layer is its stem conv. Without convs the input
    # layer is the first linear (quantizing an MLP's raw, signed input as unsigned would zero it).
    first = convs[0] if convs else linears[0]
    last = linears[-1] if linears else None
    kw = dict(quantizer=quantizer, per_channel=per_channel, standardize=standardize, signed_activations=signed_activations)
    # every new layer is built before the model is touched: a refused argument (bits 9, say)
    # leaves the model as it was, so a corrected call sees the same first and last layers
    new = []
    for name, m in layers:
        if id(m) in skipped:
            continue
        wb, ab = weight_bits, act_bits
        if first_last_bits is not None and name == first:
            wb, ab = first_last_bits, 32
        elif first_last_bits is not None and name == last:
            wb, ab = first_last_bits, first_last_bits
        new.append((m, _convert(m, wb, ab, **kw)))
    for m, q in new:
        for name in aliases[id(m)]:  # a module registered under two names is replaced under both
            _set(model, name, q)
    if fold_relu:
        fold_relus(model)
    return model
