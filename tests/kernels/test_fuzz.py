"""Differential fuzz (slow): random cases, every CPU-runnable backend against the reference.

The parity suites enumerate grids of shapes, layouts and modes; this draws random combinations
of them instead (seeded, so a failure reproduces): shapes of 1-4 dims with odd and unit sizes,
contiguous / permuted / channels-last / offset / strided layouts, every dtype, per-tensor and
per-channel (any axis, negative too) quantization, bits 2..8 signed and unsigned, non-integer
zero points, negative clips, the perturbation modes and the ReLU folds, infinities and NaNs in
inputs and gradients; for the SAM ops, lists of mixed sizes and dtypes, adaptive flags, empty
tensors, found_inf set or not, offset and strided parameters.

Checked, as saq_kernels/OPS.md pins it: forward outputs and dx bit for bit (NaN matching NaN);
sam_perturb_ / sam_restore_ bit for bit; reductions and optimizer steps with the same non-finite
pattern as the reference and, where finite, within twice the reference's own error against a
float64 run of it plus one rounding of the dtype (for sums: plus a small multiple of the
magnitude of their terms). Standardized LIQ, whose statistics are sums in another order, may
move a code by one level (as in test_cuda_backend.py).

Backends: cpp, triton (CPU interpreter) and the CUDA kernels on the host emulation
(tests/kernels/cuda_emu), each where it can run here. A differential fuzzer of this kind found
the Triton kernels' NaN for infinite inputs (test_nonfinite_inputs.py).
"""
from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

import saq_kernels as sk
from saq_kernels import reference as R

from bit_utils import as_bits, load_script

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIALS = [float("inf"), float("-inf"), float("nan"), -0.0, 1e-30, -1e-30, 65504.0]
QUANT_OPS = ["fake_quantize", "fake_quantize_backward", "liq_quantize", "liq_quantize_backward"]
SAM_OPS = ["grad_sq_norm", "sam_perturb_", "sam_restore_", "sam_restore_sgd_", "sam_restore_adamw_"]


@pytest.fixture(scope="module")
def backends() -> Dict[str, Callable[[str], Callable]]:
    out = {}
    for name in ("cpp", "triton"):
        if sk.get_backend(name).supports("fake_quantize", "cpu", torch.float32) is None:
            table = sk.get_backend(name).table()
            out[name] = table.__getitem__
    if shutil.which(os.environ.get("CXX") or "g++"):
        lib = load_script(HERE / "cuda_emu" / "build_emu.py").build()
        torch.ops.load_library(lib)
        out["cuda-emu"] = lambda op: getattr(torch.ops.saq_cuda_emu, op).default
    if not out:
        pytest.skip("no backend besides the reference runs here")
    return out


# ----------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------
def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((as_bits(a) == as_bits(b)) | (a.isnan() & b.isnan())).all())


def _close(out, ref, ref64, dtype, terms: float = 0.0) -> bool:
    """Same non-finite pattern as ref; elsewhere max|out - ref64| <= 2 max|ref - ref64|
    + eps(dtype) max|ref64| + 64 eps32 terms (terms: magnitude of a sum's terms)."""
    out, ref, ref64 = (t.double().reshape(-1) for t in (out, ref, ref64))
    if out.shape != ref.shape:
        return False
    fin = ref.isfinite()
    if not bool((out.isfinite() == fin).all()):
        return False
    nf = ~fin
    if nf.any() and not bool(((out[nf] == ref[nf]) | (out[nf].isnan() & ref[nf].isnan())).all()):
        return False
    f = fin & ref64.isfinite()
    if not f.any():
        return True
    err = (out[f] - ref64[f]).abs().max().item()
    ref_err = (ref[f] - ref64[f]).abs().max().item()
    floor = torch.finfo(dtype).eps * ref64[f].abs().max().item() + 64 * 1.2e-7 * terms + 1e-30
    return err <= 2 * ref_err + floor


def _f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


