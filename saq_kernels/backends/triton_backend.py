"""The "triton" backend: saq_kernels/_triton, imported lazily.

Placeholder until the kernels land: reports why it is unavailable.
"""
from . import Backend, register_backend

_REASON = "the Triton kernels are not part of this build yet"
register_backend(Backend(name="triton", probe=lambda: _REASON, supports_fn=lambda op, d, t: _REASON))
