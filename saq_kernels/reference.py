"""Pure-PyTorch reference of every ``saq`` op: the spec, and the fallback on any device.

Every other backend (C++, CUDA, Triton) is tested against these functions. The numerics are
pinned here and described in saq_kernels/OPS.md:

* quantizer math in fp32 for fp32/fp16/bf16 inputs (float64 inputs compute in float64, so tests
  can check the SAQ step to float64 rounding); outputs cast back to the input dtype;
* rounding half to even (``torch.round``);
* fake_quantize multiplies by the reciprocal ``1/scale`` (as ATen's fake-quant kernels do);
  liq_quantize divides by the clip (as the SAQ reference code does).

Argument order is the op schema's (saq_kernels/OPS.md); all arguments are positional.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "fake_quantize",
    "fake_quantize_backward",
    "liq_quantize",
    "liq_quantize_backward",
    "grad_sq_norm",
    "sam_perturb_",
    "sam_restore_",
    "sam_restore_sgd_",
    "sam_restore_adamw_",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _cdt(x: Tensor) -> torch.dtype:
    """Compute dtype: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_view(t: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    """Reshape a per-tensor ([] / [1]) or per-channel ([C]) parameter to broadcast against x."""
    t = t.to(_cdt(x))
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


def _sum_like(t: Tensor, param: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    """Reduce an element-wise gradient to the parameter's shape (all elements or per channel)."""
    if axis is None:
        return t.sum().reshape(param.shape)
    ax = axis % x.dim()
    dims = [d for d in range(x.dim()) if d != ax]
    return (t.sum(dim=dims) if dims else t).reshape(param.shape)


def _perturbed_input(x: Tensor, e: Optional[Tensor], s: Optional[Tensor], before: bool) -> Tensor:
    """Compute-dtype input of the quantizer: x, or x + s*e for Case 2 (perturb before quantizing)."""
    cd = _cdt(x)
    xf = x.to(cd)
    if before and e is not None:
        xf = xf + s.to(cd) * e.to(cd)
    return xf


def _add_after(y: Tensor, e: Optional[Tensor], s: Optional[Tensor], before: bool) -> Tensor:
    """Cases 1 and 3: Q(x) + s*e, in the compute dtype."""
    if e is not None and not before:
        y = y + s.to(y.dtype) * e.to(y.dtype)
    return y


# ----------------------------------------------------------------------------------------------
# LSQ / LSQ+ affine fake quantization
# ----------------------------------------------------------------------------------------------
def _fq_codes(xf: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis):
    s = _channel_view(scale, xf, axis)
    zp = torch.clamp(torch.round(_channel_view(zero_point, xf, axis)), qmin, qmax)
    inv = 1.0 / s
    xq = torch.round(xf * inv) + zp  # not clamped yet: the backward needs "inside"
    return s, zp, inv, xq


def fake_quantize(
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
    """Affine fake quantization (LSQ / LSQ+), per tensor (``axis=None``) or per channel.

    ``zp = clamp(round(zero_point), qmin, qmax)``, ``q = clamp(round(x * (1/scale)) + zp, qmin, qmax)``,
    ``y = (q - zp) * scale``. With a perturbation ``e`` and a 0-dim scale ``s``: ``Q(x) + s*e``
    (Cases 1/3) or ``Q(x + s*e)`` (Case 2, ``perturb_before``).

    Shapes: x any; scale and zero_point ``[1]``/``[]`` or ``[C]`` with ``C = x.shape[axis]``.
    Returns a new contiguous tensor of x's shape and dtype. ``grad_factor`` only scales the
    backward.
    ``relu`` (never with a perturbation): ``Q(relu(x))``.
    """
    xf = _perturbed_input(x, perturbation, perturb_scale, perturb_before)
    if relu:
        xf = torch.relu(xf)
    s, zp, _, xq = _fq_codes(xf, scale, zero_point, quant_min, quant_max, axis)
    y = (torch.clamp(xq, quant_min, quant_max) - zp) * s
    # contiguous whatever x's layout, as every backend and the op's fake (torch.compile) say
    return _add_after(y, perturbation, perturb_scale, perturb_before).to(x.dtype).contiguous()


def fake_quantize_backward(
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
    """Gradients of :func:`fake_quantize` for x, scale and zero_point (LSQ+ formulas).

    With ``xq = round(x/scale) + zp`` unclamped and ``inside = qmin <= xq <= qmax``:
    ``dx = g * inside``;
    ``dscale = sum(g * ((clamp(xq) - zp) * scale - x) * (1/scale))`` inside, ``g * (qmin - zp)``
    below, ``g * (qmax - zp)`` above, times ``grad_factor``;
    ``dzp = sum(-g * scale * grad_factor)`` outside, 0 inside. Sums over all elements (per
    tensor) or all but ``axis`` (per channel). Returns ``(dx [x.dtype], dscale, dzp)``, the latter two fp32 (fp64 for fp64 x).
    ``relu``: the gradients of ``Q(relu(x))``: every term at ``relu(x)``, and ``dx`` times
    ``relu'(x) = (x > 0)``.
    """
    xf = _perturbed_input(x, perturbation, perturb_scale, perturb_before)
    g = grad.to(xf.dtype)
    x_in = xf
    if relu:
        xf = torch.relu(xf)
    s, zp, inv, xq = _fq_codes(xf, scale, zero_point, quant_min, quant_max, axis)
    below = xq < quant_min
    above = xq > quant_max
    inside = ~(below | above)
    dx = torch.where(inside & (x_in > 0) if relu else inside, g, torch.zeros_like(g))
    xfq = (torch.clamp(xq, quant_min, quant_max) - zp) * s
    ds_in = g * (xfq - xf) * inv
    ds_out = torch.where(below, g * (quant_min - zp), g * (quant_max - zp))
    ds = torch.where(inside, ds_in, ds_out) * grad_factor
    dz = torch.where(inside, torch.zeros_like(g), -g * s * grad_factor)
    return (
        dx.to(x.dtype).contiguous(),
        _sum_like(ds, scale, x, axis).to(_cdt(x)),
        _sum_like(dz, zero_point, x, axis).to(_cdt(x)),
    )


# ----------------------------------------------------------------------------------------------
# LIQ (the SAQ reference quantizer)
# ----------------------------------------------------------------------------------------------
def _standardize(xf: Tensor) -> Tuple[Tensor, Tensor]:
    """(x - mean) / std over the whole tensor, unbiased std; returns (xs, std)."""
    mean = xf.mean()
    std = xf.std()
    return (xf - mean) / std, std


def _liq_forward_fp32(xs: Tensor, c: Tensor, bits: int, signed: bool) -> Tuple[Tensor, Tensor]:
    """Returns (y, r) with r = xs / c (before clamping), in the compute dtype.

    Levels map back as ``k * (1/n)`` with ``1/n`` rounded to the compute dtype: ATen evaluates the
    reference code's ``round(x * n) / n`` that way on CUDA (division by a scalar becomes a
    multiplication by its reciprocal), so this matches the reference code's GPU numbers bit for
    bit on every device; on the CPU the reference code's true division can differ by one ulp.
    """
    n = float(2**bits - 1)
    # a 0-dim CPU tensor, used as is: ATen takes it as a scalar on any device (no host-to-device
    # copy, which on a GPU would block the host and is not allowed inside a CUDA-graph capture)
    inv_n = torch.tensor(1.0, dtype=xs.dtype) / torch.tensor(n, dtype=xs.dtype)
    r = xs / c
    if signed:
        t = torch.clamp(r, -1.0, 1.0)
        v = (t + 1.0) / 2.0
        u = torch.round(v * n) * inv_n
        y = (u * 2.0 - 1.0) * c
    else:
        t = torch.clamp(r, 0.0, 1.0)
        u = torch.round(t * n) * inv_n
        y = u * c
    return y, r


def liq_quantize(
    x: Tensor,
    clip: Tensor,
    bits: int,
    signed: bool,
    standardize: bool,
    perturbation: Optional[Tensor],
    perturb_scale: Optional[Tensor],
    perturb_before: bool,
) -> Tensor:
    """The LIQ quantizer of the SAQ reference code.

    ``c = |clip|``, ``n = 2^bits - 1``, ``xs = (x - mean) / std`` if ``standardize`` else x.
    Signed (weights): ``y = (2 * round(n * (clamp(xs/c, -1, 1) + 1) / 2) / n - 1) * c``.
    Unsigned (activations): ``y = round(n * clamp(xs/c, 0, 1)) / n * c``.
    Perturbation as in :func:`fake_quantize`. Shapes: x any, clip ``[1]`` or ``[]``.
    """
    xf = _perturbed_input(x, perturbation, perturb_scale, perturb_before)
    if standardize:
        xf, _ = _standardize(xf)
    c = clip.to(xf.dtype).abs().reshape(())
    y, _ = _liq_forward_fp32(xf, c, bits, signed)
    return _add_after(y, perturbation, perturb_scale, perturb_before).to(x.dtype).contiguous()


def liq_quantize_backward(
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
    """Gradients of :func:`liq_quantize` for x and clip (straight-through rounding).

    ``r = xs / c``; ``inside`` is the closed clip range (``-1 <= r <= 1`` signed, ``0 <= r <= 1``
    unsigned; with ``relu``, unsigned only, ``x > 0 and r <= 1``: the quantizer absorbs a ReLU
    applied before it, ``Q(relu(x)) = Q(x)``, and ``relu'(x) = (x > 0)``); ``dx = g * inside`` (``/ std`` when standardized, statistics being constants);
    ``dclip = sum(g * (y/c - r * inside)) * sign(clip)`` where y is the unperturbed quantizer output
    (``+-1`` per element outside the range). Returns ``(dx [x.dtype, contiguous], dclip [fp32, or
    fp64 for fp64 x; clip's shape])``.
    """
    xf = _perturbed_input(x, perturbation, perturb_scale, perturb_before)
    std = None
    if standardize:
        xf, std = _standardize(xf)
    c = clip.to(xf.dtype).abs().reshape(())
    g = grad.to(xf.dtype)
    y, r = _liq_forward_fp32(xf, c, bits, signed)
    lo = -1.0 if signed else 0.0
    inside = ((xf > 0) if relu and not signed else (r >= lo)) & (r <= 1.0)
    dx = torch.where(inside, g, torch.zeros_like(g))
    if std is not None:
        dx = dx / std
    local = y / c - torch.where(inside, r, torch.zeros_like(r))
    dclip = (g * local).sum() * torch.sign(clip.to(xf.dtype).reshape(()))
    return dx.to(x.dtype).contiguous(), dclip.reshape(clip.shape)


# ----------------------------------------------------------------------------------------------
# SAM ops
# ----------------------------------------------------------------------------------------------
def grad_sq_norm(
    grads: List[Tensor], params: List[Tensor], adaptive: List[bool], eta: float
) -> Tuple[Tensor, Tensor]:
    """Squared global L2 norm over many tensors, and a non-finite flag.

    ``norm_sq = sum_i ||g_i * (|p_i| + eta)||^2`` where ``adaptive[i]``, else ``||g_i||^2``,
    accumulated in fp32 (fp64 when the first gradient is fp64). Returns two 0-dim tensors of that
    dtype on the gradients' device:
    ``(norm_sq, found_inf)`` with ``found_inf = 1.0`` if ``norm_sq`` is not finite.
    """
    if len(grads) == 0:
        z = torch.zeros(())
        return z, z.clone()
    parts = []
    cd = _cdt(grads[0])
    for i, g in enumerate(grads):
        gf = g.to(cd)
        if adaptive[i]:
            gf = gf * (params[i].to(cd).abs() + eta)
        parts.append(gf.pow(2).sum())
    total = torch.stack(parts).sum()
    found_inf = (~torch.isfinite(total)).to(total.dtype)
    return total, found_inf


def sam_perturb_(
    params: List[Tensor],
    grads: List[Tensor],
    backups: List[Tensor],
    scale: Tensor,
    adaptive: List[bool],
) -> None:
    """Save each parameter to its backup, then ``p += e`` in place.

    ``e = g * scale`` or, where ``adaptive[i]``, ``e = (p * p) * g * scale`` (the reference code's
    ``torch.pow(p, 2) * p.grad * scale``), in the parameter's dtype. Mutates params and backups.
    """
    for i, p in enumerate(params):
        backups[i].copy_(p)
        s = scale.to(p.dtype)
        if adaptive[i]:
            e = (p * p) * grads[i] * s
        else:
            e = grads[i] * s
        p.add_(e)


def sam_restore_(params: List[Tensor], backups: List[Tensor]) -> None:
    """``p.copy_(backup)`` for every pair: bit-exact undo of :func:`sam_perturb_`."""
    for p, b in zip(params, backups):
        p.copy_(b)


def _skip_mask(found_inf: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    if found_inf is None:
        return None
    return found_inf.to(like.device).reshape(()) != 0


def _select_(dst: Tensor, new: Tensor, skip: Optional[Tensor]) -> None:
    """dst = new, unless skip (a 0-dim bool device tensor) is set; no host sync."""
    if skip is None:
        dst.copy_(new)
    else:
        dst.copy_(torch.where(skip, dst, new))


def sam_restore_sgd_(
    params: List[Tensor],
    backups: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Tensor],
    lr: Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first_step: bool,
    found_inf: Optional[Tensor],
) -> None:
    """Restore each parameter from its backup, then one ``torch.optim.SGD`` step.

    ``d = g + wd*p``; with momentum: ``buf = d`` on the first step, else
    ``buf = momentum*buf + (1 - dampening)*d``; ``d = d + momentum*buf`` (Nesterov) or ``buf``;
    ``p -= lr * d``. ``lr`` is a 0-dim tensor. If ``found_inf`` is non-zero the parameters are
    only restored. ``backups`` may be shorter than ``params``: only ``params[:len(backups)]`` are
    restored. Mutates params and momentum_buffers (unused when momentum == 0).
    """
    skip = None
    for i, p in enumerate(params):
        if i < len(backups):
            p.copy_(backups[i])
        skip = _skip_mask(found_inf, p) if skip is None else skip
        d = grads[i]
        if weight_decay != 0:
            d = _add_scaled(d, p, weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step:
                new_buf = d.clone()
            else:
                new_buf = _add_scaled(buf.mul(momentum), d, 1 - dampening)
            _select_(buf, new_buf, skip)
            d = _add_scaled(d, buf, momentum) if nesterov else buf
        _select_(p, p - lr.to(p.dtype) * d, skip)


# the dtypes whose SGD / AdamW terms are spelled out in fp32 below (OPS.md's rounding rule)
_LOWP = (torch.float16, torch.bfloat16)


def _add_scaled(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``a + alpha * b`` as one torch op in fp32 math (``alpha`` an fp32 scalar, one rounding to
    the dtype), the rule of OPS.md. Spelled out for fp16 / bf16 because ``a.add(b, alpha=...)``
    does not follow it everywhere: torch's vectorized CPU kernels round ``alpha`` to the tensor's
    dtype first (a different result in about a third of the elements), and a GPU may fuse the
    multiply-add."""
    if a.dtype in _LOWP:
        # b * alpha, then + a (the same two fp32 roundings), in place on the fresh fp32 copy
        return b.to(torch.float32, copy=True).mul_(alpha).add_(a.float()).to(a.dtype)
    return a.add(b, alpha=alpha)


def _plus(a: Tensor, c: float) -> Tensor:
    """``a + c`` for a Python float ``c`` in fp32 math (torch's CPU kernels round ``c`` to fp16 /
    bf16 first, as ``alpha`` above)."""
    if a.dtype in _LOWP:
        return a.float().add_(c).to(a.dtype)
    return a + c


def _f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value (what a kernel's fp32 scalar holds). Through numpy,
    which torch.compile traces (``struct.pack`` recursed inside dynamo on a recompile)."""
    return float(np.float32(x))


def _lerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    """``torch.lerp(a, b, w)``: ``a + w * (b - a)`` if ``|w| < 0.5`` else ``b - (b - a) * (1 - w)``.
    Spelled out for fp16 / bf16 as separate fp32 ops (each rounded to fp32, one rounding to the
    dtype at the end): torch's CUDA lerp contracts the multiply-add into one fma, so on a GPU it
    differs from its own CPU kernel, and from the kernels, in a few elements per thousand."""
    if a.dtype not in _LOWP:
        return a.lerp(b, w)
    w32 = _f32(w)
    af, bf = a.float(), b.to(torch.float32, copy=True)  # bf is written below
    d = torch.sub(bf, af)  # in place from here on: the same fp32 roundings, fewer temporaries
    out = d.mul_(w32).add_(af) if abs(w32) < 0.5 else bf.sub_(d.mul_(_f32(1.0 - w32)))
    return out.to(a.dtype)


def _decay_add_sq(v: Tensor, g: Tensor, beta2: float) -> Tensor:
    """``beta2 * v + (1 - beta2) * g * g``: the first product rounded to the dtype, then
    ``+ ((1 - beta2) * g) * g`` in fp32 with one rounding (torch's CUDA addcmul fuses it)."""
    if v.dtype not in _LOWP:
        return v.mul(beta2).addcmul_(g, g, value=1 - beta2)
    gf = g.float()
    decayed = v.float().mul_(_f32(beta2)).to(v.dtype).float()
    return torch.mul(gf, _f32(1 - beta2)).mul_(gf).add_(decayed).to(v.dtype)


def sam_restore_adamw_(
    params: List[Tensor],
    backups: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    steps: List[Tensor],
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    found_inf: Optional[Tensor],
) -> None:
    """Restore each parameter from its backup, then one ``torch.optim.AdamW`` step (no amsgrad).

    ``step += 1``; ``p *= 1 - lr*wd``; ``m = lerp(m, g, 1 - beta1)``;
    ``v = beta2*v + (1 - beta2)*g*g``;
    ``p -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)``.
    ``lr`` and each ``steps[i]`` are 0-dim tensors. If ``found_inf`` is non-zero the parameters
    are only restored and no state changes. ``backups`` may be shorter than ``params`` (a prefix is
    restored). Mutates params, exp_avgs, exp_avg_sqs and steps.
    """
    skip = None
    for i, p in enumerate(params):
        if i < len(backups):
            p.copy_(backups[i])
        skip = _skip_mask(found_inf, p) if skip is None else skip
        g = grads[i]
        step = steps[i] + 1
        lr_t = lr.to(p.dtype)
        new_p = p * (1 - lr_t * weight_decay)
        m = _lerp(exp_avgs[i], g, 1 - beta1)
        v = _decay_add_sq(exp_avg_sqs[i], g, beta2)
        # steps may stay on the CPU (torch.optim.AdamW's default): the bias corrections stay there
        # too, since moving them would sync; a GPU tensor divided by such a CPU scalar is multiplied
        # by its reciprocal, which can differ from the kernels' division (they take device steps)
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        step_size = (lr_t / bc1).to(p.dtype)
        denom = _plus(v.sqrt() / bc2.sqrt().to(p.dtype), eps)
        new_p = new_p - step_size * (m / denom)
        _select_(exp_avgs[i], m, skip)
        _select_(exp_avg_sqs[i], v, skip)
        _select_(steps[i], step, skip)
        _select_(p, new_p, skip)
