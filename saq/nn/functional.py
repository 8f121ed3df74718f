"""Composite (pure torch) quantizers that have no dedicated kernel: DoReFa and PACT.

LIQ, LSQ and LSQ+ run on the fused ``saq`` ops (saq_kernels); these two are rarer and cheap to
express with torch ops and a straight-through estimator. Rounding is half to even everywhere.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward, identity gradient in the backward."""
    return x + (torch.round(x) - x).detach()


def _perturb(x: Tensor, e: Optional[Tensor], s: Optional[Tensor]) -> Tensor:
    return x if e is None else x + (s * e).to(x.dtype)


def dorefa_weight(
    w: Tensor, bits: int, e: Optional[Tensor] = None, s: Optional[Tensor] = None, before: bool = False
) -> Tensor:
    """DoReFa weights: ``2 * round_ste(n * (tanh(w) / (2 max|tanh w|) + 1/2)) / n - 1``, n = 2^bits - 1.

    With a perturbation: ``Q(w) + s*e`` or ``Q(w + s*e)`` (``before``). Output in [-1, 1].
    """
    if before:
        w = _perturb(w, e, s)
    n = float(2**bits - 1)
    t = torch.tanh(w)
    # an all-zero weight (a zero-initialized layer) would divide 0 by 0: its tanh is then
    # normalized by 1 (the level nearest 0, finite gradients) instead of NaN
    m = t.abs().max().detach()
    t = t / (2 * torch.where(m > 0, m, torch.ones_like(m))) + 0.5
    y = 2 * round_ste(t * n) / n - 1
    return y if before else _perturb(y, e, s)


def dorefa_activation(x: Tensor, bits: int) -> Tensor:
    """DoReFa activations: ``round_ste(n * clamp(x, 0, 1)) / n``."""
    n = float(2**bits - 1)
    return round_ste(torch.clamp(x, 0, 1) * n) / n


def pact_activation(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """PACT: ``y = round_ste(n * min(relu(x), a) / a) * a / n`` with ``a = |alpha|``.

    The clip gets PACT's gradient (1 where ``x > a``, 0 below, 1/2 at ``x == a``, where
    ``torch.minimum`` splits the tie): the rounding residual is passed straight through, unlike
    LIQ/LSQ whose clip gradient includes it.
    """
    n = float(2**bits - 1)
    a = alpha.abs().reshape(())
    xc = torch.minimum(torch.relu(x), a.to(x.dtype))
    q = torch.round(xc / a * n) / n * a
    return xc + (q - xc).detach()
