"""The SAM perturb and fused SGD / AdamW steps in fp16 / bf16, over every bit pattern.

Backends: cpp; triton (under the interpreter here, on a GPU there); the CUDA kernels on the host
emulation when SAQ_CUDA_EMU_LIB is set (tests/kernels/test_cuda_emulation.py runs this file so).
Every kernel rounds each term to the parameter dtype, as the reference's torch ops do. The C++
kernels round each term to the parameter dtype (csrc/cpu/kernel_utils.h: inline bf16
conversions, since c10's out-of-line ones kept the loop scalar; fp16 tiles through F16C where the
CPU has it, else c10's conversion, both paths tested). Here each op is recomputed with torch's
own conversions, ``.to(dtype)`` after each fp32 term, on tensors holding all 65536 patterns
(normals, subnormals, +-0, infs, NaNs), for each flag combination: every finite or infinite result
must be bit-identical, NaNs must stay NaNs.
The slow test checks the bf16 conversions themselves against c10's over all 2^32 fp32 inputs.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from bit_utils import as_bits, run_pytest

import saq_kernels as sk

ROOT = Path(__file__).resolve().parents[2]
_CPP = sk.get_backend("cpp")
_needs_cpp = pytest.mark.skipif(_CPP.available() is not None, reason=str(_CPP.available()))
_EMU_LIB = os.environ.get("SAQ_CUDA_EMU_LIB")

LOWP = [torch.float16, torch.bfloat16]


def _targets():
    # the reference too: its torch ops are the contract (saq_kernels/OPS.md)
    out = [pytest.param("reference"), pytest.param("cpp", marks=_needs_cpp)]
    reason = sk.get_backend("triton").supports("sam_restore_sgd_", "cpu", torch.float16)
    out.append(pytest.param("triton", marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    if _EMU_LIB:
        out.append(pytest.param("cuda-emu"))
    # on a GPU: the same bit patterns through the CUDA and Triton kernels on the device
    out += [pytest.param(t, marks=pytest.mark.gpu) for t in ("cuda", "triton-gpu", "reference-gpu")]
    return out


TARGETS = _targets()


def _on_device(fn, device):
    """fn called on device copies of its tensor arguments, whose values are copied back."""
    def call(*args):
        move = lambda t: t.to(device, copy=True) if isinstance(t, torch.Tensor) else t  # noqa: E731
        moved = [[move(t) for t in a] if isinstance(a, list) else move(a) for a in args]
        fn(*moved)
        for a, m in zip(args, moved):  # lists hold tensors, or plain values (sam_perturb_'s adaptive)
            for t, u in (zip(a, m) if isinstance(a, list) else [(a, m)]):
                if isinstance(t, torch.Tensor):
                    t.copy_(u.cpu())
    return call


def ops(target):
    """The target's sam_* implementations, by op name (CPU tensors in and out)."""
    if target == "cpp":
        return lambda name: getattr(torch.ops.saq_C, name)
    if target == "cuda-emu":
        torch.ops.load_library(_EMU_LIB)
        return lambda name: getattr(torch.ops.saq_cuda_emu, name)
    if target in ("cuda", "triton-gpu", "reference-gpu"):
        backend = sk.get_backend({"cuda": "cuda", "triton-gpu": "triton", "reference-gpu": "reference"}[target])
        reason = backend.supports("sam_restore_sgd_", "cuda", torch.float16)
        if not torch.cuda.is_available() or reason is not None:
            pytest.skip(reason or "no CUDA device")
        table = backend.table()
        return lambda name: _on_device(table[name], "cuda")
    table = sk.get_backend(target).table()
    return table.__getitem__


