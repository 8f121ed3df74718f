"""fake_quantize (LSQ / LSQ+ affine fake quantization): every provider, mode, size and dtype.

Providers: each saq backend through the ``saq::fake_quantize`` op (``use_backend(name)``);
``torch-learnable`` (``torch._fake_quantize_learnable_per_{tensor,channel}_affine``, the same
semantics, gradients for x, scale and zero point); ``torch-fq`` (``torch.fake_quantize_per_*_affine``,
fixed qparams, gradient for x only); ``reference-eager`` (``saq_kernels.reference`` called directly);
``reference-compile`` (``torch.compile`` of the same functions).

Modes: ``fwd`` (y = Q(x)); ``bwd`` (the backward op alone: dx, dscale, dzero_point from dy and x);
``fwd+bwd`` (forward, then autograd; for the reference providers forward then backward function);
``fwd+e`` (weights only: the Case 1/3 perturbed forward Q(w) + s*e).

Shapes: flat power-of-two tensors, per-tensor qparams; real layers: weights per channel (axis 0,
as LSQ weights), activations per tensor. 4-bit signed range [-8, 7].

Bytes moved (the floor, each tensor once; s = bytes per element of x's dtype; qparams and the
per-tensor / per-channel reductions are negligible):
    fwd      read x, write y                 2 s per element   (fp32: 8 B)
    bwd      read x, read dy, write dx       3 s per element   (fp32: 12 B)
    fwd+bwd  fwd + bwd                       5 s per element   (fp32: 20 B)
    fwd+e    read x, read e, write y         3 s per element   (fp32: 12 B)
"""
from __future__ import annotations

import math

import pytest
import torch

import harness as H
from harness import CFG, DTYPES

OP = "fake_quantize"
QMIN, QMAX = -8, 7
BYTES_PER_ELEM = {"fwd": 2, "bwd": 3, "fwd+bwd": 5, "fwd+e": 3}
BASELINES = ["torch-learnable", "torch-fq", "reference-eager", "reference-compile"]


def _providers():
    return H.saq_backends() + [(p, None) for p in BASELINES]


def _modes(shape, provider):
    modes = ["fwd", "bwd", "fwd+bwd"]
    if shape.kind == "weight" and not provider.startswith("torch-"):
        modes.append("fwd+e")
    return modes


def _inputs(shape, dtype):
    dt = DTYPES[dtype]
    axis = 0 if shape.kind == "weight" else None
    c = shape.dims[0] if axis is not None else 1

    def make():
        x = H.randn(shape.dims, dt, seed=1)
        g = H.randn(shape.dims, dt, seed=2)
        e = H.randn(shape.dims, dt, seed=3)
        # per-channel scales around 0.25: ~5% of N(0,1) inputs clip at the 4-bit range
        scale = (0.2 + 0.1 * torch.rand(c, generator=torch.Generator().manual_seed(4))).to(CFG.device)
        zp = torch.zeros(c, device=CFG.device)
        return x, g, e, scale, zp

    return axis, make


def _fns(provider):
    """(forward, backward) with the op schema's positional arguments, for the reference providers."""
    from saq_kernels import reference as R

    if provider == "reference-compile":
        return H.compiled(R.fake_quantize), H.compiled(R.fake_quantize_backward)
    return R.fake_quantize, R.fake_quantize_backward


