"""Shared pytest setup.

* The repository root on sys.path (tests run without an install too).
* Without a GPU, Triton kernels run under its CPU interpreter, which must be switched on before
  anything imports triton (torch.compile's inductor can); setting it here, first, makes the
  Triton tests independent of the order in which test files import things.
* ``--shard I/K``: one of K disjoint parts of the selected tests (benchmarks/gpu_check.sh runs
  them side by side).
* ``SAQ_TEST_NATIVE_TRACES=1``: a crash (SIGSEGV, SIGABRT, ...) also prints the C++ stack of
  every thread (torch's fatal-signal handler), next to faulthandler's Python stack, so that a
  crash in a native kernel on the GPU machine names its function (gpu_check.sh sets it).
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("SAQ_TEST_NATIVE_TRACES") == "1":
    _set_traces = getattr(torch._C, "_set_print_stack_traces_on_fatal_signal", None)  # private API
    if _set_traces is not None:
        _set_traces(True)


# ------------------------------------------------------------------------------------------------
# --shard I/K: run one of K disjoint parts of the selected tests (benchmarks/gpu_check.sh runs K
# pytest processes side by side, so that compiling the Triton variants of ~800 GPU tests uses the
# GPU machine's cores instead of one).
# ------------------------------------------------------------------------------------------------
def pytest_addoption(parser):
    parser.addoption(
        "--shard", default=None, metavar="I/K",
        help="run part I (0-based) of K disjoint parts of the selected tests; the parametrizations "
             "of one test function stay together (they share compiled kernel variants)",
    )


def _parse_shard(spec):
    try:
        i, k = (int(v) for v in spec.split("/"))
    except ValueError:
        i, k = -1, 0
    if not (k >= 1 and 0 <= i < k):
        raise pytest.UsageError(f"--shard {spec!r}: expected I/K with 0 <= I < K, e.g. --shard 0/4")
    return i, k


def shard_items(items, i, k):
    """Part ``i`` of ``k``: test functions (all their parametrizations) as groups, a group larger
    than half a fair share split into consecutive pieces (so no part is left with one big group
    while the others idle), pieces dealt largest first to the part with the fewest tests (ties:
    the lowest index). Deterministic, disjoint, covering; collection order kept within a part."""
    groups = {}
    for idx, item in enumerate(items):
        groups.setdefault(item.nodeid.split("[", 1)[0], []).append(idx)
    cap = max(1, -(-len(items) // (2 * k)))
    pieces = [g[j:j + cap] for g in groups.values() for j in range(0, len(g), cap)]
    pieces.sort(key=lambda p: (-len(p), p[0]))
    load, mine = [0] * k, []
    for p in pieces:
        part = min(range(k), key=lambda s: (load[s], s))
        load[part] += len(p)
        if part == i:
            mine.extend(p)
    return [items[j] for j in sorted(mine)]


@pytest.hookimpl(trylast=True)  # after -m / -k deselection, so that the parts are balanced
def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if not spec:
        return
    keep = shard_items(items, *_parse_shard(spec))
    kept = {id(t) for t in keep}
    config.hook.pytest_deselected(items=[t for t in items if id(t) not in kept])
    items[:] = keep