def all_patterns(dtype, seed):
    """The 65536 values of a 16-bit dtype, in a seeded random order."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    perm = torch.randperm(65536, generator=torch.Generator().manual_seed(seed))
    return bits[perm].view(dtype).clone()


def same(a, b):
    """Bit-identical, except that two NaNs match whatever their payloads."""
    either_nan = a.isnan() | b.isnan()
    return torch.where(either_nan, a.isnan() & b.isnan(), as_bits(a) == as_bits(b))


def emulate_sgd(p, backup, g, buf, lr, momentum, dampening, wd, nesterov, first):
    """The step's contract, term by term: fp32 math with fp32 scalars (lr as lr.to(dtype)),
    each torch op's result rounded to the dtype."""
    dt = p.dtype
    r = lambda t: t.to(dt).float()  # noqa: E731
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    pv = (p if backup is None else backup).float()
    d = g.float()
    if wd != 0:
        d = r(d + f32(wd) * pv)
    new_buf = None
    if momentum != 0:
        bv = d if first else r(r(buf.float() * f32(momentum)) + f32(1.0 - dampening) * d)
        new_buf = bv.to(dt)
        d = r(d + f32(momentum) * bv) if nesterov else bv
    lr_t = lr.to(dt).float()
    return (pv - r(lr_t * d)).to(dt), new_buf


SGD_CONFIGS = [  # momentum, dampening, weight decay, nesterov, first step, restore from a backup
    (0.0, 0.0, 0.0, False, False, True),
    (0.0, 0.0, 5e-4, False, False, False),
    (0.9, 0.0, 5e-4, True, False, True),
    (0.9, 0.1, 1e-2, False, False, True),
    (0.5, 0.0, 0.0, False, True, True),
    (0.9, 0.0, 0.0, True, True, False),
]


@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=lambda c: "mom{}-damp{}-wd{}-nest{}-first{}-restore{}".format(*c))
@pytest.mark.parametrize("lr", [0.3, 3e-5, 7.0])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_sgd_step_bitwise_over_all_patterns(target, dtype, lr, cfg):
    momentum, dampening, wd, nesterov, first, restore = cfg
    p, backup, g, buf = (all_patterns(dtype, s) for s in range(4))
    lr_t = torch.tensor(lr)
    want_p, want_buf = emulate_sgd(p, backup if restore else None, g, buf, lr_t, momentum, dampening,
                                   wd, nesterov, first)
    P, Buf = [p.clone()], [buf.clone()]
    ops(target)("sam_restore_sgd_")(P, [backup] if restore else [], [g], Buf if momentum else [],
                                    lr_t, momentum, dampening, wd, nesterov, first, None)
    ok = same(P[0], want_p)
    assert bool(ok.all()), f"{int((~ok).sum())} params differ, e.g. at {int((~ok).nonzero()[0])}"
    if momentum:
        ok = same(Buf[0], want_buf)
        assert bool(ok.all()), f"{int((~ok).sum())} momentum buffers differ"


@_needs_cpp
def test_emulation_would_catch_a_missing_rounding():
    """The comparison can fail: one term left unrounded in the emulation breaks it."""
    p, backup, g = (all_patterns(torch.bfloat16, s) for s in range(3))
    lr = torch.tensor(0.3)
    P = [p.clone()]
    torch.ops.saq_C.sam_restore_sgd_(P, [backup], [g], [], lr, 0.0, 0.0, 0.0, False, False, None)
    unrounded = (backup.float() - lr.to(torch.bfloat16).float() * g.float()).to(torch.bfloat16)
    assert not bool(same(P[0], unrounded).all())


def emulate_adamw(p, backup, g, m, v, lr, beta1, beta2, eps, wd):
    """The AdamW step's contract at step 1 with betas whose bias corrections are exact in fp32
    (powers of two), term by term, each torch op's result rounded to the dtype."""
    dt = p.dtype
    r = lambda t: t.to(dt).float()  # noqa: E731
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    lr_t = lr.to(dt).float()
    decay = r(f32(1.0) - r(lr_t * f32(wd)))
    step_size = r(lr_t / f32(1.0 - beta1))
    bc2s = r(torch.sqrt(f32(1.0 - beta2)))
    w, gi, mi = f32(1.0 - beta1), g.float(), m.float()
    pv = r((p if backup is None else backup).float() * decay)
    mn = r(mi + w * (gi - mi)) if float(w) < 0.5 else r(gi - (gi - mi) * (f32(1.0) - w))
    vn = r(r(v.float() * f32(beta2)) + f32(1.0 - beta2) * gi * gi)
    denom = r(r(r(torch.sqrt(vn)) / bc2s) + f32(eps))
    return (pv - r(step_size * r(mn / denom))).to(dt), mn.to(dt), vn.to(dt)


