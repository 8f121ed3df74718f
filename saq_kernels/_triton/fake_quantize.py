"""Triton kernels of ``saq::fake_quantize`` and ``saq::fake_quantize_backward`` (saq_kernels/OPS.md).

Forward, one pass: read x (and the perturbation e when given) once, write y once; fp32 math for
fp32 / fp16 / bf16 inputs. Scale, zero point and the perturbation scale are read from device
memory inside the kernel (no ``.item()``: CUDA-graph capturable). Per tensor or per channel on any
axis: the tensor is viewed as ``[outer, C, inner]`` (contiguous layout) and an element's channel is
``(offset // inner) % C``. Non-contiguous inputs (channels-last, slices) are first made contiguous
(one extra copy); the outputs are contiguous, as the op's fake declares. Every program but the
last sees a full block and loads it unmasked, so accesses vectorize whatever the size.

Backward, one pass: writes dx and reduces the scale / zero-point gradients inside the kernel.
Each program owns a ``[BLOCK_C channels, BLOCK_K elements]`` tile walking its channels'
elements; it accumulates the per-channel terms in registers and writes one partial sum per
(program, channel) into a ``[2, programs, C]`` buffer, which a ``torch.sum`` over the program axis
finishes. Block sizes and the program count depend only on the shape, so the result is
deterministic (no atomics), and no intermediate tensor the size of x exists.

Numerics mirror saq_kernels/reference.py op for op: ``inv = 1/scale`` (correctly rounded,
``tl.div_rn``), ``xq = round_half_even(x * inv) + zp``, clamp, ``(q - zp) * scale``; the
perturbation ``x + s*e`` (before) or ``y + s*e`` (after) rounds after the multiply (no FMA:
``launch_options``). ``round_half_even`` is exact for every fp32 input (huge, infinite, NaN),
so no pre-clamp of ``x * inv`` is needed: the codes, and the inside / below / above masks of the
backward, are the reference's.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (
    BLOCK,
    MAX_PROGRAMS,
    cdiv,
    clamp_keep_nan,
    launch_options,
    load_f32,
    needs_int64,
    next_pow2,
    round_half_even,
    splat,
    to_dtype,
)

__all__ = ["fake_quantize", "fake_quantize_backward", "fake_quantize_fwd", "fake_quantize_bwd"]


@triton.jit
def _fake_quantize_fwd_block(
    x_ptr, e_ptr, s_ptr, scale_ptr, zp_ptr, y_ptr, offs, mask, C, inner, qmin, qmax,
    PER_CHANNEL: tl.constexpr, OUTER: tl.constexpr, HAS_E: tl.constexpr, BEFORE: tl.constexpr,
    RELU: tl.constexpr,
):
    xf = load_f32(x_ptr + offs, mask, 0.0)
    if RELU:  # Q(relu(x)); NaN stays NaN, as with torch.relu
        xf = tl.where(xf < 0.0, 0.0, xf)
    se = tl.zeros_like(xf)
    if HAS_E:
        se = tl.load(s_ptr).to(tl.float32) * load_f32(e_ptr + offs, mask, 0.0)
        if BEFORE:
            xf = xf + se
    if PER_CHANNEL:
        if OUTER:
            ch = (offs // inner) % C
        else:
            ch = offs // inner
        scale = load_f32(scale_ptr + ch, mask, 1.0)
        zp = load_f32(zp_ptr + ch, mask, 0.0)
    else:
        scale = tl.load(scale_ptr)
        zp = tl.load(zp_ptr)
    zp = clamp_keep_nan(round_half_even(zp), qmin, qmax)
    inv = tl.div_rn(splat(scale, 1.0), scale)
    xq = round_half_even(xf * inv) + zp
    y = (clamp_keep_nan(xq, qmin, qmax) - zp) * scale
    if HAS_E:
        if not BEFORE:
            y = y + se
    tl.store(y_ptr + offs, to_dtype(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quantize_fwd_kernel(
    x_ptr, e_ptr, s_ptr, scale_ptr, zp_ptr, y_ptr,
    N, C, inner, qmin, qmax,
    PER_CHANNEL: tl.constexpr, OUTER: tl.constexpr, HAS_E: tl.constexpr, BEFORE: tl.constexpr,
    RELU: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= N:  # full block: unmasked, vectorized
        _fake_quantize_fwd_block(x_ptr, e_ptr, s_ptr, scale_ptr, zp_ptr, y_ptr, offs, None, C,
                                 inner, qmin, qmax, PER_CHANNEL, OUTER, HAS_E, BEFORE, RELU)
    else:
        _fake_quantize_fwd_block(x_ptr, e_ptr, s_ptr, scale_ptr, zp_ptr, y_ptr, offs, offs < N, C,
                                 inner, qmin, qmax, PER_CHANNEL, OUTER, HAS_E, BEFORE, RELU)


@triton.jit
def _fake_quantize_bwd_kernel(
    g_ptr, x_ptr, e_ptr, s_ptr, scale_ptr, zp_ptr, dx_ptr, part_ptr,
    K, C, inner, n_iter, qmin, qmax, grad_factor,
    OUTER: tl.constexpr, HAS_E: tl.constexpr, BEFORE: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, RELU: tl.constexpr = False,
):
    # x viewed as [outer, C, inner]; k runs over the outer*inner elements of one channel.
    # Channel tiles on grid axis 0 (up to 2^31 - 1 programs: a weight may have more than 65535
    # output channels), k programs on axis 1 (at most 65535, see _bwd_grid).
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    nprog = tl.num_programs(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    scale = tl.load(scale_ptr + cs, mask=cmask, other=1.0)
    zp = clamp_keep_nan(round_half_even(tl.load(zp_ptr + cs, mask=cmask, other=0.0)), qmin, qmax)
    inv = tl.div_rn(splat(scale, 1.0), scale)
    scale2 = scale[:, None]
    zp2 = zp[:, None]
    inv2 = inv[:, None]
    crow = cs[:, None]
    if IDX64:
        crow = crow.to(tl.int64)
    s = 0.0
    if HAS_E:
        s = tl.load(s_ptr).to(tl.float32)
    acc_s = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)
    for it in range(0, n_iter):
        tile = pid_k + it * nprog
        if IDX64:
            tile = tile.to(tl.int64)
        ks = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < K
        if OUTER:
            o = ks // inner
            i = ks - o * inner
            off = (o * C)[None, :] * inner + crow * inner + i[None, :]
        else:
            off = crow * inner + ks[None, :]
        m = cmask[:, None] & kmask[None, :]
        g = load_f32(g_ptr + off, m, 0.0)
        xf = load_f32(x_ptr + off, m, 0.0)
        if HAS_E:
            if BEFORE:
                xf = xf + s * load_f32(e_ptr + off, m, 0.0)
        x_in = xf
        if RELU:  # the terms of Q(relu(x))
            xf = tl.where(xf < 0.0, 0.0, xf)
        xq = round_half_even(xf * inv2) + zp2
        below = xq < qmin
        above = xq > qmax
        inside = (below | above) == 0
        if RELU:  # relu'(x) = (x > 0) gates dx (x = 0 and NaN pass none)
            dxv = tl.where(inside & (x_in > 0.0), g, 0.0)
        else:
            dxv = tl.where(inside, g, 0.0)
        tl.store(dx_ptr + off, to_dtype(dxv, dx_ptr.dtype.element_ty), mask=m)
        xfq = (clamp_keep_nan(xq, qmin, qmax) - zp2) * scale2
        ds_in = g * (xfq - xf) * inv2
        ds_out = tl.where(below, g * (qmin - zp2), g * (qmax - zp2))
        ds = tl.where(inside, ds_in, ds_out) * grad_factor
        dz = tl.where(inside, 0.0, -g * scale2 * grad_factor)
        acc_s += tl.where(m, ds, 0.0)
        acc_z += tl.where(m, dz, 0.0)
    tl.store(part_ptr + pid_k * C + cs, tl.sum(acc_s, axis=1), mask=cmask)
    tl.store(part_ptr + (nprog + pid_k) * C + cs, tl.sum(acc_z, axis=1), mask=cmask)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _layout(x: Tensor, axis: Optional[int]) -> Tuple[int, int, int]:
    """(outer, C, inner) of x viewed around the channel axis; per tensor is (1, 1, numel)."""
    if axis is None:
        return 1, 1, x.numel()
    ax = axis % x.dim()
    outer = 1
    for d in x.shape[:ax]:
        outer *= d
    inner = 1
    for d in x.shape[ax + 1:]:
        inner *= d
    return outer, x.shape[ax], inner


def _bwd_tile(C: int, inner: int, K: int) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_K) with BLOCK_C * BLOCK_K <= BLOCK.

    Per tensor, or channels with long contiguous runs (inner >= 32): the tile follows the
    contiguous k axis. Short runs (inner < 32, e.g. the last axis, inner == 1): the tile spans up
    to 64 neighbouring channels so a warp still reads consecutive addresses.
    """
    if C == 1 or inner >= 32:
        bk = min(next_pow2(K), BLOCK)
        return min(next_pow2(C), max(1, BLOCK // bk)), bk
    bc = min(next_pow2(C), 64)
    return bc, min(next_pow2(K), max(1, BLOCK // bc))


GRID_Y_MAX = 65535  # CUDA's limit on the second grid dimension


def _bwd_grid(C: int, inner: int, K: int) -> Tuple[Tuple[int, int], int, int, int]:
    """((channel tiles, k programs), BLOCK_C, BLOCK_K, tiles per k program) of the backward.

    The k programs of one channel tile share its K elements (a grid-stride loop of n_iter tiles
    each); their count is capped so that all of them hold at most MAX_PROGRAMS partial sums per
    channel and fits CUDA's second grid dimension.
    """
    bc, bk = _bwd_tile(C, inner, K)
    n_c = cdiv(C, bc)
    tiles = cdiv(K, bk)
    grid_k = max(1, min(tiles, MAX_PROGRAMS // n_c, GRID_Y_MAX))
    return (n_c, grid_k), bc, bk, cdiv(tiles, grid_k)


def _prepare(x, scale, zero_point, perturbation, perturb_scale):
    xc = x.contiguous()
    e = perturbation.contiguous() if perturbation is not None else xc
    s = perturb_scale.float().reshape(()) if perturb_scale is not None else scale.float()
    return xc, scale.float().contiguous(), zero_point.float().contiguous(), e, s


def fake_quantize_fwd(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int],
    grad_factor: float,
    perturbation: Optional[Tensor],
    perturb_scale: Optional[Tensor],
    perturb_before: bool,
    relu: bool = False,
) -> Tensor:
    """Launch :func:`_fake_quantize_fwd_kernel`. Returns a contiguous tensor like x (x.dtype)."""
    xc, sc, zp, e, s = _prepare(x, scale, zero_point, perturbation, perturb_scale)
    y = torch.empty_like(xc)
    n = xc.numel()
    if n == 0:
        return y
    outer, C, inner = _layout(xc, axis)
    _fake_quantize_fwd_kernel[(cdiv(n, BLOCK),)](
        xc, e, s, sc, zp, y,
        n, C, inner, float(quant_min), float(quant_max),
        PER_CHANNEL=axis is not None, OUTER=outer > 1, HAS_E=perturbation is not None,
        BEFORE=bool(perturb_before), RELU=bool(relu), IDX64=needs_int64(n), BLOCK=BLOCK,
        **launch_options(),
    )
    return y


def fake_quantize_bwd(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int],
    grad_factor: float,
    perturbation: Optional[Tensor],
    perturb_scale: Optional[Tensor],
    perturb_before: bool,
    relu: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Launch :func:`_fake_quantize_bwd_kernel`; returns ``(dx [x.dtype], dscale, dzero_point)``.

    dscale / dzero_point are fp32 and shaped like scale / zero_point.
    """
    xc, sc, zp, e, s = _prepare(x, scale, zero_point, perturbation, perturb_scale)
    gc = grad.contiguous()
    dx = torch.empty_like(xc)
    outer, C, inner = _layout(xc, axis)
    K = outer * inner
    if xc.numel() == 0:
        z = torch.zeros(C, dtype=torch.float32, device=x.device)
        return dx, z.reshape(scale.shape), z.clone().reshape(zero_point.shape)
    grid, bc, bk, n_iter = _bwd_grid(C, inner, K)
    part = torch.empty((2, grid[1], C), dtype=torch.float32, device=x.device)
    _fake_quantize_bwd_kernel[grid](
        gc, xc, e, s, sc, zp, dx, part,
        K, C, inner, n_iter, float(quant_min), float(quant_max), float(grad_factor),
        OUTER=outer > 1, HAS_E=perturbation is not None, BEFORE=bool(perturb_before),
        IDX64=needs_int64(xc.numel()), BLOCK_C=bc, BLOCK_K=bk, RELU=bool(relu),
        **launch_options(),
    )
    # fixed order over the programs: deterministic. Two separate sums: the op's outputs may not
    # alias each other.
    ds = part[0].sum(dim=0).reshape(scale.shape)
    dz = part[1].sum(dim=0).reshape(zero_point.shape)
    return dx, ds, dz


def fake_quantize(x, scale, zero_point, quant_min, quant_max, axis, grad_factor,
                  perturbation, perturb_scale, perturb_before, relu=False):
    """``saq::fake_quantize`` on the Triton backend (positional signature of saq_kernels/OPS.md)."""
    return fake_quantize_fwd(x, scale, zero_point, quant_min, quant_max, axis, grad_factor,
                             perturbation, perturb_scale, perturb_before, relu)


def fake_quantize_backward(grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor,
                           perturbation, perturb_scale, perturb_before, relu=False):
    """``saq::fake_quantize_backward`` on the Triton backend (positional signature of saq_kernels/OPS.md)."""
    return fake_quantize_bwd(grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor,
                             perturbation, perturb_scale, perturb_before, relu)
