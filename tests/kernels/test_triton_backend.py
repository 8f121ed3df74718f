"""The "triton" backend against the reference (saq_kernels/OPS.md's contract).

Without CUDA the kernels run on CPU tensors under the Triton interpreter: this module sets
TRITON_INTERPRET=1 before triton is imported, and skips (with the reason) if the saq Triton kernels
were already compiled without it by an earlier import. Sizes stay small (the interpreter is slow).

* quantized outputs: bitwise equal (``torch.equal``), ties included; the standardized LIQ forward
  may differ where the statistics differ in the last bit: rare, and exactly one level;
* gradients and reductions: error against a float64 oracle at most twice the reference's own
  error, never less than one fp32 rounding of the magnitude involved (``_assert_within``);
* sam_perturb_ / sam_restore_: bit-exact; SGD / AdamW: the same derived tolerance, against the
  reference run in float64. Both multi-tensor paths (one launch per dtype group through a device
  pointer table, and one launch per tensor) are tested.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import saq_kernels as sk  # noqa: E402
from saq_kernels import reference as R  # noqa: E402
from saq_kernels.backends import get_backend  # noqa: E402

DEV = "cuda" if _CUDA else "cpu"
# On a GPU this module is the Triton backend's GPU parity suite: marked gpu, so that the GPU check
# (benchmarks/gpu_check.sh: pytest -m "gpu and not slow") runs it; under the interpreter it is part
# of the default CPU run.
if _CUDA:
    pytestmark = pytest.mark.gpu
_BACKEND = get_backend("triton")
_REASON = _BACKEND.available() or _BACKEND.supports("fake_quantize", DEV, torch.float32)
if _REASON is not None:
    pytest.skip(f"triton backend unavailable on {DEV}: {_REASON}", allow_module_level=True)

from saq_kernels._triton import liq_quantize as _tliq  # noqa: E402
from saq_kernels._triton import sam as _tsam  # noqa: E402
from saq_kernels.backends import triton_backend as _tb  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PERTURB = ["none", "after", "before"]


def _on(name, fn, *args):
    with sk.use_backend(name):
        return fn(*args)


def _both(fn, *args):
    return _on("triton", fn, *args), _on("reference", fn, *args)


def _assert_within(actual, ref, oracle, scale=None, what=""):
    """max|actual - oracle| <= 2 * max(max|ref - oracle|, eps32 * max(scale)).

    ``scale``: the magnitude one fp32 rounding is relative to (default |oracle|; for sums, the sum
    of the absolute terms). The floor keeps a lucky, exact reference from demanding exactness.
    """
    oracle = oracle.double()
    scale = oracle.abs() if scale is None else scale.double()
    err = float((actual.double() - oracle).abs().max())
    err_ref = float((ref.double() - oracle).abs().max())
    floor = torch.finfo(torch.float32).eps * float(scale.max())
    tol = 2 * max(err_ref, floor)
    assert err <= tol, f"{what}: error {err:.3e} > tolerance {tol:.3e} (reference error {err_ref:.3e})"


def _perturbation(kind, x, seed=3):
    if kind == "none":
        return None, None, False
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
    return e, torch.tensor(0.07, device=x.device), kind == "before"


def _rand(shape, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(device=DEV, dtype=dtype)


def _qrange(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _fq_params(x, axis, seed=1):
    gen = torch.Generator().manual_seed(seed)
    c = 1 if axis is None else x.shape[axis]
    shape = [1] if axis is None else [c]
    scale = (torch.rand(shape, generator=gen) * 0.5 + 0.05).to(DEV)
    zp = (torch.randn(shape, generator=gen) * 2).to(DEV)
    return scale, zp


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
def test_supports_reasons(monkeypatch):
    assert "float64" in _tb._supports("fake_quantize", "cuda", torch.float64)
    assert _tb._supports("fake_quantize", "cuda", torch.bfloat16) is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _tb._supports("liq_quantize", "cpu", torch.float32) == (
        "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)"
    )
    assert set(_BACKEND.table()) >= {
        "fake_quantize", "fake_quantize_backward", "liq_quantize", "liq_quantize_backward",
        "grad_sq_norm", "sam_perturb_", "sam_restore_", "sam_restore_sgd_", "sam_restore_adamw_",
    }


def test_import_does_not_import_triton():
    import saq_kernels

    root = os.path.dirname(os.path.dirname(os.path.abspath(saq_kernels.__file__)))
    code = "import sys, saq_kernels; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_kernels_run_with_the_datas_gpu_current(monkeypatch):
    # Triton launches on the current CUDA device: every impl switches to the data's GPU first
    # (fake cuda:1 tensors stand in for a second GPU; the wrapped impl records the device)
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    import saq_kernels._triton as T

    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(str(d))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    # on a machine with a GPU, a fake cuda:1 tensor first allocates a real one there (torch's
    # fake_tensor.init_gpu_context), which fails with one GPU: nothing real is needed here
    import torch._subclasses.fake_tensor as fake_tensor
    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda d: None, raising=False)
    run = T.on_data_device(lambda *a: len(entered))
    with FakeTensorMode():
        one, zero = torch.empty(3, device="cuda:1"), torch.empty(3, device="cuda:0")
    assert run(one, 1) == 1 and entered == ["cuda:1"]  # switched, inside the call
    assert run([one], [one]) == 2                       # SAM ops: the first list's tensor
    assert run(zero) == 2 and run([]) == 2 and run(torch.empty(2)) == 2  # current, none, CPU
    table = T.impls()
    assert set(table) == set(_BACKEND.table()) and all(callable(f) for f in table.values())


def test_float64_refused_with_reason():
    x = torch.randn(5, dtype=torch.float64, device=DEV)
    with pytest.raises(RuntimeError, match="float64"):
        with sk.use_backend("triton"):
            sk.fake_quantize(x, torch.tensor([0.1], device=DEV), torch.tensor([0.0], device=DEV), 0, 15)


# ----------------------------------------------------------------------------------------------
# fake_quantize
# ----------------------------------------------------------------------------------------------
_FQ_SHAPES = {None: (5, 7, 33), 0: (13, 3, 5, 7), 1: (2, 9, 5, 11), -1: (37, 3, 23)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("perturb", PERTURB)
def test_fake_quantize_forward_exact(dtype, axis, perturb):
    x = _rand(_FQ_SHAPES[axis], dtype)
    scale, zp = _fq_params(x, axis)
    e, s, before = _perturbation(perturb, x)
    a, b = _both(sk.fake_quantize, x, scale, zp, -8, 7, axis, 1.0, e, s, before)
    assert a.dtype == x.dtype and a.shape == x.shape
    assert torch.equal(a, b)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_fake_quantize_bits(bits, signed):
    qmin, qmax = _qrange(bits, signed)
    x = _rand((3, 331), torch.float32, seed=bits)
    scale, zp = _fq_params(x, 0, seed=bits)
    a, b = _both(sk.fake_quantize, x, scale, zp * 2**bits, qmin, qmax, 0)
    assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf / NaN
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_ties_and_extremes(dtype):
    # x * (1/scale) lands exactly on k + 0.5 (scale a power of two): round half to even
    k = torch.arange(-40, 40, dtype=torch.float32)
    x = torch.cat([(k + 0.5) * 0.25, -(k + 0.5) * 0.25, k * 0.25]).to(DEV, dtype)
    for zp in (0.0, 3.0, -2.5, 2.5, 1.5):  # zero points at ties too
        args = (x, torch.tensor([0.25], device=DEV), torch.tensor([zp], device=DEV), -16, 15)
        a, b = _both(sk.fake_quantize, *args)
        assert torch.equal(a, b), zp
    # a wide range: ties of large codes, huge inputs, infinities and NaN
    wide = torch.cat([torch.arange(-6001, 6001, 2, dtype=torch.float32) * 0.5,
                      torch.tensor([1e30, -1e30, 3e38, float("inf"), -float("inf"), float("nan"), -0.0])])
    args = (wide.to(DEV), torch.tensor([1.0], device=DEV), torch.tensor([0.0], device=DEV), -32768, 32767)
    a, b = _both(sk.fake_quantize, *args)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_fake_quantize_noncontiguous_and_zero_dim():
    base = _rand((6, 10, 7), torch.float32)
    for x, axis in ((base.transpose(0, 2), 1), (base[:, ::2, :], -1), (base.permute(2, 0, 1), None)):
        scale, zp = _fq_params(x, axis)
        a, b = _both(sk.fake_quantize, x, scale, zp, 0, 15, axis)
        assert torch.equal(a, b)
    cl = _rand((2, 6, 5, 3), torch.float32).contiguous(memory_format=torch.channels_last)
    scale, zp = _fq_params(cl, 1)
    a, b = _both(sk.fake_quantize, cl, scale, zp, -8, 7, 1)
    assert torch.equal(a, b)
    x0 = torch.tensor(1.37, device=DEV)
    a, b = _both(sk.fake_quantize, x0, torch.tensor(0.1, device=DEV), torch.tensor(0.0, device=DEV), 0, 255)
    assert torch.equal(a, b)


def _fq_oracle(grad, x, scale, zp, qmin, qmax, axis, gf, e, s, before):
    """(dx, elementwise dscale terms, elementwise dzp terms): the reference's fp32 ops, unsummed."""
    xf = R._perturbed_input(x, e, s, before)
    g = grad.float()
    sv, zpv, inv, xq = R._fq_codes(xf, scale, zp, qmin, qmax, axis)
    below, above = xq < qmin, xq > qmax
    inside = ~(below | above)
    ds_in = g * ((torch.clamp(xq, qmin, qmax) - zpv) * sv - xf) * inv
    ds = torch.where(inside, ds_in, torch.where(below, g * (qmin - zpv), g * (qmax - zpv))) * gf
    dz = torch.where(inside, torch.zeros_like(g), -g * sv * gf)
    return torch.where(inside, g, torch.zeros_like(g)).to(x.dtype), ds, dz


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("perturb", PERTURB)
def test_fake_quantize_backward(dtype, axis, perturb):
    x = _rand(_FQ_SHAPES[axis], dtype)
    scale, zp = _fq_params(x, axis)
    e, s, before = _perturbation(perturb, x)
    grad = _rand(x.shape, dtype, seed=7, scale=1.0)
    args = (grad, x, scale, zp, -8, 7, axis, 0.3, e, s, before)
    (dx, ds, dz), (rdx, rds, rdz) = _both(torch.ops.saq.fake_quantize_backward, *args)
    odx, ods, odz = _fq_oracle(*args)
    assert dx.dtype == x.dtype and torch.equal(dx, rdx) and torch.equal(dx, odx)
    assert ds.dtype == torch.float32 and ds.shape == scale.shape and dz.shape == zp.shape
    for got, ref, terms, name in ((ds, rds, ods, "dscale"), (dz, rdz, odz, "dzero_point")):
        oracle = R._sum_like(terms.double(), scale, x, axis)
        mag = R._sum_like(terms.double().abs(), scale, x, axis)
        _assert_within(got, ref, oracle, mag, f"{name} {dtype} axis={axis} {perturb}")


