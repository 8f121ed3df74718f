"""Shared by the quantizers' autograd-path tests (test_native_autograd.py, test_eager_autograd.py):
inputs, a perturbation per mode, one forward + backward, and a bitwise comparison. Imported by
name: pytest puts this folder on sys.path."""
from __future__ import annotations

import torch

from bit_utils import as_bits

PERTURB = ["none", "after", "before", "probe"]


def rand(shape, dtype, device, seed, noncontig=False, scale=2.0):
    """Seeded normal values; ``noncontig``: a transposed (permuted) view of the same shape."""
    gen = torch.Generator().manual_seed(seed)
    if noncontig:
        t = (torch.randn(tuple(reversed(shape)), generator=gen) * scale).permute(
            *reversed(range(len(shape))))
    else:
        t = torch.randn(shape, generator=gen) * scale
    return t.to(dtype=dtype, device=device)


def perturbation(kind, x, seed=7):
    """(e, s, before); e requires grad (its gradient is compared too); "probe" is saq.SAQ's
    ascent pass: a zero e with s = 1."""
    if kind == "none":
        return None, None, False
    if kind == "probe":
        return torch.zeros_like(x).requires_grad_(), torch.ones((), device=x.device), False
    e = rand(tuple(x.shape), x.dtype, x.device, seed, scale=0.5).requires_grad_()
    return e, torch.tensor(0.05, device=x.device), kind == "before"


def assert_bitwise(a, b, what):
    assert (a is None) == (b is None), what
    if a is None:
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(as_bits(a.detach()), as_bits(b.detach())), f"{what}: not bitwise equal"


def run(fn, leaves, grad_seed=11):
    """Forward on fresh copies of the leaves, then backward of a fixed random cotangent; returns
    (y, y.grad_fn, the leaves' gradients, None where a leaf is None or needs none)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
              for t in leaves]
    y = fn(*leaves)
    g = rand(tuple(y.shape), y.dtype, y.device, grad_seed, scale=1.0)
    wants = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wants, g))
    return y, y.grad_fn, [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def assert_checkpointing_matches(device):
    """liq_quantize inside torch.utils.checkpoint (saved tensors through saved-tensor hooks,
    recomputed in the backward) gives the plain run's gradients exactly."""
    import saq_kernels as sk
    from torch.utils.checkpoint import checkpoint

    x = rand((16, 9), torch.float32, device, 14).requires_grad_()
    clip = torch.tensor([0.8], device=device, requires_grad=True)

    def block(t):
        return sk.liq_quantize(torch.relu(t * 1.5), clip, 3, False).sin()

    plain = torch.autograd.grad(block(x).sum(), [x, clip])
    ckpt = torch.autograd.grad(checkpoint(block, x, use_reentrant=False).sum(), [x, clip])
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)
