"""The "cpp" (CPU) and "cuda" backends: the compiled extension saq_kernels._C (namespace saq_C).

Both call ``torch.ops.saq_C.<op>`` with the op's positional arguments (saq_kernels/OPS.md, "Native
schemas"). The extension loads lazily, at the first probe (saq_kernels._build.load_extension:
the prebuilt library, else a JIT build); a failed load makes both backends unavailable with the
reason. float64 inputs are left to the reference (the kernels compute in fp32 anyway).

This module also holds the fakes of the saq_C ops (registered once the library is loaded; the C++
``set_python_module`` names this module so torch can find them when tracing).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from . import OP_NAMES as OPS
from . import Backend, register_backend
from ..validate import check_one_device

__all__ = ["OPS", "register_fakes"]


_FP64_REASON = (
    "backend '{name}' does not serve float64 inputs (its kernels compute in fp32); "
    "the reference backend serves float64"
)


def _load() -> Optional[str]:
    """None once the extension is loaded (and the fakes registered), else the reason."""
    from .. import _build

    try:
        _build.load_extension()
    except Exception as exc:  # ExtensionUnavailable, or anything a broken install raises
        return str(exc)
    register_fakes()
    return None


def _probe_cpp() -> Optional[str]:
    return _load()


def _probe_cuda() -> Optional[str]:
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build, so there is no CUDA device to run on"
        return "torch.cuda.is_available() is False: no CUDA device is visible"
    from .. import _build

    reason = _load()
    if reason is not None:
        return reason
    if not torch._C._dispatch_has_kernel_for_dispatch_key("saq_C::fake_quantize", "CUDA"):
        return (
            "saq_kernels._C was built without its CUDA kernels (a CPU-only torch or no nvcc at "
            "build time): rebuild with pip install --no-build-isolation -e . on a CUDA machine"
        )
    return _arch_reason(_build.build_info(), torch.cuda.get_device_capability())


def _arch_reason(info, capability) -> Optional[str]:
    """Why the built CUDA code cannot run on a GPU of this compute capability (None: it can).

    Otherwise the backend would look available and every launch would fail with "no kernel
    image is available for execution on the device"."""
    from .. import _build

    archs = (info or {}).get("cuda_archs") or []
    if not archs or _build.arch_runs_on(archs, capability) is not False:
        return None
    cap = f"{capability[0]}.{capability[1]}"
    return (f"saq_kernels._C holds CUDA code for {';'.join(archs)} only, and this GPU is compute "
            f"capability {cap}: rebuild with TORCH_CUDA_ARCH_LIST=\"{cap}\" pip install "
            "--no-build-isolation -e . (the triton and reference backends run meanwhile)")


def _supports(name: str, device: str) -> Callable[[str, str, object], Optional[str]]:
    def fn(op: str, device_type: str, dtype) -> Optional[str]:
        if device_type != device:
            return f"backend '{name}' runs on {device} tensors, not {device_type}"
        if dtype == torch.float64:
            return _FP64_REASON.format(name=name)
        return None

    return fn


def _impls() -> Dict[str, Callable]:
    ns = torch.ops.saq_C
    return {op: getattr(ns, op).default for op in OPS}


_SAM_OPS = ("grad_sq_norm", "sam_perturb_", "sam_restore_", "sam_restore_sgd_", "sam_restore_adamw_")


def _fp64_to_reference(op: str, native: Callable) -> Callable:
    """A SAM list op is routed by its first tensor's dtype; a float64 tensor further down the
    list is refused by the CUDA kernels (float32/16/bf16 only) while they are still checking,
    before anything is written. Such a call runs on the reference instead, as on the cpp
    backend, which takes float64: same numbers, no cost on the normal path."""
    from . import get_backend

    def call(*args):
        try:
            return native(*args)
        except RuntimeError as exc:
            if "has dtype Double; the CUDA kernels take" not in str(exc):
                raise
        return get_backend("reference").table()[op](*args)

    return call


def _cuda_impls() -> Dict[str, Callable]:
    table = _impls()
    for op in _SAM_OPS:
        table[op] = _fp64_to_reference(op, table[op])
    return table


register_backend(Backend(name="cpp", probe=_probe_cpp, supports_fn=_supports("cpp", "cpu"), impls=_impls))
register_backend(Backend(name="cuda", probe=_probe_cuda, supports_fn=_supports("cuda", "cuda"), impls=_cuda_impls))


# ----------------------------------------------------------------------------------------------
# fakes of the saq_C ops (shapes, dtypes and devices of the outputs; contiguous like the kernels)
# ----------------------------------------------------------------------------------------------
_FAKES_REGISTERED = False


def _like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _f32(p: torch.Tensor) -> torch.Tensor:
    return torch.empty(p.shape, dtype=torch.float32, device=p.device)


def register_fakes() -> None:
    """Register the fake (meta) functions of the saq_C ops; idempotent. Needs the library loaded."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return
    _FAKES_REGISTERED = True
    reg = torch.library.register_fake

    @reg("saq_C::fake_quantize")
    def _(x, scale, zero_point, quant_min, quant_max, axis, grad_factor, e, s, before, relu=False):
        return _like(x)

    @reg("saq_C::fake_quantize_backward")
    def _(grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor, e, s, before,
          relu=False):
        return _like(x), _f32(scale), _f32(zero_point)

    @reg("saq_C::liq_quantize")
    def _(x, clip, bits, signed, standardize, e, s, before):
        return _like(x)

    @reg("saq_C::liq_quantize_backward")
    def _(grad, x, clip, bits, signed, standardize, e, s, before, relu=False):
        return _like(x), _f32(clip)

    # The list ops' fakes are their Meta kernels too: a list mixing meta tensors with others
    # lands here instead of in a native kernel that checks devices, so they check (validate.py).
    @reg("saq_C::grad_sq_norm")
    def _(grads, params, adaptive, eta):
        check_one_device("grad_sq_norm", grads=grads, params=params)
        dev = grads[0].device if len(grads) else torch.device("cpu")
        return (torch.empty((), dtype=torch.float32, device=dev),
                torch.empty((), dtype=torch.float32, device=dev))

    @reg("saq_C::sam_perturb_")
    def _(params, grads, backups, scale, adaptive):
        check_one_device("sam_perturb_", params=params, grads=grads, backups=backups)

    @reg("saq_C::sam_restore_")
    def _(params, backups):
        check_one_device("sam_restore_", params=params, backups=backups)

    @reg("saq_C::sam_restore_sgd_")
    def _(params, backups, grads, bufs, lr, momentum, dampening, wd, nesterov, first_step, found_inf):
        check_one_device("sam_restore_sgd_", params=params, backups=backups, grads=grads,
                         momentum_buffers=bufs)

    @reg("saq_C::sam_restore_adamw_")
    def _(params, backups, grads, m, v, steps, lr, b1, b2, eps, wd, found_inf):
        check_one_device("sam_restore_adamw_", params=params, backups=backups, grads=grads,
                         exp_avgs=m, exp_avg_sqs=v)


def _ops_defined() -> bool:
    try:
        torch.ops.saq_C.fake_quantize.default
    except (AttributeError, RuntimeError):
        return False
    return True


# torch imports this module (the C++ set_python_module) when it needs a fake of an op loaded
# without going through the backend probe, e.g. after a direct `import saq_kernels._C`.
if _ops_defined():
    register_fakes()
