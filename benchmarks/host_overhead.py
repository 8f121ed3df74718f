"""Host time per quantizer call, layer by layer: where a small call's time goes.

    python benchmarks/host_overhead.py [--device cuda] [--numel 65536] [--calls 300] [--json F]

A small fake_quantize / liq_quantize call is host-bound: its time is the Python and C++ work of
launching it, not the kernel. This script times, per backend, the host side of each layer a call
goes through, innermost first:

* ``backend``: the backend's own function (``get_backend(b).table()[op]``: for triton, the
  argument preparation and Triton's launcher; for cpp / cuda, the ``saq_C`` op);
* ``custom-op``: ``torch.ops.saq.<op>`` (the torch.library dispatch, then the backend function);
* ``public``: ``saq_kernels.<op>`` without autograd (the argument checks, then the eager
  ``autograd.Function`` or the native ``saq_C::*_autograd`` op);
* ``public-fwd+bwd``: ``saq_kernels.<op>`` with x and the scale requiring grad, then
  ``torch.autograd.grad``: one training-style call;
* ``torch-learnable`` (fake_quantize only): torch's ``_fake_quantize_learnable_per_tensor_affine``
  forward, as a yardstick of a native op's host cost.

Each row: the median over ``--repeats`` rounds of ``--calls`` back-to-back calls timed with
``time.perf_counter`` and no device sync inside the round, so on a GPU it is the host's cost per
call as long as the device keeps up (the kernels of a 2^16-element call take a few microseconds;
the device's time per round is printed beside it: when it exceeds the host's, the row is
device-bound and says so). On the CPU the kernels run inside the call, so the rows are the whole
call there. Output: a markdown table; ``--json`` writes the rows too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # saq_kernels from the checkout

import saq_kernels as sk  # noqa: E402
from saq_kernels.backends import get_backend  # noqa: E402

OPS = ("fake_quantize", "liq_quantize")


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_host(fn: Callable[[], object], device: str, calls: int, repeats: int) -> Dict[str, float]:
    """Median host microseconds per call, and the device's microseconds per call in that round
    (CUDA events around the round; equal to the host time on the CPU)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(10):  # warm-up: compilation, caches
        fn()
    _sync(device)
    host, dev = [], []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        if cuda:
            end.record()
            end.synchronize()
            dev.append(start.elapsed_time(end) * 1e3 / calls)
        host.append((t1 - t0) * 1e6 / calls)
    h = statistics.median(host)
    return {"host_us": h, "device_us": statistics.median(dev) if dev else h}


def _calls(op: str, backend: str, x, scale, zp, clip) -> Dict[str, Callable[[], object]]:
    fn = get_backend(backend).table()[op]
    custom = getattr(torch.ops.saq, op)
    xr = x.detach().requires_grad_()
    if op == "fake_quantize":
        sr = scale.detach().requires_grad_()
        args = (x, scale, zp, -8, 7, None, 1.0, None, None, False)
        out = {
            "backend": lambda: fn(*args),
            "custom-op": lambda: custom(*args, False),
            "public": lambda: sk.fake_quantize(x, scale, zp, -8, 7),
        }

        def fwd_bwd():
            y = sk.fake_quantize(xr, sr, zp, -8, 7)
            return torch.autograd.grad(y.sum(), (xr, sr))
    else:
        cr = clip.detach().requires_grad_()
        args = (x, clip, 4, True, False, None, None, False)
        out = {
            "backend": lambda: fn(*args),
            "custom-op": lambda: custom(*args, False),
            "public": lambda: sk.liq_quantize(x, clip, 4, True),
        }

        def fwd_bwd():
            y = sk.liq_quantize(xr, cr, 4, True)
            return torch.autograd.grad(y.sum(), (xr, cr))
    out["public-fwd+bwd"] = fwd_bwd
    return out


def run(device: str, numel: int, calls: int, repeats: int) -> List[dict]:
    x = torch.randn(numel, device=device)
    scale = torch.tensor([0.05], device=device)
    zp = torch.tensor([0.0], device=device)
    clip = torch.tensor([2.5], device=device)
    rows = []
    kind = torch.device(device).type
    for backend, why in sk.available_backends().items():
        if why is not None:
            continue
        with sk.use_backend(backend):
            for op in OPS:
                if get_backend(backend).supports(op, kind, torch.float32) is not None:
                    continue
                for layer, fn in _calls(op, backend, x, scale, zp, clip).items():
                    rows.append(dict(op=op, backend=backend, layer=layer,
                                     **time_host(fn, device, calls, repeats)))
    learn = lambda: torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, -8, 7, 1.0)
    rows.append(dict(op="fake_quantize", backend="torch", layer="torch-learnable",
                     **time_host(learn, device, calls, repeats)))
    return rows


def report(rows: List[dict], device: str, numel: int) -> str:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    lines = [f"Host microseconds per call, {numel} fp32 elements on {name} (torch {torch.__version__});"
             " device-bound rows marked *", "",
             "| op | backend | layer | host us | device us |", "|---|---|---|---|---|"]
    for r in rows:
        mark = "*" if r["device_us"] > 1.1 * r["host_us"] else ""
        lines.append(f"| {r['op']} | {r['backend']} | {r['layer']} | {r['host_us']:.1f}{mark} | "
                     f"{r['device_us']:.1f} |")
    return "\n".join(lines)


def device_kind(ap: argparse.ArgumentParser, device: str) -> str:
    """"cpu" or "cuda" for a usable ``--device`` (cuda:1 included), else ``ap.error`` (exit 2)."""
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        ap.error(f"--device {device}: {exc}")
    if kind not in ("cpu", "cuda"):
        ap.error(f"--device {device}: only cpu and cuda devices are measured")
    if kind == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {device}: no CUDA device here (use --device cpu)")
    return kind


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--numel", type=int, default=1 << 16)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device_kind(ap, args.device)
    if args.numel < 1 or args.calls < 1 or args.repeats < 1:
        ap.error("--numel, --calls and --repeats must be positive")
    rows = run(args.device, args.numel, args.calls, args.repeats)
    print(report(rows, args.device, args.numel))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
