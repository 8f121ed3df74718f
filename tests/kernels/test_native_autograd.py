"""The native autograd fast path of the two quantizers (saq_C::*_autograd, csrc/autograd.cpp).

In plain eager mode, with a native backend ("cpp" on the CPU, "cuda" on a GPU) selected,
``saq_kernels.fake_quantize`` / ``liq_quantize`` skip the Python autograd formula of the "saq"
custom ops and call one C++ op that runs the same kernels. Contract checked here:

* it is taken exactly there (eager + native backend), and never under the reference backend or
  fake tensors (torch.compile's path is covered by tests/kernels/test_compile.py);
* outputs and every gradient (x, scale / zero point / clip, the perturbation e) are bitwise equal
  to the custom op ``torch.ops.saq.<op>`` on the same backend, for fp32 / fp16 / bf16,
  non-contiguous inputs, per tensor and per channel, every perturbation mode, e with and without
  requires_grad;
* the value check (scale / clip finite and > 0) raises the wrapper's message, and
  ``saq_kernels.validate.CHECK_VALUES = False`` turns it off;
* an extension built before these ops existed falls back to the Python path (the custom op's
  formula in an eager autograd.Function, tests/kernels/test_eager_autograd.py).
"""
from __future__ import annotations

import pytest
import torch

import saq_kernels as sk
import saq_kernels.ops as ops
from autograd_parity import (PERTURB, assert_bitwise, assert_checkpointing_matches, assert_same_results,
                             fake_quantize_both, liq_quantize_both, penalty_grads, rand)
from saq_kernels import validate

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _devices():
    out = ["cpu"]
    out.append(pytest.param("cuda", marks=[pytest.mark.gpu]))
    return out


@pytest.fixture(params=_devices())
def device(request):
    backend = "cpp" if request.param == "cpu" else "cuda"
    reason = sk.get_backend(backend).available()
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    if not hasattr(torch.ops.saq_C, "liq_quantize_autograd"):
        pytest.skip("saq_kernels._C predates the native autograd ops: rebuild it")
    with sk.use_backend(backend):
        yield request.param


def _is_native(grad_fn) -> bool:
    return grad_fn is not None and "QuantizeFunction" in grad_fn.name()


# ----------------------------------------------------------------------------------------------
# parity with the custom op
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("perturb", PERTURB)
@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
def test_fake_quantize_matches_the_custom_op(device, dtype, perturb, axis, noncontig):
    first, second = fake_quantize_both(device, dtype, perturb, axis, noncontig)
    assert _is_native(first[1]) and not _is_native(second[1]), (first[1], second[1])
    assert_same_results(first, second, ("dx", "dscale", "dzero_point", "de", "ds"))
    g1 = first[2]
    if perturb == "probe":  # d(Q(x) + 1 * e)/de = dL/dy, exactly
        assert g1[3] is not None and g1[3].dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("perturb", PERTURB)
