"""pytest glue of the benchmark suites.

* Collects ``bench_*.py`` in this folder (pytest's default ``python_files`` is ``test_*.py``), so
  ``pytest benchmarks`` runs them while a plain ``pytest`` (``testpaths = ["tests"]``) never
  visits this folder. Done with a ``pytest_collect_file`` hook rather than a pytest.ini here, which
  would move the rootdir when pytest is started inside benchmarks/.
* Writes the rows of the session into ``benchmarks/results/<device-slug>.csv`` (merged by key;
  every 15 s and at the end, also after Ctrl-C / ``timeout -s INT``). Not in the tiny suite nor
  with ``--benchmark-disable`` (a few samples per case: smoke tests, not measurements) unless
  ``SAQ_BENCH_WRITE=1``; ``SAQ_BENCH_WRITE=0`` never writes.
* Provides a stand-in ``benchmark`` fixture when pytest-benchmark is not installed.
"""
from __future__ import annotations

import fnmatch
import os
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import harness  # noqa: E402


def pytest_collect_file(file_path, parent):
    name = file_path.name
    if not (name.startswith("bench_") and name.endswith(".py")):
        return None
    if file_path.parent != _HERE:
        return None
    # explicitly named files, or a python_files pattern that already matches, are collected by
    # pytest's own python plugin: returning a Module here too would collect them twice
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(name, pat) for pat in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def _benchmarks_disabled(config) -> bool:
    opt = getattr(config.option, "benchmark_disable", False)
    plugin = config.pluginmanager.hasplugin("benchmark") or config.pluginmanager.hasplugin("pytest_benchmark")
    return bool(opt) or not plugin


def _write_enabled(config) -> bool:
    env = os.environ.get("SAQ_BENCH_WRITE", "").strip()
    if env:
        return env not in ("0", "false", "no")
    return not _benchmarks_disabled(config) and harness.CFG.suite != "tiny"


def pytest_report_header(config):
    c, e = harness.CFG, harness.ENV
    return (f"saq bench: suite={c.suite} device={e.device} ({c.device}) threads={c.threads} "
            f"torch={e.torch} triton={e.triton or '-'} git={e.git} -> {harness.results_path()}")


def pytest_runtest_logfinish(nodeid, location):
    cfg = _CONFIG.get("config")
    if cfg is not None and _write_enabled(cfg):
        harness.flush()


_CONFIG: dict = {}


def pytest_configure(config):
    _CONFIG["config"] = config


def pytest_sessionfinish(session, exitstatus):
    if _write_enabled(session.config):
        harness.flush(force=True)
        if harness.RECORDER.written:
            _CONFIG["written"] = harness.results_path()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = len(harness.RECORDER.rows)
    path = _CONFIG.get("written")
    if path is not None:
        terminalreporter.write_line(f"saq bench: {n} rows merged into {path}")
    elif n:
        terminalreporter.write_line(
            f"saq bench: {n} rows not written (tiny suite or benchmarks disabled; SAQ_BENCH_WRITE=1 writes them)")


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # a minimal stand-in: runs the target once per case, like --benchmark-disable

    class _StandIn:
        disabled = True

        def __init__(self):
            self.extra_info = {}
            self.group = None

        def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, **_):
            return target(*args, **(kwargs or {}))

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

    @pytest.fixture
    def benchmark():
        return _StandIn()
