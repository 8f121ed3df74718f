"""fake_quantize(..., relu=True): an LSQ / LSQ+ activation quantizer that absorbs the ReLU before it.

Contract (saq_kernels/OPS.md): ``fake_quantize(x, relu=True)`` equals ``fake_quantize(relu(x))``
bit for bit, forward and backward, for any zero point and range: every term is evaluated at
``relu(x)`` and ``dx`` is gated by ``relu'(x) = (x > 0)`` (threshold_backward's rule), so the scale
and zero-point gradients are the same sums of the same terms in the same order. Unlike LIQ's
fold, the plain quantizer is *not* the fold: its straight-through range reaches ``x > -scale/2``
(codes round to 0), so those elements would pass gradient. Checked on every backend that runs
here (reference, cpp, triton under the interpreter; cuda with the gpu marker), fp32 / fp16 / bf16,
per tensor and per channel, with exact zeros, -0.0, NaN and values past the range.
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
FQ = torch.ops.saq.fake_quantize
FQB = torch.ops.saq.fake_quantize_backward


BACKEND_OP = "fake_quantize_backward"  # the op whose availability decides (conftest.op_backend)


def _inputs(shape, dtype, device, seed=0):
    """Pre-activations with exact zeros, -0.0, small negatives (which round to code 0), values
    past the range; and an incoming gradient."""
    gen = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    x = torch.randn(n, generator=gen) * 1.5
    x[::7] = 0.0
    x[3::11] = -0.0
    x[5::13] = -0.01  # rounds to code 0: inside the plain quantizer's range
    g = torch.randn(n, generator=gen)
    return x.to(dtype).reshape(shape).to(device), g.to(dtype).reshape(shape).to(device)


# (shape, axis, quant range, zero point): LSQ unsigned per tensor, per channel on dim 1 and on the
# last dim (the periodic layouts), LSQ+ with a learned offset, and a signed range
CASES = [
    pytest.param((4099,), None, (0, 15), [0.0], id="lsq-per-tensor"),
    pytest.param((3, 5, 7, 9), 1, (0, 7), [0.0] * 5, id="lsq-per-channel-dim1"),
    pytest.param((6, 300, 3), -1, (0, 255), [0.0, 0.0, 0.0], id="lsq-per-channel-last"),
    pytest.param((2049,), None, (0, 15), [2.6], id="lsq+-offset"),
    pytest.param((33, 65), 0, (-8, 7), None, id="signed-per-channel"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape, axis, qrange, zp", CASES)
def test_equals_relu_then_quantize(op_backend, dtype, shape, axis, qrange, zp):
    name, device = op_backend
    x, g = _inputs(shape, dtype, device, seed=len(shape))
    C = 1 if axis is None else shape[axis]
    gen = torch.Generator().manual_seed(1)
    scale = (torch.rand(C, generator=gen) * 0.2 + 0.05).to(device)
    zero = torch.tensor(zp) if zp is not None else torch.randint(-3, 4, (C,)).float()
    zero = zero.to(device)
    qmin, qmax = qrange
    r = torch.relu(x)
    with sk.use_backend(name):
        y_f = FQ(x, scale, zero, qmin, qmax, axis, 0.3, None, None, False, True)
        y_u = FQ(r, scale, zero, qmin, qmax, axis, 0.3, None, None, False)
        dx_f, ds_f, dz_f = FQB(g, x, scale, zero, qmin, qmax, axis, 0.3, None, None, False, True)
        dx_u, ds_u, dz_u = FQB(g, r, scale, zero, qmin, qmax, axis, 0.3, None, None, False)
        dx_p, ds_p, _ = FQB(g, x, scale, zero, qmin, qmax, axis, 0.3, None, None, False)
    assert torch.equal(y_f, y_u)
    chain = torch.where(x > 0, dx_u, torch.zeros_like(dx_u))  # threshold_backward of the ReLU
    assert torch.equal(as_bits(dx_f), as_bits(chain)), "dx differs from relu's chain rule"
    assert torch.equal(ds_f, ds_u), (ds_f, ds_u)
    assert torch.equal(dz_f, dz_u), (dz_f, dz_u)
    # the plain quantizer is not the fold: code-0 negatives and exact zeros pass its gradient
    assert not (torch.equal(as_bits(dx_p), as_bits(dx_f)) and torch.equal(ds_p, ds_f))


def test_nan_follows_torch_relu():
    x = torch.tensor([float("nan"), -1.0, 0.0, 0.4, float("inf"), float("-inf")])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    scale, zero = torch.tensor([0.25]), torch.tensor([0.0])
    for name in [n for n, why in sk.available_backends().items() if why is None]:
        if sk.get_backend(name).supports("fake_quantize", "cpu", torch.float32) is not None:
            continue
        with sk.use_backend(name):
            y_f = FQ(x, scale, zero, 0, 15, None, 1.0, None, None, False, True)
            y_u = FQ(torch.relu(x), scale, zero, 0, 15, None, 1.0, None, None, False)
            dx_f, ds_f, dz_f = FQB(g, x, scale, zero, 0, 15, None, 1.0, None, None, False, True)
            dx_u, ds_u, dz_u = FQB(g, torch.relu(x), scale, zero, 0, 15, None, 1.0, None, None, False)
        torch.testing.assert_close(y_f, y_u, rtol=0, atol=0, equal_nan=True, msg=name)
        assert torch.equal(dx_f, torch.where(x > 0, dx_u, torch.zeros_like(dx_u))), name
        assert dx_f[0] == 0  # relu'(NaN) = 0, as threshold_backward
        torch.testing.assert_close(ds_f, ds_u, rtol=0, atol=0, equal_nan=True, msg=name)
        torch.testing.assert_close(dz_f, dz_u, rtol=0, atol=0, equal_nan=True, msg=name)


def test_reference_float64():
    x, g = _inputs((1001,), torch.float64, "cpu")
    scale, zero = torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    with sk.use_backend("reference"):
        dx_f, ds_f, _ = FQB(g, x, scale, zero, 0, 15, None, 1.0, None, None, False, True)
        dx_u, ds_u, _ = FQB(g, torch.relu(x), scale, zero, 0, 15, None, 1.0, None, None, False)
    assert torch.equal(dx_f, torch.where(x > 0, dx_u, torch.zeros_like(dx_u)))
    assert torch.equal(ds_f, ds_u)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_public_op_autograd(op_backend, dtype):
    """sk.fake_quantize(relu=True) through autograd (the native fast path where the backend is
    native, the custom op otherwise) against torch.relu followed by the quantizer."""
    name, device = op_backend
    x0, g = _inputs((7, 111), dtype, device, seed=5)
    s0, z0 = torch.tensor([0.07], device=device), torch.tensor([1.0], device=device)
    with sk.use_backend(name):
        x, s, z = (t.clone().requires_grad_() for t in (x0, s0, z0))
        y = sk.fake_quantize(x, s, z, 0, 15, None, 0.5, relu=True)
        grads_f = torch.autograd.grad(y, [x, s, z], g)
        x, s, z = (t.clone().requires_grad_() for t in (x0, s0, z0))
        y2 = sk.fake_quantize(torch.relu(x), s, z, 0, 15, None, 0.5)
        grads_u = torch.autograd.grad(y2, [x, s, z], g)
    assert torch.equal(y, y2)
    assert torch.equal(as_bits(grads_f[0]), as_bits(grads_u[0]))
    assert torch.equal(grads_f[1], grads_u[1]) and torch.equal(grads_f[2], grads_u[2])


def test_relu_refuses_a_perturbation():
    x = torch.randn(5)
    with pytest.raises(ValueError, match=r"saq::fake_quantize: relu=True .* cannot be combined with a perturbation"):
        sk.fake_quantize(x, torch.tensor([0.1]), torch.tensor([0.0]), 0, 15, relu=True,
                         perturbation=torch.zeros(5), perturb_scale=torch.tensor(0.1))


def test_native_kernels_refuse_relu_with_a_perturbation():
    if sk.get_backend("cpp").available() is not None:
        pytest.skip("cpp backend unavailable")
    x, s, z, e = torch.randn(5), torch.tensor([0.1]), torch.tensor([0.0]), torch.zeros(5)
    with pytest.raises(RuntimeError, match="relu=True cannot be combined with a perturbation"):
        torch.ops.saq_C.fake_quantize(x, s, z, 0, 15, None, 1.0, e, torch.tensor(0.1), False, True)
    with pytest.raises(RuntimeError, match="relu=True cannot be combined with a perturbation"):
        torch.ops.saq_C.fake_quantize_backward(x, x, s, z, 0, 15, None, 1.0, e, torch.tensor(0.1), True, True)
