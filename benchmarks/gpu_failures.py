"""Which backends do the failures in pytest logs implicate? (benchmarks/gpu_check.sh)

    python benchmarks/gpu_failures.py LOG [LOG ...]      # prints e.g. "triton" or "triton cuda"

A backend whose GPU test failed stays out of the proposed default order. Only the test's node id
counts (never the failure message, where "cuda" is everywhere), read as follows:

* the file: test_triton_backend.py is the Triton suite, test_cuda_backend.py and
  test_cuda_memcheck.py the CUDA one;
* the parameter id, split at "-": a backend name names that backend, except "cuda" right after a
  backend name, which is the device (tests/kernels/conftest.py's "triton-cuda", "reference-cuda";
  "cuda-cuda" is the cuda backend on the cuda device). "triton-gpu" is the Triton backend.

Only "triton" and "cuda" are reported (the reference is the fallback; "cpp" does not run there).
"""
from __future__ import annotations

import re
import sys
from typing import Iterable, Set

BACKENDS = ("triton", "cuda", "cpp", "reference")
REPORTED = ("triton", "cuda")
_FILES = {"test_triton_backend.py": "triton", "test_cuda_backend.py": "cuda",
          "test_cuda_memcheck.py": "cuda"}
_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)")


def backends_of(nodeid: str) -> Set[str]:
    """The backends a failing test's node id implicates (subset of REPORTED)."""
    path, _, rest = nodeid.partition("::")
    found = set()
    name = path.rsplit("/", 1)[-1]
    if name in _FILES:
        found.add(_FILES[name])
    if "[" in rest and rest.endswith("]"):
        tokens = rest[rest.index("[") + 1:-1].split("-")
        for i, tok in enumerate(tokens):
            if tok not in BACKENDS:
                continue
            if tok == "cuda" and i > 0 and tokens[i - 1] in BACKENDS:
                continue  # the device after a backend name
            found.add(tok)
    return found & set(REPORTED)


def failing_backends(lines: Iterable[str]) -> Set[str]:
    out: Set[str] = set()
    for line in lines:
        m = _LINE.match(line)
        if m:
            out |= backends_of(m.group(1))
    return out


def main(argv) -> int:
    lines = []
    for path in argv:
        with open(path, errors="replace") as f:
            lines.extend(f.read().splitlines())
    print(" ".join(b for b in REPORTED if b in failing_backends(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
