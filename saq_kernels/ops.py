"""The ``saq`` torch.library custom ops and their user-facing Python wrappers.

Each op body asks the backend registry for an implementation (saq_kernels.backends.select) and
calls it; the reference is the implementation of last resort. Every op has a fake (for
torch.compile / meta tensors) and the two quantizers have autograd formulas calling their
``*_backward`` ops. The wrappers (``fake_quantize``, ``liq_quantize``, ...) validate arguments with
errors that name the op, the argument and the fix, and short-circuit the no-op cases (a custom op
may not return its input).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils import _python_dispatch

from . import validate as _validate
from .reference import _cdt  # compute dtype (fp64 for fp64 inputs, which the reference serves)
from .backends import select
from .validate import (
    check_backup_prefix,
    check_bits,
    check_float,
    check_one_device,
    check_param,
    check_perturbation,
    check_quant_range,
    check_same_device,
    check_tensor_list,
)

__all__ = [
    "fake_quantize",
    "liq_quantize",
    "grad_sq_norm",
    "sam_perturb_",
    "sam_restore_",
    "sam_restore_sgd_",
    "sam_restore_adamw_",
]


def _impl(op: str, t: Tensor):
    return select(op, t.device.type, t.dtype)


def _plain_eager(t: Tensor) -> bool:
    """True outside torch.compile / export tracing, fake tensors, any Python dispatch mode and
    functorch transforms, for a plain tensor: where a direct call may bypass the custom-op layer."""
    return not (
        torch.compiler.is_compiling()
        or _python_dispatch._get_current_dispatch_mode() is not None
        or type(t) not in (Tensor, torch.nn.Parameter)
        or torch._C._are_functorch_transforms_active()
    )


_NATIVE_AUTOGRAD = {}


def _native_autograd(op: str, x: Tensor):
    """``saq_C::<op>_autograd`` (csrc/autograd.cpp) when the call may take the native fast path,
    else None.

    The fast path is the same kernels with the autograd formula in C++ instead of Python (about
    0.2 ms less per quantizer call, forward plus backward; bit-identical results). It is taken in
    plain eager mode when the selected backend is a native one ("cpp" / "cuda"); its backward then
    runs on that backend too, whereas the custom op picks the backward's backend when it runs.
    None for an extension built before these ops existed, and under torch.inference_mode(),
    whose calls skip the Autograd dispatch key that the C++ op is registered for: the eager
    autograd.Function (below) serves those, calling the same kernels."""
    if not _plain_eager(x) or torch.is_inference_mode_enabled():
        return None
    if getattr(_impl(op, x), "namespace", None) != "saq_C":
        return None
    fn = _NATIVE_AUTOGRAD.get(op, ...)
    if fn is ...:
        packet = getattr(torch.ops.saq_C, op + "_autograd", None)
        fn = _NATIVE_AUTOGRAD[op] = None if packet is None else packet.default
    return fn


# ----------------------------------------------------------------------------------------------
# fake_quantize
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("saq::fake_quantize", mutates_args=())
def _fake_quantize(
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
    return _impl("fake_quantize", x)(
        x, scale, zero_point, quant_min, quant_max, axis, grad_factor,
        perturbation, perturb_scale, perturb_before, relu,
    )


@_fake_quantize.register_fake
def _(x, scale, zero_point, quant_min, quant_max, axis, grad_factor, e, s, before, relu=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("saq::fake_quantize_backward", mutates_args=())
def _fake_quantize_backward(
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
    return _impl("fake_quantize_backward", x)(
        grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor,
        perturbation, perturb_scale, perturb_before, relu,
    )


@_fake_quantize_backward.register_fake
def _(grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor, e, s, before,
      relu=False):
    gdt = _cdt(x)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(scale, dtype=gdt),
        torch.empty_like(zero_point, dtype=gdt),
    )


def _fq_setup(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax, axis, grad_factor, e, s, before, relu = inputs
    ctx.save_for_backward(x, scale, zero_point, e, s)
    ctx.args = (qmin, qmax, axis, grad_factor, before, relu)


def _perturbation_grad(ctx, index: int, grad: Tensor, dx: Tensor, e, s, before: bool):
    """d/de of Q(x) + s*e is s*grad; of Q(x + s*e) it is s*dx. Computed only when e requires
    grad: saq.SAQ passes a zero "probe" e with s = 1 in its ascent pass, so that e.grad is
    dL/dQ(w) (no tensor hook: hooks break torch.compile graphs)."""
    if e is None or not ctx.needs_input_grad[index]:
        return None
    return ((dx if before else grad) * s).to(e.dtype)


def _fq_grads(ctx, grad, backward_op):
    x, scale, zero_point, e, s = ctx.saved_tensors
    qmin, qmax, axis, grad_factor, before, relu = ctx.args
    dx, dscale, dzp = backward_op(
        grad, x, scale, zero_point, qmin, qmax, axis, grad_factor, e, s, before, relu
    )
    de = _perturbation_grad(ctx, 7, grad, dx, e, s, before)
    return (dx, dscale.to(scale.dtype), dzp.to(zero_point.dtype), None, None, None, None, de, None,
            None, None)


def _fq_backward(ctx, grad):
    return _fq_grads(ctx, grad, _fake_quantize_backward)


_fake_quantize.register_autograd(_fq_backward, setup_context=_fq_setup)


def _backend_call(op: str):
    """``op`` on the backend selected when the call happens (the first argument after ``grad``
    decides the device and dtype), as the custom op's body does."""
    return lambda grad, x, *rest: _impl(op, x)(grad, x, *rest)


