"""liq_quantize(..., relu=True): an unsigned LIQ quantizer that absorbs the ReLU before it.

Contract (saq_kernels/OPS.md): ``Q(x, relu=True)`` equals ``Q(relu(x))`` exactly: the forward is the
plain unsigned quantizer, and the backward equals the chain rule through ``torch.relu``
(``relu'(0) = 0``) bit for bit: ``dx_fold = where(x > 0, dx(relu(x)), 0)`` and the clip gradient is
the same sum of the same terms in the same order. Checked on every backend that runs here
(reference, cpp, triton under the interpreter; cuda with the gpu marker), for fp32 / fp16 / bf16
(and fp64 on the reference), inputs holding exact zeros, -0.0, values beyond the clip and values
whose x / c underflows; the custom op and the native fast path; the argument checks.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import saq_kernels as sk  # noqa: E402
from bit_utils import as_bits  # noqa: E402  (tests/kernels/bit_utils.py)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


BACKEND_OP = "liq_quantize_backward"  # the op whose availability decides (conftest.op_backend)


def _inputs(dtype, device, n=4099, seed=0):
    """Pre-activations with exact zeros, -0.0, negatives, values past the clip and tiny positives."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 1.5
    x[::7] = 0.0
    x[3::11] = -0.0
    x[5::13] = 1e-35  # positive, but x / c underflows to 0 in fp32 with c = 2e10 below
    x = x.to(dtype).reshape(-1, 1)
    g = (torch.randn(n, generator=gen)).to(dtype).reshape(-1, 1)
    return x.to(device), g.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("clip_value", [1.1, -0.7, 2e10])
def test_backward_equals_relu_then_quantize(op_backend, dtype, bits, clip_value):
    name, device = op_backend
    x, g = _inputs(dtype, device, seed=bits)
    clip = torch.tensor([clip_value], device=device)
    r = torch.relu(x)
    with sk.use_backend(name):
        dx_f, dc_f = torch.ops.saq.liq_quantize_backward(g, x, clip, bits, False, False, None, None, False, True)
        dx_u, dc_u = torch.ops.saq.liq_quantize_backward(g, r, clip, bits, False, False, None, None, False)
        y_f = torch.ops.saq.liq_quantize(x, clip, bits, False, False, None, None, False, True)
        y_u = torch.ops.saq.liq_quantize(r, clip, bits, False, False, None, None, False)
    chain = torch.where(x > 0, dx_u, torch.zeros_like(dx_u))  # threshold_backward of the ReLU
    assert torch.equal(as_bits(dx_f), as_bits(chain)), "dx differs from relu's chain rule"
    assert torch.equal(dc_f, dc_u), (dc_f, dc_u)
    assert torch.equal(y_f, y_u)  # value-equal (a -0.0 input may give -0.0 where relu gives +0.0)
    # the fold is not the plain quantizer: at x = 0 the closed range would pass the gradient
    dx_closed, _ = torch.ops.saq.liq_quantize_backward(g, x, clip, bits, False, False, None, None, False)
    zeros = (x == 0) & (g != 0)
    assert zeros.any() and not torch.equal(dx_closed[zeros], dx_f[zeros])


def test_reference_float64():
    x, g = _inputs(torch.float64, "cpu")
    clip = torch.tensor([0.9], dtype=torch.float64)
    with sk.use_backend("reference"):
        dx_f, dc_f = torch.ops.saq.liq_quantize_backward(g, x, clip, 3, False, False, None, None, False, True)
        dx_u, dc_u = torch.ops.saq.liq_quantize_backward(g, torch.relu(x), clip, 3, False, False, None, None, False)
    assert torch.equal(dx_f, torch.where(x > 0, dx_u, torch.zeros_like(dx_u)))
    assert torch.equal(dc_f, dc_u)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_public_op_autograd(op_backend, dtype):
    """sk.liq_quantize(relu=True) through autograd (the native fast path where the backend is
    native, the custom op otherwise) against torch.relu followed by the quantizer."""
    name, device = op_backend
    x0, g = _inputs(dtype, device, n=777, seed=5)
    c0 = torch.tensor([1.3], device=device)
    with sk.use_backend(name):
        x, clip = x0.clone().requires_grad_(), c0.clone().requires_grad_()
        y = sk.liq_quantize(x, clip, 4, False, relu=True)
        dx_f, dc_f = torch.autograd.grad(y, [x, clip], g)
        x, clip = x0.clone().requires_grad_(), c0.clone().requires_grad_()
        y2 = sk.liq_quantize(torch.relu(x), clip, 4, False)
        dx_u, dc_u = torch.autograd.grad(y2, [x, clip], g)
    assert torch.equal(y, y2)
    assert torch.equal(as_bits(dx_f), as_bits(dx_u))
    assert torch.equal(dc_f, dc_u)


def test_bits_32_applies_the_relu():
    x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    y = sk.liq_quantize(x, torch.tensor([1.0]), 32, False, relu=True)
    assert torch.equal(y, torch.tensor([0.0, 0.0, 2.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 1.0]))


@pytest.mark.parametrize("kw", [dict(signed=True), dict(standardize=True), dict(perturb=True)])
def test_relu_needs_an_unsigned_plain_quantizer(kw):
    x = torch.randn(5)
    e = dict(perturbation=torch.zeros(5), perturb_scale=torch.tensor(0.1)) if kw.get("perturb") else {}
    with pytest.raises(ValueError, match=r"saq::liq_quantize: relu=True folds a ReLU into an unsigned"):
        sk.liq_quantize(x, torch.tensor([1.0]), 4, kw.get("signed", False), kw.get("standardize", False),
                        relu=True, **e)


def test_native_kernels_refuse_signed_relu():
    if sk.get_backend("cpp").available() is not None:
        pytest.skip("cpp backend unavailable")
    x = torch.randn(5)
    with pytest.raises(RuntimeError, match="relu=True needs an unsigned quantizer"):
        torch.ops.saq_C.liq_quantize_backward(x, x, torch.tensor([1.0]), 4, True, False, None, None, False, True)
