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


def penalty_grads(quantizer, device, public):
    """A gradient penalty on a weight after a quantized activation: create_graph=True, but no
    second derivative of the quantizer. Through the public wrapper (``public``) or the custom op
    ``torch.ops.saq.<quantizer>``; returns ((w.grad, s.grad, ds), the name of the quantizer output's
    grad_fn). The name, not the node: once the graph is freed, torch 2.11 refuses attribute access
    on a custom Function's node ("Attribute 'name' is invalid for this instance")."""
    import saq_kernels as sk

    x = rand((8, 12), torch.float32, device, 21)
    w = rand((5, 12), torch.float32, device, 22).requires_grad_()
    s = torch.tensor([0.2], device=device, requires_grad=True)
    z = torch.zeros(1, device=device)
    if quantizer == "fake_quantize":
        q = (sk.fake_quantize(x, s, z, 0, 15) if public
             else torch.ops.saq.fake_quantize(x, s, z, 0, 15, None, 1.0, None, None, False, False))
    else:
        q = (sk.liq_quantize(x, s, 4, False) if public
             else torch.ops.saq.liq_quantize(x, s, 4, False, False, None, None, False, False))
    loss = (q @ w.t()).square().sum()
    gw, gs = torch.autograd.grad(loss, (w, s), create_graph=True)
    name = q.grad_fn.name()
    (gw.square().sum() + loss).backward()
    return (w.grad, s.grad, gs.detach()), name


def fake_quantize_both(device, dtype, perturb, axis, noncontig, relu=False):
    """fake_quantize forward + backward through the public wrapper and through the custom op on
    the same inputs; returns the two ``run`` results (y, grad_fn, [dx, dscale, dzp, de, ds])."""
    import saq_kernels as sk

    x = rand((13, 37), dtype, device, 1, noncontig).requires_grad_()
    n = 1 if axis is None else x.shape[axis]
    scale = (torch.rand(n, generator=torch.Generator().manual_seed(2)) * 0.3 + 0.05).to(device)
    zp = (torch.randn(n, generator=torch.Generator().manual_seed(3)) * 2).to(device)
    scale.requires_grad_(), zp.requires_grad_()
    e, s, before = perturbation(perturb, x)
    args = (-8, 7, axis, 0.3)

    def public(x, scale, zp, e, s):
        return sk.fake_quantize(x, scale, zp, *args, e, s, before, relu)

    def custom(x, scale, zp, e, s):
        return torch.ops.saq.fake_quantize(x, scale, zp, *args, e, s, before, relu)

    leaves = [x, scale, zp, e, s]
    return run(public, leaves), run(custom, leaves)


def liq_quantize_both(device, dtype, perturb, signed, standardize, noncontig, relu=False):
    """liq_quantize's counterpart of :func:`fake_quantize_both` (grads: dx, dclip, de, ds)."""
    import saq_kernels as sk

    x = rand((9, 4, 3, 5), dtype, device, 4, noncontig).requires_grad_()
    clip = torch.tensor([-1.3 if signed else 1.7], device=device, requires_grad=True)
    e, s, before = perturbation(perturb, x)

    def public(x, clip, e, s):
        return sk.liq_quantize(x, clip, 3, signed, standardize, e, s, before, relu)

    def custom(x, clip, e, s):
        return torch.ops.saq.liq_quantize(x, clip, 3, signed, standardize, e, s, before, relu)

    leaves = [x, clip, e, s]
    return run(public, leaves), run(custom, leaves)


def assert_same_results(first, second, grad_names):
    """The outputs and every gradient of two ``run`` results bitwise equal."""
    assert_bitwise(first[0], second[0], "y")
    for name, a, b in zip(grad_names, first[2], second[2]):
        assert_bitwise(a, b, name)
