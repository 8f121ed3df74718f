"""The "cpp" (CPU) and "cuda" backends: the compiled extension saq_kernels._C (namespace saq_C).

Placeholder until the extension lands: both report why they are unavailable.
"""
from . import Backend, register_backend

_REASON = "saq_kernels._C is not part of this build yet"

for _name in ("cpp", "cuda"):
    register_backend(
        Backend(name=_name, probe=lambda: _REASON, supports_fn=lambda op, d, t: _REASON)
    )
