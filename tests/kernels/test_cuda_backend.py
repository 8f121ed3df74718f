"""The "cuda" backend (CUDA kernels of saq_kernels._C, csrc/cuda) against the reference.

Contract (saq_kernels/OPS.md): quantized codes and straight-through gradients bit-exact; reductions and
optimizer steps within twice the reference's own error in the same precision against a float64
run of the reference (plus one rounding of the result's dtype); sam_perturb_ / sam_restore_
bit-exact. Inputs: fp32 / fp16 / bf16, odd sizes (scalar tails), views offset by one element
(unaligned: the scalar path), non-contiguous views, lists longer than one kernel-argument table,
tensors of several 64K-element chunks. Also: CUDA-graph capture of forward + backward and of a
SAM step, and the error messages.

Everything is marked ``gpu``; without CUDA (or without the compiled kernels) every test is
skipped with the backend's own availability sentence. Collecting never touches CUDA.

With SAQ_CUDA_EMU_LIB naming a library built by tests/kernels/cuda_emu/build_emu.py, the same
tests run the same kernel code on the host instead (CPU tensors, ops ``torch.ops.saq_cuda_emu``,
no ``gpu`` mark; the CUDA-graph tests skip): tests/kernels/test_cuda_emulation.py does that.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional

import pytest
import torch

import saq_kernels as sk
from saq_kernels import reference as R

# The host emulation of the CUDA kernels, when tests/kernels/test_cuda_emulation.py runs this file.
_EMU_LIB = os.environ.get("SAQ_CUDA_EMU_LIB")
if _EMU_LIB:
    torch.ops.load_library(_EMU_LIB)
else:
    pytestmark = pytest.mark.gpu

DEVICE = "cpu" if _EMU_LIB else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (7,), (33, 5), (3, 17, 9), (1031,), (4, 3, 5, 7), (129, 257)]


def _unavailable() -> Optional[str]:
    return None if _EMU_LIB else sk.get_backend("cuda").available()


_REASON = _unavailable()


@pytest.fixture(autouse=True)
def _needs_cuda_backend():
    if _REASON is not None:
        pytest.skip(_REASON)


def _op(name: str):
    """The cuda backend's implementation of op ``name`` (positional signature of saq_kernels/OPS.md)."""
    if _EMU_LIB:
        return getattr(torch.ops.saq_cuda_emu, name).default
    return sk.get_backend("cuda").table()[name]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, seed, scale=1.0, offset=False) -> torch.Tensor:
    """Random tensor on DEVICE; offset=True returns a view starting one element into its buffer
    (not 16-byte aligned, so the kernels take their scalar path)."""
    n = math.prod(shape)
    base = (torch.randn(n + int(offset), generator=_gen(seed)) * scale).to(dtype).to(DEVICE)
    return base[int(offset):].view(shape)


def _eps(dtype) -> float:
    return torch.finfo(dtype).eps


def _assert_close_derived(out, ref, ref64, what, floor=None):
    """max |out - ref64| <= 2 max |ref - ref64| + floor (max over the tensor).

    ref is the reference run in the same precision, ref64 a float64 evaluation of the same
    formula. floor defaults to one rounding of out's dtype at the result's magnitude; sums pass
    the rounding-error scale of their terms (see _fq_backward64).
    """
    ref64 = ref64.to(out.device)
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    ref_err = (ref.double().to(out.device) - ref64).abs().max().item() if ref.numel() else 0.0
    if floor is None:
        floor = _eps(out.dtype) * (ref64.abs().max().item() if ref64.numel() else 0.0)
    assert err <= 2 * ref_err + floor, (
        f"{what}: error {err:.3e} against float64 exceeds 2 x reference error {ref_err:.3e} "
        f"+ {floor:.3e}"
    )


# A few fp32 roundings per term, twice over: the floor of a sum is this times the sum of the
# terms' rounding-error scales. It covers the fp32 terms' own rounding, which the kernel and the
# reference share, so that a lucky cancellation in the reference's fp32 summation cannot fail
# a kernel that sums the same terms exactly.
_TERM_ROUNDINGS = 8 * torch.finfo(torch.float32).eps


def _view(t, x, axis):
    t = t.double()
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


def _sum_like(t, param, x, axis):
    if axis is None:
        return t.sum().reshape(param.shape)
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    return (t.sum(dim=dims) if dims else t).reshape(param.shape)


