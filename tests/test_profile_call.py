"""benchmarks/profile_call.py: it profiles a quantizer call on the CPU backends, both modes,
writes a readable Chrome trace, and refuses what it cannot run with the reason."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "profile_call.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.mark.parametrize("backend,op,mode", [("reference", "liq_quantize", "fwd+bwd"),
                                             ("reference", "fake_quantize", "fwd"),
                                             ("cpp", "fake_quantize", "fwd+bwd")])
def test_profiles_a_call(tmp_path, backend, op, mode):
    import saq_kernels as sk

    why = sk.available_backends()[backend]
    if why is not None:
        pytest.skip(f"{backend} unavailable: {why}")
    trace = tmp_path / "trace.json"
    out = _run("--backend", backend, "--op", op, "--mode", mode, "--device", "cpu",
               "--numel", "64", "--calls", "3", "--top", "5", "--trace", str(trace))
    assert out.returncode == 0, out.stderr
    assert f"saq_kernels.{op}, {mode}, backend {backend}" in out.stdout
    assert "operators by self host time" in out.stdout
    assert "Python functions by cumulative time" in out.stdout
    # the call itself shows up in the Python profile, and the backward only when asked for
    assert f"({op})" in out.stdout
    assert ("autograd/__init__.py" in out.stdout) == (mode == "fwd+bwd")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith(("saq", "aten::")) for e in events)


@pytest.mark.parametrize("args,needle", [
    (("--backend", "nope"), "unknown backend 'nope'"),
    (("--backend", "reference", "--calls", "0"), "must be positive"),
    (("--backend", "reference", "--device", "meta"), "only cpu and cuda devices are measured"),
    (("--backend", "cuda", "--device", "cpu"), "cannot run fake_quantize on cpu"),
])
def test_bad_arguments_are_refused(args, needle):
    out = _run(*args)
    assert out.returncode == 2 and needle in out.stderr, out.stderr
