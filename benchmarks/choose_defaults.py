"""Choose each op's default backend order, per device type and dtype, from recorded benchmarks.

    python benchmarks/choose_defaults.py                        # every results/*.csv, print only
    python benchmarks/choose_defaults.py results/nvidia-h100-80gb-hbm3.csv --write
    python benchmarks/choose_defaults.py results/<gpu>.csv --exclude triton --write

For every (op, dtype) the candidates are the ``saq-<backend>`` providers of the CSV. They are
ranked by the geometric mean, over the shapes every candidate was measured at, of their median
time divided by the fastest candidate's (1.00 = fastest at every shape). Candidates within
``--tie`` of each other keep a fixed preference (cuda, cpp, triton, reference: ahead-of-time
compiled code first), so noise does not flip a choice between two equally fast backends.

Which rows decide which op:
- the quantizers (fake_quantize, liq_quantize and their _backward ops) by the ``fwd+bwd`` rows,
  one order for the pair: training runs both, and in eager mode the native backends run the
  backward on the forward's backend anyway (saq_kernels/ops.py, _native_autograd); without
  fwd+bwd rows, the forward op by ``fwd``/``fwd+e`` and the backward op by ``bwd``;
- the SAM ops by their ``update`` rows (one parameter list per row).

``--write`` replaces this device type's entries of saq_kernels/backends/measured_order.py (the
other device types' entries are kept); the registry then uses them ahead of the device type's
default order (saq_kernels/backends/__init__.py). Reads only the CSV files: no torch needed.

Only write a device type's orders after its parity tests passed on that machine
(benchmarks/gpu_check.sh runs both; ``--exclude`` drops a backend whose tests failed).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from result_files import result_files  # noqa: E402
ROOT = HERE.parent
MODULE = ROOT / "saq_kernels" / "backends" / "measured_order.py"

PREFERENCE = ("cuda", "cpp", "triton", "reference")
QUANT_OPS = ("fake_quantize", "liq_quantize")
SAM_OPS = ("grad_sq_norm", "sam_perturb_", "sam_restore_", "sam_restore_sgd_", "sam_restore_adamw_")


@dataclass
class Ranking:
    """The ranked candidates of one (op, dtype) and the evidence behind the order."""

    op: str
    dtype: str
    modes: Tuple[str, ...]
    order: List[str]
    geo: Dict[str, float]  # backend -> geometric-mean time ratio to the fastest per shape
    shapes: List[str]  # the shapes every candidate was measured at
    split: Dict[str, str] = field(default_factory=dict)  # shape -> winner, where not order[0]
    filled_from: str = ""  # "op/dtype" whose ranking this one copies (--fill)

    def comment(self) -> str:
        if self.filled_from:
            return f"no rows of its own: the order of {self.filled_from} (--fill)"
        ratios = ", ".join(f"{b} {self.geo[b]:.2f}" for b in self.order)
        text = f"{'+'.join(self.modes)} over {len(self.shapes)} shapes: {ratios}"
        if self.split:
            text += "; faster elsewhere at " + ", ".join(f"{s} ({w})" for s, w in self.split.items())
        return text


def device_type_of(path: Path) -> str:
    """results/cpu-*.csv hold CPU runs (harness.py names them so); every other file a CUDA GPU's."""
    return "cpu" if path.stem.startswith("cpu-") else "cuda"


