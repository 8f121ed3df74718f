"""The CUDA kernels without a GPU: csrc/cuda run on the host by tests/kernels/cuda_emu.

* The emulator itself (cuda_emu/selftest.cpp, no torch): the real block reduction of
  csrc/cuda/reduce.cuh sums correctly across blocks, and what a GPU faults or hangs on aborts
  with the emulator's message (divergent __syncthreads, partial-warp shuffles, a misaligned
  16-byte load, launch geometry outside the device limits), so these checks can fail.
* The CUDA backend's whole parity suite, tests/kernels/test_cuda_backend.py (with the non-finite
  input cases of test_nonfinite_inputs.py and the bitwise fp16/bf16 SAM steps over every bit
  pattern of test_lowp_steps.py), in a subprocess against the emulated kernels (SAQ_CUDA_EMU_LIB): the same kernel sources and the same
  registration code as on a GPU, CPU tensors; the CUDA-graph tests skip there.
* (slow) The same suite with the emulated kernels built with AddressSanitizer: out-of-bounds
  accesses stop it, a host stand-in for compute-sanitizer's memcheck.

What this does not cover: the device's memory model, timing, and the code nvcc generates (the
SASS checks of .ci/check_cuda.sh cover some of that); the GPU run covers the rest.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from bit_utils import load_script, run_pytest
from sanitizer import asan_env, asan_reports

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EMU = HERE / "cuda_emu"
CXX = os.environ.get("CXX") or "g++"

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"the C++ compiler {CXX!r} was not found")

_FAULTS = {
    "divergent_sync": r"__syncthreads\(\) not reached by every thread of the block",
    "partial_warp_shuffle": r"__shfl_down_sync not reached by every lane of the warp",
    "misaligned_load": r"__ldca: misaligned 16-byte load",
    "block_too_large": r"a block must have 32\.\.1024 threads",
    "block_not_warp_multiple": r"a block must have 32\.\.1024 threads, a multiple of 32",
    "grid_y_too_large": r"grid\.y / grid\.z above 65535",
    "empty_grid": r"empty grid",
}


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> str:
    exe = tmp_path_factory.mktemp("cuda_emu") / "selftest"
    r = subprocess.run([CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
                        f"-I{EMU / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}", f"-I{ROOT / 'csrc'}",
                        str(EMU / "selftest.cpp"), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return str(exe)


def test_emulated_block_reduction_is_exact(selftest):
    """5 blocks x 256 threads sum 100003 integers (i % 97) through reduce.cuh's block_sum."""
    r = subprocess.run([selftest, "ok_block_sum"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    expected = sum(i % 97 for i in range(100003))
    assert r.stdout.split() == ["ok", str(expected)]


@pytest.mark.parametrize("case", sorted(_FAULTS))
def test_emulator_stops_at_device_faults(selftest, case):
    r = subprocess.run([selftest, case], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no fault" not in r.stdout, f"{case}: the emulator let it run"
    assert re.search(r"cuda_emu: .*" + _FAULTS[case], r.stderr), r.stderr


def test_launch_rewrite_keeps_template_arguments_and_rejects_the_unknown():
    build = load_script(EMU / "build_emu.py")
    src = "k<T, TE, true><<<grid, kThreads, 0, stream>>>(x, f(a, b), y);"
    assert build.rewrite_launches(src) == (
        "emu_launch(dim3(grid), dim3(kThreads), [&]() { k<T, TE, true>(x, f(a, b), y); });")
    with pytest.raises(ValueError, match="launch"):
        build.rewrite_launches("k<<<g, b>>>(x)")  # no semicolon: not a statement it understands


def _run_cuda_backend_suite(lib: str, env: dict, asan_log: Path | None = None) -> None:
    """tests/kernels/test_cuda_backend.py, test_nonfinite_inputs.py (less its GPU-only "cuda"
    cases) and test_lowp_steps.py's bitwise fp16/bf16 SAM steps (the emulated cases) in a
    subprocess on the emulated kernels of ``lib``."""
    env = dict(env, SAQ_CUDA_EMU_LIB=lib)
    r = run_pytest(HERE / "test_cuda_backend.py", HERE / "test_nonfinite_inputs.py",
                   HERE / "test_lowp_steps.py", env=env,
                   k="not cuda] and (not test_lowp_steps or cuda-emu)")
    report = r.stdout[-6000:] + "\n--- stderr ---\n" + r.stderr[-3000:]
    if asan_log is not None:
        report = asan_reports(asan_log) + report
    assert r.returncode == 0, report
    passed = re.search(r"(\d+) passed", r.stdout)
    skipped = re.search(r"(\d+) skipped", r.stdout)
    # Every parity test ran: only the three CUDA-graph tests may skip.
    assert passed and int(passed.group(1)) >= 190, report
    assert skipped is None or int(skipped.group(1)) <= 3, report


def test_cuda_backend_suite_passes_on_the_emulated_kernels():
    """tests/kernels/test_cuda_backend.py, every test but the CUDA-graph ones, on the host, with
    an H100's 132 multiprocessors (the launch geometry of the GPU the targets name; the sanitizer
    run below uses 3, where the grid-stride loops go round several times)."""
    build = load_script(EMU / "build_emu.py")
    _run_cuda_backend_suite(build.build(), dict(os.environ, SAQ_CUDA_EMU_SMS="132"))


@pytest.mark.slow
def test_cuda_backend_suite_under_address_sanitizer(tmp_path):
    """The same suite with the emulated kernels built with AddressSanitizer: no kernel reads or
    writes outside its tensors (outputs are exactly-sized allocations with redzones after them),
    and allocations are NaN-filled (sanitizer.py), so an output element a kernel forgets to
    write, or a workspace it reads before writing, shows."""
    log = tmp_path / "asan"
    env = asan_env(log, SAQ_CUDA_EMU_SMS="3")
    if env is None:
        pytest.skip(f"{CXX} has no shared AddressSanitizer runtime (libasan.so)")
    build = load_script(EMU / "build_emu.py")
    _run_cuda_backend_suite(build.build(asan=True), env, asan_log=log)
