"""Which backends a kernel test runs on: pytest params and the skip for a backend that cannot
serve an op here (tests/kernels/conftest.py's ``op_backend`` and test modules' own fixtures)."""
from __future__ import annotations

import pytest
import torch

import saq_kernels as sk


def backend_params(cpu, cuda):
    """pytest params ``(backend name, device)``: the ``cpu`` names on the CPU, the ``cuda`` names
    on a GPU (marker ``gpu``), with ids such as ``triton-cuda``."""
    out = [pytest.param((n, "cpu"), id=f"{n}-cpu") for n in cpu]
    out += [pytest.param((n, "cuda"), id=f"{n}-cuda", marks=[pytest.mark.gpu]) for n in cuda]
    return out


def skip_unless_served(name: str, device: str, op: str) -> None:
    """Skip the test, with the reason, where backend ``name`` cannot serve ``op`` on ``device``."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = sk.get_backend(name).supports(op, device, torch.float32)
    if reason is not None:
        pytest.skip(f"{name} backend unavailable on {device}: {reason}")
