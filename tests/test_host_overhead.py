"""benchmarks/host_overhead.py: it runs on the CPU, times every layer of every usable backend,
and refuses bad arguments. (What the times are is for a GPU run to say; here they only have to
be positive and complete.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "host_overhead.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_rows_for_every_layer_and_backend(tmp_path):
    import saq_kernels as sk
    from saq_kernels.backends import get_backend

    out = _run("--device", "cpu", "--numel", "100", "--calls", "3", "--repeats", "2",
               "--json", str(tmp_path / "rows.json"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    usable = [b for b, why in sk.available_backends().items()
              if why is None and get_backend(b).supports("fake_quantize", "cpu", None) is None]
    assert "reference" in usable
    layers = {"backend", "custom-op", "public", "public-fwd+bwd"}
    for b in usable:
        for op in ("fake_quantize", "liq_quantize"):
            got = {r["layer"] for r in rows if r["backend"] == b and r["op"] == op}
            assert got == layers, (b, op, got)
    assert any(r["layer"] == "torch-learnable" for r in rows)
    assert all(r["host_us"] > 0 and r["device_us"] > 0 for r in rows)
    # the markdown table has one line per row
    assert sum(line.startswith("| fake_quantize") or line.startswith("| liq_quantize")
               for line in out.stdout.splitlines()) == len(rows)


@pytest.mark.parametrize("args,needle", [(("--calls", "0"), "must be positive"),
                                         (("--device", "cuda"), "no CUDA device"),
                                         (("--device", "cuda:0"), "no CUDA device"),
                                         (("--device", "meta"), "only cpu and cuda devices are measured"),
                                         (("--device", "gpu7"), "--device gpu7")])
def test_bad_arguments_are_refused(args, needle):
    import torch

    if args[-1].startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = _run(*args)
    assert out.returncode == 2 and needle in out.stderr, out.stderr
