"""Building and loading the compiled extension ``saq_kernels._C`` (C++ CPU kernels, CUDA kernels).

One place for the sources and compiler flags, used by ``setup.py`` (ahead-of-time build; it
loads this file by path, without importing the package) and by :func:`load_extension` (the JIT
fallback with ninja when the package was installed without the extension).

Environment:
    SAQ_BUILD_EXT=0   setup.py builds no extension (pure-Python install).
    SAQ_BUILD_CUDA=0  build only the C++ CPU kernels even where a CUDA torch and nvcc exist.
    SAQ_JIT_BUILD=0   never JIT-build at run time; without a prebuilt extension the "cpp" and
                      "cuda" backends are then unavailable.
    SAQ_BUILD_DIR     JIT build directory (default ~/.cache/saq/torch<version>-<cpu|cuda>, "+" as
                      "_", e.g. torch2.13.0_cpu-cpu).
    SAQ_SANITIZE=address  development: ignore a prebuilt extension and JIT-build the C++ CPU
                      kernels with AddressSanitizer (no CUDA; build directory tagged -asan). The
                      process must run with the sanitizer runtime preloaded, see
                      tests/kernels/test_cpp_sanitizer.py.
    TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0+PTX").

Nothing here runs at import time, and importing it never imports torch.
"""
from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import platform
import re
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "load_extension",
    "build_info",
    "csrc_dir",
    "cpp_sources",
    "cuda_sources",
    "cxx_flags",
    "link_flags",
    "nvcc_flags",
    "cuda_arch_list",
    "cuda_wanted",
    "make_build_info",
    "write_build_info",
    "BUILD_INFO_NAME",
    "REBUILD_HINT",
]

_LOG = logging.getLogger("saq_kernels")
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO_NAME = "_build_info.json"
REBUILD_HINT = "rebuild with pip install --no-build-isolation -e ."
# sm_80 code (A100; also runs on 8.6 / 8.9), sm_90 code (H100 / H200) and compute_90 PTX, which
# the driver compiles for newer GPUs (Blackwell) on first load
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


# ----------------------------------------------------------------------------------------------
# sources and flags
# ----------------------------------------------------------------------------------------------
def csrc_dir() -> Optional[str]:
    """The C++/CUDA source folder: the repository's csrc/ (source tree, editable install) or the
    copy a wheel ships as saq_kernels/_csrc; None when neither exists."""
    for cand in (os.path.join(_PKG_DIR, "_csrc"), os.path.join(os.path.dirname(_PKG_DIR), "csrc")):
        if os.path.isfile(os.path.join(cand, "register.cpp")):
            return cand
    return None


def cpp_sources(csrc: str) -> List[str]:
    """register.cpp, autograd.cpp and the CPU kernels, sorted (a stable build order)."""
    return [os.path.join(csrc, n) for n in ("register.cpp", "autograd.cpp")] + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))


def cuda_sources(csrc: str) -> List[str]:
    """The CUDA kernels and their registration file; empty if the folder has no .cu files."""
    cu = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    reg = os.path.join(csrc, "cuda_register.cpp")
    if not cu or not os.path.isfile(reg):
        return []
    return cu + [reg]


def _openmp() -> bool:
    # at::parallel_for is a header template: with an OpenMP torch it only runs in parallel when
    # the extension is compiled with -fopenmp (otherwise _OPENMP is undefined and it runs serially).
    import torch

    return bool(torch.backends.openmp.is_available()) and sys.platform != "darwin"


def cxx_flags() -> List[str]:
    """Host compiler flags. No -ffast-math; -ffp-contract=off keeps a*b+c as two roundings where
    the reference rounds twice (quantized codes must equal the reference's bit for bit)."""
    if sys.platform == "win32":
        return ["/O2", "/fp:precise", "/openmp"] if _openmp() else ["/O2", "/fp:precise"]
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    if _openmp():
        flags.append("-fopenmp")
    return flags


