"""benchmarks/gpu_failures.py: which backend a failing GPU test implicates (gpu_check.sh leaves
that backend out of the proposed default order). Node ids from the real GPU selection."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_failures as gf  # noqa: E402

CASES = [
    ("tests/kernels/test_cuda_backend.py::test_cuda_graph_forward_backward[fake_quantize]", {"cuda"}),
    ("tests/kernels/test_cuda_memcheck.py::test_memcheck_cuda_backend", {"cuda"}),
    ("tests/kernels/test_triton_backend.py::test_cuda_graph_capture_forward_backward", {"triton"}),
    ("tests/kernels/test_triton_backend.py::test_fake_quantize_backward[none-None-dtype0]", {"triton"}),
    ("tests/kernels/test_fq_relu.py::test_equals_relu_then_quantize[cuda-cuda-lsq-per-tensor-float32]", {"cuda"}),
    ("tests/kernels/test_fq_relu.py::test_equals_relu_then_quantize[triton-cuda-lsq-per-tensor-float32]", {"triton"}),
    ("tests/kernels/test_fq_relu.py::test_equals_relu_then_quantize[reference-cuda-lsq-per-tensor-float32]", set()),
    ("tests/kernels/test_native_autograd.py::test_inference_mode[cuda]", {"cuda"}),
    ("tests/kernels/test_lowp_steps.py::test_perturb_bitwise_over_all_patterns[cuda-torch.float16-False]", {"cuda"}),
    ("tests/kernels/test_lowp_steps.py::test_perturb_bitwise_over_all_patterns[triton-gpu-torch.float16-False]", {"triton"}),
    ("tests/kernels/test_nonfinite_inputs.py::test_liq_with_infinite_inputs[unsigned-torch.float32-cuda]", {"cuda"}),
    ("tests/training/test_fast_step.py::test_full_saq_step_captures_in_a_cuda_graph[reference]", set()),
    ("tests/training/test_fast_step.py::test_full_saq_step_captures_in_a_cuda_graph[triton]", {"triton"}),
    ("tests/training/test_fast_step.py::test_fused_path_matches_reference_path_on_gpu[3-True-cuda]", {"cuda"}),
    ("tests/training/test_fast_step.py::test_fused_path_matches_reference_path_on_gpu[1-False-triton]", {"triton"}),
]


@pytest.mark.parametrize("nodeid,want", CASES)
def test_backends_of(nodeid, want):
    assert gf.backends_of(nodeid) == want


def test_only_the_node_id_counts():
    lines = [
        "FAILED tests/kernels/test_fq_relu.py::test_equals_relu_then_quantize[triton-cuda-lsq-per-tensor-float32]"
        " - AssertionError: tensors on device='cuda:0' differ",
        "ERROR tests/training/test_fast_step.py::test_full_saq_step_captures_in_a_cuda_graph[reference] - cuda",
        "tests/kernels/test_cuda_backend.py::test_x PASSED",  # not a failure line
        "---- shard 0/8: rc=1",
    ]
    assert gf.failing_backends(lines) == {"triton"}
    # pytest-xdist reports a crashed worker's test like a failure (gpu_check.sh's default runner)
    crashed = ["[gw3] node down: Not properly terminated",
               "FAILED tests/kernels/test_cuda_backend.py::test_errors_name_op_and_argument - worker "
               "'gw3' crashed while runn..."]
    assert gf.failing_backends(crashed) == {"cuda"}


def test_every_gpu_test_id_is_read():
    # every node id the GPU run selects (as collected here) maps to known backends, and the ones
    # of the shared conftest fixture name their backend, never their device
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", "gpu and not slow", "tests/kernels", "tests/training"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert len(ids) > 300, out.stdout[-2000:] + out.stderr[-2000:]
    for nodeid in ids:
        got = gf.backends_of(nodeid)
        assert got <= {"triton", "cuda"}
        if "[reference-cuda" in nodeid:
            assert got == set(), nodeid
        if "[triton-cuda" in nodeid or "triton-gpu" in nodeid:
            assert got == {"triton"}, nodeid
        if "test_cuda_backend.py" in nodeid:
            assert got == {"cuda"}, nodeid


def test_cli(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("FAILED tests/kernels/test_cuda_backend.py::test_a - x\n"
                   "FAILED tests/kernels/test_fq_relu.py::test_b[triton-cuda-x] - y\n")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_failures.py"), str(log)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["triton", "cuda"]
