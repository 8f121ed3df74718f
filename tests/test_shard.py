"""tests/conftest.py's ``--shard I/K`` (benchmarks/gpu_check.sh runs K shards side by side): the K
parts of a selection are disjoint and cover it, -m deselection happens before the split, a test
function's parametrizations stay together unless the group is too big for one part, and a bad
spec is refused by name."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = "tests/kernels/test_reference.py"


def _collect(*args):
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           TARGET, *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return out, [line for line in out.stdout.splitlines() if "::" in line]


def test_shards_partition_the_selection():
    out, full = _collect("-m", "not slow")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(full) > 20 and len(set(full)) == len(full)
    k = 3
    parts = []
    for i in range(k):
        out, ids = _collect("-m", "not slow", "--shard", f"{i}/{k}")
        assert out.returncode == 0, out.stderr[-2000:]
        parts.append(ids)
    merged = [t for p in parts for t in p]
    assert sorted(merged) == sorted(full)  # disjoint and covering
    for p in parts:  # collection order kept inside a part
        assert p == [t for t in full if t in set(p)]
    cap = -(-len(full) // (2 * k))
    assert max(map(len, parts)) - min(map(len, parts)) <= cap
    groups = {}
    for t in full:
        groups.setdefault(t.split("[", 1)[0], []).append(t)
    for name, members in groups.items():
        if len(members) <= cap:  # small groups are never split
            assert sum(any(m in p for m in members) for p in map(set, parts)) == 1, name


def test_shard_follows_marker_deselection():
    _, full = _collect("-m", "not slow", "-k", "fake_quantize")
    _, a = _collect("-m", "not slow", "-k", "fake_quantize", "--shard", "0/2")
    _, b = _collect("-m", "not slow", "-k", "fake_quantize", "--shard", "1/2")
    assert full and sorted(a + b) == sorted(full) and a and b


def test_bad_shard_spec_is_refused_by_name():
    for spec in ("3/3", "-1/2", "1", "a/b", "0/0"):
        out, _ = _collect(f"--shard={spec}")
        assert out.returncode == 4, (spec, out.returncode)
        assert "--shard" in out.stderr and "I/K" in out.stderr, out.stderr[-500:]
