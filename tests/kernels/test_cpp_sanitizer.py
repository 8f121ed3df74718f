"""The C++ CPU kernels under AddressSanitizer (slow).

The "cpp" backend is what users without a GPU run, so its vectorized loops, scalar tails, F16C
tiles and fixed-chunk reductions are checked for memory errors too: with SAQ_SANITIZE=address
saq_kernels JIT-builds the C++ sources with AddressSanitizer (saq_kernels/_build.py), and the cpp
backend's parity suites, then the SAQ step suites, run against that build in a subprocess set up
by tests/kernels/sanitizer.py: a read or write past a tensor's end stops the run with the
sanitizer's report, and an output element a kernel forgets to write shows as a NaN.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bit_utils import run_pytest
from sanitizer import asan_env, asan_reports

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

pytestmark = pytest.mark.slow

# the kernel suites, then the SAQ steps that drive the multi-tensor ops over real parameter lists
SUITES = [HERE / s for s in ("test_cpp_backend.py", "test_lowp_steps.py", "test_native_autograd.py",
                             "test_fq_relu.py", "test_liq_relu.py")]
SUITES += [ROOT / "tests" / "training" / s for s in ("test_fast_step.py", "test_saq_step.py",
                                                     "test_relu_fold.py")]


def _env(tmp_path: Path) -> dict:
    env = asan_env(tmp_path / "asan", SAQ_SANITIZE="address", SAQ_BUILD_DIR=str(ROOT / "build" / "asan-cpp"))
    if env is None:
        pytest.skip("the C++ compiler has no shared AddressSanitizer runtime (libasan.so)")
    return env


def _report(r: subprocess.CompletedProcess, tmp_path: Path) -> str:
    return asan_reports(tmp_path / "asan") + r.stdout[-5000:] + "\n--- stderr ---\n" + r.stderr[-3000:]


def test_cpp_backend_suites_under_address_sanitizer(tmp_path):
    env = _env(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-c", "import saq_kernels as s; from saq_kernels import _build as b; "
         "print(s.available_backends()['cpp']); print(b.build_info()['built_by'])"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert probe.returncode == 0, _report(probe, tmp_path)
    assert probe.stdout.split()[-2:] == ["None", "jit-address"], probe.stdout + probe.stderr[-3000:]
    r = run_pytest(*SUITES, env=env, timeout=1800)
    assert r.returncode == 0, _report(r, tmp_path)
    assert " passed" in r.stdout and " failed" not in r.stdout, _report(r, tmp_path)


def test_unknown_sanitizer_is_refused(tmp_path):
    env = dict(os.environ, SAQ_SANITIZE="thread")
    code = "import saq_kernels as s; print(s.available_backends()['cpp'])"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "SAQ_SANITIZE='thread' is not supported" in r.stdout
