"""Fixtures shared by the kernel tests.

``op_backend``: ``(backend name, device)`` for every backend that can run here -- reference, cpp
and triton (interpreter) on the CPU; cuda, triton and reference on a GPU (marker ``gpu``) --
skipped with the reason where the backend cannot serve the module's ``BACKEND_OP`` (the op whose
availability decides, e.g. ``"fake_quantize_backward"``).
"""
from __future__ import annotations

import pytest
import torch

import saq_kernels as sk


def _params():
    out = [pytest.param((n, "cpu"), id=f"{n}-cpu") for n in ("reference", "cpp", "triton")]
    for name in ("cuda", "triton", "reference"):
        out.append(pytest.param((name, "cuda"), id=f"{name}-cuda", marks=[pytest.mark.gpu]))
    return out


@pytest.fixture(params=_params())
def op_backend(request):
    name, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    op = getattr(request.module, "BACKEND_OP")
    reason = sk.get_backend(name).supports(op, device, torch.float32)
    if reason is not None:
        pytest.skip(f"{name} backend unavailable on {device}: {reason}")
    return name, device