@pytest.mark.parametrize("signed,standardize", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
def test_liq_quantize_matches_the_custom_op(device, dtype, perturb, signed, standardize, noncontig):
    first, second = liq_quantize_both(device, dtype, perturb, signed, standardize, noncontig)
    assert _is_native(first[1]) and not _is_native(second[1]), (first[1], second[1])
    assert_same_results(first, second, ("dx", "dclip", "de", "ds"))


def test_no_grad_and_frozen_inputs(device):
    x = rand((6, 10), torch.float32, device, 5)
    clip = torch.tensor([1.0], device=device)
    with torch.no_grad():
        y = sk.liq_quantize(x, clip, 4, True, False)
    assert y.grad_fn is None and not y.requires_grad
    # only the clip learns: dx is computed by the kernel but not returned to a frozen x
    clip.requires_grad_()
    y = sk.liq_quantize(x, clip, 4, False, False)
    assert _is_native(y.grad_fn)
    (dclip,) = torch.autograd.grad(y.sum(), [clip])
    assert dclip.shape == clip.shape and torch.isfinite(dclip).all()


def test_inference_mode(device):
    # under torch.inference_mode() the Autograd key is skipped, where the C++ op lives: the call
    # goes to the Python path instead, with the same kernels and the same values as under no_grad
    x = rand((6, 10), torch.float32, device, 5)
    clip = torch.tensor([1.0], device=device)
    scale, zp = torch.full((10,), 0.05, device=device), torch.zeros(10, device=device)
    with torch.no_grad():
        want = (sk.liq_quantize(x, clip, 4, True, True), sk.fake_quantize(x, scale, zp, -8, 7, 1))
    with torch.inference_mode():
        got = (sk.liq_quantize(x, clip, 4, True, True), sk.fake_quantize(x, scale, zp, -8, 7, 1))
        assert torch.is_inference(got[0])
    for a, b in zip(got, want):
        assert_bitwise(a, b, "inference_mode")


def test_inplace_change_after_forward_is_caught(device):
    x = rand((8, 8), torch.float32, device, 6).requires_grad_()
    w = x * 1.0
    y = sk.liq_quantize(w, torch.tensor([1.0], device=device), 4, True, True)
    w.add_(1.0)  # the kernel's saved input changed: its backward would be wrong
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_double_backward_raises_instead_of_returning_zeros(device):
    # a second derivative through the quantizer's backward: the custom op has no autograd formula
    # for its backward op and raises when a second backward reaches it; the native path raises
    # there too (not zeros with a warning, which the autograd fallback would give)
    x = rand((6, 7), torch.float32, device, 13).requires_grad_()
    clip = torch.tensor([1.0], device=device, requires_grad=True)
    for fn in (lambda: sk.liq_quantize(x, clip, 4, False),
               lambda: sk.fake_quantize(x, clip, torch.zeros(1, device=device), 0, 15)):
        y = fn()
        assert _is_native(y.grad_fn)
        (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
        assert gx.requires_grad
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            gx.sum().backward()
        # first-order gradients are unaffected
        (gx,) = torch.autograd.grad(fn().square().sum(), [x])
        assert torch.isfinite(gx).all()


@pytest.mark.parametrize("quantizer", ["fake_quantize", "liq_quantize"])
def test_create_graph_without_a_second_derivative_of_the_quantizer(device, quantizer):
    # a gradient penalty on a weight that follows a quantized activation needs create_graph=True
    # but no second derivative of the quantizer: the native path runs it like the custom op
    (native, fn1), (custom, fn2) = (penalty_grads(quantizer, device, p) for p in (True, False))
    assert "QuantizeFunction" in fn1 and "QuantizeFunction" not in fn2, (fn1, fn2)
    for a, b in zip(native, custom):
        assert_bitwise(a, b, "penalty")


def test_activation_checkpointing(device):
    """Saved tensors go through saved-tensor hooks (torch.utils.checkpoint recomputes them)."""
    assert_checkpointing_matches(device)


# ----------------------------------------------------------------------------------------------
# when the fast path is (not) taken
# ----------------------------------------------------------------------------------------------
def test_reference_backend_takes_the_python_path(device):
    # (its own eager autograd.Function: tests/kernels/test_eager_autograd.py)
    x = rand((5, 6), torch.float32, device, 8).requires_grad_()
    with sk.use_backend("reference"):
        y = sk.liq_quantize(x, torch.tensor([1.0], device=device), 4, True, False)
    assert y.grad_fn is not None and not _is_native(y.grad_fn)
    assert y.grad_fn.name().startswith("_EagerLiqQuantize")


def test_fake_tensors_keep_the_custom_op(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    clip = torch.tensor([1.0], device=device, requires_grad=True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(rand((5, 6), torch.float32, device, 9)).requires_grad_()
        fy = sk.liq_quantize(fx, clip, 4, True, False)
    assert fy.shape == (5, 6) and not _is_native(fy.grad_fn)


def test_stale_extension_falls_back_to_the_python_path(device, monkeypatch):
    monkeypatch.setitem(ops._NATIVE_AUTOGRAD, "liq_quantize", None)
    x = rand((5, 6), torch.float32, device, 10).requires_grad_()
    y = sk.liq_quantize(x, torch.tensor([1.0], device=device), 4, True, False)
    assert y.grad_fn is not None and not _is_native(y.grad_fn)


# ----------------------------------------------------------------------------------------------
# value checks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_bad_clip_and_scale_values_raise(device, bad, monkeypatch):
    if device != "cpu":
        pytest.skip("value checks read the tensor: CPU only (a GPU read would sync every step)")
    x = rand((4, 5), torch.float32, device, 12)
    with pytest.raises(RuntimeError, match=r"saq::liq_quantize: 'clip' must be finite and \|clip\| > 0"):
        sk.liq_quantize(x, torch.tensor([bad]), 4, True, False)
    with pytest.raises(RuntimeError, match=r"saq::fake_quantize: 'scale' must be finite and scale > 0"):
        sk.fake_quantize(x, torch.tensor([0.1, bad, 0.2, 0.3]), torch.zeros(4), -8, 7, 0)
    # a negative LIQ clip is fine (|clip| is used), a negative LSQ scale is not
    sk.liq_quantize(x, torch.tensor([-0.5]), 4, True, False)
    with pytest.raises(RuntimeError, match="'scale' must be finite"):
        sk.fake_quantize(x, torch.tensor([-0.1]), torch.zeros(1), -8, 7)
    monkeypatch.setattr(validate, "CHECK_VALUES", False)
    y = sk.liq_quantize(x, torch.tensor([bad]), 4, True, False)  # unchecked: runs
    assert y.shape == x.shape
