"""Multi-tensor Triton kernels of the SAM ops: grad_sq_norm, sam_perturb_, sam_restore_,
sam_restore_sgd_, sam_restore_adamw_ (saq_kernels/OPS.md).

One launch covers many tensors (apex's multi_tensor_apply idea). On the host, per call, the
tensors are grouped by dtype (a pointer's element type is a compile-time constant) and each group
gets an int64 *table* on the device::

    rows 0 .. L-1   data pointer of tensor t in each of the op's L tensor lists
    row  L          numel of tensor t
    row  L+1        per-tensor flag (``adaptive``; 0 when unused)
    then            block -> tensor index [B], block -> first element [B]

Program b of the single launch looks up its tensor and element range, casts the pointers
(``int64 -> pointer<dtype>``) and runs the elementwise math. Per-step scalars (scale, lr,
found_inf) are read from device memory, so nothing syncs with the host. Tables are cached by the
identity of the tensors (data pointers, sizes, flags; LRU of ``_CACHE_SIZE`` entries): a cache hit
costs no copy, a miss one pinned host-to-device copy. The key includes the current CUDA stream:
a table is copied and read on one stream, so a launch on another stream never reads a table whose
copy it is not ordered after, and an evicted table is freed on the stream that used it. While a
CUDA graph is being captured the per-tensor path below is used (see ``_use_table``); the first
eager call of each op variant on a GPU runs per tensor too, which loads the kernels a later
capture launches (Triton cannot load a kernel while a stream is capturing; see ``_launch``).

Two paths, one math (the same @triton.jit kernels, ``TABLE`` constexpr):

* ``TABLE=True``: one launch per dtype group (the GPU path, and CPU tensors under the
  interpreter, where the table holds host addresses the interpreter reads directly);
* ``TABLE=False``: one launch per tensor with ordinary tensor arguments. Used during CUDA-graph
  capture, under the interpreter with CUDA tensors (the interpreter copies each tensor argument to
  the host, so device addresses in a table would be meaningless), or when
  ``MODE = "per_tensor"`` (tests).

Both paths split the tensors into the same blocks in the same order, so ``grad_sq_norm``'s block
partials, and hence its fixed-order sum, are identical on both (deterministic, no atomics).

Exactness: ``sam_perturb_`` mirrors the reference's torch ops one by one in the parameter dtype
(``e = g*s`` or ``((p*p)*g)*s``, then ``p + e``), rounding to that dtype after each op, so params
and backups are bit-exact; ``sam_restore_`` is a copy. SGD / AdamW compute in fp32 and round once
(close to, and no less accurate than, the reference). Tensor tuples the kernels do not cover
(param / grad / state dtypes that differ, different strides or non-dense layouts, state on another
device, such as AdamW steps kept on the CPU) go through the reference loop for those indices.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference as _ref
from ..validate import check_one_device
from .utils import (
    BLOCK,
    cdiv,
    interpreting,
    launch_options,
    load_f32,
    load_raw,
    masked_sum,
    round_to,
    splat,
    tl_dtype,
    to_dtype,
    widen,
)

__all__ = [
    "grad_sq_norm",
    "sam_perturb_",
    "sam_restore_",
    "sam_restore_sgd_",
    "sam_restore_adamw_",
    "grad_sq_norm_fwd",
    "sam_perturb_fwd",
    "sam_restore_fwd",
    "sam_restore_sgd_fwd",
    "sam_restore_adamw_fwd",
    "MODE",
]

# "auto": table (single launch) unless interpreting CUDA tensors; "table"; "per_tensor".
MODE = "auto"
_CACHE_SIZE = 32
_FINALIZE_BLOCK = 1024


# ----------------------------------------------------------------------------------------------
# table helpers (device side)
# ----------------------------------------------------------------------------------------------
def _per_tensor_jit(fn):
    """triton.jit specialized only on the 16-byte alignment of the tensor arguments.

    A CUDA-graph capture runs the per-tensor path, and Triton cannot load a newly compiled kernel
    while a stream is capturing. Without value specialization of the integer arguments (sizes,
    offsets, flags: ``== 1`` / ``% 16``) or alignment specialization of the 0-dim scalar
    pointers (``*_ptr`` but the table), each op has one compiled kernel per set of constexprs and
    alignment pattern of its tensor arguments (``*_arg``), which the host can tell from the data
    pointers, so the eager calls before a capture load the kernels it will launch (``_launch``).
    The alignment stays specialized: it is what lets Triton use vector access on a kernel
    argument (``tl.multiple_of`` cannot mark one).
    """
    import inspect

    names = [n for n, prm in inspect.signature(fn).parameters.items()
             if prm.annotation is inspect.Parameter.empty or "constexpr" not in str(prm.annotation)]
    data = [n for n in names if n == "tab_ptr" or (n.endswith("_arg") and n not in ("n_arg", "flag_arg"))]
    scalar_ptrs = [n for n in names if n.endswith("_ptr") and n != "tab_ptr"]
    values = [n for n in names if n not in data and n not in scalar_ptrs]
    return triton.jit(fn, do_not_specialize=values, do_not_specialize_on_alignment=scalar_ptrs)


@triton.jit
def _mt_locate(tab_ptr, T, B, n_arg, flag_arg, L: tl.constexpr, TABLE: tl.constexpr,
               BLOCK: tl.constexpr):
    """(tensor index, first element, tensor numel, flag) of this program's block."""
    pid = tl.program_id(0)
    if TABLE:
        base = (L + 2) * T
        t = tl.load(tab_ptr + base + pid)
        start = tl.multiple_of(tl.load(tab_ptr + base + B + pid), BLOCK)
        n = tl.load(tab_ptr + L * T + t)
        flag = tl.load(tab_ptr + (L + 1) * T + t)
    else:
        t = pid * 0
        start = pid.to(tl.int64) * BLOCK
        n = n_arg + start * 0  # tensors even when Triton specializes an argument == 1
        flag = flag_arg + pid * 0
    return t, start, n, flag


