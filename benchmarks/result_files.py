"""The benchmark result files under benchmarks/results/: one CSV per machine, written by the
harness (harness.py's COLUMNS). The Triton launch-constant sweep keeps its own rows there too
(triton_sweep-<machine>.csv, other columns); report.py, plot.py and choose_defaults.py read only
the harness's files."""
from __future__ import annotations

from pathlib import Path
from typing import List

RESULTS = Path(__file__).resolve().parent / "results"
SWEEP_PREFIX = "triton_sweep-"


def result_files(folder: Path = RESULTS) -> List[Path]:
    return sorted(p for p in folder.glob("*.csv") if not p.name.startswith(SWEEP_PREFIX))