def read_rows(paths: Iterable[Path]) -> List[dict]:
    rows = []
    for p in paths:
        with p.open(newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def _median(row: dict) -> float:
    try:
        v = float(row["median_ms"])
    except (KeyError, TypeError, ValueError):
        return float("nan")
    return v if v > 0 else float("nan")


def rank(rows: Sequence[dict], op: str, dtype: str, modes: Sequence[str], exclude: Sequence[str] = (),
         tie: float = 0.02) -> Optional[Ranking]:
    """Rank the saq backends measured for ``op`` at ``dtype`` in ``modes``; None without rows."""
    times: Dict[str, Dict[str, float]] = {}  # backend -> (mode, shape) -> median ms
    for r in rows:
        prov = r.get("provider", "")
        if r.get("op") != op or r.get("dtype") != dtype or r.get("mode") not in modes:
            continue
        if not prov.startswith("saq-") or prov[4:] in exclude or prov == "saq-default":
            continue
        t = _median(r)
        if t == t:
            times.setdefault(prov[4:], {})[f"{r['mode']}:{r['shape']}"] = t
    if not times:
        return None
    common = sorted(set.intersection(*(set(v) for v in times.values())))
    if not common:
        return None
    best = {k: min(times[b][k] for b in times) for k in common}
    geo = {b: math.exp(sum(math.log(times[b][k] / best[k]) for k in common) / len(common))
           for b in times}

    def pref(b: str) -> int:
        return PREFERENCE.index(b) if b in PREFERENCE else len(PREFERENCE)

    # sort by time, then let a preferred backend overtake one within `tie` of it
    order = sorted(times, key=lambda b: (geo[b], pref(b)))
    for i in range(1, len(order)):
        j = i
        while j > 0 and geo[order[j]] <= geo[order[j - 1]] * (1 + tie) and pref(order[j]) < pref(order[j - 1]):
            order[j - 1], order[j] = order[j], order[j - 1]
            j -= 1
    split = {}
    for k in common:
        winner = min(times, key=lambda b: times[b][k])
        if winner != order[0] and times[order[0]][k] > times[winner][k] * (1 + tie):
            split[k.split(":", 1)[1]] = winner
    modes_seen = tuple(m for m in modes if any(k.startswith(m + ":") for k in common))
    return Ranking(op, dtype, modes_seen, order, geo, [k.split(":", 1)[1] for k in common], split)


def choose(rows: Sequence[dict], exclude: Sequence[str] = (), tie: float = 0.02) -> Dict[str, Dict[str, Ranking]]:
    """op -> dtype -> Ranking, for every op and dtype the rows measure."""
    dtypes = sorted({r.get("dtype", "") for r in rows} - {""})
    out: Dict[str, Dict[str, Ranking]] = {}

    def put(op: str, dtype: str, rk: Optional[Ranking]) -> None:
        if rk is not None:
            out.setdefault(op, {})[dtype] = rk

    for dt in dtypes:
        for op in QUANT_OPS:
            both = rank(rows, op, dt, ("fwd+bwd",), exclude, tie)
            if both is not None:
                put(op, dt, both)
                put(op + "_backward", dt, both)
            else:
                put(op, dt, rank(rows, op, dt, ("fwd", "fwd+e"), exclude, tie))
                put(op + "_backward", dt, rank(rows, op, dt, ("bwd",), exclude, tie))
        for op in SAM_OPS:
            put(op, dt, rank(rows, op, dt, ("update",), exclude, tie))
    return out


FAMILIES = ((*QUANT_OPS, *(op + "_backward" for op in QUANT_OPS)), SAM_OPS)


def fill_missing(chosen: Dict[str, Dict[str, Ranking]], dtypes: Sequence[str] = ("fp32", "bf16")) -> None:
    """Give every op and dtype of a family that has any ranking one: the same op's ranking at
    another dtype, else another op's of its family (fp32 first). For a benchmark run cut short
    by its time budget (benchmarks/gpu_check.sh, before the train step), so that an op the
    per-op suites did not reach runs a fused kernel instead of the device's base order (CUDA:
    the reference); never for the committed order, where an unmeasured op keeps the base order."""
    for family in FAMILIES:
        measured = [(op, dt) for op in family for dt in sorted(chosen.get(op, {}), key=lambda d: d != "fp32")]
        if not measured:
            continue
        for op in family:
            for dt in dtypes:
                if dt in chosen.get(op, {}):
                    continue
                same_op = [(o, d) for o, d in measured if o == op]
                src_op, src_dt = (same_op or measured)[0]
                src = chosen[src_op][src_dt]
                chosen.setdefault(op, {})[dt] = Ranking(op, dt, src.modes, list(src.order), dict(src.geo),
                                                        list(src.shapes), filled_from=f"{src_op}/{src_dt}")


# ----------------------------------------------------------------------------------------------
# the generated module
# ----------------------------------------------------------------------------------------------
HEADER = '''"""Measured default backend order per device type, op and dtype (generated; do not edit by hand).

Written by benchmarks/choose_defaults.py from the recorded benchmark results named below; the
registry (saq_kernels/backends/__init__.py) tries these backends first, then the device type's
default order. EVIDENCE says why: the rows used, and each candidate's geometric-mean time ratio to
the fastest one per shape, over the shapes all of them were measured at.
"""
from typing import Dict, List

'''


def load_existing(path: Path = MODULE) -> Tuple[dict, dict, Dict[str, str], Dict[str, List[str]]]:
    """(MEASURED_ORDER, EVIDENCE, SOURCES, EXCLUDED) of the generated module at ``path``, or empty
    dicts."""
    if not path.exists():
        return {}, {}, {}, {}
    ns: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), ns)  # our own generated file
    return (ns.get("MEASURED_ORDER", {}), ns.get("EVIDENCE", {}), ns.get("SOURCES", {}),
            ns.get("EXCLUDED", {}))