@triton.jit
def _mt_ptr(tab_ptr, T, t, arg_ptr, J: tl.constexpr, DT: tl.constexpr, TABLE: tl.constexpr,
            ALIGNED: tl.constexpr):
    """Pointer to tensor t of list J: from the table, or the direct argument."""
    if TABLE:
        p = tl.load(tab_ptr + J * T + t).to(tl.pointer_type(DT))
        if ALIGNED:
            # every table pointer is 16-byte aligned (checked on the host): allows vector access
            p = tl.multiple_of(p, 16)
    else:
        p = arg_ptr  # Triton specializes a tensor argument on its 16-byte alignment
    return p


@triton.jit
def _and_mask(mask, go):
    if mask is None:
        return go
    else:
        return mask & go


@triton.jit
def _go(offs, found_ptr, HAS_FOUND: tl.constexpr):
    """Block of True, or of False when found_inf is set (restore only). A block, not a scalar:
    the 3.9 interpreter splats a scalar comparison as float32, which breaks ``mask & go``."""
    if HAS_FOUND:
        return (offs * 0.0 + tl.load(found_ptr).to(tl.float32)) == 0.0
    else:
        return offs >= 0


# ----------------------------------------------------------------------------------------------
# kernels: each program splits into a full block (unmasked loads: 16-byte vectors) or the tail
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grad_sq_norm_block(g_ptr, p_ptr, offs, mask, adaptive, eta):
    g = load_f32(g_ptr + offs, mask, 0.0)
    if adaptive != 0:
        g = g * (tl.abs(load_f32(p_ptr + offs, mask, 0.0)) + eta)
    return masked_sum(g * g, mask)


