"""saq.train.allocator: glibc keeps large freed CPU blocks for reuse; `saq train` applies it on the
CPU (--malloc-keep auto) and says so."""
import subprocess
import sys
import textwrap

import pytest

from saq.cli import main
from saq.train import allocator
from saq.train.config import ConfigError, TrainConfig, resolve

GLIBC = allocator._glibc() is not None
MALLINFO2 = GLIBC and hasattr(allocator._glibc(), "mallinfo2")


@pytest.mark.skipif(not MALLINFO2, reason="needs glibc >= 2.33 (mallinfo2)")
def test_large_blocks_come_from_the_heap_after_the_call():
    """In a fresh process (the setting is process-wide): a 64 MiB tensor is mmapped before the
    call (glibc's mapped-bytes count grows by it) and served from the heap after it."""
    script = textwrap.dedent("""
        import ctypes, torch
        from saq.train.allocator import keep_large_cpu_blocks, _glibc

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                        "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = _glibc()
        libc.mallinfo2.restype = MallInfo2
        def mapped_growth():
            before = libc.mallinfo2().hblkhd
            t = torch.empty(16 << 20)  # 64 MiB
            grown = libc.mallinfo2().hblkhd - before
            del t
            return grown
        print("before", mapped_growth())
        print("applied", keep_large_cpu_blocks())
        print("after", mapped_growth())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    vals = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert int(vals["before"]) >= 64 << 20
    assert vals["applied"] == "None"
    assert int(vals["after"]) == 0


def test_bad_values_and_non_glibc(monkeypatch):
    with pytest.raises(ValueError, match="mmap_threshold"):
        allocator.keep_large_cpu_blocks(mmap_threshold=0)
    with pytest.raises(ValueError, match="trim_threshold"):
        allocator.keep_large_cpu_blocks(trim_threshold=2**31)
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert "not glibc" in allocator.keep_large_cpu_blocks()


def test_refused_value_is_reported(monkeypatch):
    class FakeLibc:
        class mallopt:  # noqa: N801 - mimics the ctypes function object
            argtypes = restype = None

            def __new__(cls, param, value):
                return 0  # glibc refuses

    monkeypatch.setattr(allocator, "_glibc", lambda: FakeLibc)
    assert allocator.keep_large_cpu_blocks() == f"glibc refused mmap_threshold={allocator.MMAP_THRESHOLD}"


def test_config_validates_the_choice():
    with pytest.raises(ConfigError, match="--malloc-keep must be auto, on or off"):
        resolve(TrainConfig(malloc_keep="sometimes"))


@pytest.mark.skipif(not GLIBC, reason="glibc only")
@pytest.mark.parametrize("choice,shown", [("auto", True), ("off", False)])
def test_cli_applies_it_on_the_cpu(tmp_path, capsys, choice, shown):
    rc = main(["train", "--max-steps", "1", "--epochs", "1", "--device", "cpu", "--no-progress",
               "--malloc-keep", choice, "--out", str(tmp_path / choice)])
    assert rc == 0
    out = capsys.readouterr().out
    assert ("allocator: freed CPU blocks up to 256 MiB are kept for reuse" in out) is shown