def test_fake_quantize_autograd_and_determinism():
    x = _rand((7, 65), torch.float32)
    scale, zp = _fq_params(x, 0)

    def grads(name):
        xs, ss, zs = (t.clone().requires_grad_() for t in (x, scale, zp))
        with sk.use_backend(name):
            y = sk.fake_quantize(xs, ss, zs, -8, 7, 0, 0.5)
            y.backward(torch.linspace(-1, 1, y.numel(), device=DEV).reshape(y.shape))
        return xs.grad, ss.grad, zs.grad

    first, again, ref = grads("triton"), grads("triton"), grads("reference")
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # fixed blocks and order: bitwise reproducible
    assert torch.equal(first[0], ref[0])
    torch.testing.assert_close(first[1], ref[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# liq_quantize
# ----------------------------------------------------------------------------------------------
def _liq_inputs(dtype, signed, seed=0, shape=(37, 41)):
    x = _rand(shape, dtype, seed=seed, scale=1.0)
    clip = torch.tensor([1.7 if signed else -2.1], device=DEV)  # negative: |clip| and sign(clip)
    return x, clip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("perturb", PERTURB)
def test_liq_forward_exact(dtype, signed, perturb):
    x, clip = _liq_inputs(dtype, signed)
    e, s, before = _perturbation(perturb, x)
    for bits in (2, 4, 8):
        a, b = _both(sk.liq_quantize, x, clip, bits, signed, False, e, s, before)
        assert a.dtype == x.dtype and torch.equal(a, b), bits


@pytest.mark.parametrize("bits", range(2, 9))
def test_liq_bits_and_noncontiguous(bits):
    x = _rand((8, 6, 5), torch.float32, seed=bits, scale=1.0).permute(2, 0, 1)
    clip = torch.tensor(0.9, device=DEV)
    for signed in (True, False):
        a, b = _both(sk.liq_quantize, x, clip, bits, signed, False)
        assert torch.equal(a, b)


def _liq_level(clip, bits, signed):
    return abs(float(clip)) * (2.0 if signed else 1.0) / (2**bits - 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("perturb", PERTURB)
def test_liq_standardized_forward(dtype, perturb):
    x, clip = _liq_inputs(dtype, True, seed=5, shape=(16, 3, 3, 9))
    x = x * 0.02 + 0.3  # conv-weight-like: small spread, non-zero mean
    e, s, before = _perturbation(perturb, x)
    for bits, signed in ((4, True), (3, False), (8, True)):
        a, b = _both(sk.liq_quantize, x, clip, bits, signed, True, e, s, before)
        diff = (a.double() - b.double()).abs()
        off = diff > 0
        # the statistics are summed in another order: a value within an ulp of a rounding
        # boundary may land one level away. Rare, and exactly one level (in x's dtype).
        assert int(off.sum()) <= max(1, x.numel() // 200), int(off.sum())
        if off.any():
            level = _liq_level(clip, bits, signed)
            torch.testing.assert_close(diff[off], torch.full_like(diff[off], level),
                                       rtol=torch.finfo(dtype).eps * 4, atol=0)


def test_liq_stats_against_float64():
    x = _rand((7, 313), torch.float32, seed=9, scale=0.05) + 1.5
    stats = _tliq.liq_quantize_stats(x.contiguous(), x, x, False)
    mean64, std64 = x.double().mean(), x.double().std()
    _assert_within(stats[0:1], x.mean().reshape(1), mean64.reshape(1), what="mean")
    _assert_within(stats[1:2], x.std().reshape(1), std64.reshape(1), what="std")


def _liq_oracle64(grad, x, clip, bits, signed, standardize, e, s, before):
    """(dx, dclip, |terms| sum) of the reference formulas in float64."""
    xf = x.double()
    if before and e is not None:
        xf = xf + s.double() * e.double()
    std = None
    if standardize:
        std = xf.std()
        xf = (xf - xf.mean()) / std
    c = clip.double().abs().reshape(())
    n = float(2**bits - 1)
    r = xf / c
    if signed:
        y = (torch.round((torch.clamp(r, -1, 1) + 1) / 2 * n) / n * 2 - 1) * c
    else:
        y = torch.round(torch.clamp(r, 0, 1) * n) / n * c
    inside = (r >= (-1.0 if signed else 0.0)) & (r <= 1.0)
    g = grad.double()
    dx = torch.where(inside, g, torch.zeros_like(g))
    if std is not None:
        dx = dx / std
    terms = g * (y / c - torch.where(inside, r, torch.zeros_like(r)))
    return dx, terms.sum() * torch.sign(clip.double().reshape(())), terms.abs().sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("perturb", PERTURB)
def test_liq_backward(dtype, signed, standardize, perturb):
    x, clip = _liq_inputs(dtype, signed, seed=2)
    e, s, before = _perturbation(perturb, x)
    grad = _rand(x.shape, dtype, seed=11, scale=1.0)
    args = (grad, x, clip, 4, signed, standardize, e, s, before)
    (dx, dc), (rdx, rdc) = _both(torch.ops.saq.liq_quantize_backward, *args)
    odx, odc, mag = _liq_oracle64(*args)
    assert dx.dtype == x.dtype and dc.dtype == torch.float32 and dc.shape == clip.shape
    if standardize:  # dx = g / std: the statistics differ in the last bits
        _assert_within(dx, rdx, odx, what=f"dx {dtype}")
    else:
        assert torch.equal(dx, rdx)
    _assert_within(dc, rdc, odc.reshape(1), mag.reshape(1), f"dclip {dtype} {signed} {perturb}")


def test_liq_maps_levels_with_the_fp32_reciprocal():
    # The pinned form (saq_kernels/OPS.md): k * fp32(1/n), what ATen computes for the SAQ reference
    # code's `round(v * n) / n` on CUDA.
    x, clip = _liq_inputs(torch.float32, True, seed=4)
    n = 15.0
    inv = torch.tensor(1.0) / torch.tensor(n)
    c = clip.abs().reshape(())
    for signed in (True, False):
        r = x / c
        if signed:
            k = torch.round((torch.clamp(r, -1.0, 1.0) + 1.0) * 0.5 * n)
            expect = (k * inv.to(DEV) * 2.0 - 1.0) * c
        else:
            expect = torch.round(torch.clamp(r, 0.0, 1.0) * n) * inv.to(DEV) * c
        assert torch.equal(_on("triton", sk.liq_quantize, x, clip, 4, signed, False), expect)


@pytest.mark.parametrize("C,inner,outer", [
    (1, 1 << 31, 1),            # per tensor, 2^31 elements
    (200_000, 4096, 1),         # an LM head: more output channels than a grid's second axis holds
    (131_071, 64, 1), (70_000, 1, 4096), (3, 7, 5), (65_536, 1024, 2),
])
def test_backward_grid_fits_cuda_limits(C, inner, outer):
    # the per-channel backward's launch grid: channel tiles on axis 0 (< 2^31), k programs on
    # axis 1 (<= 65535), and together they cover every channel and every element of each
    from saq_kernels._triton import fake_quantize as tfq

    K = outer * inner
    (n_c, grid_k), bc, bk, n_iter = tfq._bwd_grid(C, inner, K)
    assert 1 <= grid_k <= 65535 and 1 <= n_c < 2**31
    assert n_c * bc >= C and (n_c - 1) * bc < C
    assert grid_k * n_iter * bk >= K
    assert bc * bk <= tfq.BLOCK


@pytest.mark.gpu  # 70,000 x 1024 elements: too many for the interpreter (deselected on the CPU)
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")
def test_backward_with_more_channels_than_grid_axis_1():
    # 70,000 channels of 1024 elements: one channel per tile, 70,000 channel tiles (> 65535)
    x = _rand((70_000, 1024), torch.float32, seed=3)
    scale = torch.rand(70_000, device=DEV) * 0.1 + 0.01
    zp = torch.zeros(70_000, device=DEV)
    args = (torch.randn_like(x), x, scale, zp, -8, 7, 0, 1.0, None, None, False)
    (dx, ds, dz), (rdx, rds, rdz) = _both(torch.ops.saq.fake_quantize_backward, *args)
    assert torch.equal(dx, rdx)
    torch.testing.assert_close(ds, rds, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(dz, rdz, rtol=1e-4, atol=1e-3)


def test_int64_indexing_path(monkeypatch):
    # tensors of 2^31+ elements index in int64; force that code path on small inputs
    from saq_kernels._triton import fake_quantize as tfq

    monkeypatch.setattr(tfq, "needs_int64", lambda n: True)
    monkeypatch.setattr(_tliq, "needs_int64", lambda n: True)
    x = _rand((5, 6, 41), torch.float32)
    for axis in (None, 1):
        scale, zp = _fq_params(x, axis)
        a, b = _both(sk.fake_quantize, x, scale, zp, -8, 7, axis)
        assert torch.equal(a, b)
        args = (torch.ones_like(x), x, scale, zp, -8, 7, axis, 1.0, None, None, False)
        (dx, ds, _), (rdx, rds, _) = _both(torch.ops.saq.fake_quantize_backward, *args)
        assert torch.equal(dx, rdx)
        torch.testing.assert_close(ds, rds, rtol=1e-5, atol=1e-4)
    a, b = _both(sk.liq_quantize, x * 0.3, torch.tensor([1.0], device=DEV), 4, True, True)
    assert (a != b).sum() <= 2


# ----------------------------------------------------------------------------------------------
# SAM ops: both multi-tensor paths
# ----------------------------------------------------------------------------------------------
_SHAPES = [(3,), (17, 5), (1031,), (33, 33), (1,), (0,), (4, 3, 3, 3)]


@pytest.fixture(params=["table", "per_tensor"])
def mt_mode(request, monkeypatch):
    if request.param == "table" and _tsam.interpreting() and DEV != "cpu":
        pytest.skip("the table path cannot run CUDA tensors under the interpreter")
    monkeypatch.setattr(_tsam, "MODE", request.param)
    return request.param


def _tensors(dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(DEV, dtype) for s in _SHAPES]


def _clone(ts):
    return [t.clone() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_sq_norm(dtype, mt_mode):
    gs, ps = _tensors(dtype, 1), _tensors(dtype, 2)
    adaptive = [i % 2 == 0 for i in range(len(gs))]
    (n, f), (rn, rf) = _both(sk.grad_sq_norm, gs, ps, adaptive, 0.01)
    assert n.shape == () and n.dtype == torch.float32 and float(f) == 0.0 == float(rf)
    # the elementwise g * (|p| + eta) is fp32 in both (the spec): oracle = those terms squared
    # and summed in float64
    terms = [(g.float() * (p.float().abs() + 0.01) if a else g.float()).double()
             for g, p, a in zip(gs, ps, adaptive)]
    oracle = sum((t * t).sum() for t in terms)
    mag = oracle
    _assert_within(n.reshape(1), rn.reshape(1), oracle.reshape(1), mag.reshape(1), "norm_sq")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf / NaN
def test_grad_sq_norm_nonfinite_and_layouts(mt_mode):
    g = [_rand((5, 7), torch.float32).t(), _rand((8, 8), torch.float32)[:, :5], _rand((3,), torch.float16)]
    p = [_rand((5, 7), torch.float32).contiguous().t().contiguous(), _rand((8, 5), torch.float32),
         _rand((3,), torch.float32)]
    (n, f), (rn, rf) = _both(sk.grad_sq_norm, g, p, [True, True, False], 0.05)
    torch.testing.assert_close(n, rn, rtol=1e-6, atol=0)
    for bad in (float("inf"), float("nan")):
        gb = _clone(g)
        gb[2][1] = bad
        n, f = _on("triton", sk.grad_sq_norm, gb, p, [True, True, False], 0.05)
        assert float(f) == 1.0 and not torch.isfinite(n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sam_perturb_restore_bit_exact(dtype, mt_mode):
    ps, gs = _tensors(dtype, 3), _tensors(dtype, 4)
    adaptive = [i % 3 == 0 for i in range(len(ps))]
    scale = torch.tensor(0.0371, device=DEV)
    out = {}
    for name in ("triton", "reference"):
        p, b = _clone(ps), [torch.full_like(t, 7.0) for t in ps]
        _on(name, sk.sam_perturb_, p, gs, b, scale, adaptive)
        out[name] = (p, b)
    for a, r, orig in zip(out["triton"][0], out["reference"][0], ps):
        assert torch.equal(a, r)
    for a, orig in zip(out["triton"][1], ps):
        assert torch.equal(a, orig)
    p, b = out["triton"]
    _on("triton", sk.sam_restore_, p, b)
    for a, orig in zip(p, ps):
        assert torch.equal(a, orig)


def test_sam_perturb_irregular_tuples(mt_mode):
    # mixed dtypes, different strides and non-dense views go through the reference loop
    p = [_rand((6, 4), torch.float32), _rand((6, 4), torch.float32).t(),
         _rand((8, 8), torch.float32)[:, :3], _rand((9,), torch.float32)]
    g = [_rand((6, 4), torch.float16), _rand((4, 6), torch.float32), _rand((8, 3), torch.float32),
         _rand((9,), torch.float32)]
    res = {}
    for name in ("triton", "reference"):
        pp, bb = _clone(p), [torch.zeros_like(t) for t in p]
        _on(name, sk.sam_perturb_, pp, g, bb, torch.tensor(0.5, device=DEV), [True, False, True, False])
        res[name] = pp
    for a, b in zip(res["triton"], res["reference"]):
        assert torch.equal(a, b)


def _state(dtype, seed):
    ps = _tensors(dtype, seed)
    return {
        "params": ps,
        "backups": [t + 0.25 for t in ps],
        "grads": _tensors(dtype, seed + 1),
        "m": _tensors(dtype, seed + 2, 0.1),
        "v": [t.abs() for t in _tensors(dtype, seed + 3, 0.01)],
    }


def _to64(ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [(0.0, 0.0, 0.0, False, False), (0.9, 0.1, 1e-4, False, True),
                                 (0.9, 0.0, 5e-4, True, False)])
def test_sam_restore_sgd(dtype, cfg, mt_mode):
    momentum, dampening, wd, nesterov, first = cfg
    st = _state(dtype, 20)
    lr = torch.tensor(0.05, device=DEV)
    runs = {}
    for name, cast in (("triton", _clone), ("reference", _clone), ("oracle", _to64)):
        p, b, g, m = cast(st["params"]), cast(st["backups"]), cast(st["grads"]), cast(st["m"])
        fn = sk.sam_restore_sgd_ if name != "oracle" else R.sam_restore_sgd_
        lr_ = lr if name != "oracle" else lr.double()
        args = (p, b, g, m, lr_, momentum, dampening, wd, nesterov, first, None)
        if name == "oracle":
            fn(*args)
        else:
            _on(name, fn, *args)
        runs[name] = (p, m)
    for k in range(2):
        for a, r, o in zip(runs["triton"][k], runs["reference"][k], runs["oracle"][k]):
            if o.numel():
                _assert_within(a.float(), r.float(), o, what=f"sgd {'param' if k == 0 else 'buf'} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sam_restore_adamw(dtype, mt_mode):
    st = _state(dtype, 30)
    lr = torch.tensor(1e-3, device=DEV)
    runs = {}
    for name, cast in (("triton", _clone), ("reference", _clone), ("oracle", _to64)):
        p, b, g, m, v = (cast(st[k]) for k in ("params", "backups", "grads", "m", "v"))
        sdt = torch.float32 if name != "oracle" else torch.float64
        steps = [torch.tensor(float(i), device=DEV, dtype=sdt) for i in range(len(p))]
        args = (p, b, g, m, v, steps, lr if name != "oracle" else lr.double(), 0.9, 0.999, 1e-8, 1e-2, None)
        if name == "oracle":
            R.sam_restore_adamw_(*args)
        else:
            _on(name, sk.sam_restore_adamw_, *args)
        runs[name] = (p, m, v, steps)
    for k, what in enumerate(("param", "exp_avg", "exp_avg_sq")):
        for a, r, o in zip(runs["triton"][k], runs["reference"][k], runs["oracle"][k]):
            if o.numel():
                _assert_within(a.float(), r.float(), o, what=f"adamw {what} {dtype}")
    assert [float(s) for s in runs["triton"][3]] == [float(i + 1) for i in range(len(_SHAPES))]


def test_found_inf_restores_only(mt_mode):
    st = _state(torch.float32, 40)
    lr = torch.tensor(0.1, device=DEV)
    found = torch.tensor(1.0, device=DEV)
    p, m = _clone(st["params"]), _clone(st["m"])
    _on("triton", sk.sam_restore_sgd_, p, st["backups"], st["grads"], m, lr, 0.9, 0.0, 0.0, False,
        False, found)
    assert all(torch.equal(a, b) for a, b in zip(p, st["backups"]))
    assert all(torch.equal(a, b) for a, b in zip(m, st["m"]))
    p, m, v = _clone(st["params"]), _clone(st["m"]), _clone(st["v"])
    steps = [torch.tensor(3.0, device=DEV) for _ in p]
    _on("triton", sk.sam_restore_adamw_, p, st["backups"], st["grads"], m, v, steps, lr, 0.9, 0.999,
        1e-8, 0.01, found)
    assert all(torch.equal(a, b) for a, b in zip(p, st["backups"]))
    assert all(torch.equal(a, b) for a, b in zip(m, st["m"])) and all(float(s) == 3.0 for s in steps)
    # found_inf == 0: the step happens
    _on("triton", sk.sam_restore_adamw_, p, st["backups"], st["grads"], m, v, steps, lr, 0.9, 0.999,
        1e-8, 0.01, torch.tensor(0.0, device=DEV))
    assert all(float(s) == 4.0 for s in steps)


def test_table_cache_follows_new_tensors(monkeypatch):
    if _tsam.interpreting() and DEV != "cpu":
        pytest.skip("the table path cannot run CUDA tensors under the interpreter")
    monkeypatch.setattr(_tsam, "MODE", "table")
    ps = _tensors(torch.float32, 50)
    for _ in range(2):  # same tensors (cache hit), then fresh grads at new addresses (miss)
        gs = _tensors(torch.float32, 51)
        p, b = _clone(ps), [torch.empty_like(t) for t in ps]
        _on("triton", sk.sam_perturb_, p, gs, b, torch.tensor(0.1, device=DEV), [False] * len(ps))
        pr, br = _clone(ps), [torch.empty_like(t) for t in ps]
        R.sam_perturb_(pr, gs, br, torch.tensor(0.1, device=DEV), [False] * len(ps))
        assert all(torch.equal(a, r) for a, r in zip(p, pr))


def test_eager_calls_load_the_kernels_a_capture_launches(monkeypatch):
    # Triton cannot load a kernel while a CUDA stream is capturing, and a capture runs the SAM ops
    # per tensor: the first eager call of each op variant runs per tensor too. Here on the CPU
    # (the device type opted in), a spy records each launch's compiled-kernel identity:
    # constexprs and the 16-byte alignment of the tensor arguments (what Triton still
    # specializes on); a "capture" must launch nothing the eager calls did not.
    if _tsam.interpreting() and DEV != "cpu":
        pytest.skip("the table path cannot run CUDA tensors under the interpreter")
    monkeypatch.setattr(_tsam, "_LOAD_BEFORE_CAPTURE", (torch.device(DEV).type,))
    monkeypatch.setattr(_tsam, "_LOADED", set())
    seen = {"eager": set(), "capture": set()}
    phase = ["eager"]

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def run(*args, **kw):
                names = self.kernel.arg_names
                align = tuple(a.data_ptr() % 16 == 0 for n, a in zip(names, args)
                              if isinstance(a, torch.Tensor) and (n.endswith("_arg") or n == "tab_ptr"))
                consts = tuple(sorted((k, str(v)) for k, v in kw.items() if k.isupper()))
                seen[phase[0]].add((self.name, consts, align))
                return self.kernel[grid](*args, **kw)
            return run

    for name in dir(_tsam):
        if name.endswith("_kernel"):
            monkeypatch.setattr(_tsam, name, Spy(name, getattr(_tsam, name)))
    ps = _tensors(torch.float32, 60) + [torch.randn(9, device=DEV)[1:]]  # + an unaligned view
    gs = [t * 0.5 for t in ps]
    bs = [torch.empty_like(t) for t in ps]
    ms = [torch.zeros_like(t) for t in ps]
    vs = [torch.zeros_like(t) for t in ps]
    steps = [torch.zeros((), device=DEV) for _ in ps]
    lr, found = torch.tensor(0.1, device=DEV), torch.tensor(0.0, device=DEV)

    def step():
        norm, _ = _tsam.grad_sq_norm(gs, ps, [True, False] * 4, 0.01)
        _tsam.sam_perturb_(ps, gs, bs, norm, [False] * len(ps))
        _tsam.sam_restore_sgd_(ps, bs, gs, ms, lr, 0.9, 0.0, 1e-4, True, False, found)
        _tsam.sam_perturb_(ps, gs, bs, norm, [False] * len(ps))
        _tsam.sam_restore_adamw_(ps, bs, gs, ms, vs, steps, lr, 0.9, 0.999, 1e-8, 0.01, found)

    for _ in range(2):
        step()
    assert any(dict(k[1]).get("TABLE") == "True" for k in seen["eager"])  # then the table path
    phase[0] = "capture"
    monkeypatch.setattr(_tsam, "_use_table", lambda device: False)  # what capturing selects
    step()
    assert any(dict(k[1]).get("TABLE") == "False" for k in seen["capture"])
    assert seen["capture"] <= seen["eager"], sorted(seen["capture"] - seen["eager"])


def test_per_tensor_kernels_specialize_on_tensor_alignment_only():
    # the compiled (not interpreted) kernels: integer and float arguments are not specialized by
    # value, 0-dim scalar pointers not by alignment; tensor arguments keep their alignment
    # specialization (vector access)
    import saq_kernels

    code = (
        "from saq_kernels._triton import sam as S\n"
        "for n in sorted(dir(S)):\n"
        "    if n.endswith('_kernel'):\n"
        "        for p in getattr(S, n).params:\n"
        "            if not p.is_constexpr:\n"
        "                print(n, p.name, int(p.do_not_specialize), int(p.do_not_specialize_on_alignment))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(saq_kernels.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    assert len({r[0] for r in rows}) == 7, out.stdout
    for kernel, name, dns, dns_align in rows:
        data = name == "tab_ptr" or (name.endswith("_arg") and name not in ("n_arg", "flag_arg"))
        expected = ("0", "0") if data else ("0", "1") if name.endswith("_ptr") else ("1", "0")
        assert (dns, dns_align) == expected, (kernel, name)


# ----------------------------------------------------------------------------------------------
# compiled for the GPU without a GPU: sm_90 PTX of representative kernel variants
# ----------------------------------------------------------------------------------------------
_PTX_CHECK = r"""
import os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from saq_kernels._triton import fake_quantize as F, liq_quantize as L, sam as S, utils as U

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
local = {}  # kernel -> count of local-memory instructions (LDL / STL) in its sm_90 SASS

def ptx(kernel, types, consts, aligned=()):
    sig = {n: types.get(n, "constexpr") for n in kernel.arg_names}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": U.NUM_WARPS, "enable_fp_fusion": False}  # the shipped launch constants
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    cubin = compiled.asm.get("cubin")
    if cubin is not None and os.access(CUOBJDUMP, os.X_OK):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        local[len(local)] = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    else:
        local[len(local)] = -1  # no cubin or no cuobjdump: not checked
    return compiled.asm["ptx"]

out = {}
t = dict(x_ptr="*bf16", e_ptr="*bf16", s_ptr="*fp32", scale_ptr="*fp32", zp_ptr="*fp32",
         y_ptr="*bf16", N="i32", C="i32", inner="i32", qmin="fp32", qmax="fp32")
out["fq_fwd"] = ptx(F._fake_quantize_fwd_kernel, t, dict(PER_CHANNEL=True, OUTER=True, HAS_E=True,
                    BEFORE=False, IDX64=False, BLOCK=U.BLOCK), aligned=("x_ptr", "e_ptr", "y_ptr"))
t.update(g_ptr="*bf16", dx_ptr="*bf16", part_ptr="*fp32", K="i32", n_iter="i32", grad_factor="fp32")
out["fq_bwd"] = ptx(F._fake_quantize_bwd_kernel, t, dict(OUTER=True, HAS_E=True, BEFORE=True,
                    IDX64=False, BLOCK_C=64, BLOCK_K=U.BLOCK // 64))
t = dict(x_ptr="*fp16", e_ptr="*fp16", s_ptr="*fp32", clip_ptr="*fp32", stats_ptr="*fp32",
         y_ptr="*fp16", g_ptr="*fp16", dx_ptr="*fp16", part_ptr="*fp32", N="i32", P="i32",
         n_levels="fp32", inv_n="fp32")
c = dict(SIGNED=True, STANDARDIZE=True, HAS_E=True, BEFORE=False, IDX64=False, BLOCK=U.BLOCK)
out["liq_fwd"] = ptx(L._liq_quantize_fwd_kernel, t, c, aligned=("x_ptr", "e_ptr", "y_ptr"))
out["liq_bwd"] = ptx(L._liq_quantize_bwd_kernel, t, dict(RELU=False, **c))
out["liq_bwd_relu"] = ptx(L._liq_quantize_bwd_kernel, t, dict(c, SIGNED=False, STANDARDIZE=False,
                          HAS_E=False, RELU=True))
out["liq_stats"] = ptx(L._liq_quantize_stats_kernel, t, dict(HAS_E=True, BEFORE=True, IDX64=True, BLOCK=U.BLOCK))
out["liq_fin"] = ptx(L._liq_quantize_stats_finalize_kernel, t, dict(STAT_BLOCK=U.BLOCK, BLOCK_P=1024))
tab = dict(tab_ptr="*i64", T="i32", B="i32", n_arg="i32", flag_arg="i32", part_ptr="*fp32",
           part_base="i32", eta="fp32", scale_ptr="*fp32", lr_ptr="*fp32", found_ptr="*fp32",
           momentum="fp32", one_minus_dampening="fp32", weight_decay="fp32", b1_hi="fp32",
           b1_lo="fp32", b2_hi="fp32", b2_lo="fp32", one_minus_b1="fp32", one_minus_b2="fp32",
           beta2="fp32", eps="fp32", norm_ptr="*fp32", P="i32")
for n in ("g_arg", "p_arg", "b_arg", "m_arg", "v_arg", "st_arg"):
    tab[n] = "*i64"
mt = dict(TABLE=True, ALIGNED=True, BLOCK=U.BLOCK)
out["norm"] = ptx(S._grad_sq_norm_fwd_kernel, tab, dict(G_DT=tl.bfloat16, P_DT=tl.float32, **mt))
out["perturb"] = ptx(S._sam_perturb_fwd_kernel, tab, dict(DT=tl.bfloat16, **mt))
out["restore"] = ptx(S._sam_restore_fwd_kernel, tab, dict(DT=tl.float32, **mt))
out["sgd"] = ptx(S._sam_restore_sgd_fwd_kernel, tab, dict(DT=tl.float16, HAS_WD=True,
                 HAS_MOMENTUM=True, NESTEROV=True, FIRST_STEP=False, HAS_FOUND=True, **mt))
out["adamw"] = ptx(S._sam_restore_adamw_fwd_kernel, tab, dict(DT=tl.float32, HAS_FOUND=True, **mt))
out["steps"] = ptx(S._sam_restore_adamw_steps_kernel, tab, dict(HAS_FOUND=True, TABLE=True, BLOCK_T=128))
out["norm_fin"] = ptx(S._grad_sq_norm_finalize_kernel, tab, dict(BLOCK_P=1024))
# the per-tensor path (CUDA-graph capture): aligned tensor arguments, as Triton specializes them,
# and no value specialization of the sizes (n_arg carries no divisibility)
pt = dict(tab, tab_ptr="*bf16", p_arg="*bf16", g_arg="*bf16", b_arg="*bf16", m_arg="*bf16")
ptc = dict(mt, TABLE=False, ALIGNED=False)
args_al = ("tab_ptr", "p_arg", "g_arg", "b_arg")
out["perturb_pt"] = ptx(S._sam_perturb_fwd_kernel, pt, dict(ptc, DT=tl.bfloat16), aligned=args_al)
out["sgd_pt"] = ptx(S._sam_restore_sgd_fwd_kernel, pt, dict(ptc, DT=tl.bfloat16, HAS_WD=True,
                    HAS_MOMENTUM=True, NESTEROV=False, FIRST_STEP=False, HAS_FOUND=True),
                    aligned=args_al + ("m_arg",))
for i, (name, code) in enumerate(out.items()):
    print(name, code.count("fma.rn"), code.count("ld.global.v4") + code.count("ld.global.nc.v4")
          + code.count("ld.global.v2") + code.count("ld.global.nc.v2"), local[i])
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_fma():
    """Every kernel family compiles to sm_90 PTX and SASS here (no GPU needed): no fused
    multiply-add (``enable_fp_fusion=False``, which bitwise equality relies on: with fusion
    ``y + s*e`` becomes an FMA), vector loads on the full-block paths, and no local memory
    (spills) in the SASS that triton's own cuobjdump shows."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton has no ahead-of-time compile API: {exc}")
    import saq_kernels

    root = os.path.dirname(os.path.dirname(os.path.abspath(saq_kernels.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in out.stdout.split("\n") if line}
    assert len(rows) == 16, out.stdout
    assert all(fma == 0 for fma, _, _ in rows.values()), rows
    # no register spills: local memory on these streaming kernels would cost bandwidth (-1: this
    # triton gave no cubin or ships no cuobjdump, so SASS was not read)
    assert all(n_local <= 0 for _, _, n_local in rows.values()), f"local memory in SASS: {rows}"
    for name in ("fq_fwd", "liq_fwd", "perturb", "perturb_pt", "sgd_pt"):
        assert rows[name][1] > 0, f"{name}: no vector loads on the full-block path: {rows}"


# ----------------------------------------------------------------------------------------------
# GPU only: CUDA graphs and torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")
def test_cuda_graph_capture_forward_backward():
    # no host sync anywhere (scales, clips, statistics and SAM scalars stay on the device):
    # forward + backward + the SAM ops capture, and a replay equals eager bitwise
    torch.manual_seed(0)
    w = torch.randn(64, 33, device="cuda", requires_grad=True)
    x = torch.randn(16, 33, device="cuda", requires_grad=True)
    clip = torch.tensor([1.5], device="cuda", requires_grad=True)
    scale = torch.tensor([0.05], device="cuda", requires_grad=True)
    zp = torch.tensor([3.0], device="cuda", requires_grad=True)
    e = torch.randn_like(w)
    s = torch.tensor(0.01, device="cuda")
    g = torch.randn(16, 64, device="cuda")
    leaves = (w, x, clip, scale, zp)
    params = [torch.randn(257, device="cuda"), torch.randn(3, 5, device="cuda")]
    backups = [torch.empty_like(p) for p in params]

    def step():
        wq = sk.liq_quantize(w, clip, 4, True, True, e, s, False)
        xq = sk.fake_quantize(x, scale, zp, 0, 15, None, 0.1)
        grads = torch.autograd.grad(xq @ wq.t(), leaves, g)
        norm, found = sk.grad_sq_norm(list(grads[:2]), [w, x], [True, False])
        sk.sam_perturb_(params, [p * 0.5 for p in params], backups, norm.rsqrt())
        sk.sam_restore_(params, backups)
        return (*grads, norm, found)

    with sk.use_backend("triton"):
        eager = step()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
    for a, b in zip(out, eager):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")
def test_torch_compile_fullgraph_quantized_linear():
    torch.manual_seed(0)
    w = torch.randn(32, 48, device="cuda", requires_grad=True)
    x = torch.randn(8, 48, device="cuda", requires_grad=True)
    clip = torch.tensor([1.2], device="cuda", requires_grad=True)
    scale = torch.full((48,), 0.05, device="cuda", requires_grad=True)
    zp = torch.zeros(48, device="cuda", requires_grad=True)
    leaves = (x, w, clip, scale, zp)

    def f(x, w, clip, scale, zp):
        wq = sk.liq_quantize(w, clip, 4, True, True)
        xq = sk.fake_quantize(x, scale, zp, -8, 7, 1, 0.1)
        return torch.nn.functional.linear(xq, wq).square().sum()

    with sk.use_backend("triton"):
        loss = torch.compile(f, fullgraph=True)(*leaves)
        grads = torch.autograd.grad(loss, leaves)
        eloss = f(*leaves)
        egrads = torch.autograd.grad(eloss, leaves)
    torch.testing.assert_close(loss, eloss, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, egrads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
