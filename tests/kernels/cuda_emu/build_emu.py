"""Build the CUDA kernels of csrc/cuda as a host library, to test them without a GPU.

What it builds: every csrc/cuda/*.cu and csrc/cuda_register.cpp compiled by the host C++
compiler against the stand-in headers of ./include (the CUDA runtime, fp16/bf16 conversions and
c10's CUDA stream/guard), where each CUDA thread is a fiber and a launch runs its blocks one
after another (include/emu_device.h says what that models and checks). The result is a torch
library that registers the CUDA backend's own operator implementations, unchanged, for CPU
tensors under the namespace ``saq_cuda_emu`` (schemas from saq_kernels/OPS.md), next to the real
``saq_C`` of the installed extension.

Three textual rewrites make the sources host C++; nothing else is edited:
  * ``kernel<<<grid, block, smem, stream>>>(args);`` becomes ``emu_launch(grid, block, [&] {
    kernel(args); });``
  * in cuda_register.cpp, ``.is_cuda()`` becomes ``.is_cpu()`` and ``at::kCUDA`` ``at::kCPU``
    (the device checks and the device of the outputs it allocates);
  * ``TORCH_LIBRARY_IMPL(saq_C, CUDA, m)`` becomes ``TORCH_LIBRARY_IMPL(saq_cuda_emu, CPU, m)``.

With asan=True the library is built with AddressSanitizer: an out-of-bounds read or write of a
kernel (an index past a tensor's end) stops the process with the sanitizer's report, a host
stand-in for compute-sanitizer's memcheck. Such a process needs the sanitizer runtime preloaded
(tests/kernels/sanitizer.py sets that up).

Usage: ``python tests/kernels/cuda_emu/build_emu.py [--asan] [OUT_DIR]`` prints the library's path; the
library is cached under OUT_DIR (default build/cuda_emu) by a hash of every input, so a rebuild
happens only when a source, a stand-in header, this script or torch changed. Load it with
``torch.ops.load_library(path)``; tests/kernels/test_cuda_emulation.py runs
tests/kernels/test_cuda_backend.py against it. Needs a C++17 compiler (g++) and a libc with ucontext;
about a minute on 2 cores.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CSRC = ROOT / "csrc"
NAMESPACE = "saq_cuda_emu"

# kernel<<<cfg>>>(args); with balanced template brackets in the kernel name.
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def _split_top(s: str) -> List[str]:
    """Split a launch configuration at its top-level commas."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "(<[{"
        depth -= ch in ")>]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def rewrite_launches(src: str) -> str:
    """Every ``k<<<grid, block, ...>>>(args);`` as
    ``emu_launch(dim3(grid), dim3(block), [&] { k(args); });``."""

    def one(m: re.Match) -> str:
        cfg = _split_top(m.group(2))
        return f"emu_launch(dim3({cfg[0]}), dim3({cfg[1]}), [&]() {{ {m.group(1)}({m.group(3)}); }});"

    out, n = _LAUNCH.subn(one, src)
    if "<<<" in out:
        raise ValueError("cuda_emu: a kernel launch the rewrite does not understand is left")
    return out


def rewrite_register(src: str) -> str:
    """cuda_register.cpp for CPU tensors under the emulation's namespace."""
    impl = "TORCH_LIBRARY_IMPL(saq_C, CUDA, m)"
    if impl not in src:
        raise ValueError(f"cuda_emu: {impl} not found in csrc/cuda_register.cpp")
    src = src.replace(impl, f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)")
    return src.replace(".is_cuda()", ".is_cpu()").replace("at::kCUDA", "at::kCPU")


def schema_source() -> str:
    """TORCH_LIBRARY(saq_cuda_emu) with the native schemas of saq_kernels/OPS.md."""
    doc = (ROOT / "saq_kernels" / "OPS.md").read_text()
    block = doc.split("## Native schemas", 1)[1].split("```")[1]
    defs = [line.strip() for line in block.splitlines() if "(" in line]
    body = "\n".join(f'  m.def("{d}");' for d in defs)
    return f"#include <torch/library.h>\nTORCH_LIBRARY({NAMESPACE}, m) {{\n{body}\n}}\n"


def _inputs() -> List[Path]:
    files = sorted(CSRC.glob("cuda/*")) + sorted(CSRC.glob("common/*")) + [CSRC / "cuda_register.cpp"]
    files += sorted(p for p in (HERE / "include").rglob("*") if p.is_file())
    return files + [Path(__file__).resolve(), ROOT / "saq_kernels" / "OPS.md"]


def _flags() -> List[str]:
    import torch
    from torch.utils import cpp_extension

    inc = cpp_extension.include_paths()
    abi = int(torch.compiled_with_cxx11_abi())
    return (
        ["-std=c++17", "-O1", "-fPIC", "-ffp-contract=off", "-DWITH_CUDA",
         f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
         f"-I{HERE / 'include'}", f"-I{CSRC / 'cuda'}", f"-I{CSRC}"]
        + [f for p in inc for f in ("-isystem", p)]
    )


def build(out_dir: os.PathLike | str | None = None, cxx: str | None = None, asan: bool = False) -> str:
    """Build (or reuse) the emulation library; returns its path. asan: with AddressSanitizer
    (load it into a process started with the sanitizer runtime preloaded: tests/kernels/sanitizer.py)."""
    import torch
    from torch.utils import cpp_extension

    cxx = cxx or os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise RuntimeError(f"cuda_emu: the C++ compiler {cxx!r} was not found (set CXX)")
    out = Path(out_dir or ROOT / "build" / "cuda_emu")
    flags = _flags() + (["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else [])
    h = hashlib.sha256(" ".join([cxx, torch.__version__, *flags]).encode())
    for p in _inputs():
        h.update(p.name.encode() + p.read_bytes())
    lib = out / f"libsaq_cuda_emu_{h.hexdigest()[:16]}.so"
    if lib.exists():
        return str(lib)
    gen = out / f"src_{h.hexdigest()[:16]}"
    gen.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in sorted(CSRC.glob("cuda/*.cu")):
        dst = gen / f"{cu.stem}_emu.cpp"
        # #line keeps compiler errors pointing at the real file.
        dst.write_text(f'#line 1 "{cu}"\n' + rewrite_launches(cu.read_text()))
        sources.append(dst)
    reg = gen / "cuda_register_emu.cpp"
    reg.write_text(f'#line 1 "{CSRC / "cuda_register.cpp"}"\n'
                   + rewrite_register((CSRC / "cuda_register.cpp").read_text()))
    schema = gen / "schema.cpp"
    schema.write_text(schema_source())
    sources += [reg, schema]

    def compile_one(src: Path) -> Path:
        obj = src.with_suffix(".o")
        r = subprocess.run([cxx, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"cuda_emu: compiling {src.name} failed:\n{r.stderr[-6000:]}")
        return obj

    jobs = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    with ThreadPoolExecutor(jobs) as pool:
        objs = list(pool.map(compile_one, sources))
    libdir = cpp_extension.library_paths()[0]
    tmp = lib.with_suffix(".tmp")
    link = [cxx, "-shared", *(["-fsanitize=address"] if asan else []), "-o", str(tmp), *map(str, objs),
            f"-L{libdir}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{libdir}"]
    r = subprocess.run(link, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"cuda_emu: linking failed:\n{r.stderr[-6000:]}")
    tmp.replace(lib)  # atomic: a concurrent reader sees the old name missing or the whole library
    shutil.rmtree(gen, ignore_errors=True)  # the generated sources and objects served their purpose
    return str(lib)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--asan"]
    print(build(args[0] if args else None, asan="--asan" in sys.argv[1:]))
