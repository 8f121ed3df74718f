#!/usr/bin/env bash
# Compile-check the saq CUDA kernels without a GPU, then inspect their machine code.
#
#   1. every csrc/cuda/*.cu compiles with nvcc alone (no torch) for sm_80 and sm_90, -O3, with
#      every host and device warning an error; ptxas -v output is kept per file;
#   2. csrc/cuda/launchers.h is plain C++ (csrc/cuda_register.cpp includes it from a host TU);
#   3. .ci/sass_check.py reads the ptxas reports and cuobjdump -sass: no spills, no stack frames,
#      no local memory in any kernel, and 128-bit global loads in every elementwise kernel.
#
# nvcc: $NVCC, else nvcc on PATH, else /usr/local/cuda-13.0/bin, /usr/local/cuda/bin. Without
# one the check prints why it was skipped and exits 0. cuobjdump: see .ci/sass_check.py.
# Env: SAQ_CUDA_CHECK_DIR keeps the objects and logs there (default: a temporary directory);
# PYTHON picks the interpreter (default: python, else python3). Takes about a minute on 2 cores.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  for cand in "$(command -v nvcc 2>/dev/null || true)" /usr/local/cuda-13.0/bin/nvcc /usr/local/cuda/bin/nvcc; do
    if [[ -n "$cand" && -x "$cand" ]]; then NVCC="$cand"; break; fi
  done
fi
if [[ -z "$NVCC" || ! -x "$NVCC" ]]; then
  echo "check_cuda: SKIP: nvcc not found (set NVCC, put it on PATH, or install the CUDA toolkit in /usr/local/cuda-13.0)"
  exit 0
fi

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

BUILD="${SAQ_CUDA_CHECK_DIR:-}"
if [[ -z "$BUILD" ]]; then
  BUILD="$(mktemp -d "${TMPDIR:-/tmp}/saq_cuda_check.XXXXXX")"
  trap 'rm -rf "$BUILD"' EXIT
fi
mkdir -p "$BUILD"
rm -f "$BUILD"/*.o "$BUILD"/*.ptxas.log

echo "check_cuda: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "check_cuda: nvcc $NVCC; objects in $BUILD"

# The optimization / math flags the extension is built with (saq_kernels/_build.py), so the
# machine code inspected below is the machine code that ships; plain -O3 if that is unavailable.
BUILD_FLAGS="$(cd "$ROOT" && "$PYTHON" -c 'from saq_kernels._build import nvcc_flags; print(" ".join(f for f in nvcc_flags() if not f.startswith("-D")))' 2>/dev/null || true)"
if [[ -z "$BUILD_FLAGS" ]]; then
  BUILD_FLAGS="-O3"
  echo "check_cuda: saq_kernels._build.nvcc_flags() unavailable; using -O3"
fi
echo "check_cuda: build flags: $BUILD_FLAGS"
# shellcheck disable=SC2206
NVCC_FLAGS=(
  -c -std=c++17 -O3 $BUILD_FLAGS
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -Xptxas -v
  -Xcompiler -Wall,-Wextra,-Werror
  --Werror all-warnings
)
export NVCC BUILD
export NVCC_FLAGS_STR="${NVCC_FLAGS[*]}"

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda: FAIL: no csrc/cuda/*.cu found"
  exit 1
fi

# One nvcc per source, as many at once as there are cores; each writes <stem>.o and its
# ptxas -v report <stem>.ptxas.log (nvcc prints ptxas info on stderr).
compile_one() {
  local src="$1" stem
  stem="$(basename "$src" .cu)"
  # shellcheck disable=SC2086
  if "$NVCC" $NVCC_FLAGS_STR "$src" -o "$BUILD/$stem.o" >"$BUILD/$stem.ptxas.log" 2>&1; then
    echo "check_cuda: compiled $src"
  else
    echo "check_cuda: FAIL: $src does not compile warning-free:"
    grep -v '^ptxas info' "$BUILD/$stem.ptxas.log" | grep -v '^    [0-9]* bytes stack frame' || true
    return 1
  fi
}
export -f compile_one

JOBS="$(nproc 2>/dev/null || echo 2)"
start=$(date +%s)
if ! printf '%s\n' "${SOURCES[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one "$@"' _ {}; then
  echo "check_cuda: FAIL: compilation"
  exit 1
fi
echo "check_cuda: nvcc done in $(( $(date +%s) - start )) s"

# launchers.h must stay plain C++: the torch-facing wrapper includes it from a host TU.
# The toolkit's include directory, as nvcc itself reports it (nvcc may be a wrapper script).
CUDA_INC="$("$NVCC" -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^" ]*\).*/\1/p' | head -n 1)"
CXX="${CXX:-$(command -v g++ || command -v c++ || true)}"
if [[ -n "$CXX" ]]; then
  if ! echo '#include "launchers.h"' | "$CXX" -std=c++17 -Wall -Wextra -Werror -fsyntax-only \
      -I csrc/cuda -I "$CUDA_INC" -x c++ -; then
    echo "check_cuda: FAIL: csrc/cuda/launchers.h is not plain C++"
    exit 1
  fi
  echo "check_cuda: csrc/cuda/launchers.h compiles as plain C++ ($CXX)"
fi

# cuobjdump: $CUOBJDUMP, triton's bundled copy, PATH, then the toolkit of this nvcc.
SAQ_CUDA_BIN=""
for cand in "$CUDA_INC/../bin" "$CUDA_INC/../../../bin"; do  # <root>/include or <root>/targets/<arch>/include
  if [[ -x "$cand/nvcc" ]]; then SAQ_CUDA_BIN="$(cd "$cand" && pwd)"; break; fi
done
export SAQ_CUDA_BIN
"$PYTHON" .ci/sass_check.py --build-dir "$BUILD"