class _EagerFakeQuantize(torch.autograd.Function):
    """The custom op's forward and autograd formula without the custom-op layer, for plain eager
    calls on the Python backends (triton, reference): the same backend functions, chosen at the
    same moments, so the same numbers; about 0.1 ms less per call (forward plus backward) on the
    project's CPU. Also what serves native backends where their C++ autograd op cannot (an
    extension that predates it, torch.inference_mode())."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_factor, e, s, before, relu):
        inputs = (x, scale, zero_point, qmin, qmax, axis, grad_factor, e, s, before, relu)
        y = _impl("fake_quantize", x)(*inputs)
        _fq_setup(ctx, inputs, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _fq_grads(ctx, grad, _backend_call("fake_quantize_backward"))


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    grad_factor: float = 1.0,
    perturbation: Optional[Tensor] = None,
    perturb_scale: Optional[Tensor] = None,
    perturb_before: bool = False,
    relu: bool = False,
) -> Tensor:
    """LSQ / LSQ+ fake quantization with gradients for x, scale and zero_point.

    ``y = (clamp(round(x * (1/scale)) + zp, quant_min, quant_max) - zp) * scale`` with
    ``zp = clamp(round(zero_point), quant_min, quant_max)``, per tensor (``axis=None``, scale of
    shape ``[1]`` or ``[]``) or per channel along ``axis`` (scale of shape ``[x.shape[axis]]``).
    Gradients follow ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``; ``grad_factor``
    multiplies the scale / zero-point gradients (LSQ uses ``1/sqrt(numel * quant_max)``).
    With ``perturbation`` e and a 0-dim ``perturb_scale`` s: ``Q(x) + s*e`` (Cases 1/3) or
    ``Q(x + s*e)`` (Case 2, ``perturb_before=True``); e gets ``s * dL/dy`` (after) or
    ``s * dL/d(x + s*e)`` (before) when it requires grad, s gets none.

    x: fp32 / fp16 / bf16 (float64 runs on the reference), any shape. Returns a new tensor shaped
    and typed like x.

    ``relu=True`` (no perturbation) computes ``Q(relu(x))`` and its gradients from the
    pre-activation x in the same single pass: every term at ``relu(x)``, and ``dx`` gated by
    ``relu'(x) = (x > 0)``; the same numbers as ``fake_quantize(torch.relu(x), ...)`` bit for bit,
    for any zero point. A model drops its ReLU and saves that op's two passes over the activation.
    """
    op = "fake_quantize"
    check_float(op, "x", x)
    check_quant_range(op, quant_min, quant_max)
    if relu and perturbation is not None:
        raise ValueError(
            f"saq::{op}: relu=True folds a ReLU into an activation quantizer; it cannot be "
            "combined with a perturbation (apply torch.relu first, or drop the perturbation)"
        )
    native = _native_autograd(op, x)
    # The native path checks the scale's values itself (on the CPU, where that is free).
    axis = check_param(op, "scale", scale, x, axis, positive=native is None)
    check_param(op, "zero_point", zero_point, x, axis, positive=False)
    check_perturbation(op, x, perturbation, perturb_scale)
    args = (x, scale, zero_point, int(quant_min), int(quant_max), axis, float(grad_factor),
            perturbation, perturb_scale, bool(perturb_before), bool(relu))
    if native is not None:
        return native(*args, _validate.CHECK_VALUES)
    if _plain_eager(x) and not torch.jit.is_tracing():  # a trace must record the op, not Python
        return _EagerFakeQuantize.apply(*args)
    return _fake_quantize(*args)


# ----------------------------------------------------------------------------------------------
# liq_quantize
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("saq::liq_quantize", mutates_args=())
def _liq_quantize(
    x: Tensor,
    clip: Tensor,
    bits: int,
    signed: bool,
    standardize: bool,
    perturbation: Optional[Tensor],
    perturb_scale: Optional[Tensor],
    perturb_before: bool,
    relu: bool = False,
) -> Tensor:
    # relu changes only the backward (Q(relu(x)) = Q(x) for an unsigned quantizer): the backends'
    # forward takes the other arguments
    return _impl("liq_quantize", x)(
        x, clip, bits, signed, standardize, perturbation, perturb_scale, perturb_before
    )


@_liq_quantize.register_fake
def _(x, clip, bits, signed, standardize, e, s, before, relu=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("saq::liq_quantize_backward", mutates_args=())
def _liq_quantize_backward(
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
    return _impl("liq_quantize_backward", x)(
        grad, x, clip, bits, signed, standardize, perturbation, perturb_scale, perturb_before, relu
    )


@_liq_quantize_backward.register_fake
def _(grad, x, clip, bits, signed, standardize, e, s, before, relu=False):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(clip, dtype=_cdt(x)),
    )


def _liq_setup(ctx, inputs, output):
    x, clip, bits, signed, standardize, e, s, before, relu = inputs
    ctx.save_for_backward(x, clip, e, s)
    ctx.args = (bits, signed, standardize, before, relu)


def _liq_grads(ctx, grad, backward_op):
    x, clip, e, s = ctx.saved_tensors
    bits, signed, standardize, before, relu = ctx.args
    dx, dclip = backward_op(grad, x, clip, bits, signed, standardize, e, s, before, relu)
    de = _perturbation_grad(ctx, 5, grad, dx, e, s, before)
    return dx, dclip.to(clip.dtype), None, None, None, de, None, None, None


def _liq_backward(ctx, grad):
    return _liq_grads(ctx, grad, _liq_quantize_backward)


_liq_quantize.register_autograd(_liq_backward, setup_context=_liq_setup)


class _EagerLiqQuantize(torch.autograd.Function):
    """liq_quantize's counterpart of :class:`_EagerFakeQuantize`."""

    @staticmethod
    def forward(ctx, x, clip, bits, signed, standardize, e, s, before, relu):
        inputs = (x, clip, bits, signed, standardize, e, s, before, relu)
        y = _impl("liq_quantize", x)(x, clip, bits, signed, standardize, e, s, before)
        _liq_setup(ctx, inputs, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _liq_grads(ctx, grad, _backend_call("liq_quantize_backward"))


def liq_quantize(
    x: Tensor,
    clip: Tensor,
    bits: int,
    signed: bool,
    standardize: bool = False,
    perturbation: Optional[Tensor] = None,
    perturb_scale: Optional[Tensor] = None,
    perturb_before: bool = False,
    relu: bool = False,
) -> Tensor:
    """The LIQ quantizer of the SAQ reference code, with its clip gradient.

    ``c = |clip|``, ``n = 2^bits - 1``; ``xs = (x - mean(x)) / std(x)`` when ``standardize``.
    Signed (weights): ``y = (2 * round(n * (clamp(xs/c, -1, 1) + 1) / 2) / n - 1) * c``.
    Unsigned (activations): ``y = round(n * clamp(xs/c, 0, 1)) / n * c``.
    Backward: straight-through inside the closed clip range;
    ``dy/dclip = (y/c - (xs/c) * inside) * sign(clip)``.
    ``bits == 32`` returns x unchanged, plus ``s*e`` when perturbed (before or after: there is no
    quantizer between). Perturbation as in :func:`fake_quantize`. x: fp32 / fp16 / bf16 (float64
    runs on the reference), any shape; clip: shape ``[1]`` or ``[]``.

    ``relu=True`` (unsigned, unstandardized, unperturbed only) computes ``Q(relu(x))`` from the
    pre-activation x, exactly: the forward is unchanged (the clamp at 0 already is the ReLU) and
    the backward's range is open at 0 (``dx = g`` for ``0 < x``, ``r <= 1``), as ``relu'(0) = 0``.
    A model drops its ReLU and saves that op's two passes over the activation.
    """
    op = "liq_quantize"
    check_float(op, "x", x)
    if relu and (signed or standardize or perturbation is not None):
        raise ValueError(
            f"saq::{op}: relu=True folds a ReLU into an unsigned activation quantizer; it needs "
            f"signed=False, standardize=False and no perturbation (got signed={signed}, "
            f"standardize={standardize}, perturbation={'set' if perturbation is not None else None})"
        )
    if check_bits(op, bits):
        if relu:
            return torch.relu(x)
        if perturbation is None:
            return x
        check_perturbation(op, x, perturbation, perturb_scale)
        # as the quantizing path: x + s*e formed in fp32 (fp64 for fp64 x), rounded once; no
        # gradient for s
        cd = _cdt(x)
        return (x.to(cd) + perturb_scale.detach().to(cd) * perturbation.to(cd)).to(x.dtype)
    native = _native_autograd(op, x)
    check_param(op, "clip", clip, x, None, positive=native is None, absolute=True)
    check_perturbation(op, x, perturbation, perturb_scale)
    args = (x, clip, int(bits), bool(signed), bool(standardize),
            perturbation, perturb_scale, bool(perturb_before), bool(relu))
    if native is not None:
        return native(*args, _validate.CHECK_VALUES)
    if _plain_eager(x) and not torch.jit.is_tracing():
        return _EagerLiqQuantize.apply(*args)
    return _liq_quantize(*args)


# ----------------------------------------------------------------------------------------------
# SAM ops
# ----------------------------------------------------------------------------------------------
def _call_list_op(op: str, custom_op, t: Tensor, *args):
    """Run a multi-tensor op through its ``saq::`` custom op, or straight on the selected
    backend in plain eager mode.

    The custom-op layer is what torch.compile, export and fake tensors see, and it stays the path
    whenever any of them is active. In plain eager mode it only adds Python work per call (for
    mutated lists: a version bump per tensor), about 0.17 ms for a 61-tensor ResNet-20 list, i.e.
    as much as the kernel itself; these ops run under no_grad on parameters between passes, so
    the direct call is equivalent there.
    """
    if not _plain_eager(t) or torch.is_grad_enabled() and t.requires_grad:
        return custom_op(*args)
    return select(op, t.device.type, t.dtype)(*args)


@torch.library.custom_op("saq::grad_sq_norm", mutates_args=())
def _grad_sq_norm(
    grads: List[Tensor], params: List[Tensor], adaptive: List[bool], eta: float
) -> Tuple[Tensor, Tensor]:
    return select("grad_sq_norm", grads[0].device.type, grads[0].dtype)(grads, params, adaptive, eta)


@_grad_sq_norm.register_fake
def _(grads, params, adaptive, eta):
    check_one_device("grad_sq_norm", grads=grads, params=params)
    dev = grads[0].device
    dt = _cdt(grads[0])
    return (torch.empty((), device=dev, dtype=dt), torch.empty((), device=dev, dtype=dt))


def grad_sq_norm(
    grads: Sequence[Tensor],
    params: Optional[Sequence[Tensor]] = None,
    adaptive: Optional[Sequence[bool]] = None,
    eta: float = 0.01,
) -> Tuple[Tensor, Tensor]:
    """Squared global L2 norm of many gradients and a non-finite flag, without a host sync.

    ``norm_sq = sum_i ||g_i * (|p_i| + eta)||^2`` for ``adaptive[i]``, else ``||g_i||^2``.
    Returns ``(norm_sq, found_inf)``: 0-dim tensors on the gradients' device, fp32 (fp64 for
    fp64 gradients).
    """
    op = "grad_sq_norm"
    grads = list(grads)
    params = list(params) if params is not None else list(grads)
    adaptive = [bool(a) for a in adaptive] if adaptive is not None else [False] * len(grads)
    check_tensor_list(op, grads=grads, params=params)
    if len(adaptive) != len(grads):
        raise ValueError(f"saq::{op}: 'adaptive' has {len(adaptive)} flags for {len(grads)} grads; pass one flag per tensor")
    if not grads:
        z = torch.zeros(())
        return z, z.clone()
    return _call_list_op("grad_sq_norm", _grad_sq_norm, grads[0], grads, params, adaptive, float(eta))


@torch.library.custom_op("saq::sam_perturb_", mutates_args=("params", "backups"))
def _sam_perturb_(
    params: List[Tensor], grads: List[Tensor], backups: List[Tensor], scale: Tensor, adaptive: List[bool]
) -> None:
    select("sam_perturb_", params[0].device.type, params[0].dtype)(params, grads, backups, scale, adaptive)


@_sam_perturb_.register_fake
def _(params, grads, backups, scale, adaptive):
    check_one_device("sam_perturb_", params=params, grads=grads, backups=backups)


def sam_perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    backups: Sequence[Tensor],
    scale: Tensor,
    adaptive: Optional[Sequence[bool]] = None,
) -> None:
    """Save each parameter into ``backups`` and add the SAM perturbation in place.

    ``p += g * scale`` (or ``(p*p) * g * scale`` where ``adaptive``); ``scale`` is a 0-dim tensor.
    Mutates params and backups (same shapes and dtypes as params). The design document's order,
    ``sam_perturb_(params, grads, scale, backups)``, is accepted too (a tensor third argument and
    a list fourth are swapped back).
    """
    op = "sam_perturb_"
    if isinstance(backups, Tensor) and not isinstance(scale, Tensor):
        backups, scale = scale, backups
    params, grads, backups = list(params), list(grads), list(backups)
    check_tensor_list(op, params=params, grads=grads, backups=backups)
    adaptive = [bool(a) for a in adaptive] if adaptive is not None else [False] * len(params)
    if len(adaptive) != len(params):  # before anything is written: a short list fails half-way
        raise ValueError(f"saq::{op}: 'adaptive' has {len(adaptive)} flags for {len(params)} params; pass one flag per tensor")
    if not params:
        return
    check_same_device(op, "scale", scale, params[0])
    if scale.dim() != 0:
        if scale.numel() != 1:
            raise ValueError(f"saq::{op}: 'scale' has shape {list(scale.shape)}; pass one 0-dim tensor")
        scale = scale.reshape(())  # [1] -> []: the same value on every backend
    _call_list_op("sam_perturb_", _sam_perturb_, params[0], params, grads, backups, scale, adaptive)


