"""The reference ops serve CUDA tensors where no kernel can (float64, a build without the
extension, SAQ_BACKEND=reference), and the SAQ step must make no host sync (CUDA-graph capture, tests/training/test_fast_step.py). Here,
on meta tensors (a device with no data, so any copy from the CPU shows), every reference op runs
under a dispatch-mode spy that fails on a host-to-device copy and on an op that reads a value
back to the host."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saq_kernels import reference as R

_HOST_READS = ("_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero")


class _Spy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        if any(h in name for h in _HOST_READS):
            self.bad.append(f"host read: {name}")
        ins = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        if name.startswith(("_to_copy", "copy_", "to.")) and any(
            isinstance(o, torch.Tensor) and o.device.type == "meta" for o in outs
        ) and any(a.device.type == "cpu" for a in ins):
            self.bad.append(f"host-to-device copy: {name} {[tuple(a.shape) for a in ins]}")
        return out


def _m(*shape):
    return torch.empty(shape, device="meta")


def _run(fn):
    spy = _Spy()
    with spy:
        fn()
    assert spy.bad == [], spy.bad


@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("perturb", ["none", "after", "before"])
@pytest.mark.parametrize("relu", [False, True])
def test_fake_quantize_no_host_traffic(axis, perturb, relu):
    x, g = _m(6, 5, 3), _m(6, 5, 3)
    scale, zp = (_m(1), _m(1)) if axis is None else (_m(5), _m(5))
    e, s = (None, None) if perturb == "none" else (_m(6, 5, 3), _m())
    before = perturb == "before"
    _run(lambda: R.fake_quantize(x, scale, zp, -8, 7, axis, 1.0, e, s, before, relu))
    _run(lambda: R.fake_quantize_backward(g, x, scale, zp, -8, 7, axis, 1.0, e, s, before, relu))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("perturb", ["none", "after", "before"])
def test_liq_quantize_no_host_traffic(signed, standardize, perturb):
    x, g, clip = _m(7, 9), _m(7, 9), _m(1)
    e, s = (None, None) if perturb == "none" else (_m(7, 9), _m())
    before = perturb == "before"
    _run(lambda: R.liq_quantize(x, clip, 4, signed, standardize, e, s, before))
    _run(lambda: R.liq_quantize_backward(g, x, clip, 4, signed, standardize, e, s, before, False))


@pytest.mark.parametrize("found", [False, True])
def test_sam_ops_no_host_traffic(found):
    shapes = [(5,), (3, 4), ()]
    ps, gs, bs = ([_m(*s) for s in shapes] for _ in range(3))
    ms, vs = [_m(*s) for s in shapes], [_m(*s) for s in shapes]
    steps = [_m() for _ in shapes]
    lr, fi = _m(), (_m() if found else None)
    _run(lambda: R.grad_sq_norm(gs, ps, [True, False, True], 0.01))
    _run(lambda: R.sam_perturb_(ps, gs, bs, _m(), [True, False, False]))
    _run(lambda: R.sam_restore_(ps, bs))
    _run(lambda: R.sam_restore_sgd_(ps, bs, gs, ms, lr, 0.9, 0.0, 1e-4, True, False, fi))
    _run(lambda: R.sam_restore_adamw_(ps, bs, gs, ms, vs, steps, lr, 0.9, 0.999, 1e-8, 0.01, fi))


def test_the_spy_catches_a_host_to_device_copy_and_a_host_read():
    spy = _Spy()
    with spy:
        _m(3) * torch.tensor([2.0]).to("meta")
    assert any("host-to-device" in b for b in spy.bad), spy.bad
    spy = _Spy()
    with pytest.raises(Exception):  # meta tensors have no value to read; the spy saw the attempt
        with spy:
            torch.nonzero(_m(3))
    assert any("host read" in b for b in spy.bad), spy.bad
