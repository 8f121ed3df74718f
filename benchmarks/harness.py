"""Shared harness of the saq benchmark suites (benchmarks/bench_*.py).

What it does for every suite:

* configuration (``CFG``): the suite size from ``SAQ_BENCH_MODE`` (tiny | short | full), the device
  (CUDA if present, ``SAQ_BENCH_DEVICE=cpu`` forces the CPU), a fixed CPU thread count, the sizes,
  layer shapes, dtypes and models each suite runs (overridable from the environment, see
  benchmarks/README.md);
* timing (:func:`time_calls`): warm-up, then the median of per-call samples taken with CUDA events
  on a GPU or ``time.perf_counter`` on the CPU (CPU work is synchronous), rotating among several
  copies of the inputs when one set would sit in the last-level cache (L2 on a GPU);
* the copy baseline: a ``dst.copy_(src)`` that moves the same number of bytes, timed the same way in
  the same run, so every memory-bound row carries ``ratio_to_copy = median_ms / copy_ms``;
* rows (:data:`COLUMNS`) tagged with device, versions, git commit, date and thread count, merged by
  key into ``benchmarks/results/<device-slug>.csv`` (conftest.py writes them).

The timing runs inside ``benchmark.pedantic`` (one round); the per-call samples then replace the
fixture's statistics, so pytest-benchmark's table and JSON show per-call times too.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SUITES = ("tiny", "short", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

COLUMNS = [
    "op", "provider", "mode", "shape", "numel", "dtype",
    "median_ms", "p20_ms", "p80_ms", "reps", "rotate",
    "bytes", "gbps", "copy_ms", "copy_gbps", "ratio_to_copy", "peak_mem_mb",
    "device", "torch", "triton", "git", "date", "threads", "loadavg", "suite", "note",
]
KEY = ("op", "provider", "mode", "shape", "dtype")


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _parse_log2(text: str) -> Tuple[int, ...]:
    """'16,20,24' or '16-22' or '16-28:2' -> exponents."""
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?", part)
        if m:
            out.extend(range(int(m[1]), int(m[2]) + 1, int(m[3] or 1)))
        else:
            out.append(int(part))
    return tuple(out)


@dataclass(frozen=True)
class Shape:
    """One benchmarked tensor: ``id`` is the pytest id, ``label`` the CSV ``shape`` column."""

    id: str
    dims: Tuple[int, ...]
    kind: str  # "flat" (power-of-two sizes), "weight" or "act" (real layers)

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def label(self) -> str:
        if self.kind == "flat":
            return f"2^{int(math.log2(self.numel))}"
        return f"{self.id}=" + "x".join(str(d) for d in self.dims)


def layer_table(big_batch: int, cifar_batch: int) -> Dict[str, Shape]:
    """Weights and quantizer inputs of real layers.

    ``big_batch`` applies to the ImageNet models (ResNet-18/50, ViT-B/16 with 197 tokens),
    ``cifar_batch`` to the pre-act ResNet-20. Activation shapes are the inputs of the named conv /
    linear layer (what its activation quantizer sees).
    """
    B, b = big_batch, cifar_batch
    rows = [
        ("prn20.l1.w", (16, 16, 3, 3), "weight"),
        ("prn20.l3.w", (64, 64, 3, 3), "weight"),
        (f"prn20.l1.act.b{b}", (b, 16, 32, 32), "act"),
        (f"prn20.l3.act.b{b}", (b, 64, 8, 8), "act"),
        ("r18.l1.w", (64, 64, 3, 3), "weight"),
        ("r18.l4.w", (512, 512, 3, 3), "weight"),
        ("r18.fc.w", (1000, 512), "weight"),
        (f"r18.l1.act.b{B}", (B, 64, 56, 56), "act"),
        (f"r18.l4.act.b{B}", (B, 512, 7, 7), "act"),
        ("r50.l4.conv2.w", (512, 512, 3, 3), "weight"),
        ("r50.l4.conv3.w", (2048, 512, 1, 1), "weight"),
        (f"r50.l2.conv1.act.b{B}", (B, 256, 56, 56), "act"),
        (f"r50.l4.conv1.act.b{B}", (B, 1024, 14, 14), "act"),
        ("vitb.qkv.w", (2304, 768), "weight"),
        ("vitb.fc1.w", (3072, 768), "weight"),
        ("vitb.fc2.w", (768, 3072), "weight"),
        (f"vitb.qkv.act.b{B}", (B, 197, 768), "act"),
        (f"vitb.fc2.act.b{B}", (B, 197, 3072), "act"),
    ]
    return {name.rsplit(".b", 1)[0] if ".act.b" in name else name: Shape(name, dims, kind)
            for name, dims, kind in rows}


# layer subsets (keys of layer_table, batch suffix stripped)
_LAYERS = {
    ("tiny", "cpu"): ["prn20.l3.w"],
    ("tiny", "cuda"): ["prn20.l3.w"],
    ("short", "cpu"): ["prn20.l1.act", "prn20.l3.w", "r18.l4.w", "vitb.fc1.w"],
    ("short", "cuda"): ["r18.l4.w", "vitb.fc1.w", "r18.l1.act"],
}
_LOG2 = {
    ("tiny", "cpu"): (16,), ("tiny", "cuda"): (16,),
    # GPU short suite (the one-call check, under a time budget): largest first, so that the GPU
    # targets' size (2^26) is measured before the budget runs out
    ("short", "cpu"): (16, 18, 20, 22), ("short", "cuda"): (26, 24, 20, 16),
    ("full", "cpu"): tuple(range(16, 23)), ("full", "cuda"): tuple(range(16, 29)),
}
_DTYPES = {"tiny": ("fp32",), "short": ("fp32", "bf16"), "full": ("fp32", "bf16", "fp16")}
_SAM_MODELS = {
    ("tiny", "cpu"): ["preact_resnet20"], ("tiny", "cuda"): ["preact_resnet20"],
    ("short", "cpu"): ["preact_resnet20", "resnet18"],
    ("short", "cuda"): ["resnet50", "resnet18", "preact_resnet20"],  # the target's model first
    ("full", "cpu"): ["preact_resnet20", "resnet18", "resnet50"],
    ("full", "cuda"): ["preact_resnet20", "resnet18", "resnet50", "vit_b"],
}
# (model, batch) per suite for bench_train_step.py
_TRAIN = {
    ("tiny", "cpu"): [("preact_resnet20", 8)], ("tiny", "cuda"): [("preact_resnet20", 32)],
    ("short", "cpu"): [("preact_resnet20", 128)],  # the CPU target shape
    # GPU: the targets' shape first (ResNet-18 at batch 256), so a time budget cuts the rest
    ("short", "cuda"): [("resnet18", 256), ("preact_resnet20", 128)],
    ("full", "cpu"): [("preact_resnet20", 128), ("resnet18", 4)],
    ("full", "cuda"): [("resnet18", 256), ("preact_resnet20", 128)],
}


@dataclass(frozen=True)
class Timing:
    warmup_ms: float      # at least this much warm-up (and at least min_warmup calls)
    min_warmup: int
    target_ms: float      # time the measured loop should take
    min_reps: int
    max_reps: int


@dataclass(frozen=True)
class Config:
    suite: str
    device: torch.device
    threads: int
    log2: Tuple[int, ...]
    layers: Tuple[Shape, ...]
    dtypes: Tuple[str, ...]
    sam_models: Tuple[str, ...]
    train: Tuple[Tuple[str, int], ...]
    timing: Timing
    compile: bool            # run the torch.compile(reference) providers
    providers: Tuple[str, ...]  # substring filters (empty: all)
    budget_s: Optional[float]   # skip the remaining cases after this many seconds
    cache_bytes: int         # last-level cache (GPU L2) size used for input rotation
    rotate_cap_bytes: int    # never allocate more than this for rotated copies

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def flat_shapes(self) -> Tuple[Shape, ...]:
        return tuple(Shape(f"2p{e}", (1 << e,), "flat") for e in self.log2)

    @property
    def shapes(self) -> Tuple[Shape, ...]:
        return self.flat_shapes + self.layers

    def want(self, provider: str) -> bool:
        return not self.providers or any(p in provider for p in self.providers)


def _cpu_llc_bytes() -> int:
    best = (0, 32 << 20)
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((idx / "level").read_text())
            size = (idx / "size").read_text().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
            nbytes = int(size.rstrip("KMG")) * mult
            best = max(best, (level, nbytes))
        except (OSError, ValueError):
            continue
    return best[1]


def _make_config() -> Config:
    suite = _env("SAQ_BENCH_MODE", "short").lower()
    if suite not in SUITES:
        raise ValueError(f"SAQ_BENCH_MODE={suite!r}: choose one of {', '.join(SUITES)}")
    want = _env("SAQ_BENCH_DEVICE").lower()
    if want:
        device = torch.device(want)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("SAQ_BENCH_DEVICE=cuda but torch.cuda.is_available() is False")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dk = device.type if device.type in ("cpu", "cuda") else "cpu"

    # tiny is a smoke test on shared CI machines: one thread avoids OpenMP spin-waits under load
    # (seen here: a pre-act ResNet-20 step took 0.7 s on 2 threads, 0.13 s on 1, at load 8 on 2 cores)
    threads = int(_env("SAQ_BENCH_THREADS") or (1 if suite == "tiny" else torch.get_num_threads()))
    torch.set_num_threads(threads)

    log2 = _parse_log2(_env("SAQ_BENCH_LOG2")) or _LOG2[(suite, dk)]
    max_log2 = _env("SAQ_BENCH_MAX_LOG2")
    if max_log2 and not _env("SAQ_BENCH_LOG2"):
        top = int(max_log2)
        step = 1 if suite == "full" else 2
        log2 = tuple(sorted(set(e for e in log2 if e <= top) | set(range(max(log2) + step, top + 1, step))))

    big, cifar = (256, 128) if dk == "cuda" else (8, 128)
    table = layer_table(big, cifar)
    names = _env("SAQ_BENCH_LAYERS")
    if names.lower() == "none":
        layer_names: List[str] = []
    elif names.lower() == "all" or (not names and suite == "full"):
        layer_names = list(table)
    elif names:
        layer_names = [n.strip() for n in names.split(",") if n.strip()]
    else:
        layer_names = _LAYERS[(suite, dk)]
    unknown = [n for n in layer_names if n not in table]
    if unknown:
        raise ValueError(f"SAQ_BENCH_LAYERS: unknown layer(s) {unknown}; known: {', '.join(table)}")

    dtypes = tuple(d.strip() for d in (_env("SAQ_BENCH_DTYPES") or ",".join(_DTYPES[suite])).split(","))
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"SAQ_BENCH_DTYPES: unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")

    if suite == "tiny":
        timing = Timing(0.0, 1, 0.0, 2, 3)
    elif dk == "cuda":
        # short = the one-call GPU check (~900 cases, more than its time budget lets run: the
        # largest sizes and models come first), ~25 ms of samples each
        timing = (Timing(10.0, 3, 25.0, 10, 200) if suite == "short" else Timing(20.0, 3, 150.0, 20, 1000))
    else:
        timing = Timing(20.0, 2, 120.0 if suite == "short" else 400.0, 5, 200 if suite == "short" else 1000)

    compile_env = _env("SAQ_BENCH_COMPILE")
    do_compile = compile_env not in ("0", "false", "no") if compile_env else suite != "tiny"

    if dk == "cuda":
        props = torch.cuda.get_device_properties(device)
        cache = int(getattr(props, "L2_cache_size", 0) or (50 << 20))
        cap = 1 << 30
    else:
        # a VM's cpuinfo reports the host's whole L3 (260 MB here), not this guest's share
        cache = min(_cpu_llc_bytes(), 32 << 20)
        cap = 256 << 20
    budget = _env("SAQ_BENCH_TIME_BUDGET")
    return Config(
        suite=suite, device=device, threads=threads, log2=tuple(log2),
        layers=tuple(table[n] for n in layer_names), dtypes=dtypes,
        sam_models=tuple(_env("SAQ_BENCH_SAM_MODELS").split(",") if _env("SAQ_BENCH_SAM_MODELS")
                         else _SAM_MODELS[(suite, dk)]),
        train=tuple(_TRAIN[(suite, dk)]), timing=timing, compile=do_compile,
        providers=tuple(p.strip() for p in _env("SAQ_BENCH_PROVIDERS").split(",") if p.strip()),
        budget_s=float(budget) if budget else None, cache_bytes=cache, rotate_cap_bytes=cap,
    )


CFG = _make_config()
_T0 = time.monotonic()


# ----------------------------------------------------------------------------------------------
# environment facts recorded on every row
# ----------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _git() -> str:
    env = _env("SAQ_BENCH_GIT")
    if env:
        return env
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return ""


@dataclass(frozen=True)
class Env:
    device: str
    slug: str
    torch: str
    triton: str
    git: str
    date: str


def _make_env() -> Env:
    if CFG.is_cuda:
        name = torch.cuda.get_device_name(CFG.device)
        slug = _slug(name)
    else:
        name = _cpu_model()
        slug = f"cpu-{_slug(name)}-{CFG.threads}t"
    return Env(device=name, slug=_env("SAQ_BENCH_SLUG") or slug, torch=torch.__version__,
               triton=_version("triton"), git=_git(),
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"))


ENV = _make_env()


def results_path() -> Path:
    folder = Path(_env("SAQ_BENCH_RESULTS") or HERE / "results")
    return folder / f"{ENV.slug}.csv"


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------
def saq_backends() -> List[Tuple[str, Optional[str]]]:
    """Every registered saq backend as ("saq-<name>", None | reason it is unavailable here)."""
    import saq_kernels

    skip = {n.strip() for n in _env("SAQ_BENCH_SKIP_BACKENDS").split(",") if n.strip()}
    out = []
    for name, reason in saq_kernels.available_backends().items():
        if reason is None and not CFG.is_cuda and name == "triton":
            reason = ("triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1), a "
                      "correctness mode: not benchmarked on the CPU")
        if reason is None and name in skip:
            # gpu_check.sh: a memory error under compute-sanitizer; an illegal address is sticky
            # for the process and would fail every later case of the suite
            reason = f"left out by SAQ_BENCH_SKIP_BACKENDS={','.join(sorted(skip))}"
        out.append((f"saq-{name}", reason))
    return out


def backend_of(provider: str) -> Optional[str]:
    return provider[4:] if provider.startswith("saq-") else None


def backend_reason(provider: str, op: str, dtype: torch.dtype) -> Optional[str]:
    """Why saq backend ``provider`` cannot run ``op`` here (its own sentence), or None."""
    import saq_kernels

    return saq_kernels.get_backend(backend_of(provider)).supports(op, CFG.device.type, dtype)


def backend_context(provider: str):
    """``use_backend(name)`` for "saq-<name>" providers, else a null context."""
    name = backend_of(provider)
    if name is None:
        return contextlib.nullcontext()
    import saq_kernels

    return saq_kernels.use_backend(name)


_COMPILED: Dict[Tuple[str, int], Callable] = {}
_COMPILE_FAILED: Dict[str, str] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=True)``, cached: one graph per function and dtype, not per size."""
    key = (fn.__qualname__, id(fn))
    if key not in _COMPILED:
        import torch._dynamo

        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
        _COMPILED[key] = torch.compile(fn, dynamic=True)
    return _COMPILED[key]