def _fq_backward64(grad, x, scale, zero_point, qmin, qmax, axis, gf, e, s, before):
    """dscale, dzero_point of saq_kernels/OPS.md in float64, and the rounding-error floor of each sum."""
    xf = x.double()
    if before and e is not None:
        xf = xf + s.double() * e.double()
    sc = _view(scale, xf, axis)
    zp = torch.clamp(torch.round(_view(zero_point, xf, axis)), qmin, qmax)
    inv = 1.0 / sc
    xq = torch.round(xf * inv) + zp
    below, above = xq < qmin, xq > qmax
    inside = ~(below | above)
    g = grad.double()
    xfq = (torch.clamp(xq, qmin, qmax) - zp) * sc
    ds = torch.where(inside, g * (xfq - xf) * inv, torch.where(below, g * (qmin - zp), g * (qmax - zp))) * gf
    dz = torch.where(inside, torch.zeros_like(g), -g * sc * gf)
    ds_scale = torch.where(inside, g.abs() * (xfq.abs() + xf.abs()) * inv,
                           g.abs() * torch.maximum((qmin - zp).abs(), (qmax - zp).abs())) * abs(gf)
    dz_scale = g.abs() * sc * abs(gf)
    ds_floor = _TERM_ROUNDINGS * _sum_like(ds_scale, scale, x, axis).max().item() if x.numel() else 0.0
    dz_floor = _TERM_ROUNDINGS * _sum_like(dz_scale, zero_point, x, axis).max().item() if x.numel() else 0.0
    return _sum_like(ds, scale, x, axis), _sum_like(dz, zero_point, x, axis), ds_floor, dz_floor


def _liq_dclip64(grad, x, clip, bits, signed, standardize, e, s, before):
    """dclip of saq_kernels/OPS.md in float64 (statistics too) and its rounding-error floor."""
    xf = x.double()
    if before and e is not None:
        xf = xf + s.double() * e.double()
    if standardize:
        xf = (xf - xf.mean()) / xf.std()
    c = clip.double().abs().reshape(())
    n = float(2**bits - 1)
    r = xf / c
    if signed:
        y = ((torch.round((torch.clamp(r, -1, 1) + 1) / 2 * n) / n) * 2 - 1) * c
    else:
        y = torch.round(torch.clamp(r, 0, 1) * n) / n * c
    inside = (r >= (-1.0 if signed else 0.0)) & (r <= 1.0)
    g = grad.double()
    dclip = (g * (y / c - torch.where(inside, r, torch.zeros_like(r)))).sum() * torch.sign(clip.double().reshape(()))
    floor = _TERM_ROUNDINGS * float((g.abs() * ((y / c).abs() + r.abs() + 1)).sum()) if x.numel() else 0.0
    return dclip.reshape(clip.shape), floor


def _grad_sq_norm64(grads, params, adaptive, eta):
    total = torch.zeros((), dtype=torch.float64, device=DEVICE)
    for g, p, a in zip(grads, params, adaptive):
        gd = g.double() * (p.double().abs() + eta) if a else g.double()
        total = total + (gd * gd).sum()
    return total, _TERM_ROUNDINGS * float(total)


def _assert_equal(out: torch.Tensor, ref: torch.Tensor, what: str):
    assert out.dtype == ref.dtype and out.shape == ref.shape, (
        f"{what}: {out.dtype}{tuple(out.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    )
    same = (out == ref) | (torch.isnan(out) & torch.isnan(ref))
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} elements differ, first at {bad}: "
                             f"{out[~same][:5].tolist()} vs {ref[~same][:5].tolist()}")


def _axes(shape) -> List[Optional[int]]:
    axes: List[Optional[int]] = [None, 0]
    if len(shape) >= 2:
        axes += [-1, 1]
    return axes


def _fq_params(shape, axis, seed):
    c = 1 if axis is None else shape[axis]
    g = _gen(seed)
    scale = (torch.rand(c, generator=g) * 0.05 + 0.02).to(DEVICE)
    zp = (torch.rand(c, generator=g) * 8.0 - 2.0).to(DEVICE)  # non-integer: exercises rounding
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(1)
    return scale, zp


def _perturb(x, mode, e_dtype, seed):
    if mode is None:
        return None, None, False
    e = _randn(x.shape, e_dtype or x.dtype, seed, scale=0.1)
    s = torch.tensor(0.37, device=DEVICE)
    return e, s, mode == "before"