@torch.library.custom_op("saq::sam_restore_", mutates_args=("params",))
def _sam_restore_(params: List[Tensor], backups: List[Tensor]) -> None:
    select("sam_restore_", params[0].device.type, params[0].dtype)(params, backups)


@_sam_restore_.register_fake
def _(params, backups):
    check_one_device("sam_restore_", params=params, backups=backups)


def sam_restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """Copy each backup back into its parameter, bit-exact. Mutates params."""
    params, backups = list(params), list(backups)
    check_tensor_list("sam_restore_", params=params, backups=backups)
    if params:
        _call_list_op("sam_restore_", _sam_restore_, params[0], params, backups)


@torch.library.custom_op("saq::sam_restore_sgd_", mutates_args=("params", "momentum_buffers"))
def _sam_restore_sgd_(
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
    select("sam_restore_sgd_", params[0].device.type, params[0].dtype)(
        params, backups, grads, momentum_buffers, lr, momentum, dampening,
        weight_decay, nesterov, first_step, found_inf,
    )


@_sam_restore_sgd_.register_fake
def _(params, backups, grads, bufs, lr, momentum, dampening, wd, nesterov, first_step, found_inf):
    check_one_device("sam_restore_sgd_", params=params, backups=backups, grads=grads, momentum_buffers=bufs)


def sam_restore_sgd_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    lr: Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool = False,
    found_inf: Optional[Tensor] = None,
) -> None:
    """Restore the parameters, then one SGD step (``torch.optim.SGD`` semantics).

    ``backups`` may be shorter than ``params``: ``params[:len(backups)]`` (the perturbed ones,
    put first) are restored, all are stepped, in one call per parameter group.

    ``lr`` is a 0-dim tensor on the parameters' device; ``momentum_buffers`` are tensors shaped
    like the parameters (ignored when ``momentum == 0``); ``first_step`` makes the buffer a copy
    of the update, as torch does when it creates the buffer. A non-zero ``found_inf`` restores only.
    """
    op = "sam_restore_sgd_"
    params, backups, grads = list(params), list(backups), list(grads)
    bufs = list(momentum_buffers) if momentum else list(grads)
    check_tensor_list(op, params=params, grads=grads, momentum_buffers=bufs)
    check_backup_prefix(op, params, backups)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"saq::{op}: nesterov needs momentum > 0 and dampening == 0 (as torch.optim.SGD)")
    if not params:
        return
    check_same_device(op, "lr", lr, params[0])
    if found_inf is not None:
        check_same_device(op, "found_inf", found_inf, params[0])
    _call_list_op(
        "sam_restore_sgd_", _sam_restore_sgd_, params[0], params, backups, grads, bufs, lr, float(momentum), float(dampening), float(weight_decay),
        bool(nesterov), bool(first_step), found_inf,
    )