@_per_tensor_jit
def _grad_sq_norm_fwd_kernel(
    g_arg, p_arg, tab_ptr, T, B, n_arg, flag_arg, part_ptr, part_base, eta,
    G_DT: tl.constexpr, P_DT: tl.constexpr, TABLE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, start, n, adaptive = _mt_locate(tab_ptr, T, B, n_arg, flag_arg, 2, TABLE, BLOCK)
    g_ptr = _mt_ptr(tab_ptr, T, t, g_arg, 0, G_DT, TABLE, ALIGNED)
    p_ptr = _mt_ptr(tab_ptr, T, t, p_arg, 1, P_DT, TABLE, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        part = _grad_sq_norm_block(g_ptr, p_ptr, offs, None, adaptive, eta)
    else:
        part = _grad_sq_norm_block(g_ptr, p_ptr, offs, offs < n, adaptive, eta)
    tl.store(part_ptr + part_base + tl.program_id(0), part)


@_per_tensor_jit
def _grad_sq_norm_finalize_kernel(part_ptr, norm_ptr, found_ptr, P, BLOCK_P: tl.constexpr):
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        idx = start + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + idx, mask=idx < P, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(norm_ptr, total)
    # total - total is 0 for finite values, NaN for inf and NaN
    tl.store(found_ptr, tl.where(total - total == 0.0, 0.0, 1.0))


@triton.jit
def _sam_perturb_block(p_ptr, g_ptr, b_ptr, offs, mask, adaptive, s, DT: tl.constexpr):
    p_raw = load_raw(p_ptr + offs, mask)
    tl.store(b_ptr + offs, p_raw, mask=mask)
    p = widen(p_raw)
    g = load_f32(g_ptr + offs, mask, 0.0)
    # the reference's ops one by one, each rounded to the parameter dtype
    if adaptive != 0:
        e = round_to(round_to(round_to(p * p, DT) * g, DT) * s, DT)  # ((p*p)*g)*s
    else:
        e = round_to(g * s, DT)
    tl.store(p_ptr + offs, to_dtype(p + e, DT), mask=mask)


@_per_tensor_jit
def _sam_perturb_fwd_kernel(
    p_arg, g_arg, b_arg, tab_ptr, T, B, n_arg, flag_arg, scale_ptr,
    DT: tl.constexpr, TABLE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, n, adaptive = _mt_locate(tab_ptr, T, B, n_arg, flag_arg, 3, TABLE, BLOCK)
    p_ptr = _mt_ptr(tab_ptr, T, t, p_arg, 0, DT, TABLE, ALIGNED)
    g_ptr = _mt_ptr(tab_ptr, T, t, g_arg, 1, DT, TABLE, ALIGNED)
    b_ptr = _mt_ptr(tab_ptr, T, t, b_arg, 2, DT, TABLE, ALIGNED)
    s = round_to(tl.load(scale_ptr).to(tl.float32), DT)  # scale.to(p.dtype)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _sam_perturb_block(p_ptr, g_ptr, b_ptr, offs, None, adaptive, s, DT)
    else:
        _sam_perturb_block(p_ptr, g_ptr, b_ptr, offs, offs < n, adaptive, s, DT)


@_per_tensor_jit
def _sam_restore_fwd_kernel(
    p_arg, b_arg, tab_ptr, T, B, n_arg, flag_arg,
    DT: tl.constexpr, TABLE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, n, unused = _mt_locate(tab_ptr, T, B, n_arg, flag_arg, 2, TABLE, BLOCK)
    p_ptr = _mt_ptr(tab_ptr, T, t, p_arg, 0, DT, TABLE, ALIGNED)
    b_ptr = _mt_ptr(tab_ptr, T, t, b_arg, 1, DT, TABLE, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        tl.store(p_ptr + offs, tl.load(b_ptr + offs))
    else:
        mask = offs < n
        tl.store(p_ptr + offs, tl.load(b_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _sam_restore_sgd_block(
    p_ptr, b_ptr, g_ptr, m_ptr, offs, mask, lr, found_ptr, momentum, one_minus_dampening,
    weight_decay, DT: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, HAS_FOUND: tl.constexpr,
):
    # The reference's torch ops one by one, each rounded to the parameter dtype (round_to is
    # the identity for fp32), as the C++ and CUDA kernels do: in fp16 / bf16 the results then
    # follow torch.optim.SGD's, overflows and underflows included.
    restored = load_raw(b_ptr + offs, mask)
    p = widen(restored)
    d = load_f32(g_ptr + offs, mask, 0.0)
    go = _go(offs, found_ptr, HAS_FOUND)
    if HAS_WD:
        d = round_to(d + weight_decay * p, DT)  # g.add(p, alpha=wd): one op
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buf = d
        else:
            scaled = round_to(load_f32(m_ptr + offs, mask, 0.0) * momentum, DT)
            buf = round_to(scaled + one_minus_dampening * d, DT)
        tl.store(m_ptr + offs, to_dtype(buf, DT), mask=_and_mask(mask, go))
        if NESTEROV:
            d = round_to(d + momentum * buf, DT)
        else:
            d = buf
    new_p = p - round_to(lr * d, DT)
    tl.store(p_ptr + offs, tl.where(go, to_dtype(new_p, DT), restored), mask=mask)


@_per_tensor_jit
def _sam_restore_sgd_fwd_kernel(
    p_arg, b_arg, g_arg, m_arg, tab_ptr, T, B, n_arg, flag_arg, lr_ptr, found_ptr,
    momentum, one_minus_dampening, weight_decay,
    DT: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    FIRST_STEP: tl.constexpr, HAS_FOUND: tl.constexpr, TABLE: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, n, unused = _mt_locate(tab_ptr, T, B, n_arg, flag_arg, 4, TABLE, BLOCK)
    p_ptr = _mt_ptr(tab_ptr, T, t, p_arg, 0, DT, TABLE, ALIGNED)
    b_ptr = _mt_ptr(tab_ptr, T, t, b_arg, 1, DT, TABLE, ALIGNED)
    g_ptr = _mt_ptr(tab_ptr, T, t, g_arg, 2, DT, TABLE, ALIGNED)
    m_ptr = _mt_ptr(tab_ptr, T, t, m_arg, 3, DT, TABLE, ALIGNED)
    lr = round_to(tl.load(lr_ptr).to(tl.float32), DT)  # lr.to(p.dtype)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _sam_restore_sgd_block(p_ptr, b_ptr, g_ptr, m_ptr, offs, None, lr, found_ptr, momentum,
                               one_minus_dampening, weight_decay, DT, HAS_WD, HAS_MOMENTUM,
                               NESTEROV, FIRST_STEP, HAS_FOUND)
    else:
        _sam_restore_sgd_block(p_ptr, b_ptr, g_ptr, m_ptr, offs, offs < n, lr, found_ptr,
                               momentum, one_minus_dampening, weight_decay, DT, HAS_WD,
                               HAS_MOMENTUM, NESTEROV, FIRST_STEP, HAS_FOUND)


@triton.jit
def _pow_int64(base, n):
    """base ** n in fp64 for an integer-valued fp32 n in [0, 2^31): square-and-multiply."""
    k = n.to(tl.int32)
    acc = splat(base, 1.0)
    b = base
    for i in range(0, 31):
        acc = tl.where(((k >> i) & 1) != 0, acc * b, acc)
        b = b * b
    return acc


@triton.jit
def _sam_restore_adamw_block(
    p_ptr, b_ptr, g_ptr, m_ptr, v_ptr, offs, mask, decay, step_size, bc2_sqrt, found_ptr,
    one_minus_b1, one_minus_b2, beta2, eps, DT: tl.constexpr, HAS_FOUND: tl.constexpr,
):
    restored = load_raw(b_ptr + offs, mask)
    p = widen(restored)
    g = load_f32(g_ptr + offs, mask, 0.0)
    m = load_f32(m_ptr + offs, mask, 0.0)
    v = load_f32(v_ptr + offs, mask, 0.0)
    go = _go(offs, found_ptr, HAS_FOUND)
    # The reference's torch ops one by one, each rounded to the parameter dtype (identity for
    # fp32), as the C++ and CUDA kernels do; in fp16 an eps of 1e-8 then underflows as it does
    # in torch.optim.AdamW. decay, step_size and bc2_sqrt come rounded to the dtype.
    new_p = round_to(p * decay, DT)
    # torch.lerp(m, g, w), w = 1 - beta1 (the double rounded to fp32, as torch does)
    if one_minus_b1 < 0.5:
        m = round_to(m + one_minus_b1 * (g - m), DT)
    else:
        m = round_to(g - (g - m) * (1.0 - one_minus_b1), DT)
    v = round_to(round_to(v * beta2, DT) + one_minus_b2 * g * g, DT)
    root = round_to(tl.div_rn(round_to(tl.sqrt_rn(v), DT), splat(v, bc2_sqrt)), DT)
    denom = round_to(root + eps, DT)
    new_p = new_p - round_to(step_size * round_to(tl.div_rn(m, denom), DT), DT)
    keep = _and_mask(mask, go)
    tl.store(m_ptr + offs, to_dtype(m, DT), mask=keep)
    tl.store(v_ptr + offs, to_dtype(v, DT), mask=keep)
    tl.store(p_ptr + offs, tl.where(go, to_dtype(new_p, DT), restored), mask=mask)


@_per_tensor_jit
def _sam_restore_adamw_fwd_kernel(
    p_arg, b_arg, g_arg, m_arg, v_arg, st_arg, tab_ptr, T, B, n_arg, flag_arg, lr_ptr,
    found_ptr, b1_hi, b1_lo, b2_hi, b2_lo, one_minus_b1, one_minus_b2, beta2, eps, weight_decay,
    DT: tl.constexpr, HAS_FOUND: tl.constexpr, TABLE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, start, n, unused = _mt_locate(tab_ptr, T, B, n_arg, flag_arg, 6, TABLE, BLOCK)
    p_ptr = _mt_ptr(tab_ptr, T, t, p_arg, 0, DT, TABLE, ALIGNED)
    b_ptr = _mt_ptr(tab_ptr, T, t, b_arg, 1, DT, TABLE, ALIGNED)
    g_ptr = _mt_ptr(tab_ptr, T, t, g_arg, 2, DT, TABLE, ALIGNED)
    m_ptr = _mt_ptr(tab_ptr, T, t, m_arg, 3, DT, TABLE, ALIGNED)
    v_ptr = _mt_ptr(tab_ptr, T, t, v_arg, 4, DT, TABLE, ALIGNED)
    st_ptr = _mt_ptr(tab_ptr, T, t, st_arg, 5, tl.float32, TABLE, False)
    lr = round_to(tl.load(lr_ptr).to(tl.float32), DT)  # lr.to(p.dtype)
    # the step count is incremented by _sam_restore_adamw_steps_kernel after this launch
    step = tl.load(st_ptr) + 1.0
    # bias corrections 1 - beta^step in fp64 (betas passed as fp32 hi + lo pairs, ~48 bits),
    # then rounded to fp32: no less accurate than the reference's fp32 pow
    b1 = tl.cast(b1_hi, tl.float64) + tl.cast(b1_lo, tl.float64)
    b2 = tl.cast(b2_hi, tl.float64) + tl.cast(b2_lo, tl.float64)
    bc1 = (1.0 - _pow_int64(b1, step)).to(tl.float32)
    bc2 = (1.0 - _pow_int64(b2, step)).to(tl.float32)
    # the reference's 0-dim ops in the parameter dtype: 1 - lr*wd, (lr / bc1).to, sqrt(bc2).to
    decay = round_to(1.0 - round_to(lr * weight_decay, DT), DT)
    step_size = round_to(tl.div_rn(lr, bc1), DT)
    bc2_sqrt = round_to(tl.sqrt_rn(bc2), DT)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _sam_restore_adamw_block(p_ptr, b_ptr, g_ptr, m_ptr, v_ptr, offs, None, decay, step_size,
                                 bc2_sqrt, found_ptr, one_minus_b1, one_minus_b2, beta2, eps,
                                 DT, HAS_FOUND)
    else:
        _sam_restore_adamw_block(p_ptr, b_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n, decay,
                                 step_size, bc2_sqrt, found_ptr, one_minus_b1, one_minus_b2,
                                 beta2, eps, DT, HAS_FOUND)


@_per_tensor_jit
def _sam_restore_adamw_steps_kernel(
    st_arg, tab_ptr, T, found_ptr, HAS_FOUND: tl.constexpr, TABLE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """steps[t] += 1 for every tensor (unless found_inf), after the update kernel read them."""
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    if TABLE:
        mask = ts < T
        ptrs = tl.load(tab_ptr + 5 * T + ts, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    else:
        mask = ts < 1
        ptrs = st_arg + ts * 0
    mask = mask & _go(ts, found_ptr, HAS_FOUND)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + 1.0, mask=mask)


# ----------------------------------------------------------------------------------------------
# host side: grouping, tables, launches
# ----------------------------------------------------------------------------------------------
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Group:
    """Tensor indices sharing the kernel's compile-time dtypes, with their blocks and table."""

    __slots__ = ("idx", "dtypes", "numels", "block_base", "B", "table", "aligned", "each_aligned")

    def __init__(self, dtypes):
        self.idx: List[int] = []
        self.dtypes = dtypes
        self.numels: List[int] = []
        self.block_base: List[int] = []
        self.B = 0
        self.table: Optional[Tensor] = None
        self.aligned = False  # every data pointer of the group 16-byte aligned (table launch)
        self.each_aligned: frozenset = frozenset()  # the per-tensor launches' alignment patterns


_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
# ((id(kernel), device, constexprs), alignment pattern) of the per-tensor launches already made, i.e.
# kernels loaded; tracked on the device types below (a test adds "cpu")
_LOADED: set = set()
_LOAD_BEFORE_CAPTURE = ("cuda",)


def _use_table(device: torch.device) -> bool:
    if MODE == "per_tensor":
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # A table missing from the cache would need a host-to-device copy inside the capture,
        # and a cached one could be evicted (freed) while the graph still reads it: capture the
        # per-tensor launches instead (a replay costs no host work either way).
        return False
    if interpreting() and device.type != "cpu":
        if MODE == "table":
            raise RuntimeError(
                "saq Triton: MODE='table' cannot run CUDA tensors under TRITON_INTERPRET=1 "
                "(the interpreter copies tensor arguments to the host; table addresses stay on the GPU)"
            )
        return False
    return True


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel) exactly."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1),
                               key=lambda a: a[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _regular(tensors: Sequence[Tensor], device: torch.device, same_dtype: bool) -> bool:
    """Can the kernels treat these index-i tensors as one flat elementwise range each?"""
    first = tensors[0]
    for t in tensors:
        if t.device != device or t.dtype not in _KERNEL_DTYPES:
            return False
        if same_dtype and t.dtype != first.dtype:
            return False
        if t.numel() > 1 and (t.stride() != first.stride() or not _dense(t)):
            return False
    return True


def _table(grp: _Group, lists, flags, device, tag: str, state_lists: int) -> None:
    """The group's device table (cached by tensor identity; see the module docstring)."""
    ptrs = tuple(tuple(l[i].data_ptr() for i in grp.idx) for l in lists)
    gflags = tuple(flags[i] for i in grp.idx)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (tag, str(device), stream, ptrs, tuple(grp.numels), gflags)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
    else:
        counts = torch.tensor([cdiv(n, BLOCK) for n in grp.numels], dtype=torch.int64)
        first = torch.repeat_interleave(torch.tensor(grp.block_base, dtype=torch.int64), counts)
        rows = [torch.tensor(r, dtype=torch.int64) for r in ptrs]
        rows.append(torch.tensor(grp.numels, dtype=torch.int64))
        rows.append(torch.tensor(gflags, dtype=torch.int64))
        rows.append(torch.repeat_interleave(torch.arange(len(grp.idx), dtype=torch.int64), counts))
        rows.append((torch.arange(grp.B, dtype=torch.int64) - first) * BLOCK)
        host = torch.cat(rows)
        if device.type == "cuda":
            host = host.pin_memory()  # asynchronous copy; the cache entry keeps it alive
            dev = host.to(device, non_blocking=True)
        else:
            dev = host
        data_rows = ptrs[: len(ptrs) - state_lists]
        aligned = all(p % 16 == 0 for r in data_rows for p in r)
        each = frozenset(tuple(r[k] % 16 == 0 for r in ptrs)
                         for k in range(len(grp.idx)) if grp.numels[k])  # empty: no launch
        hit = (host, dev, aligned, each)
        _CACHE[key] = hit
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    grp.table, grp.aligned, grp.each_aligned = hit[1], hit[2], hit[3]


_NAMES = {
    "norm": ("grads", "params"), "perturb": ("params", "grads", "backups"),
    "restore": ("params", "backups"), "sgd": ("params", "backups", "grads", "momentum_buffers"),
    "adamw": ("params", "backups", "grads", "exp_avgs", "exp_avg_sqs", "steps"),
}
_OPS = {"norm": "grad_sq_norm", "perturb": "sam_perturb_", "restore": "sam_restore_",
        "sgd": "sam_restore_sgd_", "adamw": "sam_restore_adamw_"}


def _plan(lists, flags, device, tag: str, same_dtype: bool, table: bool, state_lists: int = 0):
    """Split the indices into kernel groups (by dtype) and the irregular rest (reference loop).

    The last ``state_lists`` lists hold 0-dim fp32 state (AdamW steps): checked for device and
    dtype only, and never used for the alignment hint.
    """
    groups: Dict[tuple, _Group] = {}
    rest: List[int] = []
    n_main = len(lists) - state_lists
    for i in range(len(lists[0])):
        ok = _regular([l[i] for l in lists[:n_main]], device, same_dtype)
        if not ok and any(l[i].device != device for l in lists[:n_main]):
            # a tensor on another device: refused by name, as the ops' fakes refuse it
            check_one_device(_OPS[tag], **dict(zip(_NAMES[tag], lists[:n_main])))
        ok = ok and all(l[i].device == device and l[i].dtype == torch.float32 and l[i].numel() == 1
                        for l in lists[n_main:])
        if not ok:
            rest.append(i)
            continue
        key = tuple(l[i].dtype for l in lists[:n_main])
        if key not in groups:
            groups[key] = _Group(key)
        groups[key].idx.append(i)
    for grp in groups.values():
        grp.numels = [lists[0][i].numel() for i in grp.idx]
        base = 0
        for n in grp.numels:
            grp.block_base.append(base)
            base += cdiv(n, BLOCK)
        grp.B = base
        if table:
            _table(grp, lists, flags, device, tag, state_lists)
    return list(groups.values()), rest


def _launch(kernel, grp: _Group, lists, table: bool, scalars, consts: dict, flags=None) -> bool:
    """One launch over the whole group (table path), or one launch per tensor; returns which.

    ``scalars``: the kernel's trailing runtime arguments, or a function of the position k inside
    the group (None for the table launch) returning them.

    On a GPU, a group whose per-tensor kernels (one per alignment pattern, see _per_tensor_jit)
    were never launched takes the per-tensor path once, eagerly: same results, and a CUDA-graph
    capture of the same op later launches only kernels already loaded.
    """
    opts = launch_options()
    dev = lists[0][grp.idx[0]].device if grp.idx else None
    if table and dev is not None and dev.type in _LOAD_BEFORE_CAPTURE:
        ck = (id(kernel), str(dev), tuple(sorted((k, str(v)) for k, v in consts.items())))
        if any((ck, a) not in _LOADED for a in grp.each_aligned):
            _LOADED.update((ck, a) for a in grp.each_aligned)
            table = False
    if table:
        if grp.B:
            sc = scalars(None) if callable(scalars) else scalars
            kernel[(grp.B,)](*([grp.table] * len(lists)), grp.table, len(grp.idx), grp.B, 0, 0,
                             *sc, TABLE=True, ALIGNED=grp.aligned, BLOCK=BLOCK, **consts, **opts)
        return True
    for k, i in enumerate(grp.idx):
        n = grp.numels[k]
        if n == 0:
            continue
        args = [l[i] for l in lists]
        sc = scalars(k) if callable(scalars) else scalars
        flag = flags[i] if flags is not None else 0
        kernel[(cdiv(n, BLOCK),)](*args, args[0], 1, 1, n, flag, *sc,
                                  TABLE=False, ALIGNED=False, BLOCK=BLOCK, **consts, **opts)
    return False


def _device_scalar(t: Optional[Tensor], device: torch.device, like: Tensor) -> Tensor:
    """A 0-dim fp32 tensor on ``device`` (``like`` stands in for None)."""
    if t is None:
        return like
    t = t.reshape(())
    if t.dtype != torch.float32 or t.device != device:
        t = t.to(device=device, dtype=torch.float32)
    return t


@functools.lru_cache(maxsize=64)
def _hi_lo(x: float) -> Tuple[float, float]:
    """x as an fp32 pair hi + lo (about 48 significant bits), to rebuild it in fp64 on the device."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def grad_sq_norm_fwd(grads: List[Tensor], params: List[Tensor], adaptive: List[bool],
                     eta: float) -> Tuple[Tensor, Tensor]:
    """``(norm_sq, found_inf)``: 0-dim fp32 tensors on the grads' device, no host sync.

    One launch per dtype group writes one fp32 partial per block; a one-program kernel sums them
    in block order and sets found_inf. Reads params only where ``adaptive``. Tensors of other
    dtypes are read through fp32 copies, pairs with different layouts through contiguous copies.
    """
    if len(grads) == 0:
        z = torch.zeros(())
        return z, z.clone()
    device = grads[0].device
    gs, ps = [], []
    flags = [int(bool(a)) for a in adaptive]
    for i, g in enumerate(grads):
        g = g if g.dtype in _KERNEL_DTYPES else g.float()
        if flags[i]:
            p = params[i] if params[i].dtype in _KERNEL_DTYPES else params[i].float()
            if not _regular([g, p], device, False):
                g, p = g.contiguous(), p.contiguous()
        else:
            g = g if _dense(g) else g.contiguous()
            p = g  # never read
        gs.append(g)
        ps.append(p)
    table = _use_table(device)
    groups, rest = _plan([gs, ps], flags, device, "norm", False, table)
    if rest:  # only a device mismatch makes a rest here, and _plan raised for it
        raise RuntimeError(f"saq::grad_sq_norm (triton): tensors {rest} cannot be read")
    total = sum(g.B for g in groups)
    part = (torch.empty if total else torch.zeros)(max(total, 1), dtype=torch.float32, device=device)
    base = 0
    for grp in groups:
        consts = dict(G_DT=tl_dtype(grp.dtypes[0]), P_DT=tl_dtype(grp.dtypes[1]))
        scalars = (lambda k, b=base, g=grp: (part, b if k is None else b + g.block_base[k], float(eta)))
        _launch(_grad_sq_norm_fwd_kernel, grp, [gs, ps], table, scalars, consts, flags)
        base += grp.B
    norm = torch.empty((), dtype=torch.float32, device=device)
    found = torch.empty((), dtype=torch.float32, device=device)
    _grad_sq_norm_finalize_kernel[(1,)](part, norm, found, max(total, 1),
                                        BLOCK_P=_FINALIZE_BLOCK, **launch_options())
    return norm, found


def sam_perturb_fwd(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                    scale: Tensor, adaptive: List[bool]) -> None:
    """``backups[i] = params[i]``, ``params[i] += e``; bit-exact to the reference.

    Mutates params and backups. ``scale``: 0-dim tensor on the params' device.
    """
    if not params:
        return
    device = params[0].device
    flags = [int(bool(a)) for a in adaptive]
    table = _use_table(device)
    lists = [params, grads, backups]
    groups, rest = _plan(lists, flags, device, "perturb", True, table)
    s = _device_scalar(scale, device, scale)
    for grp in groups:
        _launch(_sam_perturb_fwd_kernel, grp, lists, table, (s,),
                dict(DT=tl_dtype(grp.dtypes[0])), flags)
    if rest:
        _ref.sam_perturb_(*[[l[i] for i in rest] for l in lists], scale, [adaptive[i] for i in rest])


def sam_restore_fwd(params: List[Tensor], backups: List[Tensor]) -> None:
    """``params[i] = backups[i]``, bit-exact. Mutates params."""
    if not params:
        return
    device = params[0].device
    table = _use_table(device)
    lists = [params, backups]
    groups, rest = _plan(lists, [0] * len(params), device, "restore", True, table)
    for grp in groups:
        _launch(_sam_restore_fwd_kernel, grp, lists, table, (), dict(DT=tl_dtype(grp.dtypes[0])))
    if rest:
        _ref.sam_restore_(*[[l[i] for i in rest] for l in lists])


def _pad_backups(params: List[Tensor], backups: List[Tensor]) -> List[Tensor]:
    """The ops restore only ``params[:len(backups)]`` (saq_kernels/OPS.md). The kernels read the value
    to update from the backup pointer, so a parameter that is not restored uses itself as its
    "backup": the same one read per element, no extra traffic, one launch for the whole group."""
    return list(backups) + list(params[len(backups):])


def sam_restore_sgd_fwd(params, backups, grads, momentum_buffers, lr, momentum, dampening,
                        weight_decay, nesterov, first_step, found_inf) -> None:
    """Restore, then one ``torch.optim.SGD`` step in fp32 math, one launch per dtype group.

    Mutates params and (momentum != 0) momentum_buffers; a non-zero found_inf restores only.
    """
    if not params:
        return
    backups = _pad_backups(params, backups)
    device = params[0].device
    table = _use_table(device)
    has_m = momentum != 0
    lists = [params, backups, grads, momentum_buffers if has_m else grads]
    groups, rest = _plan(lists, [0] * len(params), device, "sgd", True, table)
    lr0 = _device_scalar(lr, device, lr)
    fi = _device_scalar(found_inf, device, lr0)
    scalars = (lr0, fi, float(momentum), float(1.0 - dampening), float(weight_decay))
    for grp in groups:
        _launch(_sam_restore_sgd_fwd_kernel, grp, lists, table, scalars,
                dict(DT=tl_dtype(grp.dtypes[0]), HAS_WD=weight_decay != 0, HAS_MOMENTUM=has_m,
                     NESTEROV=bool(nesterov), FIRST_STEP=bool(first_step),
                     HAS_FOUND=found_inf is not None))
    if rest:
        _ref.sam_restore_sgd_(*[[l[i] for i in rest] for l in (params, backups, grads, momentum_buffers)],
                              lr, momentum, dampening, weight_decay, nesterov, first_step, found_inf)


def sam_restore_adamw_fwd(params, backups, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1,
                          beta2, eps, weight_decay, found_inf) -> None:
    """Restore, then one ``torch.optim.AdamW`` step (fp32 math, fp64 bias corrections).

    Two launches per dtype group: the update, then the step counters (+1), so no program reads
    a counter another program already incremented. Mutates params, exp_avgs, exp_avg_sqs, steps;
    a non-zero found_inf restores only. Steps kept on another device (torch's non-capturable
    AdamW keeps them on the CPU) send those tensors through the reference loop.
    """
    if not params:
        return
    backups = _pad_backups(params, backups)
    device = params[0].device
    table = _use_table(device)
    lists = [params, backups, grads, exp_avgs, exp_avg_sqs, steps]
    groups, rest = _plan(lists, [0] * len(params), device, "adamw", True, table, state_lists=1)
    lr0 = _device_scalar(lr, device, lr)
    fi = _device_scalar(found_inf, device, lr0)
    has_found = found_inf is not None
    scalars = (lr0, fi, *_hi_lo(float(beta1)), *_hi_lo(float(beta2)), float(1.0 - beta1),
               float(1.0 - beta2), float(beta2), float(eps), float(weight_decay))
    opts = launch_options()
    for grp in groups:
        used_table = _launch(_sam_restore_adamw_fwd_kernel, grp, lists, table, scalars,
                             dict(DT=tl_dtype(grp.dtypes[0]), HAS_FOUND=has_found))
        if used_table:
            _sam_restore_adamw_steps_kernel[(cdiv(len(grp.idx), 128),)](
                grp.table, grp.table, len(grp.idx), fi, HAS_FOUND=has_found, TABLE=True,
                BLOCK_T=128, **opts)
        else:
            for i in grp.idx:
                _sam_restore_adamw_steps_kernel[(1,)](
                    steps[i], steps[i], 1, fi, HAS_FOUND=has_found, TABLE=False, BLOCK_T=1, **opts)
    if rest:
        _ref.sam_restore_adamw_(*[[l[i] for i in rest] for l in lists], lr, beta1, beta2, eps,
                                weight_decay, found_inf)


# The ops' positional signatures (saq_kernels/OPS.md).
def grad_sq_norm(grads, params, adaptive, eta):
    """``saq::grad_sq_norm`` on the Triton backend."""
    return grad_sq_norm_fwd(grads, params, adaptive, eta)


def sam_perturb_(params, grads, backups, scale, adaptive):
    """``saq::sam_perturb_`` on the Triton backend (mutates params and backups)."""
    sam_perturb_fwd(params, grads, backups, scale, adaptive)


def sam_restore_(params, backups):
    """``saq::sam_restore_`` on the Triton backend (mutates params)."""
    sam_restore_fwd(params, backups)


def sam_restore_sgd_(params, backups, grads, momentum_buffers, lr, momentum, dampening,
                     weight_decay, nesterov, first_step, found_inf):
    """``saq::sam_restore_sgd_`` on the Triton backend (mutates params, momentum_buffers)."""
    sam_restore_sgd_fwd(params, backups, grads, momentum_buffers, lr, momentum, dampening,
                        weight_decay, nesterov, first_step, found_inf)


def sam_restore_adamw_(params, backups, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2,
                       eps, weight_decay, found_inf):
    """``saq::sam_restore_adamw_`` on the Triton backend (mutates params, moments, steps)."""
    sam_restore_adamw_fwd(params, backups, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1,
                          beta2, eps, weight_decay, found_inf)
