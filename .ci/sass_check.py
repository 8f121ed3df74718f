#!/usr/bin/env python3
"""Inspect the compiled saq CUDA kernels: no register spills / local memory, wide loads.

Run by .ci/check_cuda.sh after it compiled every csrc/cuda/*.cu into ``<build>/<stem>.o`` with
``-Xptxas -v`` output saved in ``<build>/<stem>.ptxas.log``. For every kernel and architecture
this prints registers, stack frame, spills, local-memory instructions and global load / store
widths, and FAILS (exit 1) when

* any kernel has a stack frame, spill stores / loads (ptxas -v) or LDL / STL instructions (SASS):
  every saq kernel is on a training step's hot path, and local memory there costs bandwidth;
* a kernel listed in ELEMENTWISE has no 128-bit global load (LDG.E.128), or one in WIDE_STORES no
  128-bit global store (STG.E.128): its vectorized main loop did not vectorize (the narrow
  accesses of the scalar tail and of per-tensor scalars are expected);
* a kernel is in neither list (keep the lists in step with the sources), or a listed kernel is
  missing from every object (renamed or deleted).

Usage: sass_check.py --build-dir DIR [--cuobjdump PATH]   (cuobjdump: see find_cuobjdump)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

# Kernels whose main loop streams tensors with 16-byte accesses: each must show LDG.E.128.
ELEMENTWISE = {
    "fq_fwd_kernel",
    "fq_bwd_tensor_kernel",
    "fq_bwd_channel_kernel",
    "liq_stats_kernel",
    "liq_fwd_kernel",
    "liq_bwd_kernel",
    "grad_sq_norm_kernel",
    "sam_perturb_kernel",
    "sam_restore_kernel",
    "sam_restore_sgd_kernel",
    "sam_restore_adamw_kernel",
}
# Of those, the ones that write tensors: each must also show STG.E.128 (an aggregate store can be
# split into four 32-bit stores without any warning).
WIDE_STORES = ELEMENTWISE - {"liq_stats_kernel", "grad_sq_norm_kernel"}
# Small kernels (second reduction stages, step counters): scalar loads by design.
SCALAR = {
    "fq_bwd_tensor_finish",
    "fq_bwd_channel_finish",
    "liq_stats_finish",
    "liq_bwd_finish",
    "grad_sq_norm_finish_kernel",
    "adamw_steps_kernel",
}

_TYPE_SHORT = [("__nv_bfloat16", "bf16"), ("__half", "f16"), ("float", "f32"), ("double", "f64")]


def find_cuobjdump(explicit: Optional[str]) -> Optional[str]:
    """--cuobjdump / $CUOBJDUMP, then triton's bundled copy, then PATH, then the CUDA toolkit
    that check_cuda.sh compiled with ($SAQ_CUDA_BIN)."""
    for cand in (explicit, os.environ.get("CUOBJDUMP")):
        if cand:
            return cand
    try:
        import triton  # noqa: PLC0415 - optional, only to find its bundled binary

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    except Exception:  # triton missing or broken: fall through to PATH
        pass
    found = shutil.which("cuobjdump")
    if found:
        return found
    toolkit = os.path.join(os.environ.get("SAQ_CUDA_BIN", ""), "cuobjdump")
    return toolkit if os.environ.get("SAQ_CUDA_BIN") and os.access(toolkit, os.X_OK) else None


def demangle(names: List[str]) -> Dict[str, str]:
    """Mangled -> readable short name, e.g. fq_fwd_kernel<bf16,f32,true>."""
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    full = dict(zip(names, names))
    if tool and names:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
        lines = out.stdout.splitlines()
        if out.returncode == 0 and len(lines) == len(names):
            full = dict(zip(names, lines))
    return {m: shorten(d) for m, d in full.items()}


def shorten(demangled: str) -> str:
    # "void saq::cuda::(anonymous namespace)::k<float, true>(args...)" -> "k<f32,true>"
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # drop the parameter list: the first '(' at template depth 0
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not s.startswith("(anonymous", i):
            cut = i
            break
    s = s[:cut]
    s = s.replace("(anonymous namespace)::", "")
    m = re.match(r"^(?:[\w]+::)*([\w]+)(<.*>)?$", s)
    if m:
        s = m.group(1) + (m.group(2) or "")
    for long, short in _TYPE_SHORT:
        s = s.replace(long, short)
    return s.replace(" ", "")


def base_name(short: str) -> str:
    return short.split("<", 1)[0]


def parse_ptxas(log: str) -> Dict[Tuple[str, str], dict]:
    """(mangled, sm_xx) -> {regs, stack, spill_st, spill_ld} from ptxas -v output."""
    out: Dict[Tuple[str, str], dict] = {}
    cur: Optional[Tuple[str, str]] = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = (m.group(1), m.group(2))
            out[cur] = {"regs": None, "stack": 0, "spill_st": 0, "spill_ld": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur]["regs"] = int(m.group(1))
    return out


_LDG = re.compile(r"\bLDG\.E(?:\.[A-Z0-9_]+)*")
_STG = re.compile(r"\bSTG\.E(?:\.[A-Z0-9_]+)*")
_LOCAL = re.compile(r"\b(?:LDL|STL)(?:\.[A-Z0-9_]+)*\b")
_WIDE = re.compile(r"\.(?:128|256)\b")


def parse_sass(text: str) -> Dict[Tuple[str, str], dict]:
    """(mangled, sm_xx) -> load / store / local-memory instruction counts from cuobjdump -sass."""
    out: Dict[Tuple[str, str], dict] = {}
    arch, cur = None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = (m.group(1), arch)
            out[cur] = {"ldg": 0, "ldg_wide": 0, "stg": 0, "stg_wide": 0, "local": 0}
            continue
        if cur is None or "/*" not in line:
            continue
        code = line.split(";", 1)[0]
        for mm in _LDG.finditer(code):
            out[cur]["ldg"] += 1
            out[cur]["ldg_wide"] += bool(_WIDE.search(mm.group(0)))
        for mm in _STG.finditer(code):
            out[cur]["stg"] += 1
            out[cur]["stg_wide"] += bool(_WIDE.search(mm.group(0)))
        out[cur]["local"] += len(_LOCAL.findall(code))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--cuobjdump", default=None)
    args = ap.parse_args()

    cuobjdump = find_cuobjdump(args.cuobjdump)
    if cuobjdump is None:
        print("sass_check: FAIL: no cuobjdump (set CUOBJDUMP, install triton (it bundles one), or put the "
              "CUDA toolkit's bin on PATH)")
        return 1

    objs = sorted(f for f in os.listdir(args.build_dir) if f.endswith(".o"))
    if not objs:
        print(f"sass_check: FAIL: no object files in {args.build_dir}")
        return 1

    rows = []  # (source, mangled, arch, ptxas dict, sass dict)
    for obj in objs:
        stem = obj[:-2]
        log_path = os.path.join(args.build_dir, stem + ".ptxas.log")
        with open(log_path, encoding="utf-8", errors="replace") as f:
            ptx = parse_ptxas(f.read())
        res = subprocess.run([cuobjdump, "-sass", os.path.join(args.build_dir, obj)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"sass_check: FAIL: {cuobjdump} -sass {obj}: {res.stderr.strip()}")
            return 1
        sass = parse_sass(res.stdout)
        for key in sorted(set(ptx) | set(sass)):
            rows.append((stem, key[0], key[1], ptx.get(key), sass.get(key)))

    names = demangle(sorted({r[1] for r in rows}))
    failures: List[str] = []
    seen = set()
    header = (f"{'source':<14} {'kernel':<44} {'arch':<6} {'regs':>4} {'stack':>5} {'spill':>9} "
              f"{'LDL/STL':>7} {'LDG 128/all':>11} {'STG 128/all':>11}  status")
    print(header)
    print("-" * len(header))
    by_source = defaultdict(list)
    for r in rows:
        by_source[r[0]].append(r)
    for source in sorted(by_source):
        for stem, mangled, arch, ptx, sass in sorted(by_source[source], key=lambda r: (names[r[1]], r[2])):
            short = names[mangled]
            base = base_name(short)
            seen.add(base)
            problems = []
            if ptx is None:
                problems.append("missing from ptxas log")
                ptx = {"regs": None, "stack": 0, "spill_st": 0, "spill_ld": 0}
            if sass is None:
                problems.append("missing from SASS")
                sass = {"ldg": 0, "ldg_wide": 0, "stg": 0, "stg_wide": 0, "local": 0}
            if ptx["stack"] or ptx["spill_st"] or ptx["spill_ld"]:
                problems.append(f"stack frame {ptx['stack']} B / spills {ptx['spill_st']}+{ptx['spill_ld']} B")
            if sass["local"]:
                problems.append(f"{sass['local']} local-memory instructions")
            if base in ELEMENTWISE:
                if sass["ldg_wide"] == 0:
                    problems.append("elementwise kernel without 128-bit global loads")
                if base in WIDE_STORES and sass["stg_wide"] == 0:
                    problems.append("elementwise kernel without 128-bit global stores")
            elif base not in SCALAR:
                problems.append("unclassified kernel: add it to ELEMENTWISE or SCALAR in .ci/sass_check.py")
            status = "ok" if not problems else "FAIL: " + "; ".join(problems)
            if problems:
                failures.append(f"{short} [{arch}]: {'; '.join(problems)}")
            regs = "?" if ptx["regs"] is None else str(ptx["regs"])
            print(f"{stem:<14} {short:<44} {arch:<6} {regs:>4} {ptx['stack']:>5} "
                  f"{ptx['spill_st']:>4}/{ptx['spill_ld']:<4} {sass['local']:>7} "
                  f"{sass['ldg_wide']:>5}/{sass['ldg']:<5} {sass['stg_wide']:>5}/{sass['stg']:<5}  {status}")

    for missing in sorted((ELEMENTWISE | SCALAR) - seen):
        failures.append(f"{missing}: listed in .ci/sass_check.py but found in no object file")

    archs = sorted({r[2] for r in rows if r[2]})
    print()
    print(f"sass_check: {len(rows)} kernel builds ({len(seen)} kernels x instantiations) for {', '.join(archs)}; "
          f"cuobjdump: {cuobjdump}")
    if failures:
        print(f"sass_check: FAIL ({len(failures)}):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("sass_check: PASS: no spills, no stack frames, no local memory; every elementwise kernel "
          "has 128-bit loads (and stores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
