"""The "triton" backend: the kernels of saq_kernels/_triton, imported lazily.

Nothing here imports triton at ``import saq_kernels`` time: the probe imports it the first time
the registry asks whether the backend is available, and the kernels load with the impl table.

Serves CUDA tensors, and CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``
set before the kernels were first imported). float64 is refused: the kernels compute in fp32
and the op contract's exactness is defined for fp32 / fp16 / bf16 inputs.
"""
from __future__ import annotations

import os
import re
import warnings
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
_interpreter_problem: Optional[str] = None
_interpreter_checked = False


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


def _check_interpreter() -> Optional[str]:
    """Why this triton's interpreter cannot run the kernels here, or None.

    Triton's interpreter before 3.7 turns a runtime scalar (a loop's trip count, say) into a
    Python int with ``int(array_of_one_element)``; numpy deprecated that in 1.25 and newer numpy
    raises TypeError, so every kernel with such a loop fails mid-run. Checked once, by trying the
    same conversion, so the registry can say so instead of failing inside a kernel.
    """
    global _interpreter_problem, _interpreter_checked
    if not _interpreter_checked:
        _interpreter_checked = True
        import numpy as np
        import triton

        try:
            with warnings.catch_warnings():  # numpy 1.25 - 2.3 warn: deprecated, not refused
                warnings.simplefilter("ignore", DeprecationWarning)
                int(np.ones(1, dtype=np.int32))
        except TypeError:
            version = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
            if version < (3, 7):
                _interpreter_problem = (
                    f"triton {triton.__version__}'s interpreter converts 1-element arrays with "
                    f"int(), which numpy {np.__version__} refuses, so the Triton kernels cannot "
                    "run on the CPU here; pip install 'triton>=3.7' (or 'numpy<2.4') for "
                    "TRITON_INTERPRET=1 (CUDA tensors are not affected)"
                )
    return _interpreter_problem


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
        return _check_interpreter()
    return f"Triton kernels do not run on device type '{device_type}'; {_NEED_DEVICE}"


def _impls():
    from .._triton import impls

    return impls()


register_backend(Backend(name="triton", probe=_probe, supports_fn=_supports, impls=_impls))