def _nested(name: str, doc: str, table: Dict[str, Dict[str, Dict[str, object]]], kind: str) -> List[str]:
    lines = [f"#: {doc}", f"{name}: {kind} = {{"]
    for dev in sorted(table):
        lines.append(f"    {dev!r}: {{")
        for op in sorted(table[dev]):
            lines.append(f"        {op!r}: {{")
            lines += [f"            {dt!r}: {table[dev][op][dt]!r}," for dt in sorted(table[dev][op])]
            lines.append("        },")
        lines.append("    },")
    return lines + ["}", ""]


def render(orders: dict, evidence: dict, sources: Dict[str, str],
           excluded: Optional[Dict[str, List[str]]] = None) -> str:
    lines = [HEADER, "#: device type -> the result files its orders were chosen from",
             "SOURCES: Dict[str, str] = {"]
    lines += [f"    {dev!r}: {src!r}," for dev, src in sorted(sources.items())]
    lines += ["}", ""]
    lines += ["#: device type -> backends left out of its orders (--exclude: their tests had failed",
              "#: on that run), so that the orders can be derived again from the same files",
              "EXCLUDED: Dict[str, List[str]] = {"]
    lines += [f"    {dev!r}: {sorted(b)!r}," for dev, b in sorted((excluded or {}).items()) if b]
    lines += ["}", ""]
    lines += _nested("MEASURED_ORDER", "device type -> op -> dtype -> backend names, fastest first",
                     orders, "Dict[str, Dict[str, Dict[str, List[str]]]]")
    lines += _nested("EVIDENCE", "device type -> op -> dtype -> the rows and time ratios behind the order",
                     evidence, "Dict[str, Dict[str, Dict[str, str]]]")
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="*", type=Path, help="result files (default: benchmarks/results/*.csv)")
    ap.add_argument("--device-type", choices=("cpu", "cuda"),
                    help="device type of the rows (default: from each file's name)")
    ap.add_argument("--exclude", action="append", default=[], metavar="BACKEND",
                    help="leave this backend out (e.g. one whose parity tests failed); repeatable")
    ap.add_argument("--tie", type=float, default=0.02,
                    help="relative margin within which the fixed preference decides (default 0.02)")
    ap.add_argument("--write", action="store_true", help=f"update {MODULE.relative_to(ROOT)}")
    ap.add_argument("--fill", action="store_true",
                    help="give ops / dtypes without rows the order of a measured one of their family "
                         "(for timing a budget-cut run's train step; not for a committed order)")
    ap.add_argument("--module", type=Path, default=MODULE, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    paths = args.csv or result_files()
    if not paths:
        print("choose_defaults: no result files (run the benchmarks first)", file=sys.stderr)
        return 2
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"choose_defaults: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    by_dev: Dict[str, List[Path]] = {}
    for p in paths:
        by_dev.setdefault(args.device_type or device_type_of(p), []).append(p)

    orders, evidence, sources, excluded = load_existing(args.module)
    for dev, files in sorted(by_dev.items()):
        chosen = choose(read_rows(files), args.exclude, args.tie)
        if args.fill:
            fill_missing(chosen)
        if not chosen:
            print(f"{dev}: no saq-<backend> rows in {', '.join(map(str, files))}")
            continue
        print(f"## {dev} ({', '.join(p.name for p in files)})")
        print("| op | dtype | order | time / fastest (geo-mean) | shapes | faster elsewhere |")
        print("|---|---|---|---|---|---|")
        orders[dev], evidence[dev] = {}, {}
        for op in sorted(chosen):
            for dt in sorted(chosen[op]):
                rk = chosen[op][dt]
                orders[dev].setdefault(op, {})[dt] = rk.order
                evidence[dev].setdefault(op, {})[dt] = rk.comment()
                split = ", ".join(f"{s}: {w}" for s, w in rk.split.items()) or "-"
                ratios = ", ".join(f"{b} {rk.geo[b]:.2f}" for b in rk.order)
                print(f"| {op} | {dt} | {' > '.join(rk.order)} | {ratios} | {len(rk.shapes)} | {split} |")
        sources[dev] = ", ".join(_rel(p) for p in files)
        excluded[dev] = sorted(set(args.exclude))
    if args.write:
        args.module.write_text(render(orders, evidence, sources, excluded))
        print(f"wrote {args.module}")
    return 0


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return p.name


if __name__ == "__main__":
    sys.exit(main())
