"""Print a compact markdown summary of benchmark results (for benchmarks/README.md).

    python benchmarks/report.py                       # every benchmarks/results/*.csv
    python benchmarks/report.py results/nvidia-h100-80gb-hbm3.csv --ops fake_quantize

Headline per device: the quantizers at the largest power-of-two size of each dtype (median ms
per provider and, in brackets, the ratio to a plain copy of the same bytes; 1.0x = copy speed);
the SAM ops on the largest model's parameter list; the training steps (ms and the ratio to the
float step). Reads only the CSV files: no torch needed.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from result_files import result_files  # noqa: E402
QUANT_OPS = ("fake_quantize", "liq_quantize")
SAM_OPS = ("grad_sq_norm", "sam_perturb_", "sam_restore_", "sam_restore_sgd_", "sam_restore_adamw_")
MODES = ("fwd", "bwd", "fwd+bwd", "fwd+e")
DTYPE_ORDER = ("fp32", "bf16", "fp16")


def provider_rank(p: str):
    order = ["saq-cuda", "saq-triton", "saq-cpp", "saq-reference", "saq-default", "qat-default",
             "qat-liq-unfolded", "qat-lsq", "qat-lsq-unfolded", "qat-reference", "torch-learnable", "torch-fq", "torch-fused", "foreach", "loop",
             "float", "float-sam-loop", "refsaq-loop", "reference-eager", "reference-compile",
             "copy-alloc"]
    return (order.index(p) if p in order else len(order), p)


def read(path: Path) -> List[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def fmt_ms(ms: float) -> str:
    if ms != ms:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _dtypes(rows):
    return sorted({r["dtype"] for r in rows}, key=lambda d: DTYPE_ORDER.index(d) if d in DTYPE_ORDER else 9)


def quant_section(rows: List[dict], op: str) -> str:
    rows = [r for r in rows if r["op"] == op and r["shape"].startswith("2^")]
    if not rows:
        return ""
    providers = sorted({r["provider"] for r in rows if r["provider"] != "copy"}, key=provider_rank)
    body = []
    for dtype in _dtypes(rows):
        drows = [r for r in rows if r["dtype"] == dtype]
        top = max(int(r["numel"]) for r in drows)
        shape = next(r["shape"] for r in drows if int(r["numel"]) == top)
        for mode in MODES:
            cell: Dict[str, dict] = {r["provider"]: r for r in drows
                                     if r["mode"] == mode and int(r["numel"]) == top}
            if not cell or set(cell) == {"copy"}:
                continue
            copy = cell.get("copy")
            line = [mode, dtype, shape,
                    f"{fmt_ms(_f(copy['median_ms']))} ({_f(copy['gbps']):.0f} GB/s)" if copy else "-"]
            for p in providers:
                r = cell.get(p)
                line.append(f"{fmt_ms(_f(r['median_ms']))} ({_f(r['ratio_to_copy']):.1f}x)" if r else "-")
            body.append(line)
    return f"**{op}** (ms, ratio to copy)\n\n" + _table(["mode", "dtype", "size", "copy"] + providers, body)


def sam_section(rows: List[dict]) -> str:
    rows = [r for r in rows if r["op"] in SAM_OPS]
    if not rows:
        return ""
    providers = sorted({r["provider"] for r in rows if r["provider"] != "copy"}, key=provider_rank)
    body = []
    for dtype in _dtypes(rows):
        drows = [r for r in rows if r["dtype"] == dtype]
        top = max(int(r["numel"]) for r in drows)
        for op in SAM_OPS:
            cell = {r["provider"]: r for r in drows if r["op"] == op and int(r["numel"]) == top}
            if not cell:
                continue
            any_row = next(iter(cell.values()))
            copy = cell.get("copy")
            line = [op, dtype, f"{any_row['shape']} ({int(any_row['numel']) / 1e6:.1f}M)",
                    f"{fmt_ms(_f(copy['median_ms']))}" if copy else "-"]
            for p in providers:
                r = cell.get(p)
                line.append(f"{fmt_ms(_f(r['median_ms']))} ({_f(r['ratio_to_copy']):.1f}x)" if r else "-")
            body.append(line)
    return "**SAM ops** (ms, ratio to copy)\n\n" + _table(["op", "dtype", "params", "copy"] + providers, body)


def train_section(rows: List[dict]) -> str:
    rows = [r for r in rows if r["op"] == "train_step"]
    if not rows:
        return ""
    providers = sorted({r["provider"] for r in rows}, key=provider_rank)
    body = []
    # mode "step": each provider timed on its own; "step-interleaved": float / QAT / SAQ timed
    # round-robin in the same rounds (the ratios to trust on a machine whose speed drifts)
    for key in sorted({(r["shape"], r["dtype"], r["mode"]) for r in rows}):
        cell = {r["provider"]: r for r in rows if (r["shape"], r["dtype"], r["mode"]) == key}
        base = _f(cell["float"]["median_ms"]) if "float" in cell else float("nan")
        line = list(key)
        for p in providers:
            r = cell.get(p)
            if not r:
                line.append("-")
                continue
            ms = _f(r["median_ms"])
            ratio = f" ({ms / base:.2f}x)" if base == base else ""
            line.append(f"{fmt_ms(ms)}{ratio}")
        body.append(line)
    return "**train step** (ms, ratio to the float step)\n\n" + _table(["model/batch", "dtype", "mode"] + providers, body)


def report(path: Path, ops: List[str]) -> str:
    rows = [r for r in read(path) if r.get("median_ms")]
    if not rows:
        return ""
    r0 = rows[0]
    dates = sorted({r["date"] for r in rows})
    gits = sorted({r["git"] for r in rows})
    loads = sorted(_f(r.get("loadavg")) for r in rows if r.get("loadavg"))
    load = f", host load average {loads[0]:.0f}..{loads[-1]:.0f}" if loads else ""
    head = (f"### {r0['device']} ({path.stem})\n\n"
            f"torch {r0['torch']}, triton {r0['triton'] or '-'}, threads {r0['threads']}{load}, "
            f"suite {', '.join(sorted({r['suite'] for r in rows}))}, "
            f"git {', '.join(gits)}, {dates[0]}{' .. ' + dates[-1] if len(dates) > 1 else ''}")
    parts = [head]
    for op in QUANT_OPS:
        if not ops or op in ops:
            parts.append(quant_section(rows, op))
    if not ops or "sam" in ops:
        parts.append(sam_section(rows))
    if not ops or "train_step" in ops:
        parts.append(train_section(rows))
    return "\n\n".join(p for p in parts if p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="*", type=Path, help="result files (default: benchmarks/results/*.csv)")
    ap.add_argument("--ops", nargs="*", default=[],
                    help="subset: fake_quantize liq_quantize sam train_step")
    args = ap.parse_args(argv)
    paths = args.csv or result_files()
    if not paths:
        print("no results: run `pytest benchmarks` first", file=sys.stderr)
        return 1
    print("\n\n".join(filter(None, (report(p, args.ops) for p in paths))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
