"""Triton kernels of ``saq::liq_quantize`` and ``saq::liq_quantize_backward`` (saq_kernels/OPS.md).

Forward, one pass over x (read x and e once, write y once), fp32 math, fp32 / fp16 / bf16 in and
out; the clip, the perturbation scale and the standardization statistics are read from device
memory (no host sync). Weight standardization runs two small extra launches first:

1. ``_liq_quantize_stats_kernel``: each program loads one block, and writes its sum and its
   sum of squared deviations from the *block* mean (two passes over registers, so no
   ``E[x^2] - E[x]^2`` cancellation);
2. ``_liq_quantize_stats_finalize_kernel`` (one program): merges the block partials in a fixed
   order with Chan's formula ``M2 = sum(M2_b) + sum(n_b * (mean_b - mean)^2)`` and writes
   ``[mean, std]`` (unbiased) to a 2-float device buffer;

then the quantize pass takes that buffer as a pointer. The backward recomputes the statistics the
same way (they are constants of the backward, as in the reference) and writes dx plus one partial
sum of the clip gradient per program, finished by ``torch.sum`` (fixed order: deterministic).

Numerics follow saq_kernels/reference.py op for op: ``r = x / c`` (correctly rounded division,
``tl.div_rn``), clamp, ``round_half_even``, ``k * fp32(1/n)``: the reference pins the level
mapping to the reciprocal form on every device (it is what ATen computes for the SAQ reference
code's ``round(v * n) / n`` on CUDA), so outputs are bitwise equal to the reference everywhere.
The clip gradient's per-element term takes ``y / c`` as the level ``y`` is ``c`` times (one
division less per element; the sum is tolerance-tested against float64 like every reduction).
The statistics are summed in a different order from ``torch.mean`` / ``torch.std``, so a value
lying within an ulp of a rounding boundary can land one level apart (tested: rare, one level).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (
    BLOCK,
    cdiv,
    clamp_keep_nan,
    launch_options,
    load_f32,
    masked_sum,
    needs_int64,
    round_half_even,
    splat,
    to_dtype,
)

__all__ = ["liq_quantize", "liq_quantize_backward", "liq_quantize_fwd", "liq_quantize_bwd"]


@triton.jit
def _load_input(x_ptr, e_ptr, s_ptr, offs, mask, HAS_E: tl.constexpr, BEFORE: tl.constexpr):
    """(fp32 quantizer input, fp32 s*e): x, or x + s*e formed in fp32 for Case 2."""
    xf = load_f32(x_ptr + offs, mask, 0.0)
    se = tl.zeros_like(xf)
    if HAS_E:
        se = tl.load(s_ptr).to(tl.float32) * load_f32(e_ptr + offs, mask, 0.0)
        if BEFORE:
            xf = xf + se
    return xf, se


@triton.jit
def _liq_math(xs, c, n_levels, inv_n, SIGNED: tl.constexpr):
    """(level, r) of the LIQ quantizer for standardized fp32 input xs and clip magnitude c:
    r = xs / c, and the output in units of c (y = level * c)."""
    r = tl.div_rn(xs, c)
    if SIGNED:
        v = (clamp_keep_nan(r, -1.0, 1.0) + 1.0) * 0.5  # == / 2.0 (exact either way)
    else:
        v = clamp_keep_nan(r, 0.0, 1.0)
    k = round_half_even(v * n_levels)
    u = k * inv_n
    if SIGNED:
        u = u * 2.0 - 1.0
    return u, r


@triton.jit
def _liq_quantize_stats_kernel(
    x_ptr, e_ptr, s_ptr, part_ptr, N, P,
    HAS_E: tl.constexpr, BEFORE: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    xf, se = _load_input(x_ptr, e_ptr, s_ptr, offs, mask, HAS_E, BEFORE)
    xf = tl.where(mask, xf, 0.0)
    bsum = tl.sum(xf, axis=0)
    cnt = tl.minimum(N - pid * BLOCK, BLOCK).to(tl.float32)
    bmean = tl.div_rn(bsum, cnt)
    d = tl.where(mask, xf - bmean, 0.0)
    tl.store(part_ptr + pid, bsum)
    tl.store(part_ptr + P + pid, tl.sum(d * d, axis=0))


@triton.jit
def _liq_quantize_stats_finalize_kernel(
    part_ptr, stats_ptr, N, P, STAT_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        idx = start + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + idx, mask=idx < P, other=0.0)
    nf = N + 0.0  # fp32 (also when Triton specializes N == 1 to a constant)
    mean = tl.div_rn(tl.sum(acc, axis=0), nf)
    acc2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        idx = start + tl.arange(0, BLOCK_P)
        m = idx < P
        bsum = tl.load(part_ptr + idx, mask=m, other=0.0)
        m2 = tl.load(part_ptr + P + idx, mask=m, other=0.0)
        cnt = tl.maximum(tl.minimum(N - idx.to(tl.int64) * STAT_BLOCK, STAT_BLOCK), 1).to(tl.float32)
        dm = tl.div_rn(bsum, cnt) - mean
        acc2 += tl.where(m, m2 + cnt * dm * dm, 0.0)
    var = tl.div_rn(tl.sum(acc2, axis=0), nf - 1.0)
    tl.store(stats_ptr, mean)
    tl.store(stats_ptr + 1, tl.sqrt_rn(var))


@triton.jit
def _liq_quantize_fwd_block(
    x_ptr, e_ptr, s_ptr, clip_ptr, stats_ptr, y_ptr, offs, mask, n_levels, inv_n,
    SIGNED: tl.constexpr, STANDARDIZE: tl.constexpr, HAS_E: tl.constexpr, BEFORE: tl.constexpr,
):
    xf, se = _load_input(x_ptr, e_ptr, s_ptr, offs, mask, HAS_E, BEFORE)
    if STANDARDIZE:
        xf = tl.div_rn(xf - tl.load(stats_ptr), splat(xf, tl.load(stats_ptr + 1)))
    c = tl.abs(tl.load(clip_ptr).to(tl.float32))
    level, r = _liq_math(xf, c, n_levels, inv_n, SIGNED)
    y = level * c
    if HAS_E:
        if not BEFORE:
            y = y + se
    tl.store(y_ptr + offs, to_dtype(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _liq_quantize_fwd_kernel(
    x_ptr, e_ptr, s_ptr, clip_ptr, stats_ptr, y_ptr, N, n_levels, inv_n,
    SIGNED: tl.constexpr, STANDARDIZE: tl.constexpr, HAS_E: tl.constexpr, BEFORE: tl.constexpr,
    IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= N:  # full block: unmasked, vectorized
        _liq_quantize_fwd_block(x_ptr, e_ptr, s_ptr, clip_ptr, stats_ptr, y_ptr, offs, None,
                                n_levels, inv_n, SIGNED, STANDARDIZE, HAS_E, BEFORE)
    else:
        _liq_quantize_fwd_block(x_ptr, e_ptr, s_ptr, clip_ptr, stats_ptr, y_ptr, offs, offs < N,
                                n_levels, inv_n, SIGNED, STANDARDIZE, HAS_E, BEFORE)


@triton.jit
def _liq_quantize_bwd_block(
    g_ptr, x_ptr, e_ptr, s_ptr, clip_ptr, stats_ptr, dx_ptr, offs, mask, n_levels, inv_n,
    SIGNED: tl.constexpr, STANDARDIZE: tl.constexpr, HAS_E: tl.constexpr, BEFORE: tl.constexpr,
    RELU: tl.constexpr,
):
    """Writes dx for the block and returns its partial sum of the clip gradient."""
    xf, se = _load_input(x_ptr, e_ptr, s_ptr, offs, mask, HAS_E, BEFORE)
    g = load_f32(g_ptr + offs, mask, 0.0)
    std = splat(xf, 1.0)
    if STANDARDIZE:
        std = splat(xf, tl.load(stats_ptr + 1))
        xf = tl.div_rn(xf - tl.load(stats_ptr), std)
    c = tl.abs(tl.load(clip_ptr).to(tl.float32))
    level, r = _liq_math(xf, c, n_levels, inv_n, SIGNED)
    if SIGNED:
        inside = (r >= -1.0) & (r <= 1.0)
    elif RELU:  # absorbed ReLU: open lower end, relu'(x) = (x > 0)
        inside = (xf > 0.0) & (r <= 1.0)
    else:
        inside = (r >= 0.0) & (r <= 1.0)
    dx = tl.where(inside, g, 0.0)
    if STANDARDIZE:
        dx = tl.div_rn(dx, std)
    tl.store(dx_ptr + offs, to_dtype(dx, dx_ptr.dtype.element_ty), mask=mask)
    # y / c taken as the level itself: one division less per element (csrc/common/saq_math.h)
    local = level - tl.where(inside, r, 0.0)
    return masked_sum(g * local, mask)


@triton.jit
def _liq_quantize_bwd_kernel(
    g_ptr, x_ptr, e_ptr, s_ptr, clip_ptr, stats_ptr, dx_ptr, part_ptr, N, n_levels, inv_n,
    SIGNED: tl.constexpr, STANDARDIZE: tl.constexpr, HAS_E: tl.constexpr, BEFORE: tl.constexpr,
    RELU: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= N:  # full block: unmasked, vectorized
        part = _liq_quantize_bwd_block(g_ptr, x_ptr, e_ptr, s_ptr, clip_ptr, stats_ptr, dx_ptr,
                                       offs, None, n_levels, inv_n, SIGNED, STANDARDIZE, HAS_E,
                                       BEFORE, RELU)
    else:
        part = _liq_quantize_bwd_block(g_ptr, x_ptr, e_ptr, s_ptr, clip_ptr, stats_ptr, dx_ptr,
                                       offs, offs < N, n_levels, inv_n, SIGNED, STANDARDIZE, HAS_E,
                                       BEFORE, RELU)
    tl.store(part_ptr + pid, part)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
_FINALIZE_BLOCK = 1024  # partials per iteration of the one-program finalize (N / 1024 partials)


@functools.lru_cache(maxsize=None)
def _levels(bits: int) -> Tuple[float, float]:
    """(n, fp32(1/n)) for a bit width; see the module docstring."""
    n = float(2**bits - 1)
    inv_n = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(n, dtype=torch.float32))
    return n, inv_n


def _inputs(x, clip, perturbation, perturb_scale):
    xc = x.contiguous()
    e = perturbation.contiguous() if perturbation is not None else xc
    c = clip.float().reshape(())
    s = perturb_scale.float().reshape(()) if perturb_scale is not None else c
    return xc, e, s, c


def liq_quantize_stats(xc: Tensor, e: Tensor, s: Tensor, perturbed: bool) -> Tensor:
    """``[mean, std]`` (fp32, unbiased std, on x's device) of x, or of x + s*e when ``perturbed``."""
    n = xc.numel()
    p = cdiv(n, BLOCK)
    part = torch.empty(2 * p, dtype=torch.float32, device=xc.device)
    stats = torch.empty(2, dtype=torch.float32, device=xc.device)
    opts = launch_options()
    _liq_quantize_stats_kernel[(p,)](
        xc, e, s, part, n, p, HAS_E=perturbed, BEFORE=perturbed, IDX64=needs_int64(n),
        BLOCK=BLOCK, **opts,
    )
    _liq_quantize_stats_finalize_kernel[(1,)](
        part, stats, n, p, STAT_BLOCK=BLOCK, BLOCK_P=_FINALIZE_BLOCK, **opts,
    )
    return stats


def liq_quantize_fwd(
    x: Tensor,
    clip: Tensor,
    bits: int,
    signed: bool,
    standardize: bool,
    perturbation: Optional[Tensor],
    perturb_scale: Optional[Tensor],
    perturb_before: bool,
) -> Tensor:
    """Launch the LIQ forward (and the statistics kernels when ``standardize``).

    Returns a contiguous tensor of x's shape and dtype. Reads x (twice when standardizing).
    """
    xc, e, s, c = _inputs(x, clip, perturbation, perturb_scale)
    y = torch.empty_like(xc)
    n = xc.numel()
    if n == 0:
        return y
    has_e = perturbation is not None
    before = has_e and bool(perturb_before)
    stats = liq_quantize_stats(xc, e, s, before) if standardize else c
    n_levels, inv_n = _levels(int(bits))
    _liq_quantize_fwd_kernel[(cdiv(n, BLOCK),)](
        xc, e, s, c, stats, y, n, n_levels, inv_n,
        SIGNED=bool(signed), STANDARDIZE=bool(standardize), HAS_E=has_e, BEFORE=before,
        IDX64=needs_int64(n), BLOCK=BLOCK, **launch_options(),
    )
    return y


def liq_quantize_bwd(
    grad: Tensor,
    x: Tensor,
    clip: Tensor,
    bits: int,
    signed: bool,
    standardize: bool,
    perturbation: Optional[Tensor],
    perturb_scale: Optional[Tensor],
    perturb_before: bool,
    relu: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Launch the LIQ backward; returns ``(dx [x.dtype, contiguous], dclip [fp32, clip's shape])``.
    ``relu`` (unsigned only): the quantizer absorbs a ReLU before it (dx = 0 where x <= 0)."""
    xc, e, s, c = _inputs(x, clip, perturbation, perturb_scale)
    gc = grad.contiguous()
    dx = torch.empty_like(xc)
    n = xc.numel()
    if n == 0:
        return dx, torch.zeros(clip.shape, dtype=torch.float32, device=x.device)
    has_e = perturbation is not None
    before = has_e and bool(perturb_before)
    stats = liq_quantize_stats(xc, e, s, before) if standardize else c
    n_levels, inv_n = _levels(int(bits))
    p = cdiv(n, BLOCK)
    part = torch.empty(p, dtype=torch.float32, device=x.device)
    _liq_quantize_bwd_kernel[(p,)](
        gc, xc, e, s, c, stats, dx, part, n, n_levels, inv_n,
        SIGNED=bool(signed), STANDARDIZE=bool(standardize), HAS_E=has_e, BEFORE=before,
        RELU=bool(relu) and not signed, IDX64=needs_int64(n), BLOCK=BLOCK, **launch_options(),
    )
    dclip = part.sum() * torch.sign(c)
    return dx, dclip.reshape(clip.shape)


def liq_quantize(x, clip, bits, signed, standardize, perturbation, perturb_scale, perturb_before):
    """``saq::liq_quantize`` on the Triton backend (positional signature of saq_kernels/OPS.md)."""
    return liq_quantize_fwd(x, clip, bits, signed, standardize, perturbation, perturb_scale,
                            perturb_before)


def liq_quantize_backward(grad, x, clip, bits, signed, standardize, perturbation, perturb_scale,
                          perturb_before, relu=False):
    """``saq::liq_quantize_backward`` on the Triton backend (positional signature of saq_kernels/OPS.md)."""
    return liq_quantize_bwd(grad, x, clip, bits, signed, standardize, perturbation, perturb_scale,
                            perturb_before, relu)
