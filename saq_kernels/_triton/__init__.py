"""The Triton kernels of the ``saq`` ops (imported lazily by saq_kernels.backends.triton_backend).

Importing this package imports triton and compiles nothing until a kernel first runs. Modules,
one per op family (the same stem as reference.py, csrc/ and the tests):

* ``fake_quantize``: ``_fake_quantize_{fwd,bwd}_kernel``, launchers ``fake_quantize_{fwd,bwd}``;
* ``liq_quantize``: ``_liq_quantize_{fwd,bwd}_kernel`` plus the statistics kernels of the fused
  weight standardization;
* ``sam``: the multi-tensor ``grad_sq_norm`` / ``sam_perturb_`` / ``sam_restore_`` /
  ``sam_restore_sgd_`` / ``sam_restore_adamw_`` kernels (one launch per dtype group);
* ``utils``: exact rounding (half to even, bf16 casts), launch constants.

CPU tensors run only under the Triton interpreter, and the interpreter is chosen when a kernel is
*decorated*, i.e. when this package is first imported: ``TRITON_INTERPRET=1`` must be in the
environment by then (set it before importing triton or saq_kernels' Triton modules).
``INTERPRETED`` records what actually happened.
"""
from __future__ import annotations

from typing import Callable, Dict

from ..backends import OP_NAMES as OPS
from . import fake_quantize as _fq
from . import liq_quantize as _liq
from . import sam as _sam

#: True when the kernels were built by the Triton interpreter (they run on CPU tensors).
INTERPRETED = type(_fq._fake_quantize_fwd_kernel).__name__ == "InterpretedFunction"


def impls() -> Dict[str, Callable]:
    """op name -> implementation taking the op's positional arguments (saq_kernels/OPS.md)."""
    table = {}
    for mod in (_fq, _liq, _sam):
        for name in OPS:
            if hasattr(mod, name):
                table[name] = getattr(mod, name)
    return table
