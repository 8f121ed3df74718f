"""saq_kernels: the ``saq`` torch.library ops (fake-quantize, LIQ, SAM multi-tensor updates).

Importing never fails because Triton, CUDA or the compiled extension is missing: those backends
report why they are unavailable (``available_backends()``) and the pure-PyTorch reference runs.

>>> import saq_kernels as sk
>>> y = sk.liq_quantize(w, clip, bits=4, signed=True, standardize=True)
>>> with sk.use_backend("reference"): ...
"""
from . import reference
from .backends import available_backends, default_order, get_backend, set_default_order, use_backend
from .ops import (
    fake_quantize,
    grad_sq_norm,
    liq_quantize,
    sam_perturb_,
    sam_restore_,
    sam_restore_adamw_,
    sam_restore_sgd_,
)

__version__ = "0.1.0"

__all__ = [
    "reference",
    "available_backends",
    "default_order",
    "get_backend",
    "set_default_order",
    "use_backend",
    "fake_quantize",
    "liq_quantize",
    "grad_sq_norm",
    "sam_perturb_",
    "sam_restore_",
    "sam_restore_sgd_",
    "sam_restore_adamw_",
]
