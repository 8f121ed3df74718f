"""Folding a ReLU into the input quantizer of the layers it feeds.

A ReLU followed by an unsigned quantizer costs two passes over the activation, forward and
backward, for nothing the quantizer does not already do: its clamp at 0 is the ReLU. A layer with
``input_relu = True`` computes ``layer(relu(x))`` itself: LIQ's ``relu=True`` (the same forward, the
backward's range open at 0 so that ``relu'(0) = 0`` holds, exactly), ``fake_quantize(relu=True)``
for LSQ / LSQ+ (the terms at ``relu(x)``, dx gated by ``x > 0``), PACT as it is (it applies a ReLU
itself), or ``torch.relu`` first for any other quantizer (``QuantLayer.relu_foldable``). Applying a ReLU twice changes nothing, so the flag is always safe; the model
skips its own ReLU (``relu_unless_absorbed``) only when every consumer of its output absorbs it.

Models say which layers take a ReLU output that nothing else reads through a
``relu_fed_layers()`` method (module names; ``saq.models`` implements it for pre-act ResNet,
ResNet and the digits CNN). ``saq.quantize_model(fold_relu=True)`` (the default) then sets the flag
on those whose input quantizer absorbs the ReLU, where it saves time.
"""
from __future__ import annotations

from typing import Callable, List

from torch import Tensor, nn

__all__ = ["relu_unless_absorbed", "fold_relus"]


def relu_unless_absorbed(x: Tensor, relu: Callable[[Tensor], Tensor], *consumers: nn.Module) -> Tensor:
    """``relu(x)``, or x itself when every consumer (a module reading this ReLU's output) has
    ``input_relu`` set and so applies the ReLU inside its quantizer."""
    if consumers and all(getattr(c, "input_relu", False) for c in consumers):
        return x
    return relu(x)


def fold_relus(model: nn.Module) -> List[str]:
    """Set ``input_relu`` on the layers of ``model.relu_fed_layers()`` that absorb a ReLU for free
    (saq.nn quantized layers whose ``relu_foldable`` is true); returns their names. Models
    without ``relu_fed_layers`` are left as they are."""
    from .modules import QuantLayer

    names = getattr(model, "relu_fed_layers", None)
    if names is None:
        return []
    folded = []
    for name in names():
        layer = model.get_submodule(name)
        if isinstance(layer, QuantLayer) and layer.relu_foldable:
            layer.input_relu = True
            folded.append(name)
    return folded
