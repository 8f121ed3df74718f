"""The Triton parity suite with every new allocation NaN-filled (slow).

The Triton kernels allocate their outputs and workspaces with torch.empty; on the CPU that memory
usually holds old data, so an element a kernel forgets to write could still match by chance.
Here test_triton_backend.py runs (under the interpreter) in a subprocess whose allocations are
all filled with 0xff bytes (NaN in fp32/fp16/bf16) by the AddressSanitizer runtime
(tests/kernels/sanitizer.py; nothing is instrumented, the runtime only fills allocations).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bit_utils import run_pytest
from sanitizer import asan_env, asan_reports

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.slow
def test_triton_suite_with_nan_filled_allocations(tmp_path):
    log = tmp_path / "asan"
    env = asan_env(log, TRITON_INTERPRET="1")
    if env is None:
        pytest.skip("the C++ compiler has no shared AddressSanitizer runtime (libasan.so)")
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.empty(1000).isnan().all().item())"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == "True", probe.stdout + probe.stderr[-2000:]  # the fill is on
    r = run_pytest(HERE / "test_triton_backend.py", env=env)
    report = asan_reports(log) + r.stdout[-5000:] + "\n--- stderr ---\n" + r.stderr[-3000:]
    assert r.returncode == 0, report
    assert " passed" in r.stdout and " failed" not in r.stdout, report
