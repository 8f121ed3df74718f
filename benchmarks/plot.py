"""Render benchmark results as PNGs in benchmarks/results/plots/.

    python benchmarks/plot.py                      # every benchmarks/results/*.csv
    python benchmarks/plot.py results/cpu-...csv --out /tmp/plots

One figure per device and op (and mode, for the quantizers):
* quantizers: median time and effective GB/s against the power-of-two size, one line per provider,
  one column per dtype, the copy of the same bytes dashed;
* SAM ops: median time per model's parameter list, bars per provider, one panel per dtype;
* train step: median step time per model, bars per provider.
Reads only the CSV files; needs matplotlib.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import DTYPE_ORDER, QUANT_OPS, SAM_OPS, provider_rank  # noqa: E402
from result_files import result_files  # noqa: E402


def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _dtypes(rows):
    return sorted({r["dtype"] for r in rows}, key=lambda d: DTYPE_ORDER.index(d) if d in DTYPE_ORDER else 9)


_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5"]
_COLORS: dict = {}


def color(provider: str) -> str:
    """One colour per provider name, the same in every figure of a run."""
    if provider == "copy":
        return "k"
    if provider not in _COLORS:
        _COLORS[provider] = _PALETTE[len(_COLORS) % len(_PALETTE)]
    return _COLORS[provider]


def _name(*parts) -> str:
    return "__".join(p.replace("+", "-").replace("/", "-") for p in parts) + ".png"


def quant_figs(plt, rows, slug, out):
    written = []
    for op in QUANT_OPS:
        orow = [r for r in rows if r["op"] == op and r["shape"].startswith("2^")]
        for mode in sorted({r["mode"] for r in orow}):
            mrow = [r for r in orow if r["mode"] == mode]
            dtypes = _dtypes(mrow)
            fig, axes = plt.subplots(2, len(dtypes), figsize=(4.2 * len(dtypes) + 1.5, 6.4), squeeze=False)
            providers = sorted({r["provider"] for r in mrow}, key=provider_rank)
            for j, dtype in enumerate(dtypes):
                for p in providers:
                    pts = sorted((int(r["numel"]), _f(r["median_ms"]), _f(r["gbps"]))
                                 for r in mrow if r["dtype"] == dtype and r["provider"] == p)
                    if not pts:
                        continue
                    x = [math.log2(n) for n, _, _ in pts]
                    style = (dict(ls="--", color="k", lw=1.2) if p == "copy"
                             else dict(marker="o", ms=3, color=color(p)))
                    axes[0][j].plot(x, [t for _, t, _ in pts], label=p, **style)
                    axes[1][j].plot(x, [g for _, _, g in pts], label=p, **style)
                axes[0][j].set_yscale("log")
                axes[0][j].set_title(f"{op} {mode} {dtype}", fontsize=9)
                axes[0][j].set_ylabel("median ms")
                axes[1][j].set_ylabel("effective GB/s")
                axes[1][j].set_xlabel("log2(elements)")
                for ax in (axes[0][j], axes[1][j]):
                    ax.grid(alpha=0.3)
            h, l = axes[0][0].get_legend_handles_labels()
            fig.legend(h, l, loc="center right", fontsize=8)
            fig.suptitle(f"{rows[0]['device']}  threads={rows[0]['threads']}  torch {rows[0]['torch']}", fontsize=9)
            fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 0.96))
            path = out / _name(slug, op, mode)
            fig.savefig(path, dpi=80)
            plt.close(fig)
            written.append(path)
    return written


def bar_fig(plt, rows, slug, out, op_names, title, fname, group_key):
    rows = [r for r in rows if r["op"] in op_names and r["provider"] != "copy"]
    if not rows:
        return []
    panels = [(op, d) for op in op_names for d in _dtypes(rows) if any(
        r["op"] == op and r["dtype"] == d for r in rows)]
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol + 1.5, 3.6 * nrow), squeeze=False)
    providers = sorted({r["provider"] for r in rows}, key=provider_rank)
    for idx, (op, dtype) in enumerate(panels):
        ax = axes[idx // ncol][idx % ncol]
        prow = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
        groups = sorted({group_key(r) for r in prow}, key=lambda g: min(int(r["numel"]) for r in prow if group_key(r) == g))
        width = 0.8 / max(1, len(providers))
        for k, p in enumerate(providers):
            ys = []
            for g in groups:
                m = [_f(r["median_ms"]) for r in prow if group_key(r) == g and r["provider"] == p]
                ys.append(m[0] if m else float("nan"))
            if all(y != y for y in ys):
                continue
            ax.bar([i + k * width for i in range(len(groups))], ys, width, label=p, color=color(p))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        # long labels (the train step's "model/batch" + mode) would run into each other: slanted
        slant = len(groups) * max(len(line) for g in groups for line in g.split("\n")) > 60
        ax.set_xticklabels(groups, fontsize=7 if slant else 8, rotation=25 if slant else 0,
                           ha="right" if slant else "center")
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"{op} {dtype}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for idx in range(len(panels), nrow * ncol):
        axes[idx // ncol][idx % ncol].axis("off")
    handles = {}
    for ax in fig.axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8)
    fig.suptitle(f"{title}: {rows[0]['device']}  threads={rows[0]['threads']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 0.95))
    path = out / _name(slug, fname)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="*", type=Path, help="result files (default: benchmarks/results/*.csv)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "plots")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = args.csv or result_files()
    args.out.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in paths:
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("median_ms")]
        if not rows:
            continue
        slug = path.stem
        for p in sorted({r["provider"] for r in rows}, key=provider_rank):
            color(p)
        written = quant_figs(plt, rows, slug, args.out)
        written += bar_fig(plt, rows, slug, args.out, SAM_OPS, "SAM ops", "sam", lambda r: r["shape"])
        # the interleaved rows (same providers timed round-robin) get their own group of bars
        written += bar_fig(plt, rows, slug, args.out, ("train_step",), "train step", "train_step",
                           lambda r: r["shape"] + ("" if r["mode"] == "step" else f"\n{r['mode']}"))
        n += len(written)
    print(f"{n} plots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