# ----------------------------------------------------------------------------------------------
# fake_quantize
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "offset"])
def test_fake_quantize_forward_backward(dtype, shape, offset):
    for axis in _axes(shape):
        for mode, e_dtype in [(None, None), ("after", None), ("before", None), ("before", torch.float32)]:
            x = _randn(shape, dtype, 1, scale=0.4, offset=offset)
            scale, zp = _fq_params(shape, axis, 2)
            e, s, before = _perturb(x, mode, e_dtype, 3)
            args = (x, scale, zp, -8, 7, axis, 0.3, e, s, before)
            what = f"fake_quantize {dtype} {shape} axis={axis} perturb={mode}/{e_dtype} offset={offset}"
            _assert_equal(_op("fake_quantize")(*args), R.fake_quantize(*args), what)

            grad = _randn(shape, dtype, 4, offset=offset)
            dx, ds, dz = _op("fake_quantize_backward")(grad, *args)
            rdx, rds, rdz = R.fake_quantize_backward(grad, *args)
            rds64, rdz64, ds_floor, dz_floor = _fq_backward64(grad, *args)
            _assert_equal(dx, rdx, what + " dx")
            assert ds.shape == scale.shape and dz.shape == zp.shape and ds.dtype == torch.float32
            _assert_close_derived(ds, rds, rds64, what + " dscale", ds_floor)
            _assert_close_derived(dz, rdz, rdz64, what + " dzero_point", dz_floor)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fake_quantize_ties_and_specials(dtype):
    """Exact ties round half to even; +-inf clamp; NaN propagates (as torch.clamp)."""
    scale = torch.tensor([0.5], device=DEVICE)
    zp = torch.tensor([2.5], device=DEVICE)  # rounds to 2
    vals = [0.25, 0.75, -0.25, 1.25, 3.0, -3.0, 100.0, -100.0, float("inf"), -float("inf"), float("nan")]
    x = torch.tensor(vals * 3, device=DEVICE).to(dtype)
    args = (x, scale, zp, 0, 15, None, 1.0, None, None, False)
    _assert_equal(_op("fake_quantize")(*args), R.fake_quantize(*args), f"fake_quantize ties {dtype}")


def test_fake_quantize_non_contiguous_and_empty():
    x = _randn((16, 24), torch.float32, 5).t()  # non-contiguous
    scale, zp = _fq_params((24, 16), 0, 6)
    args = (x, scale, zp, 0, 255, 0, 1.0, None, None, False)
    _assert_equal(_op("fake_quantize")(*args), R.fake_quantize(*args), "fake_quantize transposed")
    empty = torch.empty(0, 5, device=DEVICE)
    s2, z2 = _fq_params((0, 5), 1, 7)
    y = _op("fake_quantize")(empty, s2, z2, 0, 15, 1, 1.0, None, None, False)
    assert y.shape == (0, 5)
    dx, ds, dz = _op("fake_quantize_backward")(empty, empty, s2, z2, 0, 15, 1, 1.0, None, None, False)
    assert dx.shape == (0, 5) and bool((ds == 0).all()) and bool((dz == 0).all())
    # empty runs behind several channels (the CPU kernel once divided by the zero-length period)
    for shape, axis in [((3, 0), 0), ((2, 3, 0), 1), ((300, 0), -2)]:
        empty = torch.empty(shape, device=DEVICE)
        s3, z3 = _fq_params(shape, axis, 8)
        y = _op("fake_quantize")(empty, s3, z3, 0, 15, axis, 1.0, None, None, False)
        dx, ds, dz = _op("fake_quantize_backward")(empty, empty, s3, z3, 0, 15, axis, 1.0, None, None, False)
        assert y.shape == shape and dx.shape == shape
        assert bool((ds == 0).all()) and bool((dz == 0).all()) and ds.shape == s3.shape


def test_fake_quantize_large_per_channel_reduction():
    """Many blocks per channel (split reduction) and many channels (grid.y loop)."""
    for shape, axis in [((3, 70001), 0), ((300, 7, 9), 1), ((2, 5, 4099), -1)]:
        x = _randn(shape, torch.float32, 8)
        scale, zp = _fq_params(shape, axis, 9)
        grad = _randn(shape, torch.float32, 10)
        args = (x, scale, zp, 0, 15, axis, 0.1, None, None, False)
        dx, ds, dz = _op("fake_quantize_backward")(grad, *args)
        rdx, rds, rdz = R.fake_quantize_backward(grad, *args)
        rds64, rdz64, ds_floor, dz_floor = _fq_backward64(grad, *args)
        _assert_equal(dx, rdx, f"dx {shape}")
        _assert_close_derived(ds, rds, rds64, f"dscale {shape} axis={axis}", ds_floor)
        _assert_close_derived(dz, rdz, rdz64, f"dzero_point {shape} axis={axis}", dz_floor)


def test_fake_quantize_more_channels_than_grid_y():
    """C > 65535: the per-channel backward's blocks loop over channels (gridDim.y <= 65535)."""
    shape, axis = (2, 70001, 3), 1
    x = _randn(shape, torch.float16, 14)
    grad = _randn(shape, torch.float16, 15)
    scale, zp = _fq_params(shape, axis, 16)
    args = (x, scale, zp, -8, 7, axis, 1.0, None, None, False)
    _assert_equal(_op("fake_quantize")(*args), R.fake_quantize(*args), "fake_quantize C=70001")
    dx, ds, dz = _op("fake_quantize_backward")(grad, *args)
    rdx, rds, rdz = R.fake_quantize_backward(grad, *args)
    rds64, rdz64, ds_floor, dz_floor = _fq_backward64(grad, *args)
    _assert_equal(dx, rdx, "dx C=70001")
    _assert_close_derived(ds, rds, rds64, "dscale C=70001", ds_floor)
    _assert_close_derived(dz, rdz, rdz64, "dzero_point C=70001", dz_floor)


