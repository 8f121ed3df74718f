"""Helpers for the kernel tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers: equality that tells -0.0 from 0.0 and compares NaNs."""
    ity = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(ity)


def load_script(path: Path) -> ModuleType:
    """Import a file that is not in a package (a benchmark tool, a standalone case) as a module.
    Registered in sys.modules under its stem: dataclasses look their module up by name."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


ROOT = Path(__file__).resolve().parents[2]


def run_pytest(*paths, env=None, k=None, timeout=1200) -> subprocess.CompletedProcess:
    """pytest -q on ``paths`` in a fresh process from the repository root (a different
    environment: a sanitizer runtime, an emulated backend, other launch constants)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, paths)]
    if k is not None:
        cmd += ["-k", k]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