def link_flags() -> List[str]:
    """Linker flags. On Linux, ``-Wl,--exclude-libs,ALL`` keeps whatever comes from a static
    archive local to the extension. Some toolchains link libstdc++ statically (the GPU machine's
    /opt/gcc did); Python's -Bsymbolic-functions then binds the copy's functions inside the
    extension while its data (the locale's facets) still resolves to the libstdc++.so the
    process loaded first, and ``stream << int`` in an error message fails: an empty message, or
    a segfault (seen on the H200 run, 2026-11-27, in TORCH_CHECK's message for a bad 'scale').
    With the copy's symbols local it uses its own data. No effect with a shared libstdc++."""
    flags = []
    if sys.platform != "win32" and _openmp():
        flags.append("-fopenmp")
    if sys.platform.startswith("linux"):
        flags.append("-Wl,--exclude-libs,ALL")
    return flags


def nvcc_flags() -> List[str]:
    """nvcc flags: -fmad=false for the same reason as -ffp-contract=off on the host."""
    return ["-O3", "-fmad=false", "-lineinfo", "-DWITH_CUDA"]


def cuda_arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS


def arch_runs_on(archs: Sequence[str], capability: Tuple[int, int]) -> Optional[bool]:
    """Can a library built for ``archs`` (TORCH_CUDA_ARCH_LIST entries, e.g. ``["8.0",
    "9.0+PTX"]``) run on a GPU of compute ``capability`` (major, minor)? ``X.Y`` code runs on
    ``X.y`` with y >= Y; ``X.Y+PTX`` also on every later GPU; ``X.Ya`` only on ``X.Y``. None when
    an entry is not numeric (``Hopper``): unknown, the caller should not refuse."""
    for a in archs:
        m = re.fullmatch(r"\s*(\d+)\.(\d+)([af]?)(\+PTX)?\s*", a)
        if m is None:
            return None
        cap = (int(m.group(1)), int(m.group(2)))
        if m.group(3):  # arch-specific features: exactly that GPU
            if cap == tuple(capability):
                return True
            continue
        if cap[0] == capability[0] and cap[1] <= capability[1]:
            return True
        if m.group(4) and cap <= tuple(capability):
            return True
    return False


def _nvcc() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        exe = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.isfile(exe):
            return exe
    return shutil.which("nvcc")


def _has_cuda_headers(home: Optional[str]) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))


