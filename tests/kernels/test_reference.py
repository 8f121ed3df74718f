"""The reference ops: parity with torch's learnable fake-quant ops, LIQ against autograd through
the composite straight-through formula, SAM ops against torch.optim, torch.library.opcheck."""
import pytest
import torch
from torch.library import opcheck

import saq_kernels as sk
from saq_kernels import reference as R

RANGES = [(0, 15), (-8, 7), (0, 255), (-128, 127), (-2, 1)]


def _rand(shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ------------------------------------------------------------------------------------------
# fake_quantize vs torch._fake_quantize_learnable_per_{tensor,channel}_affine
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (2, 3, 5, 7)])
def test_fake_quantize_per_tensor_matches_torch(qmin, qmax, shape):
    x = _rand(shape, 1, scale=2.0)
    scale = torch.tensor([0.173])
    zp = torch.tensor([float(max(qmin + qmax, 0) // 3)])  # non-negative: see the zero-point test
    gf = 0.37
    xa, sa, za = (t.clone().requires_grad_() for t in (x, scale, zp))
    xb, sb, zb = (t.clone().requires_grad_() for t in (x, scale, zp))
    ya = sk.fake_quantize(xa, sa, za, qmin, qmax, None, gf)
    yb = torch._fake_quantize_learnable_per_tensor_affine(xb, sb, zb, qmin, qmax, gf)
    assert torch.equal(ya, yb)
    dy = _rand(shape, 2)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(xa.grad, xb.grad)
    # Our sums run in a different order than ATen's: compare to float64 sums.
    torch.testing.assert_close(sa.grad, sb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("qmin,qmax", [(-8, 7), (0, 255)])
def test_fake_quantize_per_channel_matches_torch(axis, qmin, qmax):
    x = _rand((6, 5, 4), 3, scale=3.0)
    c = x.shape[axis]
    scale = torch.linspace(0.05, 0.4, c)
    zp = torch.arange(c, dtype=torch.float32) % 3 + (qmin + qmax) // 2
    xa, sa, za = (t.clone().requires_grad_() for t in (x, scale, zp))
    xb, sb, zb = (t.clone().requires_grad_() for t in (x, scale, zp))
    ya = sk.fake_quantize(xa, sa, za, qmin, qmax, axis, 1.0)
    yb = torch._fake_quantize_learnable_per_channel_affine(xb, sb, zb, axis % 3, qmin, qmax, 1.0)
    assert torch.equal(ya, yb)
    dy = _rand(x.shape, 4)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(xa.grad, xb.grad)
    torch.testing.assert_close(sa.grad, sb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-5, atol=1e-5)


def test_fake_quantize_ties_round_half_to_even():
    scale = torch.tensor([0.5])
    x = torch.tensor([0.25, 0.75, -0.25, -0.75, 1.25])  # x/scale = .5, 1.5, -.5, -1.5, 2.5
    y = sk.fake_quantize(x, scale, torch.zeros(1), -8, 7)
    assert y.tolist() == [0.0, 1.0, -0.0, -1.0, 1.0]


def test_fake_quantize_zero_point_rounding_is_documented_difference():
    # torch's per-tensor *backward* uses trunc(zp + 0.5) (= 3 here), its forward and ours use
    # round-half-even (= 2): the gradients differ only for such tie zero points.
    x = torch.tensor([-0.3, 0.4])  # x/s = -3: code -1 (outside) with zp 2, 0 (inside) with zp 3
    s, z = torch.tensor([0.1]), torch.tensor([2.5])
    dx, _, dz = R.fake_quantize_backward(torch.ones(2), x, s, z, 0, 15, None, 1.0, None, None, False)
    xb, zb = x.clone().requires_grad_(), z.clone().requires_grad_()
    torch._fake_quantize_learnable_per_tensor_affine(xb, s, zb, 0, 15, 1.0).sum().backward()
    assert dx.tolist() == [0.0, 1.0] and xb.grad.tolist() == [1.0, 1.0]
    assert not torch.equal(dz, zb.grad)
    y = sk.fake_quantize(x, s, z, 0, 15)
    assert torch.equal(y, torch._fake_quantize_learnable_per_tensor_affine(x, s, z, 0, 15, 1.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_quantize_low_precision_is_fp32_math_then_cast(dtype):
    x = _rand((257,), 5, dtype=dtype, scale=2.0)
    s, z = torch.tensor([0.07]), torch.tensor([3.0])
    y = sk.fake_quantize(x, s, z, 0, 15)
    assert y.dtype == dtype
    assert torch.equal(y, sk.fake_quantize(x.float(), s, z, 0, 15).to(dtype))


def test_fake_quantize_non_contiguous_input():
    x = _rand((8, 6), 6).t()
    s, z = torch.tensor([0.1]), torch.tensor([0.0])
    assert torch.equal(sk.fake_quantize(x, s, z, -8, 7), sk.fake_quantize(x.contiguous(), s, z, -8, 7))


# ------------------------------------------------------------------------------------------
# LIQ against autograd through the composite straight-through formula
# ------------------------------------------------------------------------------------------
def liq_composite(x, clip, bits, signed, standardize):
    def ste(t):
        return t + (torch.round(t) - t).detach()

    if standardize:
        x = (x - x.detach().mean()) / x.detach().std()
    c, n = clip.abs(), 2**bits - 1
    # the reference code's `/ n`, as ATen evaluates it on CUDA: times the rounded reciprocal
    inv_n = torch.tensor(1.0, dtype=x.dtype) / n
    if signed:
        t = torch.clamp(x / c, -1, 1)
        return (ste((t + 1) / 2 * n) * inv_n * 2 - 1) * c
    return ste(torch.clamp(x / c, 0, 1) * n) * inv_n * c


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("signed,standardize", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_liq_matches_autograd_composite(bits, signed, standardize, dtype):
    x = _rand((5, 3, 3, 3), bits, dtype=dtype, scale=0.8)
    clip = torch.tensor([-0.9 if signed else 1.1], dtype=dtype)
    xa, ca = x.clone().requires_grad_(), clip.clone().requires_grad_()
    xb, cb = x.clone().requires_grad_(), clip.clone().requires_grad_()
    ya = sk.liq_quantize(xa, ca, bits, signed, standardize)
    yb = liq_composite(xb, cb, bits, signed, standardize)
    assert torch.equal(ya, yb)
    dy = _rand(x.shape, 99, dtype=dtype)
    ya.backward(dy)
    yb.backward(dy)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(xa.grad, xb.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(ca.grad, cb.grad, rtol=tol, atol=tol)


def test_liq_clip_boundary_is_inside():
    # x == c: inside the closed range, dx = 1 and dQ/dc = Q/c - x/c = 0.
    x = torch.tensor([1.0, 1.5, -1.0, 0.3], requires_grad=True)
    c = torch.tensor([1.0], requires_grad=True)
    sk.liq_quantize(x, c, 4, True).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 1.0]
    y = R.liq_quantize(x.detach(), c.detach(), 4, True, False, None, None, False)
    expected = (y / 1.0 - torch.tensor([1.0, 0.0, -1.0, 0.3]) * torch.tensor([1.0, 0.0, 1.0, 1.0])).sum()
    torch.testing.assert_close(c.grad, expected.reshape(1))


@pytest.mark.parametrize("before", [False, True])
def test_perturbed_variants(before):
    w = _rand((4, 3, 3, 3), 7, scale=0.5)
    e = _rand(w.shape, 8)
    s = torch.tensor(0.03)
    clip = torch.tensor([1.2])
    wa = w.clone().requires_grad_()
    y = sk.liq_quantize(wa, clip, 4, True, True, e, s, before)
    if before:
        wb = w.clone().requires_grad_()
        yb = liq_composite(wb + s * e, clip, 4, True, True)
    else:
        wb = w.clone().requires_grad_()
        yb = liq_composite(wb, clip, 4, True, True) + s * e
    torch.testing.assert_close(y, yb, rtol=0, atol=1e-6)
    dy = _rand(w.shape, 9)
    y.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(wa.grad, wb.grad)
    # fake_quantize: Q(x) + s*e == fake_quantize(x) + s*e
    sc, z = torch.tensor([0.05]), torch.tensor([0.0])
    q = sk.fake_quantize(w, sc, z, -8, 7, None, 1.0, e, s, before)
    ref = sk.fake_quantize(w + s * e, sc, z, -8, 7) if before else sk.fake_quantize(w, sc, z, -8, 7) + s * e
    torch.testing.assert_close(q, ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# SAM ops
# ------------------------------------------------------------------------------------------
def _tensors(seed, shapes=((5, 3), (7,), (2, 3, 4))):
    return [_rand(s, seed + i) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sq_norm_against_float64(adaptive):
    gs, ps = _tensors(0), _tensors(10)
    flags = [adaptive, False, adaptive]
    n2, inf = sk.grad_sq_norm(gs, ps, flags, 0.01)
    exp = sum(
        ((g.double() * (p.double().abs() + 0.01)) if f else g.double()).pow(2).sum()
        for g, p, f in zip(gs, ps, flags)
    )
    torch.testing.assert_close(n2.double(), exp, rtol=1e-6, atol=0)
    assert n2.dtype == torch.float32 and inf.item() == 0.0
    gs[1][3] = float("inf")
    assert sk.grad_sq_norm(gs)[1].item() == 1.0
    z, zi = sk.grad_sq_norm([])
    assert z.item() == 0.0 and zi.item() == 0.0


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sam_perturb_restore_bit_exact(adaptive, dtype):
    ps = [t.to(dtype) for t in _tensors(0)]
    gs = [t.to(dtype) for t in _tensors(20)]
    orig = [p.clone() for p in ps]
    backups = [torch.full_like(p, float("nan")) for p in ps]  # poisoned
    scale = torch.tensor(0.37)
    sk.sam_perturb_(ps, gs, backups, scale, [adaptive] * 3)
    for p, o, g, b in zip(ps, orig, gs, backups):
        assert torch.equal(b, o)
        s = scale.to(dtype)
        assert torch.equal(p, o + ((o * o) * g * s if adaptive else g * s))
    sk.sam_restore_(ps, backups)
    for p, o in zip(ps, orig):
        assert torch.equal(p, o)


@pytest.mark.parametrize("momentum,nesterov,dampening,wd", [(0.0, False, 0.0, 0.0), (0.9, True, 0.0, 1e-4), (0.9, False, 0.1, 5e-4)])
def test_sam_restore_sgd_matches_torch_optim(momentum, nesterov, dampening, wd):
    ps = [torch.nn.Parameter(t) for t in _tensors(0)]
    ref = [torch.nn.Parameter(t.clone()) for t in _tensors(0)]
    opt = torch.optim.SGD(ref, lr=0.05, momentum=momentum, nesterov=nesterov, dampening=dampening, weight_decay=wd, foreach=False)
    bufs = [torch.zeros_like(p) for p in ps]
    lr = torch.tensor(0.05)
    for step in range(3):
        gs = _tensors(100 + step)
        backups = [p.detach().clone() for p in ps]
        with torch.no_grad():
            for p in ps:
                p.add_(1.0)  # "perturbed": the op must restore before stepping
        sk.sam_restore_sgd_([p.data for p in ps], backups, gs, bufs, lr, momentum, dampening, wd, nesterov, step == 0)
        for r, g in zip(ref, gs):
            r.grad = g.clone()
        opt.step()
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p.data, r.data, rtol=2e-6, atol=1e-7)


def test_sam_restore_adamw_matches_torch_optim():
    ps = [t.clone() for t in _tensors(0)]
    ref = [torch.nn.Parameter(t.clone()) for t in _tensors(0)]
    opt = torch.optim.AdamW(ref, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, foreach=False)
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros(()) for _ in ps]
    for step in range(4):
        gs = _tensors(200 + step)
        backups = [p.clone() for p in ps]
        sk.sam_restore_adamw_(ps, backups, gs, m, v, steps, torch.tensor(0.01), 0.8, 0.95, 1e-6, 0.05)
        for r, g in zip(ref, gs):
            r.grad = g.clone()
        opt.step()
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p, r.data, rtol=2e-6, atol=1e-7)
    assert steps[0].item() == 4.0


def test_fused_steps_skip_on_found_inf():
    ps = _tensors(0)
    orig = [p.clone() for p in ps]
    backups = [p.clone() for p in ps]
    for p in ps:
        p.add_(1.0)
    bufs = [torch.full_like(p, 2.0) for p in ps]
    sk.sam_restore_sgd_(ps, backups, _tensors(5), bufs, torch.tensor(0.1), 0.9, 0.0, 0.0, False, False, torch.tensor(1.0))
    assert all(torch.equal(p, o) for p, o in zip(ps, orig))
    assert all(torch.equal(b, torch.full_like(b, 2.0)) for b in bufs)
    steps = [torch.zeros(()) for _ in ps]
    m = [torch.zeros_like(p) for p in ps]
    sk.sam_restore_adamw_(ps, backups, _tensors(5), m, [x.clone() for x in m], steps, torch.tensor(0.1), found_inf=torch.tensor(1.0))
    assert all(s.item() == 0 for s in steps) and all(torch.equal(p, o) for p, o in zip(ps, orig))


# ------------------------------------------------------------------------------------------
# opcheck: schema, fake, autograd registration, AOT dispatch
# ------------------------------------------------------------------------------------------
def _opcheck_cases():
    x = _rand((4, 6), 1)
    e, s = _rand((4, 6), 2), torch.tensor(0.1)
    ps, gs = _tensors(0), _tensors(1)
    return [
        (torch.ops.saq.fake_quantize.default, (x, torch.tensor([0.1]), torch.tensor([1.0]), -8, 7, None, 0.5, None, None, False)),
        (torch.ops.saq.fake_quantize.default, (x, torch.full((6,), 0.1), torch.zeros(6), 0, 15, 1, 1.0, e, s, True)),
        (torch.ops.saq.fake_quantize_backward.default, (x, x, torch.tensor([0.1]), torch.tensor([1.0]), -8, 7, None, 1.0, None, None, False)),
        (torch.ops.saq.liq_quantize.default, (x, torch.tensor([0.7]), 4, True, True, e, s, False)),
        (torch.ops.saq.liq_quantize_backward.default, (x, x, torch.tensor([0.7]), 3, False, False, None, None, False)),
        (torch.ops.saq.grad_sq_norm.default, (gs, ps, [True, False, True], 0.01)),
        (torch.ops.saq.sam_perturb_.default, ([p.clone() for p in ps], gs, [torch.empty_like(p) for p in ps], s, [False] * 3)),
        (torch.ops.saq.sam_restore_.default, ([p.clone() for p in ps], gs)),
        (torch.ops.saq.sam_restore_sgd_.default, ([p.clone() for p in ps], ps, gs, [torch.zeros_like(p) for p in ps], s, 0.9, 0.0, 1e-4, True, False, None)),
        (torch.ops.saq.sam_restore_adamw_.default, ([p.clone() for p in ps], ps, gs, [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps], [torch.zeros(()) for _ in ps], s, 0.9, 0.999, 1e-8, 0.01, torch.tensor(0.0))),
    ]


@pytest.mark.parametrize("case", range(10))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    tests = ["test_schema", "test_faketensor"]
    if op in (torch.ops.saq.fake_quantize.default, torch.ops.saq.liq_quantize.default):
        tests += ["test_autograd_registration", "test_aot_dispatch_dynamic"]
    opcheck(op, args, test_utils=tests)
