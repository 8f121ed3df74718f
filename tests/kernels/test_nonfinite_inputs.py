"""Non-finite values inside inputs and optimizer state: every backend does what the reference does.

An infinite activation (an overflowed fp16 layer) or an overflowed exp_avg_sq are legal inputs;
the reference turns them into finite results where the formulas allow it (``clamp(inf / c)`` is
the top level, ``m / sqrt(inf)`` is 0). A kernel that broadcasts a scalar as ``t * 0.0 + v`` gets
NaN there instead (the Triton kernels did, found by a differential fuzzer): these tests pin it.

Backends: cpp, triton (CPU under the interpreter, or CUDA), cuda (a GPU), and the host emulation
of the CUDA kernels when SAQ_CUDA_EMU_LIB is set (tests/kernels/test_cuda_emulation.py).
"""
from __future__ import annotations

import os

import pytest
import torch

import saq_kernels as sk
from saq_kernels import reference as R

from bit_utils import as_bits

INF = float("inf")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _targets():
    out = []
    for name in ("cpp", "triton", "cuda"):
        device = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
        marks = [pytest.mark.gpu] if device == "cuda" else []
        out.append(pytest.param(name, device, id=name, marks=marks))
    if os.environ.get("SAQ_CUDA_EMU_LIB"):
        out.append(pytest.param("cuda-emu", "cpu", id="cuda-emu"))
    return out


def _table(name, device):
    if name == "cuda-emu":
        torch.ops.load_library(os.environ["SAQ_CUDA_EMU_LIB"])
        return lambda op: getattr(torch.ops.saq_cuda_emu, op).default
    reason = sk.get_backend(name).supports("liq_quantize", device, torch.float32)
    if reason is not None:
        pytest.skip(reason)
    table = sk.get_backend(name).table()
    return lambda op: table[op]


def _same(a, b):
    return a.shape == b.shape and bool((as_bits(a.cpu()) == as_bits(b.cpu())).all() | (a.isnan() & b.isnan()).all())


def _close_where_finite(out, ref, rtol):
    """Non-finite exactly where the reference is; elsewhere within rtol of it."""
    out, ref = out.double().cpu().reshape(-1), ref.double().cpu().reshape(-1)
    fin = ref.isfinite()
    assert bool((out.isfinite() == fin).all()), f"non-finite pattern differs: {out.tolist()} vs {ref.tolist()}"
    assert torch.allclose(out[fin], ref[fin], rtol=rtol, atol=0.0), f"{out.tolist()} vs {ref.tolist()}"


@pytest.mark.parametrize("name,device", _targets())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_liq_with_infinite_inputs(name, device, dtype, signed):
    op = _table(name, device)
    x = torch.tensor([0.3, INF, -0.2, -INF, 0.5, 1e30, -1e30, 0.0] * 5, dtype=dtype, device=device)
    g = torch.linspace(-1.0, 1.0, x.numel(), device=device).to(dtype)
    for clip in (torch.tensor([0.7], device=device), torch.tensor([-1.3], device=device)):
        args = (x, clip, 4, signed, False, None, None, False)
        assert _same(op("liq_quantize")(*args), R.liq_quantize(*args))
        dx, dclip = op("liq_quantize_backward")(g, *args, False)
        rdx, rdclip = R.liq_quantize_backward(g, *args, False)
        assert _same(dx, rdx)
        assert bool(rdclip.isfinite().all())  # the case this test is for
        _close_where_finite(dclip, rdclip, rtol=1e-5)


@pytest.mark.parametrize("name,device", _targets())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fake_quantize_with_infinite_inputs(name, device, dtype):
    op = _table(name, device)
    x = torch.tensor([0.3, INF, -0.2, -INF, 0.5, 1e30, -1e30, 0.0] * 5, dtype=dtype, device=device)
    g = torch.linspace(-1.0, 1.0, x.numel(), device=device).to(dtype)
    scale, zp = torch.tensor([0.05], device=device), torch.tensor([3.0], device=device)
    args = (x, scale, zp, -8, 7, None, 1.0, None, None, False)
    assert _same(op("fake_quantize")(*args), R.fake_quantize(*args))
    dx, ds, dz = op("fake_quantize_backward")(g, *args)
    rdx, rds, rdz = R.fake_quantize_backward(g, *args)
    assert _same(dx, rdx)
    _close_where_finite(ds, rds, rtol=1e-5)
    _close_where_finite(dz, rdz, rtol=1e-5)


@pytest.mark.parametrize("name,device", _targets())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_adamw_with_overflowed_state(name, device, dtype):
    """exp_avg_sq = inf (g * g overflowed fp16 in an earlier step): torch's AdamW and the
    reference move that parameter by weight decay only (m / sqrt(inf) = 0)."""
    op = _table(name, device)

    def state():
        t = lambda v: torch.tensor(v, dtype=dtype, device=device)
        return dict(p=t([0.5, -0.25, 1.0, 2.0]), g=t([1e-3, 300.0, -2.0, 0.5]),
                    m=t([0.1, 0.2, 0.3, -0.1]), v=t([INF, 0.5, INF, 0.2]))

    outs = []
    for fn in (op("sam_restore_adamw_"), R.sam_restore_adamw_):
        s = state()
        steps = [torch.tensor(3.0, device=device)]
        fn([s["p"]], [s["p"].clone()], [s["g"]], [s["m"]], [s["v"]], steps,
           torch.tensor(1e-3, device=device), 0.9, 0.999, 1e-8, 0.01, None)
        outs.append(s)
    got, ref = outs
    assert bool(ref["p"].isfinite().all())  # the case this test is for
    _close_where_finite(got["p"], ref["p"], rtol=2 * torch.finfo(dtype).eps)
    _close_where_finite(got["m"], ref["m"], rtol=2 * torch.finfo(dtype).eps)
    assert _same(got["v"], ref["v"]) or bool(torch.allclose(got["v"].double(), ref["v"].double(),
                                                            rtol=2 * torch.finfo(dtype).eps))