def test_fake_quantize_backward_deterministic():
    x = _randn((1000, 37), torch.float32, 11)
    grad = _randn((1000, 37), torch.float32, 12)
    for axis in (None, 1):
        scale, zp = _fq_params((1000, 37), axis, 13)
        args = (grad, x, scale, zp, 0, 15, axis, 1.0, None, None, False)
        first = _op("fake_quantize_backward")(*args)
        for _ in range(3):
            again = _op("fake_quantize_backward")(*args)
            for a, b in zip(first, again):
                assert torch.equal(a, b), "the two-stage reduction must be run-to-run deterministic"


# ----------------------------------------------------------------------------------------------
# liq_quantize
# ----------------------------------------------------------------------------------------------
def _liq_step(clip: torch.Tensor, bits: int, signed: bool) -> float:
    n = 2**bits - 1
    return float(clip.abs().max()) * (2.0 if signed else 1.0) / n


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "offset"])
def test_liq_quantize_forward_backward(dtype, shape, offset):
    for signed, bits, clip_v in [(True, 4, 1.3), (False, 3, 0.9), (True, 8, -2.0), (False, 2, 1.0)]:
        for mode, e_dtype in [(None, None), ("after", None), ("before", torch.float32)]:
            x = _randn(shape, dtype, 21, offset=offset)
            clip = torch.tensor([clip_v], device=DEVICE)
            e, s, before = _perturb(x, mode, e_dtype, 22)
            args = (x, clip, bits, signed, False, e, s, before)
            what = f"liq {dtype} {shape} signed={signed} bits={bits} perturb={mode} offset={offset}"
            _assert_equal(_op("liq_quantize")(*args), R.liq_quantize(*args), what)
            grad = _randn(shape, dtype, 23, offset=offset)
            dx, dclip = _op("liq_quantize_backward")(grad, *args)
            rdx, rdclip = R.liq_quantize_backward(grad, *args)
            rdclip64, floor = _liq_dclip64(grad, *args)
            _assert_equal(dx, rdx, what + " dx")
            assert dclip.shape == clip.shape and dclip.dtype == torch.float32
            _assert_close_derived(dclip, rdclip, rdclip64, what + " dclip", floor)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7,), (33, 5), (3, 17, 9), (64, 3, 3, 3), (129, 257)], ids=str)
def test_liq_quantize_standardize(dtype, shape):
    """Statistics are fp64 sums here and fp32 torch.mean / torch.std in the reference: a code may
    move by one level where x sits on a rounding boundary to within the statistics' last bit."""
    for signed, bits, mode in [(True, 4, None), (True, 3, "before"), (False, 4, "after")]:
        x = _randn(shape, dtype, 31, scale=0.05) + 0.02
        clip = torch.tensor([1.7], device=DEVICE)
        e, s, before = _perturb(x, mode, None, 32)
        args = (x, clip, bits, signed, True, e, s, before)
        what = f"liq standardize {dtype} {shape} signed={signed} perturb={mode}"
        y, ry = _op("liq_quantize")(*args), R.liq_quantize(*args)
        step = _liq_step(clip, bits, signed)
        diff = (y.double() - ry.double()).abs()
        moved = diff > 0
        assert int(moved.sum()) <= max(1, y.numel() // 1000), f"{what}: {int(moved.sum())} codes differ"
        tol_step = step * (1 + 4 * _eps(dtype)) + 4 * _eps(dtype) * float(ry.abs().max())
        assert float(diff.max()) <= tol_step, f"{what}: a code moved by more than one level"
        grad = _randn(shape, dtype, 33)
        dx, dclip = _op("liq_quantize_backward")(grad, *args)
        rdx, rdclip = R.liq_quantize_backward(grad, *args)
        rdclip64, floor = _liq_dclip64(grad, *args)
        # dx = g * inside / std: the std may differ in its last bit (one rounding of dtype)
        dx_err = (dx.double() - rdx.double()).abs().max().item()
        assert dx_err <= 2 * _eps(dtype) * float(rdx.double().abs().max()) + 1e-30, f"{what} dx: {dx_err}"
        # dclip: besides rounding, each moved code changes one term by about one step / c
        extra = int(moved.sum()) * float(grad.double().abs().max()) * 2.0
        ref_err = (rdclip.double() - rdclip64.to(rdclip.device)).abs().max().item()
        err = (dclip.double() - rdclip64.to(dclip.device)).abs().max().item()
        assert err <= 2 * ref_err + floor + extra, f"{what} dclip: {err:.3e} vs {ref_err:.3e}"


def test_liq_backward_deterministic_and_empty():
    x = _randn((513, 77), torch.bfloat16, 41)
    grad = _randn((513, 77), torch.bfloat16, 42)
    clip = torch.tensor([1.1], device=DEVICE)
    args = (grad, x, clip, 4, True, True, None, None, False)
    first = _op("liq_quantize_backward")(*args)
    for _ in range(3):
        again = _op("liq_quantize_backward")(*args)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    empty = torch.empty(0, device=DEVICE)
    dx, dclip = _op("liq_quantize_backward")(empty, empty, clip, 4, True, False, None, None, False)
    assert dx.numel() == 0 and float(dclip) == 0.0


# ----------------------------------------------------------------------------------------------
# SAM ops
# ----------------------------------------------------------------------------------------------
LIST_DTYPES = [[torch.float32], [torch.float16], [torch.bfloat16], DTYPES]  # last: mixed list
LIST_DTYPE_IDS = ["f32", "f16", "bf16", "mixed"]
LIST_SHAPES = [(7,), (0,), (33, 5), (1031,), (65536 + 9,), (3, 17, 9), (2 * 65536,), (1,)]


def _tensor_list(dtypes, seed, shapes=LIST_SHAPES, offset=False, scale=1.0):
    out = []
    for i, shape in enumerate(shapes):
        out.append(_randn(shape, dtypes[i % len(dtypes)], seed + i, scale=scale, offset=offset and i % 2 == 1))
    return out


def _clones(ts):
    return [t.clone() for t in ts]


@pytest.mark.parametrize("dtypes", LIST_DTYPES, ids=LIST_DTYPE_IDS)
@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "offset"])
def test_grad_sq_norm(dtypes, offset):
    grads = _tensor_list(dtypes, 51, offset=offset)
    params = _tensor_list(dtypes, 61, offset=not offset)
    adaptive = [i % 3 != 0 for i in range(len(grads))]
    norm, found = _op("grad_sq_norm")(grads, params, adaptive, 0.01)
    rnorm, rfound = R.grad_sq_norm(grads, params, adaptive, 0.01)
    rnorm64, floor = _grad_sq_norm64(grads, params, adaptive, 0.01)
    assert norm.shape == () and norm.dtype == torch.float32 and norm.device.type == DEVICE
    _assert_close_derived(norm, rnorm, rnorm64, "grad_sq_norm", floor)
    assert float(found) == float(rfound) == 0.0