def compile_skip(tag: str, dtype: Optional[str] = None) -> Optional[str]:
    """Reason to skip a torch.compile provider (disabled, or the same graph failed before)."""
    if not CFG.compile:
        return ("torch.compile providers are off in this suite (tiny: the first compile alone takes "
                "~20 s on 2 cores); set SAQ_BENCH_COMPILE=1 to include them")
    if (CFG.suite == "short" and dtype is not None and dtype != CFG.dtypes[0]
            and _env("SAQ_BENCH_COMPILE") != "1"):
        return (f"torch.compile runs only for {CFG.dtypes[0]} in the short suite (each graph and dtype "
                "compiles for seconds); SAQ_BENCH_COMPILE=1 or the full suite runs every dtype")
    return _COMPILE_FAILED.get(tag)


def note_compile_failure(tag: str, exc: BaseException) -> str:
    reason = f"torch.compile(reference) failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    _COMPILE_FAILED[tag] = reason
    return reason


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def sync() -> None:
    if CFG.is_cuda:
        torch.cuda.synchronize(CFG.device)


@dataclass
class Samples:
    ms: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    def quantile(self, q: float) -> float:
        s = sorted(self.ms)
        return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def time_calls(calls: Sequence[Callable[[], object]], quick: bool = False,
               timing: Optional[Timing] = None) -> Samples:
    """Per-call times (ms) of ``calls[i % len(calls)]()`` after warm-up.

    GPU: a CUDA event pair around each call (the median is robust to the odd launch gap).
    CPU: ``time.perf_counter`` around each call. ``quick`` (benchmarks disabled): no warm-up
    and one sample, enough to prove the code runs.
    """
    tm = timing or CFG.timing
    k = len(calls)
    sync()
    n, t0 = 0, time.perf_counter()
    warm = 0 if quick else tm.min_warmup  # the caller's probe call already ran once
    while n < warm or (not quick and (time.perf_counter() - t0) * 1e3 < tm.warmup_ms and n < 10_000):
        calls[n % k]()
        n += 1
        sync()
    per_call_ms = max((time.perf_counter() - t0) * 1e3 / max(n, 1), 1e-4)
    if quick:
        reps = 1
    else:
        reps = int(min(tm.max_reps, max(tm.min_reps, tm.target_ms / per_call_ms)))
    out: List[float] = []
    if CFG.is_cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            calls[(n + i) % k]()
            ends[i].record()
        torch.cuda.synchronize(CFG.device)
        out = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(reps):
            t = time.perf_counter()
            calls[(n + i) % k]()
            out.append((time.perf_counter() - t) * 1e3)
    return Samples(out)


