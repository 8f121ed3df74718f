"""The eager autograd path of the two quantizers on the Python backends (reference, triton).

In plain eager mode ``saq_kernels.fake_quantize`` / ``liq_quantize`` on a non-native backend
call the backend through a ``torch.autograd.Function`` (saq_kernels/ops.py, ``_EagerFakeQuantize``,
``_EagerLiqQuantize``) instead of the ``saq`` custom op, whose dispatch layers cost about 0.1-0.2
ms per forward+backward. Contract checked here, against ``torch.ops.saq.<op>`` on the same backend:

* outputs and every gradient bitwise equal (fp32 / fp16 / bf16, non-contiguous, per tensor and
  per channel, every perturbation mode including SAQ's probe, relu folding);
* the backends are selected at the same moments (the forward's when it runs, the backward's when
  the backward runs, inside or outside a ``use_backend`` block);
* double backward raises; saved-tensor hooks (checkpointing), in-place checks and
  ``torch.inference_mode`` work; fake tensors and dispatch modes keep the custom op.
"""
from __future__ import annotations

import pytest
import torch

import saq_kernels as sk
import saq_kernels.ops as ops
from autograd_parity import (PERTURB, assert_bitwise, assert_checkpointing_matches, assert_same_results,
                             fake_quantize_both, liq_quantize_both, penalty_grads, rand)
from backends_under_test import backend_params, skip_unless_served

BACKEND_OP = "fake_quantize_backward"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# the Python backends; cpp / cuda take the native autograd op (test_native_autograd.py). On a
# GPU, triton only: the reference's path is the same Python as on the CPU.
@pytest.fixture(params=backend_params(("reference", "triton"), ("triton",)))
def backend(request):
    name, device = request.param
    skip_unless_served(name, device, BACKEND_OP)
    with sk.use_backend(name):
        yield name, device


def _eager(grad_fn) -> bool:
    return grad_fn is not None and grad_fn.name().startswith("_Eager")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("perturb", PERTURB)
@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
def test_fake_quantize_matches_the_custom_op(backend, dtype, perturb, axis, noncontig):
    _, device = backend
    first, second = fake_quantize_both(device, dtype, perturb, axis, noncontig, relu=perturb == "none")
    assert _eager(first[1]) and not _eager(second[1]), (first[1], second[1])
    assert_same_results(first, second, ("dx", "dscale", "dzero_point", "de", "ds"))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("perturb", PERTURB)
@pytest.mark.parametrize("signed,standardize", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "noncontig"])
def test_liq_quantize_matches_the_custom_op(backend, dtype, perturb, signed, standardize, noncontig):
    _, device = backend
    first, second = liq_quantize_both(device, dtype, perturb, signed, standardize, noncontig,
                                      relu=perturb == "none" and not signed)
    assert _eager(first[1]) and not _eager(second[1]), (first[1], second[1])
    assert_same_results(first, second, ("dx", "dclip", "de", "ds"))


def test_backends_are_chosen_when_each_pass_runs(backend, monkeypatch):
    """Forward inside a use_backend block, backward after it closed: both paths ask the registry
    for the same ops at the same moments, and get the same backends."""
    name, device = backend
    seen = []
    real = ops._impl

    def spy(op, t):
        impl = real(op, t)
        seen.append((op, impl))
        return impl

    monkeypatch.setattr(ops, "_impl", spy)
    x = rand((6, 10), torch.float32, device, 5).requires_grad_()
    clip = torch.tensor([1.1], device=device, requires_grad=True)
    calls = []
    for fn in (lambda: sk.liq_quantize(x, clip, 4, True, True),
               lambda: torch.ops.saq.liq_quantize(x, clip, 4, True, True, None, None, False, False)):
        seen.clear()
        with sk.use_backend("reference"):
            y = fn()
        y.sum().backward()  # outside the block: the default order picks the backward's backend
        calls.append(list(seen))
    # (the public wrapper also asks for the forward once more, to see whether a native op serves it)
    assert dict(calls[0]) == dict(calls[1])
    assert list(dict(calls[1])) == ["liq_quantize", "liq_quantize_backward"]
    fwd, bwd = dict(calls[1]).values()
    assert fwd is sk.get_backend("reference").table()["liq_quantize"]
    assert bwd is ops.select("liq_quantize_backward", device, torch.float32)


def test_double_backward_raises(backend):
    _, device = backend
    x = rand((6, 7), torch.float32, device, 13).requires_grad_()
    clip = torch.tensor([1.0], device=device, requires_grad=True)
    y = sk.liq_quantize(x, clip, 4, False)
    assert _eager(y.grad_fn)
    (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_checkpointing_inplace_check_and_inference_mode(backend):
    _, device = backend
    assert_checkpointing_matches(device)
    x = rand((16, 9), torch.float32, device, 14).requires_grad_()
    clip = torch.tensor([0.8], device=device, requires_grad=True)
    w = x * 1.0
    y = sk.liq_quantize(w, clip, 4, True, True)
    w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with torch.no_grad():
        want = sk.fake_quantize(x, clip, torch.zeros(1, device=device), 0, 7)
    with torch.inference_mode():
        got = sk.fake_quantize(x, clip, torch.zeros(1, device=device), 0, 7)
    assert_bitwise(got, want, "inference_mode")


def test_fake_tensors_and_dispatch_modes_keep_the_custom_op(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    _, device = backend
    clip = torch.tensor([1.0], device=device, requires_grad=True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(rand((5, 6), torch.float32, device, 9)).requires_grad_()
        fy = sk.liq_quantize(fx, clip, 4, True, False)
    assert fy.shape == (5, 6) and not _eager(fy.grad_fn)

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = rand((5, 6), torch.float32, device, 9).requires_grad_()
    with Record() as rec:
        y = sk.liq_quantize(x, clip, 4, True, False)
    assert "saq.liq_quantize.default" in rec.ops and not _eager(y.grad_fn)


def test_jit_trace_records_the_custom_op(backend, tmp_path):
    """torch.jit.trace must not record the eager Function (a Python op jit.save cannot export):
    under tracing the custom op stays the path, and the saved module reloads and computes the
    same values."""
    _, device = backend

    class Q(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = torch.nn.Parameter(torch.tensor([1.2], device=device))

        def forward(self, x):
            return sk.liq_quantize(x, self.clip, 4, False)

    x = rand((3, 4), torch.float32, device, 15)
    traced = torch.jit.trace(Q(), x)
    assert "saq::liq_quantize" in str(traced.graph) and "PythonOp" not in str(traced.graph)
    torch.jit.save(traced, str(tmp_path / "q.pt"))
    loaded = torch.jit.load(str(tmp_path / "q.pt"))
    assert torch.equal(loaded(x), Q()(x))


@pytest.mark.parametrize("quantizer", ["fake_quantize", "liq_quantize"])
def test_gradient_penalty_with_create_graph_matches_the_custom_op(backend, quantizer):
    """create_graph=True without a second derivative of the quantizer (a penalty on a weight
    after a quantized activation): the eager path gives the custom op's numbers."""
    _, device = backend
    (eager, fn1), (custom, fn2) = (penalty_grads(quantizer, device, p) for p in (True, False))
    assert fn1.startswith("_Eager") and not fn2.startswith("_Eager"), (fn1, fn2)
    for a, b in zip(eager, custom):
        assert_bitwise(a, b, "penalty")