def test_grad_sq_norm_non_finite_and_many_tensors():
    grads = _tensor_list([torch.float32, torch.bfloat16], 71, shapes=[(5,)] * 150 + [(70001,)])
    params = _tensor_list([torch.float32, torch.bfloat16], 72, shapes=[(5,)] * 150 + [(70001,)])
    adaptive = [i % 2 == 0 for i in range(len(grads))]
    norm, found = _op("grad_sq_norm")(grads, params, adaptive, 0.05)
    rnorm, _ = R.grad_sq_norm(grads, params, adaptive, 0.05)
    rnorm64, floor = _grad_sq_norm64(grads, params, adaptive, 0.05)
    _assert_close_derived(norm, rnorm, rnorm64, "grad_sq_norm 151 tensors", floor)
    assert float(found) == 0.0
    for bad in (float("inf"), float("nan")):
        g2 = _clones(grads)
        g2[37][3] = bad
        _, found = _op("grad_sq_norm")(g2, params, adaptive, 0.05)
        assert float(found) == 1.0


@pytest.mark.parametrize("dtypes", LIST_DTYPES, ids=LIST_DTYPE_IDS)
@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "offset"])
def test_sam_perturb_and_restore_bit_exact(dtypes, offset):
    params = _tensor_list(dtypes, 81, offset=offset)
    grads = _tensor_list(dtypes, 91, offset=offset)
    adaptive = [i % 2 == 1 for i in range(len(params))]
    scale = torch.tensor(0.0731, device=DEVICE)
    p_ref, b_ref = _clones(params), [torch.full_like(p, float("nan")) for p in params]
    backups = [torch.full_like(p, float("nan")) for p in params]  # poisoned: must be overwritten
    original = _clones(params)
    _op("sam_perturb_")(params, grads, backups, scale, adaptive)
    R.sam_perturb_(p_ref, grads, b_ref, scale, adaptive)
    for i in range(len(params)):
        _assert_equal(params[i], p_ref[i], f"sam_perturb_ params[{i}] {params[i].dtype}")
        _assert_equal(backups[i], b_ref[i], f"sam_perturb_ backups[{i}]")
    _op("sam_restore_")(params, backups)
    for i in range(len(params)):
        _assert_equal(params[i], original[i], f"sam_restore_ params[{i}]")


