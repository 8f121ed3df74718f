"""Backend registry: which implementation serves each ``saq`` op call.

A backend is a :class:`Backend`: a name, a lazily computed availability (``None`` or the reason it
is unavailable), a capability check per (op, device type, dtype) and a table of implementations
taking the op's positional arguments (see saq_kernels/OPS.md). Capabilities are data and refusals are
sentences: the same string is the error message and the pytest skip reason.

Selection, per call:
1. an explicit choice: the innermost ``use_backend(name)`` block of the calling thread; while a
   backward pass runs in a thread with no block of its own, the most recently entered block
   still open in any thread (PyTorch runs the backward pass of CUDA tensors on its own
   per-device thread, which must see the block its caller's ``loss.backward()`` runs in); else
   the ``SAQ_BACKEND`` environment variable. It must be available and support the input, or
   the call raises with the reason (no silent fallback: a user who asked for "triton" must not
   get the reference).
2. otherwise the first backend that is available and supports it, in the order measured for this
   device type, op and dtype (measured_order.py, written by benchmarks/choose_defaults.py from the
   recorded benchmarks), then in the device type's default order; the reference supports
   everything, so there is always one. ``set_default_order`` replaces both for a device type.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

__all__ = [
    "OP_NAMES",
    "Backend",
    "register_backend",
    "get_backend",
    "available_backends",
    "use_backend",
    "select",
    "default_order",
    "set_default_order",
]


#: Every op a backend implements, with the positional signatures of saq_kernels/OPS.md.
OP_NAMES = (
    "fake_quantize",
    "fake_quantize_backward",
    "liq_quantize",
    "liq_quantize_backward",
    "grad_sq_norm",
    "sam_perturb_",
    "sam_restore_",
    "sam_restore_sgd_",
    "sam_restore_adamw_",
)


@dataclass
class Backend:
    """One implementation family of the ``saq`` ops.

    Args:
        name: "reference", "cpp", "cuda" or "triton".
        probe: called once, lazily; returns None when usable or a sentence saying why not.
        supports_fn: ``(op, device_type, dtype) -> None | reason``.
        impls: op name -> callable with the op's positional signature, or a zero-argument loader
            returning that dict (so heavy modules import only when first used).
    """

    name: str
    probe: Callable[[], Optional[str]]
    supports_fn: Callable[[str, str, object], Optional[str]]
    impls: object = field(default_factory=dict)
    _reason: object = field(default=..., repr=False)
    _table: Optional[Dict[str, Callable]] = field(default=None, repr=False)

    def available(self) -> Optional[str]:
        """None if this backend can run here, else the reason it cannot."""
        if self._reason is ...:
            try:
                self._reason = self.probe()
            except Exception as exc:  # a broken install must never break import
                self._reason = f"{self.name}: probing failed: {type(exc).__name__}: {exc}"
        return self._reason

    def table(self) -> Dict[str, Callable]:
        """op name -> implementation. Probes first (loading the extension is part of the cpp /
        cuda probe), so an unavailable backend raises with its reason instead of failing inside
        the loader."""
        if self._table is None:
            reason = self.available()
            if reason is not None:
                raise RuntimeError(f"saq_kernels: backend '{self.name}' is unavailable here: {reason}")
            self._table = self.impls() if callable(self.impls) else dict(self.impls)
        return self._table

    def supports(self, op: str, device_type: str, dtype=None) -> Optional[str]:
        """None if this backend can serve ``op`` for this input, else the reason it cannot."""
        reason = self.available()
        if reason is not None:
            return reason
        reason = self.supports_fn(op, device_type, dtype)
        if reason is not None:
            return reason
        if op not in self.table():
            return f"backend '{self.name}' has no kernel for op '{op}'"
        return None

    def reset(self) -> None:
        """Forget the cached probe result (tests use this after building the extension)."""
        self._reason = ...
        self._table = None


_BACKENDS: Dict[str, Backend] = {}
# Default order per device type, fastest first; the per-op, per-dtype orders measured on the
# recorded benchmarks (measured_order.py) come before it. Backends that are unavailable are skipped.
# CUDA: the H200 runs of 2026-11-27 (benchmarks/gpu_check.sh; benchmarks/results/nvidia-h200.csv)
# passed every GPU test of both kernels (1051, every fp16 / bf16 bit pattern through the SAM
# steps included) and ranked cuda first, then triton, for every op and dtype they timed (fp32,
# bf16; geometric mean over the shapes of forward+backward for the quantizers, of the update for
# the SAM ops: triton wins a few single-direction rows in fp32 and liq_quantize's fp32
# forward+backward at 2^26); an op or dtype without rows of its own (fp16) takes that ranking
# from here.
_DEFAULT_ORDER: Dict[str, List[str]] = {
    "cpu": ["cpp", "reference"],
    "cuda": ["cuda", "triton", "reference"],
}
# device types whose order a user set (set_default_order): the measured orders no longer apply
_USER_ORDER: set = set()
# (device type, op, dtype) -> effective order; cleared by set_default_order
_ORDER_CACHE: Dict[tuple, List[str]] = {}
_LOCAL = threading.local()  # .stack: this thread's open use_backend blocks, innermost last
# every open use_backend block of every thread, as (token, name), most recently entered last:
# what a thread without blocks of its own (autograd's backward threads) follows
_OPEN: List[tuple] = []
_OPEN_LOCK = threading.Lock()


_DTYPE_KEYS = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def _order(device_type: str, op: Optional[str], dtype) -> List[str]:
    """The effective order for this call (cached: select() runs on every op call)."""
    key = (device_type, op, dtype)
    order = _ORDER_CACHE.get(key)
    if order is None:
        base = _DEFAULT_ORDER.get(device_type, ["reference"])
        measured: List[str] = []
        dkey = _DTYPE_KEYS.get(str(dtype))  # the results' spelling of the dtype
        if device_type not in _USER_ORDER and op is not None and dkey is not None:
            from .measured_order import MEASURED_ORDER

            measured = MEASURED_ORDER.get(device_type, {}).get(op, {}).get(dkey, [])
        order = _ORDER_CACHE[key] = list(measured) + [n for n in base if n not in measured]
    return order


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    _ensure_registered()
    if name not in _BACKENDS:
        raise ValueError(
            f"saq_kernels: unknown backend {name!r}; choose one of {sorted(_BACKENDS)}"
        )
    return _BACKENDS[name]


def available_backends() -> Dict[str, Optional[str]]:
    """Map every known backend name to None (usable here) or the reason it is unavailable."""
    _ensure_registered()
    return {name: b.available() for name, b in _BACKENDS.items()}


def default_order(device_type: str, op: Optional[str] = None, dtype=None) -> List[str]:
    """The backend names tried, in order, for ``op`` on ``dtype`` tensors of ``device_type``
    (unavailable ones are skipped at selection); without ``op``, the device type's order."""
    return list(_order(device_type, op, dtype))


