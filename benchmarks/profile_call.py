"""Profile the host side of one quantizer call: which functions a small call spends its time in.

    python benchmarks/profile_call.py --backend triton [--op fake_quantize] [--mode fwd+bwd]
        [--device cuda] [--numel 65536] [--calls 200] [--top 25] [--trace trace.json]

``benchmarks/host_overhead.py`` says how long each layer of a call takes; this script says
where inside the layers that time goes. It runs ``--calls`` calls of ``saq_kernels.<op>`` on one
backend (``fwd``: without autograd; ``fwd+bwd``: x and the scale / clip require grad, then
``torch.autograd.grad`` of the output's sum, the way a training step calls it) under
``torch.profiler`` with Python stacks, and prints two tables: the profiler's operators by their
own host time, and the Python functions (cProfile over the same calls, run separately so the two
do not time each other) by their cumulative time. ``--trace`` writes a Chrome trace
(chrome://tracing, Perfetto) of the profiled calls, where the autograd engine's device thread
and the gaps between launches show.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # saq_kernels from the checkout

import saq_kernels as sk  # noqa: E402
from host_overhead import device_kind  # noqa: E402  (this folder: sys.path[0] when run)
from saq_kernels.backends import get_backend  # noqa: E402

OPS = ("fake_quantize", "liq_quantize")
MODES = ("fwd", "fwd+bwd")


def make_call(op: str, mode: str, device: str, numel: int) -> Callable[[], object]:
    """One call of ``saq_kernels.<op>`` in ``mode`` on fixed inputs (fp32, per tensor)."""
    x = torch.randn(numel, device=device)
    p = torch.tensor([0.05 if op == "fake_quantize" else 2.5], device=device)
    zp = torch.zeros(1, device=device)
    if mode == "fwd+bwd":
        x.requires_grad_()
        p.requires_grad_()

    def fwd():
        if op == "fake_quantize":
            return sk.fake_quantize(x, p, zp, -8, 7)
        return sk.liq_quantize(x, p, 4, True)

    if mode == "fwd":
        return fwd
    return lambda: torch.autograd.grad(fwd().sum(), (x, p))


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def profile(call: Callable[[], object], device: str, calls: int, top: int, trace) -> str:
    """The two tables as text (and the Chrome trace when ``trace`` is a path)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    for _ in range(10):  # warm-up: Triton compiles, caches fill
        call()
    _sync(device)
    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with tprofile(activities=activities, with_stack=True) as prof:
        for _ in range(calls):
            call()
        _sync(device)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    out = [f"torch.profiler, {calls} calls: operators by self host time",
           prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)]

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        call()
    _sync(device)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(top)
    out += [f"cProfile, {calls} calls: Python functions by cumulative time", buf.getvalue()]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True)
    ap.add_argument("--op", choices=OPS, default="fake_quantize")
    ap.add_argument("--mode", choices=MODES, default="fwd+bwd")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--numel", type=int, default=1 << 16)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.numel < 1 or args.calls < 1 or args.top < 1:
        ap.error("--numel, --calls and --top must be positive")
    kind = device_kind(ap, args.device)
    try:
        why = get_backend(args.backend).supports(args.op, kind, torch.float32)
    except ValueError as exc:  # an unknown backend name: the registry's message lists the known
        ap.error(f"--backend: {exc}")
    if why is not None:
        ap.error(f"--backend {args.backend}: cannot run {args.op} on {kind}: {why}")
    with sk.use_backend(args.backend):
        print(f"saq_kernels.{args.op}, {args.mode}, backend {args.backend}, {args.numel} fp32 "
              f"elements on {args.device} (torch {torch.__version__})\n")
        print(profile(make_call(args.op, args.mode, args.device, args.numel), args.device,
                      args.calls, args.top, args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
