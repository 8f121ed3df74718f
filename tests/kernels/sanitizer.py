"""Running a test subprocess under AddressSanitizer (tests/kernels/test_cuda_emulation.py,
tests/kernels/test_cpp_sanitizer.py).

The code under test is built with -fsanitize=address; python and torch are not, so the process
starts with the sanitizer runtime preloaded. Every new allocation is filled with 0xff bytes (NaN
in fp32/fp16/bf16), so an output element a kernel forgets to write shows as a NaN; reports go to
files (pytest's output capture in the subprocess would swallow stderr when the process aborts).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, Optional


def asan_runtime(cxx: Optional[str] = None) -> Optional[str]:
    """LD_PRELOAD value: the compiler's AddressSanitizer runtime, then libstdc++ (preloaded too,
    so that the runtime's C++ exception interceptor finds the real __cxa_throw: without it the
    first TORCH_CHECK that throws aborts the process). None without a shared runtime."""
    cxx = cxx or os.environ.get("CXX") or "g++"
    paths = []
    for name in ("libasan.so", "libstdc++.so.6"):
        try:
            r = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True)
        except OSError:
            return None
        path = r.stdout.strip()
        if r.returncode or not os.path.isabs(path) or not os.path.exists(path):
            return None
        paths.append(os.path.realpath(path))
    return " ".join(paths)


def asan_env(log: Path, **extra: str) -> Optional[Dict[str, str]]:
    """os.environ plus what a sanitized subprocess needs, reports written to ``log``.<pid>;
    None when the compiler has no shared sanitizer runtime."""
    preload = asan_runtime()
    if preload is None:
        return None
    options = f"detect_leaks=0:malloc_fill_byte=255:max_malloc_fill_size=2147483647:log_path={log}"
    return dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS=options, **extra)


def asan_reports(log: Path) -> str:
    """The sanitizer's reports written under ``log`` (empty when there are none)."""
    return "".join(f"--- {p.name} ---\n{p.read_text()[:6000]}\n"
                   for p in sorted(log.parent.glob(log.name + ".*")))