def test_sam_ops_many_tensors_and_odd_layouts():
    """More tensors than one kernel-argument table holds; a transposed (non-contiguous) pair;
    a parameter spanning several launches' worth of chunks; float64 for the byte-copy restore."""
    shapes = [(3,)] * 130 + [(321 * 65536 + 5,)] + [(6, 10)]
    params = _tensor_list([torch.float32, torch.float16], 101, shapes=shapes)
    grads = _tensor_list([torch.float32, torch.float16], 102, shapes=shapes)
    params[-1] = params[-1].t()  # transposed view; its grad contiguous: the copy-back path
    grads[-1] = grads[-1].t().contiguous()
    adaptive = [i % 2 == 0 for i in range(len(params))]
    scale = torch.tensor(0.01, device=DEVICE)
    p_ref, b_ref = _clones(params), [torch.empty_like(p) for p in params]
    backups = [torch.empty_like(p) for p in params]
    original = _clones(params)
    _op("sam_perturb_")(params, grads, backups, scale, adaptive)
    R.sam_perturb_(p_ref, grads, b_ref, scale, adaptive)
    for i in range(len(params)):
        _assert_equal(params[i], p_ref[i], f"params[{i}]")
        _assert_equal(backups[i], b_ref[i], f"backups[{i}]")
    _op("sam_restore_")(params, backups)
    for i in range(len(params)):
        _assert_equal(params[i], original[i], f"restore params[{i}]")
    d = [_randn((9, 3), torch.float64, 103)]
    b = [_randn((9, 3), torch.float64, 104)]
    _op("sam_restore_")(d, b)
    _assert_equal(d[0], b[0], "sam_restore_ float64")


SGD_CASES = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, first_step=True),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, first_step=False),
    dict(momentum=0.8, dampening=0.0, weight_decay=0.0, nesterov=True, first_step=False),
]