def rotation_count(working_set_bytes: int, max_k: int = 64) -> int:
    """How many input copies to cycle through so the timed loop does not run out of cache."""
    if working_set_bytes <= 0:
        return 1
    target = 2 * CFG.cache_bytes
    k = math.ceil(target / working_set_bytes)
    k = min(k, max_k, max(1, CFG.rotate_cap_bytes // working_set_bytes))
    return max(1, k)


_COPY_MS: Dict[Tuple[int, int], float] = {}


def copy_ms(nbytes: int, quick: bool, k: Optional[int] = None) -> float:
    """Median time of ``dst.copy_(src)`` moving ``nbytes`` (half read, half written), rotating
    through ``k`` buffer pairs: the op's own rotation, so both see the same cache state."""
    if k is None:
        k = 1 if (quick or CFG.suite == "tiny") else rotation_count(nbytes)
    if (nbytes, k) in _COPY_MS:
        return _COPY_MS[(nbytes, k)]
    half = max(1, nbytes // 2)
    pairs = [(torch.empty(half, dtype=torch.uint8, device=CFG.device).fill_(i % 251 + 1),
              torch.empty(half, dtype=torch.uint8, device=CFG.device)) for i in range(k)]
    calls = [lambda s=s, d=d: d.copy_(s) for s, d in pairs]
    ms = time_calls(calls, quick=quick).median
    if not quick:
        _COPY_MS[(nbytes, k)] = ms
    del pairs, calls
    return ms


_ALLOC_COPY_MS: Dict[int, float] = {}


def alloc_copy_ms(nbytes: int, quick: bool) -> float:
    """Median time of ``src.clone()`` moving ``nbytes``: a copy that allocates its output, as an
    out-of-place op does. On the CPU an output above glibc's mmap ceiling (32 MB) is mapped
    afresh every call and its pages fault in on first touch, a cost ``copy_ms`` (into a
    preallocated buffer) does not include; this row shows it (it is not the ratio's base)."""
    if nbytes in _ALLOC_COPY_MS:
        return _ALLOC_COPY_MS[nbytes]
    half = max(1, nbytes // 2)
    k = 1 if (quick or CFG.suite == "tiny") else rotation_count(nbytes)
    srcs = [torch.empty(half, dtype=torch.uint8, device=CFG.device).fill_(i % 251 + 1) for i in range(k)]
    calls = [lambda s=s: s.clone() for s in srcs]
    ms = time_calls(calls, quick=quick).median
    if not quick:
        _ALLOC_COPY_MS[nbytes] = ms
    del srcs, calls
    return ms


def peak_extra_mb(call: Callable[[], object]) -> Optional[float]:
    """GPU: memory allocated beyond the inputs during one call (outputs + temporaries), MiB."""
    if not CFG.is_cuda:
        call()
        return None
    sync()
    torch.cuda.reset_peak_memory_stats(CFG.device)
    base = torch.cuda.memory_allocated(CFG.device)
    call()
    sync()
    return (torch.cuda.max_memory_allocated(CFG.device) - base) / 2**20


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
_INPUT_CACHE: Dict[tuple, list] = {}


def rotated(key: tuple, k: int, make: Callable[[], tuple]) -> List[tuple]:
    """``k`` input sets: ``make()`` once (random data), then clones; the last request is cached
    so consecutive providers and modes on the same shape reuse it."""
    full = (key, k)
    if full not in _INPUT_CACHE:
        _INPUT_CACHE.clear()
        if CFG.is_cuda:
            torch.cuda.empty_cache()
        base = make()
        _INPUT_CACHE[full] = [base] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t
                                             for t in base) for _ in range(k - 1)]
    return _INPUT_CACHE[full]


def drop_inputs() -> None:
    _INPUT_CACHE.clear()


def randn(dims, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=CFG.device).manual_seed(seed)
    return torch.randn(dims, generator=g, device=CFG.device, dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------------------------------------
# running one case
# ----------------------------------------------------------------------------------------------
@dataclass
class Recorder:
    rows: List[dict] = field(default_factory=list)
    last_flush: float = field(default_factory=time.monotonic)
    written: int = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)


RECORDER = Recorder()


def check_budget() -> None:
    if CFG.budget_s is not None and time.monotonic() - _T0 > CFG.budget_s:
        pytest.skip(f"SAQ_BENCH_TIME_BUDGET={CFG.budget_s:g}s spent; later cases skipped")


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _loadavg() -> str:
    """1-minute load average of the host when the row was taken (CPU rows on shared machines)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        return ""


def make_row(**kw) -> dict:
    row = {c: "" for c in COLUMNS}
    row.update(device=ENV.device, torch=ENV.torch, triton=ENV.triton, git=ENV.git, date=ENV.date,
               threads=CFG.threads, suite=CFG.suite, loadavg=_loadavg())
    row.update({k: _fmt(v) for k, v in kw.items()})
    return row


def _install_stats(benchmark, samples_ms: List[float]) -> None:
    """Make pytest-benchmark report the per-call samples instead of the one batch round."""
    try:
        from pytest_benchmark.stats import Stats

        st = Stats()
        for v in samples_ms:
            st.update(v / 1e3)
        benchmark.stats.stats = st
    except Exception:  # private API of pytest-benchmark; the CSV has the numbers regardless
        pass


_COPY_ROWS: set = set()


def run_case(benchmark, *, op: str, provider: str, mode: str, shape: str, numel: int,
             dtype: str, nbytes: Optional[int], setup: Callable[[int], Sequence[Callable]],
             context: Callable[[], object] = contextlib.nullcontext, tolerate: bool = False,
             note: str = "", timing: Optional[Timing] = None, rotate: bool = True,
             peak: Optional[Callable[[Callable], Optional[float]]] = None,
             compile_tag: Optional[str] = None, per_call: int = 1, max_rotation: int = 64) -> dict:
    """Time one (op, provider, mode, shape, dtype) case and record its row.

    ``setup(k)`` returns ``k`` zero-argument callables, one per rotated input set (or raises
    ``pytest.skip``). ``tolerate``: an exception on the first call skips the case with the error
    as the reason (baselines outside our control: torch ops, torch.compile); otherwise it fails.
    ``nbytes``: bytes the op must move at least (None for compute-bound cases: no GB/s, no copy).
    ``compile_tag``: a torch.compile provider's graph family; a failure skips the rest of it.
    ``per_call``: how many steps one call runs (a cycle of the efficient mode); times are divided
    by it, so the row is the mean step of a whole cycle, not the median of its cheap steps.
    ``max_rotation``: at most this many input sets (the SAM suite keeps under the Triton table
    cache, which a real training step always hits); the copy baseline uses the same count.
    On a GPU each call's output stays alive until ``k`` calls later: the caching allocator would
    otherwise hand every call the block the previous one freed, whose lines sit in L2, while
    the copy baseline writes into ``k`` distinct buffers.
    """
    check_budget()
    quick = bool(getattr(benchmark, "disabled", False))
    # rotation only pays for itself in real measurements (tiny / disabled runs are smoke tests)
    k = (rotation_count(nbytes, max_rotation) if (nbytes and rotate and not quick and CFG.suite != "tiny")
         else 1)
    with context():
        calls = list(setup(k))
        if CFG.is_cuda and k > 1:
            ring: collections.deque = collections.deque(maxlen=k)
            calls = [lambda c=c: ring.append(c()) for c in calls]
        try:
            extra = (peak or peak_extra_mb)(calls[0])
        except Exception as exc:
            if not tolerate:
                raise
            if compile_tag:
                pytest.skip(note_compile_failure(compile_tag, exc))
            pytest.skip(f"{provider}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:240]}")
        holder: Dict[str, Samples] = {}

        def target():
            holder["s"] = time_calls(calls, quick=quick, timing=timing)

        benchmark.pedantic(target, rounds=1, iterations=1, warmup_rounds=0)
    del calls
    s = holder["s"]
    if per_call != 1:
        s = Samples([m / per_call for m in s.ms])
    _install_stats(benchmark, s.ms)
    med = s.median
    fields = dict(op=op, provider=provider, mode=mode, shape=shape, numel=numel, dtype=dtype,
                  median_ms=med, p20_ms=s.quantile(0.2), p80_ms=s.quantile(0.8), reps=len(s.ms),
                  rotate=k, peak_mem_mb=extra, note=note)
    if nbytes:
        cms = copy_ms(nbytes, quick, k)
        fields.update(bytes=nbytes, gbps=nbytes / med / 1e6, copy_ms=cms,
                      copy_gbps=nbytes / cms / 1e6, ratio_to_copy=med / cms)
        ckey = (op, mode, shape, dtype)
        if ckey not in _COPY_ROWS:
            _COPY_ROWS.add(ckey)
            RECORDER.add(make_row(op=op, provider="copy", mode=mode, shape=shape, numel=numel,
                                  dtype=dtype, median_ms=cms, bytes=nbytes, gbps=nbytes / cms / 1e6,
                                  copy_ms=cms, copy_gbps=nbytes / cms / 1e6, ratio_to_copy=1.0,
                                  rotate=k, note="uint8 dst.copy_(src) of bytes/2"))
            if not CFG.is_cuda:
                # CPU only: CUDA's caching allocator recycles outputs, so a GPU clone is a copy
                ams = alloc_copy_ms(nbytes, quick)
                RECORDER.add(make_row(op=op, provider="copy-alloc", mode=mode, shape=shape, numel=numel,
                                      dtype=dtype, median_ms=ams, bytes=nbytes, gbps=nbytes / ams / 1e6,
                                      copy_ms=cms, copy_gbps=nbytes / cms / 1e6, ratio_to_copy=ams / cms,
                                      rotate=k,
                                      note="uint8 src.clone() of bytes/2: a copy that allocates its output"))
    row = make_row(**fields)
    RECORDER.add(row)
    benchmark.group = f"{op} {mode} {shape} {dtype}"
    benchmark.extra_info.update({c: row[c] for c in ("median_ms", "bytes", "gbps", "copy_ms",
                                                     "ratio_to_copy", "rotate", "peak_mem_mb",
                                                     "threads", "device")})
    if CFG.is_cuda and numel >= (1 << 26):
        drop_inputs()
        torch.cuda.empty_cache()
    return row


def case_id(*parts) -> str:
    return "/".join(str(p) for p in parts)


def quantizer_params(providers: Sequence[Tuple[str, Optional[str]]],
                     modes_for: Callable[[Shape, str], Sequence[str]]) -> list:
    """pytest params (provider, mode, shape, dtype) of a quantizer suite, in run order: shape
    (sizes in the suite's order -- ascending, but largest first in the GPU short suite -- then
    layers), then dtype, then provider, then mode, so that consecutive cases share inputs and a
    time budget cuts small shapes, not a dtype (bf16 training runs its activation quantizers in
    bf16, its weight quantizers in fp32: both matter). A provider unavailable here is kept as a
    skipped param carrying the reason."""
    out = []
    for shape in CFG.shapes:
        for dtype in CFG.dtypes:
            for provider, reason in providers:
                if not CFG.want(provider):
                    continue
                for mode in modes_for(shape, provider):
                    marks = [pytest.mark.skip(reason=reason)] if reason else []
                    out.append(pytest.param(provider, mode, shape, dtype, marks=marks,
                                            id=case_id(provider, mode, shape.id, dtype)))
    return out


# ----------------------------------------------------------------------------------------------
# results file
# ----------------------------------------------------------------------------------------------
def read_rows(path: Path) -> List[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def _sort_key(r: dict):
    try:
        n = int(r.get("numel") or 0)
    except ValueError:
        n = 0
    return (r.get("op", ""), r.get("mode", ""), r.get("dtype", ""), n, r.get("shape", ""), r.get("provider", ""))


def merge_rows(path: Path, rows: List[dict]) -> int:
    """Merge ``rows`` into the CSV at ``path``: a row with the same key (op, provider, mode, shape,
    dtype) replaces the old one. Written atomically. Returns the number of rows in the file."""
    merged = {tuple(r.get(k, "") for k in KEY): r for r in read_rows(path)}
    for r in rows:
        merged[tuple(r[k] for k in KEY)] = r
    out = sorted(merged.values(), key=_sort_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in out:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    os.replace(tmp, path)
    return len(out)


def flush(force: bool = False) -> Optional[Path]:
    """Write the rows recorded so far (every 15 s, and at the end of the session)."""
    if not RECORDER.rows[RECORDER.written:]:
        return None
    if not force and time.monotonic() - RECORDER.last_flush < 15:
        return None
    path = results_path()
    merge_rows(path, RECORDER.rows[RECORDER.written:])
    RECORDER.written = len(RECORDER.rows)
    RECORDER.last_flush = time.monotonic()
    return path