def _make_call(provider, mode, axis, gf, inp, s_e):
    import saq_kernels as sk

    x, g, e, scale, zp = inp
    if provider.startswith("saq-"):
        if mode == "fwd":
            return lambda: sk.fake_quantize(x, scale, zp, QMIN, QMAX, axis, gf)
        if mode == "fwd+e":
            return lambda: sk.fake_quantize(x, scale, zp, QMIN, QMAX, axis, gf, e, s_e)
        if mode == "bwd":
            bwd = torch.ops.saq.fake_quantize_backward
            return lambda: bwd(g, x, scale, zp, QMIN, QMAX, axis, gf, None, None, False)
        xr, sr, zr = x.detach().requires_grad_(), scale.detach().requires_grad_(), zp.detach().requires_grad_()

        def fwd_bwd():
            y = sk.fake_quantize(xr, sr, zr, QMIN, QMAX, axis, gf)
            return torch.autograd.grad(y, (xr, sr, zr), g)

        return fwd_bwd

    if provider == "torch-learnable":
        if axis is None:
            fwd = lambda a, s, z: torch._fake_quantize_learnable_per_tensor_affine(a, s, z, QMIN, QMAX, gf)
            bwd = lambda: torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
                g, x, scale, zp, QMIN, QMAX, gf)
        else:
            fwd = lambda a, s, z: torch._fake_quantize_learnable_per_channel_affine(a, s, z, axis, QMIN, QMAX, gf)
            bwd = lambda: torch.ops.aten._fake_quantize_learnable_per_channel_affine_backward(
                g, x, scale, zp, axis, QMIN, QMAX, gf)
        if mode == "fwd":
            return lambda: fwd(x, scale, zp)
        if mode == "bwd":
            return bwd
        xr, sr, zr = x.detach().requires_grad_(), scale.detach().requires_grad_(), zp.detach().requires_grad_()
        return lambda: torch.autograd.grad(fwd(xr, sr, zr), (xr, sr, zr), g)

    if provider == "torch-fq":
        zi = zp.to(torch.int32)
        if axis is None:
            fwd = lambda a: torch.fake_quantize_per_tensor_affine(a, scale, zi, QMIN, QMAX)
        else:
            fwd = lambda a: torch.fake_quantize_per_channel_affine(a, scale, zi, axis, QMIN, QMAX)
        if mode == "fwd":
            return lambda: fwd(x)
        if mode == "bwd":
            pytest.skip("torch-fq: no standalone backward op (autograd multiplies dy by the mask "
                        "cached in the forward); see fwd+bwd")
        xr = x.detach().requires_grad_()
        return lambda: torch.autograd.grad(fwd(xr), (xr,), g)

    fwd, bwd = _fns(provider)
    if mode == "fwd":
        return lambda: fwd(x, scale, zp, QMIN, QMAX, axis, gf, None, None, False)
    if mode == "fwd+e":
        return lambda: fwd(x, scale, zp, QMIN, QMAX, axis, gf, e, s_e, False)
    if mode == "bwd":
        return lambda: bwd(g, x, scale, zp, QMIN, QMAX, axis, gf, None, None, False)

    def fwd_bwd():
        fwd(x, scale, zp, QMIN, QMAX, axis, gf, None, None, False)
        return bwd(g, x, scale, zp, QMIN, QMAX, axis, gf, None, None, False)

    return fwd_bwd


@pytest.mark.parametrize("provider,mode,shape,dtype", H.quantizer_params(_providers(), _modes))
def test_fake_quantize(benchmark, provider, mode, shape, dtype):
    dt = DTYPES[dtype]
    if provider.startswith("saq-"):
        reason = H.backend_reason(provider, OP, dt)
        if reason:
            pytest.skip(reason)
    tolerate = not provider.startswith("saq-")
    tag = f"{OP}/{dtype}/{'ch' if shape.kind == 'weight' else 't'}"
    if provider == "reference-compile":
        reason = H.compile_skip(tag, dtype)
        if reason:
            pytest.skip(reason)
    axis, make = _inputs(shape, dtype)
    gf = 1.0 / math.sqrt(shape.numel * QMAX)
    nbytes = BYTES_PER_ELEM[mode] * dt.itemsize * shape.numel
    s_e = torch.tensor(0.01, device=CFG.device)

    def setup(k):
        sets = H.rotated((OP, shape.dims, dtype), k, make)
        return [_make_call(provider, mode, axis, gf, inp, s_e) for inp in sets]

    H.run_case(benchmark, op=OP, provider=provider, mode=mode, shape=shape.label,
               numel=shape.numel, dtype=dtype, nbytes=nbytes, setup=setup,
               context=lambda: H.backend_context(provider), tolerate=tolerate,
               note=("per-channel axis 0" if axis is not None else "per-tensor")
               + ("; dx only: torch's op has no scale / zero-point gradients here"
                  if provider == "torch-fq" and mode == "fwd+bwd" else ""),
               compile_tag=tag if provider == "reference-compile" else None)