@pytest.mark.parametrize("dtypes", LIST_DTYPES, ids=LIST_DTYPE_IDS)
@pytest.mark.parametrize("case", range(len(SGD_CASES)))
@pytest.mark.parametrize("found", [None, 0.0, 1.0, True], ids=["no_flag", "finite", "inf", "inf_bool"])
def test_sam_restore_sgd(dtypes, case, found):
    h = SGD_CASES[case]
    shapes = LIST_SHAPES[:6]
    params = _tensor_list(dtypes, 111, shapes=shapes)
    backups = _tensor_list(dtypes, 112, shapes=shapes, offset=True)
    grads = _tensor_list(dtypes, 113, shapes=shapes)
    bufs = _tensor_list(dtypes, 114, shapes=shapes)
    if h["first_step"]:
        bufs = [b.fill_(float("nan")) for b in bufs]  # first step never reads the buffer
    if h["momentum"] == 0.0:
        bufs = grads  # what the Python wrapper passes; must stay untouched
    lr = torch.tensor(0.05, device=DEVICE)
    fi = None if found is None else torch.tensor(found, device=DEVICE)
    hyper = (h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"], h["first_step"], fi)
    p_ref, m_ref = _clones(params), _clones(bufs)
    grads_before, bufs_before = _clones(grads), _clones(bufs)
    _op("sam_restore_sgd_")(params, backups, grads, bufs, lr, *hyper)
    R.sam_restore_sgd_(p_ref, backups, grads, m_ref, lr, *hyper)
    p64, m64 = [p.double() for p in p_ref], [m.double() for m in bufs_before]
    lr64 = lr.double()
    R.sam_restore_sgd_(p64, [b.double() for b in backups], [g.double() for g in grads], m64, lr64, *hyper)
    for i in range(len(params)):
        what = f"sgd case {case} found={found} params[{i}] {params[i].dtype}"
        if found == 1.0:
            _assert_equal(params[i], backups[i], what)
            _assert_equal(bufs[i], bufs_before[i], what + " buffer untouched")
            continue
        _assert_close_derived(params[i], p_ref[i], p64[i], what)
        if h["momentum"] != 0.0:
            _assert_close_derived(bufs[i], m_ref[i], m64[i], what + " buffer")
        _assert_equal(grads[i], grads_before[i], what + " grads untouched")


@pytest.mark.parametrize("dtypes", LIST_DTYPES, ids=LIST_DTYPE_IDS)
@pytest.mark.parametrize("found", [None, 0.0, 1.0, True], ids=["no_flag", "finite", "inf", "inf_bool"])
@pytest.mark.parametrize("step0", [0.0, 9.0])
def test_sam_restore_adamw(dtypes, found, step0):
    shapes = LIST_SHAPES[:6]
    params = _tensor_list(dtypes, 121, shapes=shapes)
    backups = _tensor_list(dtypes, 122, shapes=shapes)
    grads = _tensor_list(dtypes, 123, shapes=shapes, offset=True)
    m = _tensor_list(dtypes, 124, shapes=shapes, scale=0.1)
    v = [t.abs() for t in _tensor_list(dtypes, 125, shapes=shapes, scale=0.01)]
    steps = [torch.tensor(step0, device=DEVICE) for _ in shapes]
    lr = torch.tensor(1e-3, device=DEVICE)
    fi = None if found is None else torch.tensor(found, device=DEVICE)
    hp = (0.9, 0.999, 1e-8, 1e-2)
    m0, v0, s0 = _clones(m), _clones(v), _clones(steps)
    p_ref, m_ref, v_ref, s_ref = _clones(params), _clones(m), _clones(v), _clones(steps)
    _op("sam_restore_adamw_")(params, backups, grads, m, v, steps, lr, *hp, fi)
    R.sam_restore_adamw_(p_ref, backups, grads, m_ref, v_ref, s_ref, lr, *hp, fi)
    p64 = [p.double() for p in params]
    m64, v64, s64 = [t.double() for t in m0], [t.double() for t in v0], _clones(s0)
    b64, g64 = [b.double() for b in backups], [g.double() for g in grads]
    R.sam_restore_adamw_(p64, b64, g64, m64, v64, s64, lr.double(), *hp, fi)
    for i in range(len(params)):
        what = f"adamw found={found} step0={step0} params[{i}] {params[i].dtype}"
        _assert_equal(steps[i], s_ref[i], what + " step")
        if found == 1.0:
            _assert_equal(params[i], backups[i], what)
            _assert_equal(m[i], m0[i], what + " exp_avg untouched")
            _assert_equal(v[i], v0[i], what + " exp_avg_sq untouched")
            continue
        _assert_close_derived(params[i], p_ref[i], p64[i], what)
        _assert_close_derived(m[i], m_ref[i], m64[i], what + " exp_avg")
        _assert_close_derived(v[i], v_ref[i], v64[i], what + " exp_avg_sq")


# ----------------------------------------------------------------------------------------------
# CUDA graphs: every per-step scalar is read on the device, so a captured step replays correctly
# ----------------------------------------------------------------------------------------------
def _capture(fn, warmup=3):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _needs_graphs():
    if DEVICE != "cuda" or not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")


@pytest.mark.parametrize("quantizer", ["fake_quantize", "liq_quantize"])
def test_cuda_graph_forward_backward(quantizer):
    """Capture forward + backward through the public ops, change x and the perturbation scale
    in place, replay: the result equals an eager run of the same kernels bit for bit."""
    _needs_graphs()
    shape = (64, 3, 3, 3)
    x = _randn(shape, torch.float32, 131).requires_grad_()
    gy = _randn(shape, torch.float32, 132)
    e = _randn(shape, torch.float32, 133, scale=0.1)
    s = torch.tensor(0.5, device=DEVICE)
    if quantizer == "fake_quantize":
        q = torch.full((64,), 0.05, device=DEVICE).requires_grad_()
        zp = torch.zeros(64, device=DEVICE).requires_grad_()
        params = [x, q, zp]
        fwd = lambda: sk.fake_quantize(x, q, zp, -8, 7, axis=0, perturbation=e, perturb_scale=s)  # noqa: E731
    else:
        clip = torch.tensor([1.5], device=DEVICE).requires_grad_()
        params = [x, clip]
        fwd = lambda: sk.liq_quantize(x, clip, 4, True, standardize=True, perturbation=e,  # noqa: E731
                                      perturb_scale=s, perturb_before=True)

    def step():
        for p in params:
            p.grad = None
        y = fwd()
        y.backward(gy)
        return y

    with sk.use_backend("cuda"):
        graph, y_static = _capture(step)
        with torch.no_grad():
            x.copy_(_randn(shape, torch.float32, 134))
            s.fill_(0.25)  # a per-step scalar changed on the device only
        graph.replay()
        torch.cuda.synchronize()
        got = [y_static.detach().clone()] + [p.grad.clone() for p in params]
        want = [step().detach()] + [p.grad.clone() for p in params]  # eager, same kernels
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_equal(g, w, f"{quantizer} graph replay output {i}")


def test_cuda_graph_sam_step():
    """grad_sq_norm -> scale on the device -> sam_perturb_ -> fused restore + SGD, captured once
    and replayed from reset state: bit-identical to the same ops run eagerly."""
    _needs_graphs()
    shapes = [(17,), (64, 3, 3, 3), (70001,)]
    params = _tensor_list([torch.float32, torch.bfloat16], 141, shapes=shapes)
    grads = _tensor_list([torch.float32, torch.bfloat16], 142, shapes=shapes)
    backups = [torch.empty_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    lr = torch.tensor(0.1, device=DEVICE)
    rho = torch.tensor(0.05, device=DEVICE)
    start = _clones(params)
    flags = [False, True, False]

    def step(ps, bs, ms):
        norm, found = _op("grad_sq_norm")(grads, ps, flags, 0.01)
        scale = rho / (norm.sqrt() + 1e-12)
        _op("sam_perturb_")(ps, grads, bs, scale, flags)
        _op("sam_restore_sgd_")(ps, bs, grads, ms, lr, 0.9, 0.0, 1e-4, False, False, found)
        return norm

    graph, norm_static = _capture(lambda: step(params, backups, bufs), warmup=1)
    for p, p0 in zip(params, start):
        p.copy_(p0)
    for b in bufs:
        b.zero_()
    graph.replay()
    torch.cuda.synchronize()
    p_eager, m_eager = _clones(start), [torch.zeros_like(p) for p in start]
    norm = step(p_eager, [torch.empty_like(p) for p in start], m_eager)
    _assert_equal(norm_static, norm, "graph replay norm")
    for i in range(len(params)):
        _assert_equal(params[i], p_eager[i], f"graph replay params[{i}]")
        _assert_equal(bufs[i], m_eager[i], f"graph replay momentum[{i}]")


# ----------------------------------------------------------------------------------------------
# errors name the op and the argument
# ----------------------------------------------------------------------------------------------
def _test_float64_further_down_a_sam_list_runs_on_the_reference():
    # the list ops are routed by their first tensor's dtype: a float64 tensor at index 1 is
    # refused by the CUDA kernels before anything is written, and the call runs on the reference
    ps = [_randn((5,), torch.float32, 171), _randn((4,), torch.float32, 172).double()]
    gs = [_randn((5,), torch.float32, 173), _randn((4,), torch.float32, 174).double()]
    bs, s = [torch.empty_like(p) for p in ps], torch.tensor(0.25, device=DEVICE)
    pr, br = _clones(ps), [torch.empty_like(p) for p in ps]
    _op("sam_perturb_")(ps, gs, bs, s, [False, True])
    R.sam_perturb_(pr, gs, br, s, [False, True])
    for a, b in zip(ps + bs, pr + br):
        _assert_equal(a, b, "mixed fp32/fp64 sam_perturb_")
    norm = _op("grad_sq_norm")(gs, ps, [False, False], 0.01)[0]
    torch.testing.assert_close(norm.double(), R.grad_sq_norm(gs, ps, [False, False], 0.01)[0].double())


# the backend table (not the emulated ops) routes float64: defined on a GPU only, so that the
# emulated run's count of skipped tests stays that of the CUDA-graph tests
if not _EMU_LIB:
    test_float64_further_down_a_sam_list_runs_on_the_reference = _test_float64_further_down_a_sam_list_runs_on_the_reference


def test_integer_found_inf_counts_as_a_flag():
    # a count of non-finite gradients (or ~isfinite as bool): non-zero skips, as on every backend
    p = [_randn((5,), torch.float32, 161)]
    b, g, m = _clones(p), [_randn((5,), torch.float32, 162)], [torch.zeros(5, device=DEVICE)]
    lr = torch.tensor(0.1, device=DEVICE)
    for flag, skipped in ((torch.tensor(3, device=DEVICE), True), (torch.tensor([0], device=DEVICE), False)):
        q = [b[0].clone() + 1]
        _op("sam_restore_sgd_")(q, b, g, m, lr, 0.0, 0.0, 0.0, False, False, flag)
        assert torch.equal(q[0], b[0]) is skipped


def test_errors_name_op_and_argument():
    x = _randn((4, 5), torch.float32, 151)
    scale, zp = _fq_params((4, 5), 0, 152)
    with pytest.raises(RuntimeError, match=r"fake_quantize.*'x' has dtype"):
        _op("fake_quantize")(x.double(), scale, zp, 0, 15, 0, 1.0, None, None, False)
    with pytest.raises(RuntimeError, match=r"fake_quantize.*'scale'.*\[4\]"):
        _op("fake_quantize")(x, scale[:3], zp, 0, 15, 0, 1.0, None, None, False)
    with pytest.raises(RuntimeError, match=r"liq_quantize.*'clip'"):
        _op("liq_quantize")(x, torch.ones(2, device=DEVICE), 4, True, False, None, None, False)
    p = [_randn((3,), torch.float32, 153)]
    bad_steps = [[torch.tensor(0.0, dtype=torch.float64, device=DEVICE)]]
    if DEVICE == "cuda":
        bad_steps.append([torch.tensor(0.0)])  # torch.optim.AdamW's default: steps on the CPU
    if DEVICE == "cuda":  # the data on the CPU, a parameter on the GPU: the CUDA kernel is chosen
        with pytest.raises(RuntimeError, match=r"fake_quantize: 'x' is on cpu while another argument"):
            _op("fake_quantize")(x.cpu(), scale, zp, 0, 15, 0, 1.0, None, None, False)
        with pytest.raises(RuntimeError, match=r"sam_restore_: 'params\[0\]' is on cpu"):
            _op("sam_restore_")([torch.zeros(3), p[0]], [torch.zeros(3), p[0]])
    for steps in bad_steps:
        with pytest.raises(RuntimeError, match=r"sam_restore_adamw_.*'steps\[0\]'"):
            _op("sam_restore_adamw_")(p, _clones(p), _clones(p), _clones(p), _clones(p), steps,
                                      torch.tensor(1e-3, device=DEVICE), 0.9, 0.999, 1e-8, 0.0, None)
