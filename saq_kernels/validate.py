"""Argument checks for the ``saq`` ops: every error names the op, the argument and the fix.

Shape, dtype and device checks are free (host metadata). Value checks (scale/clip positive and
finite) need the tensor's data: on CPU tensors they run through ``torch._assert_async`` (no Python
``.item()``, so they also work inside a step that forbids host syncs); on GPU tensors they are
skipped, because reading device memory would stall the stream every step. Set
``saq_kernels.validate.CHECK_VALUES = False`` to skip them everywhere.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

CHECK_VALUES = True
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SUPPORTED_BITS = "2..8 (or 32 to disable quantization)"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_float(op: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"saq::{op}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"saq::{op}: '{name}' has dtype {t.dtype}; quantizers take floating tensors "
            f"(float32, float16, bfloat16): convert with {name}.float()"
        )


def check_bits(op: str, bits) -> bool:
    """Validate a bit width; returns True when it means "quantization off" (32)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"saq::{op}: 'bits' must be an int in {SUPPORTED_BITS}, got {bits!r}")
    if bits == 32:
        return True
    if not 2 <= bits <= 8:
        raise ValueError(f"saq::{op}: bits={bits} is not supported; use {SUPPORTED_BITS}")
    return False


def check_quant_range(op: str, quant_min: int, quant_max: int) -> None:
    for name, v in (("quant_min", quant_min), ("quant_max", quant_max)):
        # isinstance first: int(nan) / int(inf) raise without naming the op
        if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                or int(v) != v):
            raise TypeError(f"saq::{op}: {name} must be an integer, got {v!r}")
    if quant_min > quant_max:
        raise ValueError(
            f"saq::{op}: quant_min={quant_min} > quant_max={quant_max}; pass quant_min <= quant_max "
            f"(e.g. 0..15 for unsigned 4-bit, -8..7 for signed)"
        )
    if quant_max - quant_min >= 2**16 or not -(2**31) <= quant_min <= quant_max < 2**31:
        raise ValueError(
            f"saq::{op}: the range quant_min..quant_max ({quant_min}..{quant_max}) needs more than "
            f"16 bits (at most 65536 levels, within int32)"
        )


def check_same_device(op: str, name: str, t: Tensor, ref: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"saq::{op}: '{name}' must be a 0-dim torch.Tensor, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(
            f"saq::{op}: '{name}' is on {t.device} but the data is on {ref.device}; "
            f"move it with {name}.to({str(ref.device)!r})"
        )


def check_values_positive(op: str, name: str, t: Tensor, absolute: bool = False) -> None:
    """Assert every element of ``t`` (or ``|t|``) is finite and > 0, without a Python sync."""
    if not CHECK_VALUES or _compiling() or t.device.type != "cpu":
        return
    v = t.detach().float()
    if absolute:
        v = v.abs()
    what = f"|{name}|" if absolute else name
    torch._assert_async(
        torch.all(torch.isfinite(v) & (v > 0)),
        f"saq::{op}: '{name}' must be finite and {what} > 0, got a non-positive or non-finite value; "
        f"re-initialize it (e.g. from the data range) or lower the learning rate of the quantizer parameters",
    )


def check_param(
    op: str,
    name: str,
    p: Tensor,
    x: Tensor,
    axis: Optional[int],
    positive: bool,
    absolute: bool = False,
) -> Optional[int]:
    """Check a scale / zero point / clip against x; returns the normalized axis."""
    if not isinstance(p, Tensor):
        raise TypeError(f"saq::{op}: '{name}' must be a torch.Tensor, got {type(p).__name__}; wrap it with torch.tensor([...])")
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"saq::{op}: '{name}' has dtype {p.dtype}; pass a float32 tensor ({name}.float())")
    check_same_device(op, name, p, x)
    if axis is None:
        if p.numel() != 1 or p.dim() > 1:
            raise ValueError(
                f"saq::{op}: per-tensor '{name}' must have shape [1] or [], got {list(p.shape)}; "
                f"pass axis=<channel dim> for per-channel quantization"
            )
    else:
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"saq::{op}: axis={axis} is out of range for x with {x.dim()} dims")
        axis = axis % x.dim()
        if p.dim() != 1 or p.shape[0] != x.shape[axis]:
            raise ValueError(
                f"saq::{op}: per-channel '{name}' must have shape [{x.shape[axis]}] "
                f"(x.shape[{axis}]), got {list(p.shape)}"
            )
    if positive:
        check_values_positive(op, name, p, absolute)
    return axis