def set_default_order(device_type: str, names: List[str]) -> None:
    """Replace the backend order of a device type, for every op and dtype (the measured per-op
    orders no longer apply to it). Names are validated."""
    for n in names:
        get_backend(n)
    _DEFAULT_ORDER[device_type] = list(names)
    _USER_ORDER.add(device_type)
    _ORDER_CACHE.clear()


def _in_backward() -> bool:
    """True while this thread executes a backward pass (an autograd graph task)."""
    import torch

    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _explicit() -> Optional[str]:
    stack = getattr(_LOCAL, "stack", None)
    if stack:
        return stack[-1]
    # a thread with no block of its own, inside a backward pass: the autograd engine's device
    # thread running the backward of a loss.backward() called inside a block (other threads,
    # an evaluation thread say, keep their own choice)
    if _OPEN and _in_backward():
        try:
            return _OPEN[-1][1]
        except IndexError:  # the last block closed in between
            pass
    env = os.environ.get("SAQ_BACKEND", "").strip()
    return env or None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Run the ``saq`` ops inside this block on backend ``name``.

    Raises ValueError for an unknown name and RuntimeError with the reason when the backend is
    unavailable here, so a typo or a missing build never silently falls back to another path.

    The block applies to the calling thread, and to backward passes that run, while it is open,
    in threads with no block of their own -- the autograd engine's backward thread for CUDA
    tensors -- so that ``loss.backward()`` inside the block runs the backward ops on ``name`` too.
    Other threads keep their own choice. (Two threads that each hold a block and run backward
    passes on the GPU at the same time: their backward ops follow the block entered last.)
    """
    backend = get_backend(name)
    reason = backend.available()
    if reason is not None:
        raise RuntimeError(f"saq_kernels.use_backend({name!r}): backend unavailable: {reason}")
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    token = object()
    stack.append(name)
    with _OPEN_LOCK:
        _OPEN.append((token, name))
    try:
        yield backend
    finally:
        stack.pop()
        with _OPEN_LOCK:
            _OPEN[:] = [t for t in _OPEN if t[0] is not token]


def _serving(op: str, device_type: str, dtype) -> List[str]:
    """The backends that can serve ``op`` for this input."""
    return [n for n, b in _BACKENDS.items() if b.supports(op, device_type, dtype) is None]


def select(op: str, device_type: str, dtype=None) -> Callable:
    """Return the implementation of ``op`` for this input (see module docstring for the rule)."""
    _ensure_registered()
    name = _explicit()
    if name is not None:
        backend = get_backend(name)
        reason = backend.supports(op, device_type, dtype)
        if reason is not None:
            raise RuntimeError(
                f"saq::{op}: backend {name!r} was requested (use_backend / SAQ_BACKEND) but cannot "
                f"serve this input ({device_type}, {dtype}): {reason}. Unset SAQ_BACKEND or pick "
                f"one that can: {_serving(op, device_type, dtype)}."
            )
        return backend.table()[op]
    for cand in _order(device_type, op, dtype):
        backend = _BACKENDS.get(cand)
        if backend is not None and backend.supports(op, device_type, dtype) is None:
            return backend.table()[op]
    return _BACKENDS["reference"].table()[op]


_REGISTERED = False


def _ensure_registered() -> None:
    # Deferred so importing saq_kernels never imports triton or loads the extension.
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    from . import reference_backend, native_backend, triton_backend  # noqa: F401
