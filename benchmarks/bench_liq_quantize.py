"""liq_quantize (the LIQ clip quantizer of SAQ): every provider, mode, size and dtype.

Providers: each saq backend through the ``saq::liq_quantize`` op (``use_backend(name)``);
``reference-eager`` (``saq_kernels.reference`` called directly); ``reference-compile``
(``torch.compile`` of the same functions). torch has no LIQ op.

Variants follow the layer: activations (flat power-of-two sizes and ``*.act`` layers) are unsigned
without standardization; conv weights (4-D) are signed with the whole-tensor weight
standardization; linear weights (2-D) are signed without it (as the SAQ reference code). 4 bits.

Modes: ``fwd``; ``bwd`` (the backward op alone: dx and dclip from dy and x); ``fwd+bwd`` (forward,
then autograd; for the reference providers forward then backward function); ``fwd+e`` (weights:
the Case 1/3 perturbed forward Q(w) + s*e).

Bytes moved (the floor for the op as specified; s = bytes per element of x's dtype). The
standardized variant must read x once more for mean/std before quantizing, in the forward and again
in the backward (the statistics are recomputed, not passed between them):
    fwd      read x, write y                 2 s   (+ s standardized)
    bwd      read x, read dy, write dx       3 s   (+ s standardized)
    fwd+bwd  fwd + bwd                       5 s   (+ 2 s standardized)
    fwd+e    read x, read e, write y         3 s   (+ s standardized)
"""
from __future__ import annotations

import pytest
import torch

import harness as H
from harness import CFG, DTYPES

OP = "liq_quantize"
BITS = 4
BYTES_PER_ELEM = {"fwd": 2, "bwd": 3, "fwd+bwd": 5, "fwd+e": 3}
STD_EXTRA = {"fwd": 1, "bwd": 1, "fwd+bwd": 2, "fwd+e": 1}
BASELINES = ["reference-eager", "reference-compile"]


def _providers():
    return H.saq_backends() + [(p, None) for p in BASELINES]


def _modes(shape, provider):
    return ["fwd", "bwd", "fwd+bwd"] + (["fwd+e"] if shape.kind == "weight" else [])


def _variant(shape):
    """(signed, standardize, label)"""
    if shape.kind != "weight":
        return False, False, "unsigned act"
    if len(shape.dims) == 4:
        return True, True, "signed conv weight, standardized"
    return True, False, "signed linear weight"


def _fns(provider):
    from saq_kernels import reference as R

    if provider == "reference-compile":
        return H.compiled(R.liq_quantize), H.compiled(R.liq_quantize_backward)
    return R.liq_quantize, R.liq_quantize_backward


def _make_call(provider, mode, signed, std, inp, s_e):
    import saq_kernels as sk

    x, g, e, clip = inp
    if provider.startswith("saq-"):
        if mode == "fwd":
            return lambda: sk.liq_quantize(x, clip, BITS, signed, std)
        if mode == "fwd+e":
            return lambda: sk.liq_quantize(x, clip, BITS, signed, std, e, s_e)
        if mode == "bwd":
            bwd = torch.ops.saq.liq_quantize_backward
            return lambda: bwd(g, x, clip, BITS, signed, std, None, None, False)
        xr, cr = x.detach().requires_grad_(), clip.detach().requires_grad_()

        def fwd_bwd():
            y = sk.liq_quantize(xr, cr, BITS, signed, std)
            return torch.autograd.grad(y, (xr, cr), g)

        return fwd_bwd

    fwd, bwd = _fns(provider)
    if mode == "fwd":
        return lambda: fwd(x, clip, BITS, signed, std, None, None, False)
    if mode == "fwd+e":
        return lambda: fwd(x, clip, BITS, signed, std, e, s_e, False)
    if mode == "bwd":
        return lambda: bwd(g, x, clip, BITS, signed, std, None, None, False)

    def fwd_bwd():
        fwd(x, clip, BITS, signed, std, None, None, False)
        return bwd(g, x, clip, BITS, signed, std, None, None, False)

    return fwd_bwd


@pytest.mark.parametrize("provider,mode,shape,dtype", H.quantizer_params(_providers(), _modes))
def test_liq_quantize(benchmark, provider, mode, shape, dtype):
    dt = DTYPES[dtype]
    if provider.startswith("saq-"):
        reason = H.backend_reason(provider, OP, dt)
        if reason:
            pytest.skip(reason)
    signed, std, label = _variant(shape)
    tag = f"{OP}/{dtype}/{int(signed)}{int(std)}"
    if provider == "reference-compile":
        reason = H.compile_skip(tag, dtype)
        if reason:
            pytest.skip(reason)

    def make():
        x = H.randn(shape.dims, dt, seed=1)
        if not std and signed:
            x = x * 0.05  # linear weights: clip 0.1 ~ 2 std
        g = H.randn(shape.dims, dt, seed=2)
        e = H.randn(shape.dims, dt, seed=3)
        clip = torch.tensor([2.0 if std or not signed else 0.1], device=CFG.device)
        return x, g, e, clip

    s_e = torch.tensor(0.01, device=CFG.device)
    per_elem = BYTES_PER_ELEM[mode] + (STD_EXTRA[mode] if std else 0)
    nbytes = per_elem * dt.itemsize * shape.numel

    def setup(k):
        sets = H.rotated((OP, shape.dims, dtype, signed, std), k, make)
        return [_make_call(provider, mode, signed, std, inp, s_e) for inp in sets]

    H.run_case(benchmark, op=OP, provider=provider, mode=mode, shape=shape.label,
               numel=shape.numel, dtype=dtype, nbytes=nbytes, setup=setup,
               context=lambda: H.backend_context(provider), tolerate=not provider.startswith("saq-"),
               note=label, compile_tag=tag if provider == "reference-compile" else None)
