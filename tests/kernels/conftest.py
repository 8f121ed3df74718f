"""Fixtures shared by the kernel tests.

``op_backend``: ``(backend name, device)`` for every backend that can run here -- reference, cpp
and triton (interpreter) on the CPU; cuda, triton and reference on a GPU (marker ``gpu``) --
skipped with the reason where the backend cannot serve the module's ``BACKEND_OP`` (the op whose
availability decides, e.g. ``"fake_quantize_backward"``).
"""
from __future__ import annotations

import pytest

from backends_under_test import backend_params, skip_unless_served


@pytest.fixture(params=backend_params(("reference", "cpp", "triton"), ("cuda", "triton", "reference")))
def op_backend(request):
    name, device = request.param
    skip_unless_served(name, device, getattr(request.module, "BACKEND_OP"))
    return name, device

