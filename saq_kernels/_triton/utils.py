"""Shared pieces of the saq Triton kernels: exact rounding, clamping, launch constants.

Everything here must compile with Triton 3.6 (the GPU machines) and 3.9, and run under the CPU
interpreter (``TRITON_INTERPRET=1``), so only core ``triton.language`` is used: ``libdevice``
functions (``rint``, ``pow``) are extern calls the interpreter refuses.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _launch_constant(name: str, default: int, lo: int, hi: int) -> int:
    """``default``, or the environment variable ``name`` when set: a power of two in [lo, hi].
    Read once, at import: benchmarks/triton_sweep.py times each setting in a fresh process."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        v = 0
    if v < lo or v > hi or v & (v - 1):
        raise ValueError(f"saq Triton kernels: {name}={raw!r} is not a power of two in [{lo}, {hi}]; "
                         f"unset it for the default ({default})")
    return v


# Elementwise kernels: 1024 elements per program over 4 warps (128 threads) = 8 fp32 per thread,
# two 16-byte vector accesses in flight per operand, the usual point for memory-bound pointwise
# kernels (Inductor's pointwise XBLOCK=1024 / 4 warps). Measured on an H200
# (benchmarks/triton_sweep.py, each configuration in a fresh process; geometric mean of each
# configuration's time over the fastest's): fp32 at 2^26 and ResNet-50's SAM update, 2048x8
# 1.017x, 4096x8 1.037x, 1024x4 1.045x (benchmarks/results/triton_sweep-nvidia-h200.csv at
# d809b80); fp32 and bf16, 14 rows, 2048x8 1.026x, 2048x4 1.117x, 1024x4 1.220x (that file now),
# most of the gap in the host-bound SAM rows. The benchmark suite run with 2048x8 (2026-11-27,
# d477c7a; benchmarks/README.md, GPU) did not agree: fake_quantize's bf16 forward faster,
# liq_quantize's rows and most SAM rows slower, on a host about 2x slower than the first run's.
# Until the suite times both side by side, 1024x4 stays. SAQ_TRITON_BLOCK / SAQ_TRITON_NUM_WARPS
# override them.
BLOCK = _launch_constant("SAQ_TRITON_BLOCK", 1024, 128, 16384)
NUM_WARPS = _launch_constant("SAQ_TRITON_NUM_WARPS", 4, 1, 32)
# Reduction kernels (fake-quantize backward) cap their grid at this many programs and loop over
# the rest, so the partial-sum buffer stays small (<= MAX_PROGRAMS * C floats) while still
# giving each of an H100's 132 SMs several programs. Not swept yet (SAQ_TRITON_MAX_PROGRAMS); with
# it the fp32 backward ran at 1.09-1.14x a copy at 2^26 on the H200.
MAX_PROGRAMS = _launch_constant("SAQ_TRITON_MAX_PROGRAMS", 1024, 128, 65536)


def interpreting() -> bool:
    """True when the Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_options() -> dict:
    """Compile options for every launch.

    ``enable_fp_fusion=False``: the reference runs each multiply and add as its own torch kernel
    (separately rounded), so a fused multiply-add here (``x + s*e``, ``q*scale + s*e``) would move
    outputs by an ulp and break bitwise equality. The interpreter ignores these options.
    """
    return {"num_warps": NUM_WARPS, "enable_fp_fusion": False}


def needs_int64(n: int) -> bool:
    """Whether offsets up to ``n`` (plus a grid's worth of slack) overflow int32 indexing."""
    return n + BLOCK * MAX_PROGRAMS >= 2**31


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype of a torch floating dtype (for pointer casts in tables)."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(
            f"saq Triton kernels: unsupported dtype {dtype}; use float32, float16 or bfloat16"
        ) from None


@triton.jit
def round_half_even(v):
    """Round half to even, exactly like ``torch.round`` / ``nearbyint``, for every fp32 input.

    Built from ``floor`` because ``libdevice.rint`` is an extern call the interpreter cannot run
    and the magic-number trick ``(v + 1.5*2^23) - 1.5*2^23`` is only valid for |v| < 2^22.
    ``d = v - floor(v)`` is exact for all finite v (Sterbenz, and for -1 < v < 0 a rounded
    ``v + 1`` can only land on 0.5 or above, which still rounds the right way). Infinities and NaN
    pass through (``floor`` keeps them and the comparisons are false).
    """
    r = tl.floor(v)
    d = v - r
    half = r * 0.5
    odd = (half - tl.floor(half)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def clamp_keep_nan(v, lo, hi):
    """``torch.clamp`` semantics: NaN stays NaN (where-based, unlike PTX min/max)."""
    v = tl.where(v < lo, lo, v)
    return tl.where(v > hi, hi, v)


@triton.jit
def to_dtype(v, DT: tl.constexpr):
    """Cast fp32 ``v`` to ``DT`` rounding to nearest even, as torch's ``.to(dtype)`` does.

    bf16 is rounded by hand (c10::BFloat16's ``round_to_nearest_even``: add 0x7FFF plus the kept
    LSB, keep the high half, NaN -> 0x7FC0) because the Triton interpreter truncates fp32 -> bf16;
    on a GPU this is the same value ``cvt.rn.bf16.f32`` gives.
    """
    if DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


@triton.jit
def round_to(v, DT: tl.constexpr):
    """fp32 ``v`` rounded to ``DT`` and widened back to fp32 (one torch op's rounding in DT).

    bf16 is widened by its bits (:func:`widen`)."""
    if DT == tl.float32:
        return v
    else:
        return widen(to_dtype(v, DT))


@triton.jit
def widen(v):
    """fp16 / bf16 / fp32 ``v`` as fp32. bf16 by its bits (a 16-bit shift, exact, what the GPU's
    conversion does too): the interpreter's bf16 -> fp32 conversion gets bf16 subnormals wrong
    (0x804e, -7.16e-39, came out as -2.57e-39)."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def load_f32(ptrs, mask, other):
    """Load as fp32. ``mask`` None: a full block, loaded unmasked so the compiler can use 16-byte
    vector accesses (a mask built from a run-time size defeats them); else masked with ``other``.
    """
    if mask is None:
        return widen(tl.load(ptrs))
    else:
        return widen(tl.load(ptrs, mask=mask, other=other))


@triton.jit
def load_raw(ptrs, mask):
    """Load in the pointer's dtype (``mask`` None: unmasked, see :func:`load_f32`)."""
    if mask is None:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def splat(like, v):
    """A block shaped like ``like`` (fp32) filled with the scalar ``v``: what ``tl.div_rn``
    needs for a per-launch divisor. Not ``like * 0.0 + v``: that is NaN wherever ``like`` is
    infinite (an inf input, an overflowed optimizer state), where the reference divides by v."""
    return tl.zeros_like(like) + v


@triton.jit
def masked_sum(v, mask):
    """Sum of a block, masked-off lanes excluded (``mask`` None: every lane counts)."""
    if mask is None:
        return tl.sum(v, axis=0)
    else:
        return tl.sum(tl.where(mask, v, 0.0), axis=0)
