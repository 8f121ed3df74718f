"""A small run of every saq op on one backend, for compute-sanitizer (tests/kernels/test_cuda_memcheck.py).

    compute-sanitizer --tool memcheck --error-exitcode 99 python tests/kernels/memcheck_case.py
    python tests/kernels/memcheck_case.py --device cpu --backend cpp     # the same calls on the CPU

Each quantizer runs forward and backward (autograd) on odd sizes, a view one element into its
buffer (the kernels' unaligned scalar path) and a non-contiguous view, in fp32 / fp16 / bf16, per
tensor and per channel, plain, perturbed before and after, and with relu; the SAM ops run over a
list of odd-sized tensors including an unaligned view, with and without a found-inf flag. Sizes
are small: under memcheck every access is checked. Prints one line and exits 0 when every call
returned; the sanitizer's own exit code reports memory errors.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

import saq_kernels as sk

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((7,), (3, 17, 9), (1031,), (5, 33))


def _inputs(shape, dtype, device, seed):
    """A plain tensor, a view one element into its buffer, and a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    plain = torch.randn(shape, generator=g).to(dtype).to(device)
    offset = torch.randn(n + 1, generator=g).to(dtype).to(device)[1:].view(shape)
    wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=g).to(dtype).to(device)
    return plain, offset, wide[..., ::2]


def _quantizers(device, calls):
    s = torch.tensor(0.05, device=device)
    for dtype in DTYPES:
        for k, shape in enumerate(SHAPES):
            for x0 in _inputs(shape, dtype, device, seed=k):
                c = shape[0]
                e = torch.randn(shape, device=device).to(dtype)
                for axis, scale, zp in ((None, torch.tensor([0.1], device=device), torch.tensor([0.0], device=device)),
                                        (0, torch.rand(c, device=device) * 0.1 + 0.01, torch.zeros(c, device=device))):
                    for pert in ("none", "before", "after", "relu"):
                        x = x0.detach().requires_grad_(True)  # keeps the view's layout
                        sc, z = scale.clone().requires_grad_(True), zp.clone().requires_grad_(True)
                        kw = {}
                        if pert in ("before", "after"):
                            kw = dict(perturbation=e, perturb_scale=s, perturb_before=pert == "before")
                        y = sk.fake_quantize(x, sc, z, -8, 7, axis, 1.0, relu=pert == "relu", **kw)
                        y.float().sum().backward()
                        calls += 2
                clip = torch.tensor([2.0], device=device, requires_grad=True)
                for signed, standardize in ((True, False), (True, True), (False, False)):
                    x = x0.detach().requires_grad_(True)
                    y = sk.liq_quantize(x, clip, 4, signed, standardize)
                    y.float().sum().backward()
                    calls += 2
                x = x0.detach().requires_grad_(True)
                y = sk.liq_quantize(x, clip, 3, True, False, perturbation=e, perturb_scale=s)
                y.float().sum().backward()
                calls += 2
    return calls


def _sam(device, calls):
    for dtype in DTYPES:
        shapes = [(7,), (33, 17), (1,), (1031,), (5, 3, 3)]
        params = [torch.randn(sh, device=device).to(dtype) for sh in shapes]
        params.append(torch.randn(1032, device=device).to(dtype)[1:])  # unaligned view
        grads = [torch.randn_like(p) * 0.1 for p in params]
        backups = [torch.empty_like(p) for p in params]
        norm, found = sk.grad_sq_norm(grads, params, [i % 2 == 0 for i in range(len(params))])
        sk.sam_perturb_(params, grads, backups, norm.sqrt() * 0.01, [i % 2 == 1 for i in range(len(params))])
        sk.sam_restore_(params, backups)
        calls += 3
        lr = torch.tensor(0.05, device=device)
        bufs = [torch.zeros_like(p) for p in params]
        for flag in (None, torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)):
            sk.sam_restore_sgd_(params, backups[:3], grads, bufs, lr, 0.9, 0.0, 5e-4, True, False, flag)
            m = [torch.zeros_like(p) for p in params]
            v = [torch.zeros_like(p) for p in params]
            # CUDA kernels read the step counts on the device, the CPU ones on the host
            steps = [torch.tensor(0.0, device=device) for _ in params]
            sk.sam_restore_adamw_(params, backups, grads, m, v, steps, lr, 0.9, 0.999, 1e-8, 0.01, flag)
            calls += 2
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="cuda", help="saq backend to run on [cuda]")
    args = ap.parse_args(argv)
    reason = sk.get_backend(args.backend).available()
    if reason is not None:
        print(f"memcheck case: backend {args.backend!r} unavailable: {reason}")
        return 2
    with sk.use_backend(args.backend):
        calls = _sam(args.device, _quantizers(args.device, 0))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"memcheck case: {calls} op calls on backend {args.backend} returned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
