"""benchmarks/triton_sweep.py and the launch-constant overrides it relies on.

The sweep's numbers only mean something on a GPU (benchmarks/gpu_check.sh runs it there); here it
runs under the Triton interpreter to show that each configuration really reaches the kernels (a
child process reports the constants saq_kernels/_triton/utils.py read), that its rows and report
come out, that bad settings are refused with a message naming the variable, and (slow) that the
Triton parity suite passes under other settings, so whatever the sweep picks stays exact.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bit_utils import load_script, run_pytest

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "benchmarks" / "triton_sweep.py"


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, TRITON_INTERPRET="1", **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=300)


def test_launch_constants_follow_the_environment():
    r = _python("from saq_kernels._triton import utils as U; print(U.BLOCK, U.NUM_WARPS, U.MAX_PROGRAMS)",
                SAQ_TRITON_BLOCK="2048", SAQ_TRITON_NUM_WARPS="8", SAQ_TRITON_MAX_PROGRAMS="256")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2048", "8", "256"]


@pytest.mark.parametrize("name,value", [("SAQ_TRITON_BLOCK", "1000"), ("SAQ_TRITON_BLOCK", "64"),
                                        ("SAQ_TRITON_NUM_WARPS", "three"),
                                        ("SAQ_TRITON_MAX_PROGRAMS", "131072")])
def test_bad_launch_constant_is_refused_by_name(name, value):
    r = _python("from saq_kernels._triton import utils", **{name: value})
    assert r.returncode != 0
    assert f"{name}={value!r} is not a power of two" in r.stderr


def test_config_parsing():
    sweep = load_script(SWEEP)
    assert sweep.parse_config("2048x8") == (2048, 8, 1024)
    assert sweep.parse_config("4096X8x256") == (4096, 8, 256)
    with pytest.raises(ValueError, match="BLOCKxWARPS"):
        sweep.parse_config("2048")


@pytest.mark.slow
def test_sweep_runs_each_configuration_in_its_own_process(tmp_path):
    out = tmp_path / "sweep.csv"
    env = dict(os.environ, SAQ_BENCH_MODE="tiny")
    r = subprocess.run([sys.executable, str(SWEEP), "--device", "cpu", "--sizes", "10", "--dtypes", "fp32",
                        "--configs", "128x1,256x2x128", "--sam-model", "none", "--budget", "240",
                        "--csv", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out)))
    ops = {"fq_fwd", "fq_bwd", "fq_bwd_channel", "liq_fwd", "liq_bwd"}
    got = {(row["op"], row["block"], row["warps"], row["max_programs"]) for row in rows}
    assert got == {(op, *cfg) for op in ops for cfg in [("128", "1", "1024"), ("256", "2", "128")]}
    assert all(float(row["median_ms"]) > 0 and float(row["copy_ms"]) > 0 for row in rows)
    assert "| fq_fwd | fp32 | 2^10 |" in r.stdout
    assert "128x1x1024:" in r.stdout and "256x2x128:" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("block,warps,programs", [(256, 2, 128), (4096, 8, 1024)])
def test_triton_parity_holds_for_other_launch_constants(block, warps, programs):
    """Whatever the sweep picks must stay exact: the Triton parity suite under another BLOCK /
    num_warps / MAX_PROGRAMS (256x2x128: many programs, reductions that loop over the grid)."""
    env = dict(os.environ, TRITON_INTERPRET="1", SAQ_TRITON_BLOCK=str(block),
               SAQ_TRITON_NUM_WARPS=str(warps), SAQ_TRITON_MAX_PROGRAMS=str(programs))
    r = run_pytest(ROOT / "tests" / "kernels" / "test_triton_backend.py", env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
