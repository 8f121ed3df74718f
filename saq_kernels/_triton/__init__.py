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

import functools
from typing import Callable, Dict

import torch

from ..backends import OP_NAMES as OPS
from . import fake_quantize as _fq
from . import liq_quantize as _liq
from . import sam as _sam

#: True when the kernels were built by the Triton interpreter (they run on CPU tensors).
INTERPRETED = type(_fq._fake_quantize_fwd_kernel).__name__ == "InterpretedFunction"


def _data_device(args) -> torch.device:
    """The device of the op's data: its first tensor argument, or the first tensor of its first
    tensor list (the SAM ops)."""
    first = args[0]
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")


def on_data_device(fn: Callable) -> Callable:
    """Run ``fn`` with the data's GPU as the current device.

    Triton launches on the current CUDA device (and allocates there, e.g. partial sums); for
    tensors on another GPU of a process that never called torch.cuda.set_device, the launch
    would read foreign pointers. ATen ops switch devices the same way (a device guard)."""

    @functools.wraps(fn)
    def run(*args):
        dev = _data_device(args)
        if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return fn(*args)
        return fn(*args)

    return run


def impls() -> Dict[str, Callable]:
    """op name -> implementation taking the op's positional arguments (saq_kernels/OPS.md)."""
    table = {}
    for mod in (_fq, _liq, _sam):
        for name in OPS:
            if hasattr(mod, name):
                table[name] = on_data_device(getattr(mod, name))
    return table
