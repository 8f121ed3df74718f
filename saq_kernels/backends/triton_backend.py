"""The "triton" backend: the kernels of saq_kernels/_triton, imported lazily.

Nothing here imports triton at ``import saq_kernels`` time: the probe imports it the first time
the registry asks whether the backend is available, and the kernels load with the impl table.

Serves CUDA tensors, and CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``
set before the kernels were first imported). float64 is refused: the kernels compute in fp32
and the op contract's exactness is defined for fp32 / fp16 / bf16 inputs.
"""
from __future__ import annotations

import os
from typing import Optional

from . import Backend, register_backend

_NEED_DEVICE = (
    "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)"
)
_NOT_INTERPRETED = (
    "TRITON_INTERPRET=1 is set but the saq Triton kernels were compiled without it (they were "
    "imported before the variable was set); set TRITON_INTERPRET=1 before importing triton or "
    "the saq Triton kernels"
)
_FLOAT64 = (
    "the Triton kernels compute in fp32 and take float32, float16 or bfloat16 tensors, not "
    "float64; use the 'reference' or 'cpp' backend for float64"
)
_interpreted: Optional[bool] = None


def _probe() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(exc).__name__}: {exc}); pip install triton"
    return None


def _kernels_interpreted() -> bool:
    global _interpreted
    if _interpreted is None:
        from .._triton import INTERPRETED

        _interpreted = bool(INTERPRETED)
    return _interpreted


def _supports(op: str, device_type: str, dtype) -> Optional[str]:
    if dtype is not None and str(dtype) == "torch.float64":
        return _FLOAT64
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return _NEED_DEVICE
        if not _kernels_interpreted():
            return _NOT_INTERPRETED
        return None
    return f"Triton kernels do not run on device type '{device_type}'; {_NEED_DEVICE}"


def _impls():
    from .._triton import impls

    return impls()


register_backend(Backend(name="triton", probe=_probe, supports_fn=_supports, impls=_impls))