def resolve_cuda_home(candidates: Optional[List[str]] = None) -> Optional[str]:
    """The CUDA toolkit folder the build uses, or None if no toolkit with headers is found.

    torch takes CUDA_HOME from the environment, else from ``which nvcc`` (two levels up). Where
    ``nvcc`` on the PATH is a wrapper script (``/usr/local/bin/nvcc`` running
    ``/usr/local/cuda-13.0/bin/nvcc``, as on this project's machines) that gives ``/usr/local``,
    which has no CUDA headers, and the host files that include ATen's CUDA headers fail with
    "cuda_runtime_api.h: No such file or directory". Then the toolkit's own folder is used
    (``/usr/local/cuda-<torch's CUDA version>``, ``/usr/local/cuda``, the newest
    ``/usr/local/cuda-*``), for torch's build helpers too.
    """
    import torch
    import torch.utils.cpp_extension as ce

    if _has_cuda_headers(ce.CUDA_HOME):
        return ce.CUDA_HOME
    if candidates is None:
        candidates = [f"/usr/local/cuda-{torch.version.cuda}"] if torch.version.cuda else []
        candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if _has_cuda_headers(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            _LOG.warning("saq_kernels: CUDA_HOME=%s has no CUDA headers; using %s", ce.CUDA_HOME, home)
            ce.CUDA_HOME = home  # read by torch's include / library paths and nvcc lookup
            os.environ["CUDA_HOME"] = home
            return home
    return None


def cuda_wanted(csrc: str) -> Optional[str]:
    """None if the CUDA kernels should be built here, else why not (a sentence)."""
    import torch

    if os.environ.get("SAQ_BUILD_CUDA", "1") == "0":
        return "SAQ_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if _nvcc() is None:
        return "nvcc was not found (set CUDA_HOME)"
    if resolve_cuda_home() is None:
        from torch.utils.cpp_extension import CUDA_HOME

        return (f"no CUDA headers (include/cuda_runtime_api.h) under CUDA_HOME={CUDA_HOME}; "
                "set CUDA_HOME to the CUDA toolkit's folder")
    mismatch = cuda_version_mismatch(torch.version.cuda, _nvcc_release(_nvcc()))
    if mismatch is not None:
        return mismatch
    if not cuda_sources(csrc):
        return "csrc/cuda has no kernels"
    return None


def _nvcc_release(nvcc: Optional[str]) -> Optional[str]:
    """'13.0' from ``nvcc --version`` ("Cuda compilation tools, release 13.0, V13.0.88"), or None."""
    import subprocess

    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_version_mismatch(torch_cuda: Optional[str], nvcc_release: Optional[str]) -> Optional[str]:
    """Why the CUDA sources cannot be built with this nvcc for this torch, or None.

    torch's build refuses an nvcc whose major version differs from the CUDA torch was built with,
    failing the whole extension, the C++ CPU kernels included. Checked first, so that the CPU
    kernels still build and the cuda backend says why it is missing."""
    if not torch_cuda or not nvcc_release:
        return None  # unknown: let torch's own check decide
    if torch_cuda.split(".")[0] != nvcc_release.split(".")[0]:
        return (f"nvcc {nvcc_release} and torch's CUDA {torch_cuda} differ in major version, which "
                "torch's build refuses; set CUDA_HOME to a CUDA " + torch_cuda.split(".")[0]
                + ".x toolkit (building the C++ CPU kernels only)")
    return None


def _compiler_version() -> Optional[str]:
    import subprocess

    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.stdout else None
    except (OSError, subprocess.SubprocessError):
        return None


def make_build_info(with_cuda: bool, how: str) -> Dict[str, object]:
    """The build metadata written next to the library (saq_kernels/_build_info.json)."""
    import torch

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "cuda_archs": cuda_arch_list().replace(" ", ";").split(";") if with_cuda else [],
        "cxx_flags": cxx_flags(),
        "link_flags": link_flags(),
        "nvcc_flags": nvcc_flags() if with_cuda else [],
        "compiler": _compiler_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "built_by": how,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_build_info(directory: str, info: Dict[str, object]) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, BUILD_INFO_NAME)
    with open(path, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
class ExtensionUnavailable(RuntimeError):
    """saq_kernels._C cannot be used here; str(exc) says why, as a sentence."""


_STATE: Dict[str, object] = {"module": None, "error": None, "info": None}


def build_info() -> Optional[Dict[str, object]]:
    """Metadata of the loaded (or installed) extension build, or None if unknown."""
    if _STATE["info"] is not None:
        return _STATE["info"]  # type: ignore[return-value]
    path = os.path.join(_PKG_DIR, BUILD_INFO_NAME)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_extension():
    """Return the loaded extension module (its import registers the torch.ops.saq_C ops).

    Tries the prebuilt ``saq_kernels._C``; if it is not installed, JIT-builds the sources with
    ninja (unless SAQ_JIT_BUILD=0). Raises :class:`ExtensionUnavailable` with the reason; the
    outcome is cached, so a failed build is not retried in the same process.
    """
    if _STATE["module"] is not None:
        return _STATE["module"]
    if _STATE["error"] is not None:
        raise ExtensionUnavailable(_STATE["error"])
    try:
        mod = _load()
    except ExtensionUnavailable as exc:
        _STATE["error"] = str(exc)
        raise
    except Exception as exc:  # a broken build must surface as a reason, not a crash
        _STATE["error"] = f"loading saq_kernels._C failed ({type(exc).__name__}: {exc}); {REBUILD_HINT}"
        raise ExtensionUnavailable(_STATE["error"]) from exc
    _STATE["module"] = mod
    return mod


def sanitizer() -> Optional[str]:
    """The sanitizer SAQ_SANITIZE asks for ("address"), or None; anything else is refused."""
    value = os.environ.get("SAQ_SANITIZE", "").strip().lower()
    if value in ("", "0", "none"):
        return None
    if value != "address":
        raise ExtensionUnavailable(
            f"SAQ_SANITIZE={value!r} is not supported; use SAQ_SANITIZE=address or unset it")
    return value


def _load():
    import importlib
    import importlib.util

    import torch

    if sanitizer() is not None:
        return _jit_build()
    spec = importlib.util.find_spec("saq_kernels._C")
    if spec is not None:
        info = build_info()
        if info is not None and info.get("torch") != torch.__version__:
            raise ExtensionUnavailable(
                f"saq_kernels._C was built for torch {info.get('torch')}, running "
                f"{torch.__version__}: {REBUILD_HINT}"
            )
        try:
            mod = importlib.import_module("saq_kernels._C")
        except ImportError as exc:
            raise ExtensionUnavailable(f"saq_kernels._C failed to load ({exc}); {REBUILD_HINT}") from exc
        _STATE["info"] = info
        return mod
    return _jit_build()


def _jit_build():
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("SAQ_JIT_BUILD", "1") == "0":
        raise ExtensionUnavailable(
            "saq_kernels._C is not built and SAQ_JIT_BUILD=0 disables the JIT build; "
            "install with pip install --no-build-isolation -e ."
        )
    csrc = csrc_dir()
    if csrc is None:
        raise ExtensionUnavailable(
            "saq_kernels._C is not built and its C++ sources are not installed, so it cannot be "
            "JIT-built; install from a source checkout with pip install --no-build-isolation -e ."
        )
    if not cpp_extension.is_ninja_available():
        raise ExtensionUnavailable(
            "saq_kernels._C is not built and the JIT build needs ninja: pip install ninja "
            "(or build ahead of time with pip install --no-build-isolation -e .)"
        )
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise ExtensionUnavailable(
            f"saq_kernels._C is not built and no C++ compiler ({cxx}) was found for the JIT build; "
            "install g++ or set CXX"
        )
    sanitize = sanitizer()
    with_cuda = sanitize is None and cuda_wanted(csrc) is None
    sources = cpp_sources(csrc) + (cuda_sources(csrc) if with_cuda else [])
    tag = f"torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}".replace("+", "_")
    cflags, ldflags = cxx_flags(), link_flags()
    if sanitize is not None:  # -O1 -g: readable reports; the kernels' numerics do not change
        tag += "-asan"
        cflags = [f for f in cflags if not f.startswith("-O")] + ["-O1", "-g", "-fsanitize=address",
                                                                   "-fno-omit-frame-pointer"]
        ldflags = ldflags + ["-fsanitize=address"]
    build_dir = os.environ.get("SAQ_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "saq", tag
    )
    os.makedirs(build_dir, exist_ok=True)
    archs = cuda_arch_list()
    if with_cuda and "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        if not arch_runs_on(archs.split(";"), cap):  # also this GPU (when nvcc can target it)
            archs += f";{cap[0]}.{cap[1]}"
    _LOG.warning("saq_kernels: JIT-building the C++%s extension in %s (first use only; about a minute)",
                 "/CUDA" if with_cuda else "", build_dir)
    # torch reads the architectures from the environment: set for this build only (a later
    # extension built in the same process must not inherit them)
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        mod = cpp_extension.load(
            name="saq_kernels_C",
            sources=sources,
            extra_cflags=cflags + (["-DWITH_CUDA"] if with_cuda else []),
            extra_cuda_cflags=nvcc_flags() if with_cuda else None,
            extra_ldflags=ldflags,
            extra_include_paths=[csrc],
            build_directory=build_dir,
            with_cuda=with_cuda,
            is_python_module=True,
            verbose=False,
        )
        _STATE["info"] = make_build_info(with_cuda, "jit" if sanitize is None else f"jit-{sanitize}")
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    return mod
