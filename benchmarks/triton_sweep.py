"""Launch-constant sweep of the Triton kernels: which BLOCK / num_warps (/ MAX_PROGRAMS) is fastest.

saq_kernels/_triton/utils.py reads BLOCK, NUM_WARPS and MAX_PROGRAMS once, at import, from
SAQ_TRITON_BLOCK / SAQ_TRITON_NUM_WARPS / SAQ_TRITON_MAX_PROGRAMS. This script times each
configuration in a fresh process (a child run of this file), the same ops and inputs in each, with
a copy of the same bytes timed in the same process as the baseline:

  fake_quantize fwd / bwd per tensor, fake_quantize bwd per channel (512 rows), liq_quantize fwd /
  bwd, grad_sq_norm and sam_restore_sgd_ over ResNet-50's parameters (--sam-model; bytes moved:
  fwd 2, bwd 3, norm 1, restore + SGD 5 element sizes per element).

Usage (a GPU; benchmarks/gpu_check.sh runs it within its time budget):

  python benchmarks/triton_sweep.py [--configs 1024x4,2048x8,4096x8] [--sizes 24,26]
      [--dtypes fp32,bf16] [--budget 60] [--csv PATH] [--device cuda|cpu]

A configuration is BLOCKxWARPS or BLOCKxWARPSxMAX_PROGRAMS. Prints one markdown table (median ms
per configuration, the fastest marked, and its ratio to a copy of the same bytes) and a summary
line per configuration: the geometric mean over all rows of its time over the row's fastest. Rows
go to --csv (default benchmarks/results/triton_sweep-<device>.csv, or under SAQ_BENCH_RESULTS). With --device cpu the kernels
run under TRITON_INTERPRET=1 (a check that the sweep runs; the times mean nothing).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIGS = "1024x4,2048x4,2048x8,4096x8,1024x8"
FIELDS = ["op", "dtype", "numel", "block", "warps", "max_programs", "median_ms", "bytes", "gbps",
          "copy_ms", "ratio_to_copy", "device"]


def parse_config(text: str) -> Tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) not in (2, 3):
        raise ValueError(f"triton_sweep: configuration {text!r} is not BLOCKxWARPS[xMAX_PROGRAMS]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 1024


# ----------------------------------------------------------------------------------------------
# child: one configuration, already in the environment
# ----------------------------------------------------------------------------------------------
def _cases(sizes: List[int], dtypes: List[str], sam_model: str):
    """(op, dtype name, numel, bytes, make) with make() -> list of calls (one per input copy)."""
    import torch

    import harness as H
    import bench_sam

    from saq_kernels import get_backend

    T = get_backend("triton").table()
    dev = H.CFG.device
    out = []
    for dname in dtypes:
        dt = H.DTYPES[dname]
        es = torch.tensor([], dtype=dt).element_size()
        for lg in sizes:
            n = 1 << lg
            scale = torch.tensor([0.05], device=dev)
            zp = torch.tensor([3.0], device=dev)
            clip = torch.tensor([2.5], device=dev)
            rows = 512 if n >= 512 * 4 else 4
            sc_c = torch.full((rows,), 0.05, device=dev)
            zp_c = torch.full((rows,), 3.0, device=dev)

            def fq_fwd(x, g):
                return lambda: T["fake_quantize"](x, scale, zp, 0, 15, None, 1.0, None, None, False)

            def fq_bwd(x, g):
                return lambda: T["fake_quantize_backward"](g, x, scale, zp, 0, 15, None, 1.0, None, None, False)

            def fq_bwd_ch(x, g):
                x2, g2 = x.view(rows, -1), g.view(rows, -1)
                return lambda: T["fake_quantize_backward"](g2, x2, sc_c, zp_c, 0, 15, 0, 1.0, None, None, False)

            def liq_fwd(x, g):
                return lambda: T["liq_quantize"](x, clip, 4, True, False, None, None, False)

            def liq_bwd(x, g):
                return lambda: T["liq_quantize_backward"](g, x, clip, 4, True, False, None, None, False)

            for op, f, nbytes in [("fq_fwd", fq_fwd, 2), ("fq_bwd", fq_bwd, 3), ("fq_bwd_channel", fq_bwd_ch, 3),
                                  ("liq_fwd", liq_fwd, 2), ("liq_bwd", liq_bwd, 3)]:
                def make(f=f, n=n, dt=dt, nbytes=nbytes, es=es):
                    k = H.rotation_count(nbytes * n * es)
                    return [f(H.randn((n,), dt, seed=i), H.randn((n,), dt, seed=100 + i)) for i in range(k)]
                out.append((op, dname, n, nbytes * n * es, make))
        if sam_model == "none":
            continue
        shapes = bench_sam._param_shapes(sam_model)
        numel = sum(math.prod(s) for s in shapes)

        def make_norm(dt=dt, shapes=shapes):
            st = bench_sam._make_state(shapes, dt)
            return [lambda: T["grad_sq_norm"](st["grads"], st["params"], [False] * len(shapes), 0.01)]

        def make_sgd(dt=dt, shapes=shapes):
            st = bench_sam._make_state(shapes, dt)
            lr = torch.tensor(0.01, device=dev)
            return [lambda: T["sam_restore_sgd_"](st["params"], st["backups"], st["grads"], st["bufs"], lr,
                                                  0.9, 0.0, 1e-4, True, False, None)]
        out.append((f"grad_sq_norm_{sam_model}", dname, numel, numel * es, make_norm))
        out.append((f"sam_restore_sgd_{sam_model}", dname, numel, 5 * numel * es, make_sgd))
    return out


def child(args) -> None:
    sys.path[:0] = [str(HERE), str(HERE.parent)]  # harness, bench_sam; saq_kernels uninstalled too
    import harness as H
    from saq_kernels._triton import utils as U

    for op, dname, n, nbytes, make in _cases(args.sizes, args.dtypes, args.sam_model):
        calls = make()
        calls[0]()  # compile
        H.sync()
        ms = H.time_calls(calls).median
        cms = H.copy_ms(nbytes, quick=False, k=len(calls))  # the same rotation as the op
        print(json.dumps(dict(op=op, dtype=dname, numel=n, block=U.BLOCK, warps=U.NUM_WARPS,
                              max_programs=U.MAX_PROGRAMS, median_ms=round(ms, 5), bytes=nbytes,
                              gbps=round(nbytes / ms / 1e6, 2), copy_ms=round(cms, 5),
                              ratio_to_copy=round(ms / cms, 3), device=H.ENV.device,
                              slug=H.ENV.slug)), flush=True)
        del calls
        H.drop_inputs()


# ----------------------------------------------------------------------------------------------
# parent: every configuration, one child each, within the budget
# ----------------------------------------------------------------------------------------------
def run_configs(args) -> List[dict]:
    rows: List[dict] = []
    deadline = time.monotonic() + args.budget
    for i, text in enumerate(args.configs):
        block, warps, progs = parse_config(text)
        # an equal share of what is left, so that one slow configuration cannot starve the rest
        left = (deadline - time.monotonic()) / (len(args.configs) - i)
        if left < 10:
            print(f"triton_sweep: out of time before {text}", file=sys.stderr)
            break
        env = dict(os.environ, SAQ_TRITON_BLOCK=str(block), SAQ_TRITON_NUM_WARPS=str(warps),
                   SAQ_TRITON_MAX_PROGRAMS=str(progs))
        if args.device == "cpu":
            env.update(TRITON_INTERPRET="1", SAQ_BENCH_DEVICE="cpu")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--sizes",
               ",".join(map(str, args.sizes)), "--dtypes", ",".join(args.dtypes),
               "--sam-model", args.sam_model]
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
            out, err, rc = r.stdout, r.stderr, r.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err, rc = "timeout", -1
        got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        rows += got
        if rc != 0:
            print(f"triton_sweep: {text}: rc={rc} after {len(got)} rows: {err.strip()[-600:]}", file=sys.stderr)
    return rows


def _cfg(r: dict) -> str:
    return f"{r['block']}x{r['warps']}x{r['max_programs']}"


def report(rows: List[dict]) -> str:
    """Markdown: a row per (op, dtype, numel), a column per configuration; then the summary."""
    if not rows:
        return "triton_sweep: no rows\n"
    configs = list(dict.fromkeys(_cfg(r) for r in rows))
    cases: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["op"], r["dtype"], int(r["numel"])), {})[_cfg(r)] = r
    lines = [f"Triton launch-constant sweep on {rows[0]['device']} (median ms; * fastest; "
             "x copy = fastest / copy of the same bytes)", "",
             "| op | dtype | numel | " + " | ".join(configs) + " | x copy |",
             "|---|---|---|" + "---|" * (len(configs) + 1)]
    ratios: Dict[str, List[float]] = {c: [] for c in configs}
    for (op, dt, n), by in cases.items():
        best = min(by.values(), key=lambda r: float(r["median_ms"]))
        cells = []
        for c in configs:
            r = by.get(c)
            if r is None:
                cells.append("-")
                continue
            ms = float(r["median_ms"])
            ratios[c].append(ms / float(best["median_ms"]))
            cells.append(f"{ms:.4g}{'*' if r is best else ''}")
        size = f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)
        lines.append(f"| {op} | {dt} | {size} | "
                     + " | ".join(cells) + f" | {float(best['ratio_to_copy']):.2f} |")
    lines.append("")
    for c in configs:
        v = ratios[c]
        if v:
            gm = math.exp(sum(math.log(x) for x in v) / len(v))
            lines.append(f"- {c}: {gm:.3f}x the fastest (geometric mean over {len(v)} rows)")
    return "\n".join(lines) + "\n"


def write_csv(rows: List[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    type=lambda s: [c for c in s.split(",") if c])
    ap.add_argument("--sizes", default="24,26", type=lambda s: [int(v) for v in s.split(",") if v],
                    help="log2 of the element counts")
    ap.add_argument("--dtypes", default="fp32,bf16", type=lambda s: [v for v in s.split(",") if v])
    ap.add_argument("--sam-model", default="resnet50",
                    help="model whose parameters the SAM rows use; none: no SAM rows")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds for the whole sweep")
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    for c in args.configs:
        parse_config(c)  # refuse a malformed list before spending time
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("triton_sweep: --device cuda, but torch sees no CUDA device; on a machine without "
                  "a GPU use --device cpu (the Triton interpreter: checks the sweep, times nothing)",
                  file=sys.stderr)
            return 2
    rows = run_configs(args)
    if rows:
        folder = Path(os.environ.get("SAQ_BENCH_RESULTS") or HERE / "results")  # as harness.results_path
        path = args.csv or folder / f"triton_sweep-{rows[0]['slug']}.csv"
        write_csv(rows, path)
        print(f"triton_sweep: {len(rows)} rows -> {path}", file=sys.stderr)
    print(report(rows), end="")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