# ----------------------------------------------------------------------------------------------
# random inputs
# ----------------------------------------------------------------------------------------------
def _shape(rng):
    dims = []
    for _ in range(rng.randint(1, 4)):
        d = rng.choice([1, 2, 3, 5, 7, 8, 16, 17, 31, 33, 64, 129]) if rng.random() < 0.7 else rng.randint(1, 300)
        dims.append(max(1, min(d, 30000 // max(1, math.prod(dims)))))
    return dims


def _values(rng, shape, dtype, scale, specials=True):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(shape, generator=g) * scale
    if specials and x.numel() > 4 and rng.random() < 0.3:
        flat = x.view(-1)
        for _ in range(rng.randint(1, 4)):
            flat[rng.randrange(flat.numel())] = rng.choice(SPECIALS)
    return x.to(dtype)


def _layout(rng, t):
    """t, or the same values in another layout: permuted, channels-last, offset or strided view."""
    k = rng.random()
    if k < 0.45:
        return t.contiguous()
    if k < 0.6 and t.dim() >= 2:
        perm = list(range(t.dim()))
        rng.shuffle(perm)
        return t.permute(perm).contiguous().permute([perm.index(i) for i in range(t.dim())])
    if k < 0.75 and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if k < 0.9:
        flat = torch.empty(t.numel() + 1, dtype=t.dtype)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)
    big = torch.empty([d * 2 for d in t.shape], dtype=t.dtype)
    view = big[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


def _perturbation(rng, shape, dtype):
    mode = rng.choice([None, None, "after", "before", "relu"])
    if mode in ("after", "before"):
        e = _layout(rng, _values(rng, shape, dtype, 0.1))
        return mode, e, torch.tensor(rng.uniform(-0.5, 0.5)), mode == "before"
    return mode, None, None, False


def _fq_case(rng):
    dtype, shape = rng.choice(DTYPES), _shape(rng)
    x = _layout(rng, _values(rng, shape, dtype, rng.choice([0.01, 0.3, 1.0, 5.0])))
    axis, channels = None, 1
    if rng.random() < 0.5:
        axis = rng.randrange(len(shape))
        channels = shape[axis]
        if rng.random() < 0.3:
            axis -= len(shape)
    bits, signed = rng.randint(2, 8), rng.random() < 0.5
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    scale = torch.rand(channels, generator=g) * 0.3 + 0.005
    zp = torch.rand(channels, generator=g) * (qmax - qmin) + qmin - 0.5
    if rng.random() < 0.3:
        zp = zp.round()
    if axis is None and rng.random() < 0.3:
        scale, zp = scale.reshape(()), zp.reshape(())
    mode, e, s, before = _perturbation(rng, shape, dtype)
    grad_factor = rng.choice([1.0, 0.5, 1.0 / math.sqrt(x.numel() * qmax)])
    args = (x, scale, zp, qmin, qmax, axis, grad_factor, e, s, before, mode == "relu")
    grad = _layout(rng, _values(rng, shape, dtype, 1.0))
    return args, grad, f"fake_quantize {dtype} {shape} axis={axis} bits={bits} signed={signed} mode={mode}"


def _liq_case(rng):
    dtype, shape = rng.choice(DTYPES), _shape(rng)
    x = _layout(rng, _values(rng, shape, dtype, rng.choice([0.05, 0.5, 1.0, 3.0])))
    bits, signed = rng.randint(2, 8), rng.random() < 0.5
    standardize = x.numel() >= 2 and rng.random() < 0.3
    clip = torch.tensor([rng.choice([1.0, -1.3, 0.7, 2.5, 1e-3])])
    if rng.random() < 0.3:
        clip = clip.reshape(())
    mode, e, s, before = _perturbation(rng, shape, dtype)
    relu = mode == "relu" and not signed and not standardize
    args = (x, clip, bits, signed, standardize, e, s, before)
    grad = _layout(rng, _values(rng, shape, dtype, 1.0))
    return args, grad, relu, f"liq_quantize {dtype} {shape} bits={bits} signed={signed} std={standardize} mode={mode}"


# ----------------------------------------------------------------------------------------------
# quantizers
# ----------------------------------------------------------------------------------------------
def _check_fq(op, args, grad, desc):
    ref_y = R.fake_quantize(*args)
    rdx, rds, rdz = R.fake_quantize_backward(grad, *args)
    _, rds64, rdz64 = R.fake_quantize_backward(grad.double(), *_f64(args))
    terms = grad.double().abs().nan_to_num(nan=0.0, posinf=0.0).sum().item() * (args[1].abs().max().item() + 1) * 300
    assert _same(op("fake_quantize")(*args), ref_y), f"{desc}: forward"
    dx, ds, dz = op("fake_quantize_backward")(grad, *args)
    assert _same(dx, rdx), f"{desc}: dx"
    assert _close(ds, rds, rds64, torch.float32, terms), f"{desc}: dscale {ds} vs {rds}"
    assert _close(dz, rdz, rdz64, torch.float32, terms), f"{desc}: dzero_point {dz} vs {rdz}"


def _check_liq(op, args, grad, relu, desc):
    ref_y = R.liq_quantize(*args)
    y = op("liq_quantize")(*args)
    dx, dclip = op("liq_quantize_backward")(grad, *args, relu)
    if args[4]:  # standardized: a code may move by one level where x sits on a boundary
        moved = (y.double() - ref_y.double()).abs() > 0
        assert int(moved.sum()) <= max(1, y.numel() // 200), f"{desc}: {int(moved.sum())} codes moved"
        return
    rdx, rdclip = R.liq_quantize_backward(grad, *args, relu)
    _, rdclip64 = R.liq_quantize_backward(grad.double(), *_f64(args), relu)
    terms = grad.double().abs().nan_to_num(nan=0.0, posinf=0.0).sum().item() * 4
    assert _same(y, ref_y), f"{desc}: forward"
    assert _same(dx, rdx), f"{desc}: dx"
    assert _close(dclip, rdclip, rdclip64, torch.float32, terms), f"{desc}: dclip {dclip} vs {rdclip}"


@pytest.mark.parametrize("seed", range(6))
def test_quantizers_fuzz(backends, seed):
    rng = random.Random(1000 + seed)
    for _ in range(60):
        if rng.random() < 0.5:
            args, grad, desc = _fq_case(rng)
            for name, op in backends.items():
                _check_fq(op, args, grad, f"{name}: {desc}")
        else:
            args, grad, relu, desc = _liq_case(rng)
            for name, op in backends.items():
                _check_liq(op, args, grad, relu, f"{name}: {desc}")


# ----------------------------------------------------------------------------------------------
# SAM ops
# ----------------------------------------------------------------------------------------------
def _state(rng, sizes, dtypes, scale, specials=False):
    out = []
    for n, dt in zip(sizes, dtypes):
        t = _values(rng, [n], dt, scale, specials) if n else torch.empty(0, dtype=dt)
        k = rng.random()
        if n and k < 0.15:  # offset view (unaligned)
            big = torch.empty(n + 1, dtype=dt)
            big[1:] = t
            t = big[1:]
        elif n > 1 and k < 0.25:  # strided view
            big = torch.empty(2 * n, dtype=dt)
            big[::2] = t
            t = big[::2]
        out.append(t)
    return out


def _copies(ts, f64=False):
    return [t.double() if f64 else t.clone() for t in ts]


@pytest.mark.parametrize("seed", range(3))
def test_sam_ops_fuzz(backends, seed):
    rng = random.Random(2000 + seed)
    for it in range(12):
        k = rng.randint(1, 10)
        mixed = rng.random() < 0.3
        dt0 = rng.choice(DTYPES)
        sizes = [rng.choice([0, 1, 3, 7, 8, 17, 64, 65, 255, 1000, 4097, 70000]) for _ in range(k)]
        dtypes = [rng.choice(DTYPES) if mixed else dt0 for _ in range(k)]
        params = _state(rng, sizes, dtypes, 0.5)
        grads = _state(rng, sizes, dtypes, 1e-2, specials=rng.random() < 0.3)
        adaptive = [rng.random() < 0.5 for _ in sizes]
        eta = rng.choice([0.0, 0.01])
        scale = torch.tensor(rng.uniform(-2, 2))
        n_backup = rng.randint(0, k)
        found = rng.choice([None, 0.0, 1.0])
        mom, damp, wd = rng.choice([0.0, 0.9]), rng.choice([0.0, 0.1]), rng.choice([0.0, 1e-4])
        nesterov, first = mom > 0 and damp == 0 and rng.random() < 0.5, rng.random() < 0.3
        lr = torch.tensor(rng.choice([0.1, 1e-3]))
        bufs = _state(rng, sizes, dtypes, 1e-2)
        m0, v0 = _state(rng, sizes, dtypes, 1e-2), [t.abs() for t in _state(rng, sizes, dtypes, 1e-2)]
        step0 = rng.choice([0.0, 5.0])
        desc = f"seed={seed} it={it} sizes={sizes} dtypes={dtypes} adaptive={adaptive} found={found}"

        rnorm, rfound = R.grad_sq_norm(grads, params, adaptive, eta)
        rnorm64, _ = R.grad_sq_norm(_copies(grads, True), _copies(params, True), adaptive, eta)
        rp, rb = _copies(params), [torch.empty_like(p) for p in params]
        R.sam_perturb_(rp, grads, rb, scale, adaptive)

        def sgd(fn, f64=False):
            ps, bf = _copies(rp, f64), _copies(bufs, f64)
            fn(ps, _copies(params[:n_backup], f64), _copies(grads, f64), bf, lr, mom, damp, wd,
               nesterov, first, None if found is None else torch.tensor(found))
            return ps + bf

        def adamw(fn, f64=False):
            ps, m, v = _copies(rp, f64), _copies(m0, f64), _copies(v0, f64)
            steps = [torch.tensor(step0) for _ in sizes]
            fn(ps, _copies(params[:n_backup], f64), _copies(grads, f64), m, v, steps, torch.tensor(1e-3),
               0.9, 0.999, 1e-8, 0.01, None if found is None else torch.tensor(found))
            return ps + m + v, steps

        ref_sgd, ref_sgd64 = sgd(R.sam_restore_sgd_), sgd(R.sam_restore_sgd_, True)
        (ref_adam, ref_steps), (ref_adam64, _) = adamw(R.sam_restore_adamw_), adamw(R.sam_restore_adamw_, True)
        for name, op in backends.items():
            where = f"{name}: {desc}"
            norm, fnd = op("grad_sq_norm")(grads, params, adaptive, eta)
            terms = rnorm64.abs().item() if math.isfinite(rnorm64.item()) else 0.0
            assert _same(fnd, rfound), f"{where}: found_inf {fnd} vs {rfound}"
            assert _close(norm, rnorm, rnorm64, torch.float32, terms), f"{where}: norm {norm} vs {rnorm}"
            ps, bs = _copies(params), [torch.empty_like(p) for p in params]
            op("sam_perturb_")(ps, grads, bs, scale, adaptive)
            assert all(_same(a, b) for a, b in zip(ps, rp)), f"{where}: sam_perturb_ params"
            assert all(_same(a, b) for a, b in zip(bs, rb)), f"{where}: sam_perturb_ backups"
            op("sam_restore_")(ps, bs)
            assert all(_same(a, b) for a, b in zip(ps, params)), f"{where}: sam_restore_"
            got = sgd(op("sam_restore_sgd_"))
            for i, (a, b, b64) in enumerate(zip(got, ref_sgd, ref_sgd64)):
                assert _close(a, b, b64, dtypes[i % k]), f"{where}: sgd tensor {i}"
            got, steps = adamw(op("sam_restore_adamw_"))
            for i, (a, b, b64) in enumerate(zip(got, ref_adam, ref_adam64)):
                assert _close(a, b, b64, dtypes[i % k]), f"{where}: adamw tensor {i}"
            assert all(_same(a, b) for a, b in zip(steps, ref_steps)), f"{where}: adamw steps"
