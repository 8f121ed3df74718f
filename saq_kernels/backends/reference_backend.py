"""The "reference" backend: saq_kernels.reference, on every device and dtype."""
from . import OP_NAMES, Backend, register_backend


def _impls():
    from .. import reference as R

    return {name: getattr(R, name) for name in OP_NAMES}


register_backend(
    Backend(
        name="reference",
        probe=lambda: None,
        supports_fn=lambda op, device_type, dtype: None,
        impls=_impls,
    )
)