@torch.library.custom_op(
    "saq::sam_restore_adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps")
)
def _sam_restore_adamw_(
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
    select("sam_restore_adamw_", params[0].device.type, params[0].dtype)(
        params, backups, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps,
        weight_decay, found_inf,
    )


@_sam_restore_adamw_.register_fake
def _(params, backups, grads, m, v, steps, lr, b1, b2, eps, wd, found_inf):
    # (the steps may stay on the CPU: torch.optim keeps them there)
    check_one_device("sam_restore_adamw_", params=params, backups=backups, grads=grads,
                     exp_avgs=m, exp_avg_sqs=v)


def sam_restore_adamw_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    lr: Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    found_inf: Optional[Tensor] = None,
) -> None:
    """Restore the parameters, then one AdamW step (``torch.optim.AdamW`` semantics, no amsgrad).

    ``steps`` are 0-dim fp32 tensors (incremented here), ``lr`` a 0-dim tensor. A non-zero
    ``found_inf`` restores only. Mutates params, exp_avgs, exp_avg_sqs and steps.
    """
    op = "sam_restore_adamw_"
    params, backups, grads = list(params), list(backups), list(grads)
    exp_avgs, exp_avg_sqs, steps = list(exp_avgs), list(exp_avg_sqs), list(steps)
    check_tensor_list(op, params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    check_backup_prefix(op, params, backups)
    if len(steps) != len(params):
        raise ValueError(f"saq::{op}: 'steps' has {len(steps)} entries for {len(params)} params; pass one 0-dim step tensor per parameter")
    if not params:
        return
    check_same_device(op, "lr", lr, params[0])
    if found_inf is not None:
        check_same_device(op, "found_inf", found_inf, params[0])
    _call_list_op(
        "sam_restore_adamw_", _sam_restore_adamw_, params[0], params, backups, grads, exp_avgs, exp_avg_sqs, steps, lr, float(beta1), float(beta2),
        float(eps), float(weight_decay), found_inf,
    )