def check_perturbation(op: str, x: Tensor, e: Optional[Tensor], s: Optional[Tensor]) -> None:
    if (e is None) != (s is None):
        raise ValueError(f"saq::{op}: pass both 'perturbation' and 'perturb_scale', or neither")
    if e is None:
        return
    check_float(op, "perturbation", e)
    if e.shape != x.shape:
        raise ValueError(f"saq::{op}: 'perturbation' has shape {list(e.shape)} but x has {list(x.shape)}")
    check_same_device(op, "perturbation", e, x)
    check_same_device(op, "perturb_scale", s, x)
    if s.numel() != 1:
        raise ValueError(f"saq::{op}: 'perturb_scale' must be a 0-dim tensor, got shape {list(s.shape)}")


def check_tensor_list(op: str, **lists) -> None:
    """All lists have equal length and pair up in shape with the first list; floating tensors on
    one device. This runs on every SAM op call, so the fast path compares whole lists of shapes
    and looks at each list's first tensor for device and dtype (a full per-tensor Python loop cost
    ~0.1 ms for a ResNet-20 list, as much as the kernel); per-tensor devices and dtypes are
    checked again by the native kernels. On any mismatch the slow path names the culprit."""
    try:
        first = next(iter(lists.values()))
        shapes = [t.shape for t in first]
        if not first or all(
            len(seq) == len(first)
            and [t.shape for t in seq] == shapes
            and seq[0].device == first[0].device
            and seq[0].is_floating_point()
            for seq in lists.values()
        ):
            return
    except (AttributeError, TypeError, StopIteration):
        pass  # a non-tensor entry: the loop below says which
    _check_tensor_list_slow(op, **lists)


def check_one_device(op: str, **lists) -> None:
    """Every tensor of these lists on one device. Called by the SAM ops' fakes, which also serve
    as their Meta kernels: a list that mixes meta tensors with others dispatches there (to the
    fake, not to a native kernel that would check), and must not pass with made-up outputs."""
    ref_name, ref = None, None
    for name, seq in lists.items():
        for i, t in enumerate(seq):
            if ref is None:
                ref_name, ref = f"{name}[{i}]", t.device
            elif t.device != ref:
                raise ValueError(
                    f"saq::{op}: '{name}[{i}]' is on {t.device} but '{ref_name}' is on {ref}; "
                    "the SAM ops take the tensors of one device per call"
                )


def _check_tensor_list_slow(op: str, **lists) -> None:
    names = list(lists)
    first_name = names[0]
    first = lists[first_name]
    for name in names:
        seq = lists[name]
        if len(seq) != len(first):
            raise ValueError(
                f"saq::{op}: '{name}' has {len(seq)} tensors but '{first_name}' has {len(first)}; pass one per parameter"
            )
        for i, t in enumerate(seq):
            if not isinstance(t, Tensor):
                raise TypeError(f"saq::{op}: '{name}[{i}]' is {type(t).__name__}, not a tensor (a parameter without .grad?)")
            ref = first[i]
            if t.shape != ref.shape:
                raise ValueError(f"saq::{op}: '{name}[{i}]' has shape {list(t.shape)}, '{first_name}[{i}]' has {list(ref.shape)}")
            if t.device != ref.device:
                raise ValueError(f"saq::{op}: '{name}[{i}]' is on {t.device}, '{first_name}[{i}]' on {ref.device}; put them on one device")
            if not t.is_floating_point():
                raise TypeError(f"saq::{op}: '{name}[{i}]' has dtype {t.dtype}; SAM ops take floating tensors")


def check_backup_prefix(op: str, params, backups) -> None:
    """``backups`` pairs with the first ``len(backups)`` params (the perturbed ones)."""
    if len(backups) > len(params):
        raise ValueError(f"saq::{op}: {len(backups)} backups for {len(params)} params; pass at most one per parameter")
    check_tensor_list(op, params=list(params[: len(backups)]), backups=list(backups))