@pytest.mark.parametrize("beta1", [0.5, 0.75])  # lerp weight 0.5 and 0.25: both lerp formulas
@pytest.mark.parametrize("wd,restore", [(0.01, True), (0.0, False)])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_adamw_step_bitwise_over_all_patterns(target, dtype, wd, restore, beta1):
    beta2, eps, lr = 0.75, 1e-3, torch.tensor(3e-3)
    p, backup, g, m, v = (all_patterns(dtype, s) for s in range(5))
    v = v.abs()
    want = emulate_adamw(p, backup if restore else None, g, m, v, lr, beta1, beta2, eps, wd)
    P, M, V, steps = [p.clone()], [m.clone()], [v.clone()], [torch.tensor(0.0)]
    ops(target)("sam_restore_adamw_")(P, [backup] if restore else [], [g], M, V, steps, lr, beta1,
                                      beta2, eps, wd, None)
    for got, exp, name in zip((P[0], M[0], V[0]), want, ("param", "exp_avg", "exp_avg_sq")):
        ok = same(got, exp)
        assert bool(ok.all()), f"{name}: {int((~ok).sum())} differ, e.g. at {int((~ok).nonzero()[0])}"
    assert float(steps[0]) == 1.0


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_perturb_bitwise_over_all_patterns(target, dtype, adaptive):
    """p += ((p * p) * g) * s (adaptive) or g * s, each product rounded to the dtype; the backup is
    a bit copy."""
    p, g = all_patterns(dtype, 0), all_patterns(dtype, 1)
    s = torch.tensor(0.0371)
    r = lambda t: t.to(dtype).float()  # noqa: E731
    sv = s.to(dtype).float()
    e = r(r(r(p.float() * p.float()) * g.float()) * sv) if adaptive else r(g.float() * sv)
    want = (p.float() + e).to(dtype)
    P, B = [p.clone()], [torch.full_like(p, float("nan"))]
    ops(target)("sam_perturb_")(P, [g], B, s, [adaptive])
    assert torch.equal(as_bits(B[0]), as_bits(p))
    ok = same(P[0], want)
    assert bool(ok.all()), f"{int((~ok).sum())} differ"


@_needs_cpp
@pytest.mark.skipif(os.environ.get("SAQ_CPU_NO_F16C") is not None, reason="this is the inner run")
def test_both_fp16_paths():
    """The fp16 tiles convert with F16C where the CPU has it, else with c10's conversion; run this
    file's bitwise tests and the cpp backend's parity tests (quantizers included) again with
    SAQ_CPU_NO_F16C=1 (the fallback) in a fresh process."""
    env = dict(os.environ, SAQ_CPU_NO_F16C="1")
    run = run_pytest(__file__, Path(__file__).with_name("test_cpp_backend.py"), env=env,
                     k="not both_fp16 and not triton", timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
def test_inline_bf16_conversions_match_c10_exhaustively(tmp_path):
    """Every fp32 -> bf16 and bf16 -> fp32 conversion of the kernels equals c10's, NaNs included."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = os.environ.get("CXX", "g++")
    exe = tmp_path / "lowp_conversions"
    libdir = library_paths()[0]
    cmd = [cxx, "-O2", "-std=c++20", "-ffp-contract=off", "-DSAQ_NO_TARGET_CLONES",
           f"-I{ROOT / 'csrc'}", *(f"-I{p}" for p in include_paths()),
           str(ROOT / "tests" / "kernels" / "cpp" / "lowp_conversions.cpp"), "-o", str(exe),
           f"-L{libdir}", "-lc10", f"-Wl,-rpath,{libdir}"]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout
    assert "mismatches: fp32->bf16 0, bf16->fp32 0" in run.stdout
