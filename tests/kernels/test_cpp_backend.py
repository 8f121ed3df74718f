"""The "cpp" backend (C++ CPU kernels of saq_kernels._C, ops torch.ops.saq_C.*) against the reference.

Skipped, with the backend's own reason, where the extension is not built and cannot be JIT-built.

* quantized outputs: bitwise equal (``torch.equal``) for fp32 / fp16 / bf16 inputs, ties, odd
  sizes, every layout (per tensor, per channel on axis 0, 1, -1), non-contiguous inputs and all
  perturbation modes; standardized LIQ may differ where the statistics differ in the last bit:
  rarely, and by exactly one level;
* gradients: dx bitwise; scale / zero-point / clip gradients and norms within twice the
  reference's own error against a float64 oracle, never below one fp32 rounding of the
  magnitude summed (``_assert_within``); sums are bitwise reproducible for any thread count;
* sam_perturb_ / sam_restore_: bitwise, with poisoned backups; SGD / AdamW: the same derived
  tolerance against the reference run in float64.
"""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch

import saq_kernels as sk
from saq_kernels import reference as R

_BACKEND = sk.get_backend("cpp")
_REASON = _BACKEND.available()
if _REASON is not None:
    pytest.skip(f"cpp backend unavailable: {_REASON}", allow_module_level=True)

C = torch.ops.saq_C
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PERTURB = ["none", "after", "before"]
EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _rand(shape, dtype=torch.float32, seed=0, scale=3.0, noncontig=False):
    gen = torch.Generator().manual_seed(seed)
    if noncontig and len(shape) >= 2:  # same shape, transposed strides
        t = torch.randn(tuple(reversed(shape)), generator=gen) * scale
        t = t.permute(*reversed(range(len(shape))))
        assert not t.is_contiguous() or 1 in shape
        return t.to(dtype)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _qrange(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _fq_params(x, axis, seed=1, zp_scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    shape = [1] if axis is None else [x.shape[axis]]
    scale = torch.rand(shape, generator=gen) * 0.5 + 0.05
    zp = torch.randn(shape, generator=gen) * zp_scale
    return scale, zp


def _perturbation(kind, x, seed=3):
    if kind == "none":
        return None, None, False
    e = _rand(x.shape, x.dtype, seed=seed, scale=1.0)
    return e, torch.tensor(0.07), kind == "before"


def _assert_within(actual, ref, oracle, scale=None, what=""):
    """max|actual - oracle| <= 2 * max(max|ref - oracle|, eps32 * max(scale)).

    ``scale``: the magnitude one fp32 rounding is relative to (default |oracle|; for sums, the sum
    of the absolute terms), so an exact-by-luck reference does not demand exactness.
    """
    oracle = oracle.double()
    scale = oracle.abs() if scale is None else scale.double()
    err = float((actual.double() - oracle).abs().max()) if oracle.numel() else 0.0
    err_ref = float((ref.double() - oracle).abs().max()) if oracle.numel() else 0.0
    floor = EPS32 * float(scale.max()) if scale.numel() else 0.0
    tol = 2 * max(err_ref, floor)
    assert err <= tol, f"{what}: error {err:.3e} > tolerance {tol:.3e} (reference error {err_ref:.3e})"


def _bits_equal(a, b):
    """Bitwise equality (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ity = {4: torch.int32, 2: torch.int16, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ity), b.contiguous().view(ity))


# ----------------------------------------------------------------------------------------------
# registry and build
# ----------------------------------------------------------------------------------------------
def test_backend_registry_and_reasons():
    assert set(_BACKEND.table()) == {
        "fake_quantize", "fake_quantize_backward", "liq_quantize", "liq_quantize_backward",
        "grad_sq_norm", "sam_perturb_", "sam_restore_", "sam_restore_sgd_", "sam_restore_adamw_",
    }
    assert _BACKEND.supports("fake_quantize", "cpu", torch.float32) is None
    assert "float64" in _BACKEND.supports("fake_quantize", "cpu", torch.float64)
    assert "reference" in _BACKEND.supports("liq_quantize", "cpu", torch.float64)
    assert "cpu" in _BACKEND.supports("fake_quantize", "cuda", torch.float32)
    if not torch.cuda.is_available():
        assert isinstance(sk.get_backend("cuda").available(), str)
    # default CPU order: fp32 goes to the C++ kernel, fp64 to the reference
    from saq_kernels.backends import select

    assert select("fake_quantize", "cpu", torch.float32) is C.fake_quantize.default
    assert select("fake_quantize", "cpu", torch.float64) is R.fake_quantize


def test_build_info_and_load():
    from saq_kernels import _build

    mod = _build.load_extension()
    assert mod.with_cuda in (0, 1)
    info = _build.build_info()
    if info is not None:  # absent only for an extension built outside setup.py / the JIT
        assert info["torch"] == torch.__version__
        assert "-ffp-contract=off" in info["cxx_flags"]


_FORMAT_INT = r"""
#include <cstring>
#include <sstream>
#include <string>
extern "C" void format_int(long v, char* out, int n) {
  std::ostringstream s;
  s << "got " << v << " entries";
  std::strncpy(out, s.str().c_str(), n - 1);
  out[n - 1] = 0;
}
"""

_LOAD_AND_FORMAT = """
import ctypes, sys
import torch  # first, as for saq_kernels._C: its libstdc++ is the process's (it is what breaks the copy)
buf = ctypes.create_string_buffer(64)
ctypes.CDLL(sys.argv[1]).format_int(ctypes.c_long(42), buf, 64)
print(buf.value.decode())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a GNU-ld flag (Linux builds)")
def test_link_flags_keep_a_static_libstdcxx_working(tmp_path):
    # A toolchain that links libstdc++ statically (the GPU machine's did) plus Python's
    # -Bsymbolic-functions: without the extension's link flags, `stream << int` in a TORCH_CHECK
    # message printed nothing past the integer here and segfaulted there. A library built as
    # setup.py links saq_kernels._C (its link flags) must format the integer.
    import shutil
    import subprocess

    from saq_kernels import _build

    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        pytest.skip(f"the C++ compiler {cxx!r} was not found")
    src = tmp_path / "fmt.cpp"
    src.write_text(_FORMAT_INT)
    flags = [f for f in _build.link_flags() if f != "-fopenmp"]
    out = {}
    for name, extra in (("ours", flags), ("bare", [])):
        lib = tmp_path / f"lib_{name}.so"
        r = subprocess.run([cxx, "-O1", "-fPIC", "-shared", "-Wl,-Bsymbolic-functions", str(src),
                            "-static-libstdc++", *extra, "-o", str(lib)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"{cxx} cannot link libstdc++ statically here: {r.stderr[-300:]}")
        run = subprocess.run([sys.executable, "-c", _LOAD_AND_FORMAT, str(lib)], capture_output=True,
                             text=True, timeout=60)
        out[name] = run.stdout.strip() if run.returncode == 0 else f"exit {run.returncode}"
    assert out["ours"] == "got 42 entries", out  # out["bare"]: what the flags prevent


@pytest.mark.parametrize("archs, cap, runs", [
    (["8.0", "9.0+PTX"], (8, 0), True), (["8.0", "9.0+PTX"], (8, 6), True),
    (["8.0", "9.0+PTX"], (9, 0), True), (["8.0", "9.0+PTX"], (10, 0), True),
    (["8.0", "9.0+PTX"], (12, 0), True), (["8.0", "9.0+PTX"], (7, 5), False),
    (["8.0", "9.0"], (10, 0), False), (["9.0a"], (9, 0), True), (["9.0a"], (10, 0), False),
    (["8.6"], (8, 0), False), ([" 8.0 ", "Hopper"], (9, 0), None),
])
def test_arch_list_coverage(archs, cap, runs):
    from saq_kernels import _build
    from saq_kernels.backends.native_backend import _arch_reason

    assert _build.arch_runs_on(archs, cap) is runs
    reason = _arch_reason({"cuda_archs": archs}, cap)
    if runs is False:
        assert f"compute capability {cap[0]}.{cap[1]}" in reason and "TORCH_CUDA_ARCH_LIST" in reason
    else:
        assert reason is None
    assert _arch_reason({"cuda_archs": []}, cap) is None and _arch_reason(None, cap) is None


def test_version_mismatch_is_a_reason(monkeypatch):
    import importlib.util

    from saq_kernels import _build

    if importlib.util.find_spec("saq_kernels._C") is None:
        pytest.skip("saq_kernels._C is JIT-built here; the check reads a prebuilt one's build info")
    monkeypatch.delenv("SAQ_SANITIZE", raising=False)  # that mode skips the prebuilt extension
    monkeypatch.setattr(_build, "_STATE", {"module": None, "error": None, "info": None})
    monkeypatch.setattr(_build, "build_info", lambda: {"torch": "0.0.1"})
    with pytest.raises(_build.ExtensionUnavailable) as exc:
        _build.load_extension()
    assert str(exc.value) == (
        f"saq_kernels._C was built for torch 0.0.1, running {torch.__version__}: "
        "rebuild with pip install --no-build-isolation -e ."
    )
    with pytest.raises(_build.ExtensionUnavailable):  # cached: no retry in this process
        _build.load_extension()


def test_direct_import_registers_the_fakes():
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("saq_kernels._C") is None:
        pytest.skip("no prebuilt saq_kernels._C here (JIT-built)")
    code = (
        "import sys, torch, saq_kernels._C\n"
        "assert 'saq_kernels.backends.native_backend' in sys.modules\n"
        "k = torch._library.simple_registry.singleton.find('saq_C::fake_quantize').fake_impl.kernel\n"
        "assert k is not None\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# fake_quantize
# ----------------------------------------------------------------------------------------------
# (shape, axis): per tensor; per channel on axis 0 / 1 / -1 with long rows (>= 256) and short
# ones (the periodic layout), one row period wider than a tile, and sizes around the blocks.
_FQ_LAYOUTS = [
    ((1,), None), ((7,), None), ((16385,), None), ((5, 7, 33), None),
    ((13, 300), 0), ((3, 5, 7), 0), ((2, 9, 5, 11), 1), ((4, 3, 600), 1),
    ((37, 3, 23), -1), ((70, 1500), -1), ((9, 1), 0), ((300, 5), 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", _FQ_LAYOUTS, ids=lambda l: f"{l[0]}-{l[1]}")
@pytest.mark.parametrize("perturb", PERTURB)
def test_fake_quantize_forward_exact(dtype, layout, perturb):
    shape, axis = layout
    x = _rand(shape, dtype, noncontig=len(shape) > 1 and perturb == "after")
    scale, zp = _fq_params(x, axis)
    e, s, before = _perturbation(perturb, x)
    args = (scale, zp, -8, 7, axis, 1.0, e, s, before)
    y = C.fake_quantize(x, *args)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    assert torch.equal(y, R.fake_quantize(x, *args))


@pytest.mark.parametrize("perturb,axis", [("none", None), ("before", None), ("after", 0), ("none", 1)])
def test_fake_quantize_large(perturb, axis):
    shape = (1000003,) if axis is None else (129, 2051)
    x = _rand(shape)
    scale, zp = _fq_params(x, axis)
    e, s, before = _perturbation(perturb, x)
    args = (scale, zp, 0, 255, axis, 0.01, e, s, before)
    assert torch.equal(C.fake_quantize(x, *args), R.fake_quantize(x, *args))
    grad = _rand(shape, seed=5, scale=1.0)
    dx, ds, dz = C.fake_quantize_backward(grad, x, *args)
    rdx, rds, rdz = R.fake_quantize_backward(grad, x, *args)
    assert torch.equal(dx, rdx)
    _check_fq_sums(ds, dz, rds, rdz, (grad, x) + args, "large")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_fake_quantize_bits(bits, signed):
    qmin, qmax = _qrange(bits, signed)
    x = _rand((3, 331), seed=bits)
    for axis in (None, 0, -1):
        scale, zp = _fq_params(x, axis, seed=bits)
        args = (scale, zp * 2**bits, qmin, qmax, axis, 1.0, None, None, False)
        assert torch.equal(C.fake_quantize(x, *args), R.fake_quantize(x, *args))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_ties_and_extremes(dtype):
    # x * (1/scale) lands exactly on k + 0.5 (scale a power of two): round half to even
    k = torch.arange(-40, 40, dtype=torch.float32)
    x = torch.cat([(k + 0.5) * 0.25, -(k + 0.5) * 0.25, k * 0.25]).to(dtype)
    for zp in (0.0, 3.0, -2.5, 2.5, 1.5):  # zero points at ties too
        args = (torch.tensor([0.25]), torch.tensor([zp]), -16, 15, None, 1.0, None, None, False)
        assert torch.equal(C.fake_quantize(x, *args), R.fake_quantize(x, *args)), zp
    wide = torch.cat([torch.arange(-6001, 6001, 2, dtype=torch.float32) * 0.5,
                      torch.tensor([1e30, -1e30, 3e38, float("inf"), -float("inf"), float("nan"), -0.0])])
    args = (torch.tensor(1.0), torch.tensor(0.0), -32768, 32767, None, 1.0, None, None, False)
    torch.testing.assert_close(C.fake_quantize(wide, *args), R.fake_quantize(wide, *args),
                               rtol=0, atol=0, equal_nan=True)
    g = torch.ones_like(wide)
    a, b = C.fake_quantize_backward(g, wide, *args), R.fake_quantize_backward(g, wide, *args)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0, equal_nan=True)


def test_fake_quantize_layout_edge_cases():
    base = _rand((6, 10, 7))
    cases = [(base.transpose(0, 2), 1), (base[:, ::2, :], -1), (base.permute(2, 0, 1), None),
             (base.contiguous(memory_format=torch.contiguous_format)[None].contiguous(
                 memory_format=torch.channels_last), 1),
             (torch.tensor(1.37), None), (torch.empty(0, 3), 1), (torch.empty(0), None),
             # empty runs behind several channels (a zero-length period: divided by it once)
             (torch.empty(3, 0), 0), (torch.empty(2, 3, 0), 1), (torch.empty(3, 0), -2),
             (torch.empty(300, 0), 0)]
    for x, axis in cases:
        scale, zp = _fq_params(x, axis)
        args = (scale, zp, 0, 15, axis, 1.0, None, None, False)
        y = C.fake_quantize(x, *args)
        assert y.is_contiguous() and torch.equal(y, R.fake_quantize(x, *args))
        dx, ds, dz = C.fake_quantize_backward(torch.ones_like(x), x, *args)
        assert torch.equal(dx, R.fake_quantize_backward(torch.ones_like(x), x, *args)[0])
        assert ds.shape == scale.shape and dz.shape == zp.shape
        if x.numel() == 0:
            assert not ds.any() and not dz.any()
    # 0-dim scale / zero point (per tensor) give 0-dim gradients
    x = _rand((50,))
    dx, ds, dz = C.fake_quantize_backward(x, x, torch.tensor(0.1), torch.tensor(1.0), 0, 15, None,
                                          1.0, None, None, False)
    assert ds.shape == () and dz.shape == ()


def _fq_terms(grad, x, scale, zp, qmin, qmax, axis, gf, e, s, before):
    """Elementwise dscale / dzp terms, the reference's fp32 ops, unsummed."""
    xf = R._perturbed_input(x, e, s, before)
    g = grad.float()
    sv, zpv, inv, xq = R._fq_codes(xf, scale, zp, qmin, qmax, axis)
    below, above = xq < qmin, xq > qmax
    inside = ~(below | above)
    ds_in = g * ((torch.clamp(xq, qmin, qmax) - zpv) * sv - xf) * inv
    ds = torch.where(inside, ds_in, torch.where(below, g * (qmin - zpv), g * (qmax - zpv))) * gf
    dz = torch.where(inside, torch.zeros_like(g), -g * sv * gf)
    return ds, dz


def _check_fq_sums(ds, dz, rds, rdz, args, what):
    grad, x, scale, zp, qmin, qmax, axis = args[:7]
    tds, tdz = _fq_terms(*args)
    assert ds.dtype == torch.float32 and ds.shape == scale.shape and dz.shape == zp.shape
    for got, ref, terms, name in ((ds, rds, tds, "dscale"), (dz, rdz, tdz, "dzero_point")):
        oracle = R._sum_like(terms.double(), scale, x, axis)
        mag = R._sum_like(terms.double().abs(), scale, x, axis)
        _assert_within(got, ref, oracle, mag, f"{name} {what}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", _FQ_LAYOUTS[2:], ids=lambda l: f"{l[0]}-{l[1]}")
@pytest.mark.parametrize("perturb", PERTURB)
def test_fake_quantize_backward(dtype, layout, perturb):
    shape, axis = layout
    x = _rand(shape, dtype, noncontig=len(shape) > 1 and perturb == "before")
    scale, zp = _fq_params(x, axis)
    e, s, before = _perturbation(perturb, x)
    grad = _rand(shape, dtype, seed=7, scale=1.0)
    args = (grad, x, scale, zp, -8, 7, axis, 0.3, e, s, before)
    dx, ds, dz = C.fake_quantize_backward(*args)
    rdx, rds, rdz = R.fake_quantize_backward(*args)
    assert dx.dtype == dtype and dx.is_contiguous() and torch.equal(dx, rdx)
    _check_fq_sums(ds, dz, rds, rdz, args, f"{dtype} {layout} {perturb}")


@pytest.mark.parametrize("axis", [None, 1, -1])
def test_fake_quantize_sums_reproducible_across_threads(axis):
    x = _rand((40, 3, 2000) if axis is not None else (200003,))
    scale, zp = _fq_params(x, axis)
    grad = _rand(x.shape, seed=2, scale=1.0)
    args = (grad, x, scale, zp, -8, 7, axis, 1.0, None, None, False)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(C.fake_quantize_backward(*args))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert torch.equal(a, b)


def test_fake_quantize_through_the_public_op():
    x = _rand((7, 65))
    scale, zp = _fq_params(x, 0)

    def grads(name):
        xs, ss, zs = (t.clone().requires_grad_() for t in (x, scale, zp))
        with sk.use_backend(name):
            y = sk.fake_quantize(xs, ss, zs, -8, 7, 0, 0.5)
            y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        return y.detach(), xs.grad, ss.grad, zs.grad

    ours, ref = grads("cpp"), grads("reference")
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[3], ref[3], rtol=1e-5, atol=1e-6)


def test_fake_quantize_errors_name_the_op():
    x = _rand((4, 5))
    with pytest.raises(RuntimeError, match="saq_C::fake_quantize.*float64.*reference"):
        C.fake_quantize(x.double(), torch.tensor([0.1]), torch.tensor([0.0]), 0, 15, None, 1.0,
                        None, None, False)
    with pytest.raises(RuntimeError, match="saq_C::fake_quantize.*perturbation"):
        C.fake_quantize(x, torch.tensor([0.1]), torch.tensor([0.0]), 0, 15, None, 1.0,
                        torch.zeros(3), torch.tensor(0.1), False)
    with pytest.raises(RuntimeError, match="saq_C::fake_quantize.*'scale'"):
        C.fake_quantize(x, torch.rand(3), torch.zeros(3), 0, 15, 1, 1.0, None, None, False)
    with pytest.raises(RuntimeError, match="saq_C::fake_quantize.*dtype"):
        C.fake_quantize(x.int(), torch.tensor([0.1]), torch.tensor([0.0]), 0, 15, None, 1.0,
                        None, None, False)


# ----------------------------------------------------------------------------------------------
# liq_quantize
# ----------------------------------------------------------------------------------------------
def _liq_inputs(dtype, signed, shape=(37, 41), seed=0, noncontig=False):
    x = _rand(shape, dtype, seed=seed, scale=1.0, noncontig=noncontig)
    clip = torch.tensor([1.7 if signed else -2.1])  # negative: |clip| and sign(clip)
    return x, clip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("perturb", PERTURB)
def test_liq_forward_exact(dtype, signed, perturb):
    for shape in ((1,), (7,), (37, 41), (17000,)):
        x, clip = _liq_inputs(dtype, signed, shape, noncontig=len(shape) > 1)
        e, s, before = _perturbation(perturb, x)
        for bits in range(2, 9):
            args = (clip, bits, signed, False, e, s, before)
            y = C.liq_quantize(x, *args)
            assert y.dtype == x.dtype and y.is_contiguous()
            assert torch.equal(y, R.liq_quantize(x, *args)), (shape, bits)


def _level_mismatches(y, yr, clip, bits, signed):
    """Number of elements that differ; asserts each differs by exactly one quantization level."""
    diff = (y.double() - yr.double()).abs()
    bad = diff != 0
    if bad.any():
        c = float(clip.abs())
        step = (2 * c if signed else c) / (2**bits - 1)
        mag = torch.maximum(y.double().abs(), yr.double().abs())[bad]
        tol = 4 * torch.finfo(y.dtype).eps * (mag + step)
        assert torch.all((diff[bad] - step).abs() <= tol), "a standardized code is off by more than one level"
    return int(bad.sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("perturb", PERTURB)
def test_liq_standardize_forward(dtype, signed, perturb):
    # statistics in fp64 here vs torch's fp32 mean: identical codes, except (rarely) one level
    x, clip = _liq_inputs(dtype, signed, (64, 3, 3, 3), seed=4, noncontig=True)
    x = x + 0.3  # a non-zero mean
    e, s, before = _perturbation(perturb, x)
    total = mismatched = 0
    for bits in range(2, 9):
        args = (clip, bits, signed, True, e, s, before)
        y = C.liq_quantize(x, *args)
        mismatched += _level_mismatches(y, R.liq_quantize(x, *args), clip, bits, signed)
        total += y.numel()
    assert mismatched <= max(2, total // 1000)


@pytest.mark.parametrize("n", [2, 3, 17, 100003])
def test_liq_standardize_statistics(n):
    # a large offset: the two-pass (mean, then squared deviations) statistics stay accurate
    x = _rand((n,), seed=n, scale=0.01) + 1000.0
    clip = torch.tensor([2.0])
    y = C.liq_quantize(x, clip, 4, True, True, None, None, False)
    assert _level_mismatches(y, R.liq_quantize(x, clip, 4, True, True, None, None, False),
                             clip, 4, True) <= max(1, n // 1000)


def _liq_terms(grad, x, clip, bits, signed, standardize, e, s, before):
    """Elementwise dclip terms g * (y/c - r * inside), the reference's fp32 ops, unsummed."""
    xf = R._perturbed_input(x, e, s, before)
    if standardize:
        xf, _ = R._standardize(xf)
    c = clip.float().abs().reshape(())
    y, r = R._liq_forward_fp32(xf, c, bits, signed)
    inside = (r >= (-1.0 if signed else 0.0)) & (r <= 1.0)
    return grad.float() * (y / c - torch.where(inside, r, torch.zeros_like(r)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("perturb", PERTURB)
@pytest.mark.parametrize("standardize", [False, True])
def test_liq_backward(dtype, signed, perturb, standardize):
    x, clip = _liq_inputs(dtype, signed, (41, 37, 11), noncontig=True)
    e, s, before = _perturbation(perturb, x)
    grad = _rand(x.shape, dtype, seed=9, scale=1.0)
    for bits in (2, 4, 8):
        args = (grad, x, clip, bits, signed, standardize, e, s, before)
        dx, dclip = C.liq_quantize_backward(*args)
        rdx, rdclip = R.liq_quantize_backward(*args)
        assert dx.dtype == dtype and dclip.dtype == torch.float32 and dclip.shape == clip.shape
        terms = _liq_terms(*args)
        oracle = terms.double().sum() * torch.sign(clip.double())
        scale = terms.double().abs().sum()
        if not standardize:
            assert torch.equal(dx, rdx)
            _assert_within(dclip, rdclip, oracle, scale, f"dclip bits={bits}")
            continue
        # standardized: dx = g * inside / std, std possibly one ulp off; codes rarely one level off
        fwd = (clip, bits, signed, True, e, s, before)
        m = _level_mismatches(C.liq_quantize(x, *fwd), R.liq_quantize(x, *fwd), clip, bits, signed)
        close = torch.isclose(dx.double(), rdx.double(), rtol=2 * torch.finfo(dtype).eps, atol=0)
        assert int((~close).sum()) <= m
        step = (2.0 if signed else 1.0) / (2**bits - 1)
        slack = m * step * float(grad.float().abs().max())
        err = float((dclip.double() - oracle).abs())
        err_ref = float((rdclip.double() - oracle).abs())
        assert err <= 2 * max(err_ref, EPS32 * float(scale)) + slack


def test_liq_extremes_and_errors():
    x = torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), -float("inf"), float("nan"), 0.5])
    for signed in (True, False):
        args = (torch.tensor(1.0), 4, signed, False, None, None, False)
        torch.testing.assert_close(C.liq_quantize(x, *args), R.liq_quantize(x, *args), rtol=0,
                                   atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match="saq_C::liq_quantize.*bits"):
        C.liq_quantize(x, torch.tensor(1.0), 0, True, False, None, None, False)
    with pytest.raises(RuntimeError, match="saq_C::liq_quantize.*'clip'"):
        C.liq_quantize(x, torch.ones(2), 4, True, False, None, None, False)
    with pytest.raises(RuntimeError, match="saq_C::liq_quantize.*float64"):
        C.liq_quantize(x.double(), torch.tensor(1.0), 4, True, False, None, None, False)


# ----------------------------------------------------------------------------------------------
# SAM ops
# ----------------------------------------------------------------------------------------------
_SAM_SHAPES = [(7,), (33, 17), (1,), (20000,), (5, 3, 3)]
_SAM_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float32, torch.float32]


def _tensors(seed, scale=1.0, dtypes=_SAM_DTYPES, noncontig_last=False):
    out = []
    for i, (shape, dt) in enumerate(zip(_SAM_SHAPES, dtypes)):
        out.append(_rand(shape, dt, seed=seed * 31 + i, scale=scale,
                         noncontig=noncontig_last and i == len(_SAM_SHAPES) - 1))
    return out


def test_grad_sq_norm():
    grads, params = _tensors(1), _tensors(2, dtypes=_SAM_DTYPES)
    grads[-1] = grads[-1].transpose(0, 2)  # non-contiguous
    params[-1] = params[-1].transpose(0, 2)
    for adaptive in ([False] * 5, [True, False, True, True, False], [True] * 5):
        args = (grads, params, adaptive, 0.01)
        norm, found = C.grad_sq_norm(*args)
        rnorm, rfound = R.grad_sq_norm(*args)
        assert norm.shape == () and norm.dtype == torch.float32 and float(found) == 0.0
        terms = [(g.double() * (p.float().abs() + 0.01).double() if a else g.double()) ** 2
                 for g, p, a in zip(grads, params, adaptive)]
        oracle = sum(t.sum() for t in terms)
        _assert_within(norm, rnorm, oracle, oracle, f"norm adaptive={adaptive}")
    for bad in (float("inf"), float("nan")):
        g2 = [g.clone() for g in grads]
        g2[1].view(-1)[5] = bad
        assert float(C.grad_sq_norm(g2, params, [False] * 5, 0.01)[1]) == 1.0
    big = [torch.full((10,), 3e30)]  # finite terms whose fp32 sum overflows
    assert float(C.grad_sq_norm(big, big, [False], 0.0)[1]) == 1.0
    with pytest.raises(RuntimeError, match="saq_C::grad_sq_norm.*float64"):
        C.grad_sq_norm([grads[0].double()], [params[0]], [False], 0.01)


def test_grad_sq_norm_reproducible_across_threads():
    grads = [_rand((100003,), seed=1), _rand((3, 40000), seed=2)]
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(C.grad_sq_norm(grads, grads, [True, False], 0.01)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("noncontig", [False, True])
def test_sam_perturb_and_restore_bitwise(noncontig):
    params = _tensors(1, noncontig_last=noncontig)
    grads = _tensors(2, scale=0.5)
    adaptive = [True, False, True, True, False]
    scale = torch.tensor(0.0371)
    ours = [p.clone() for p in params]
    ref = [p.clone() for p in params]
    assert noncontig != ours[-1].is_contiguous()
    backups = [torch.full_like(p, float("nan")) for p in params]  # poisoned
    rbackups = [torch.empty_like(p) for p in params]
    C.sam_perturb_(ours, grads, backups, scale, adaptive)
    R.sam_perturb_(ref, grads, rbackups, scale, adaptive)
    for a, b, bk, p in zip(ours, ref, backups, params):
        assert _bits_equal(a, b) and _bits_equal(bk, p.contiguous())
    ours[0].view(-1)[0] = float("nan")  # restore is a byte copy, whatever the values
    C.sam_restore_(ours, backups)
    for a, p in zip(ours, params):
        assert _bits_equal(a, p.contiguous())


def _sgd_states(momentum, seed=0):
    params = _tensors(seed + 1)
    backups = _tensors(seed + 2)
    grads = _tensors(seed + 3, scale=0.1)
    bufs = _tensors(seed + 4, scale=0.1) if momentum else [g.clone() for g in grads]
    return params, backups, grads, bufs


def _clone(ts, dtype=None):
    return [t.clone() if dtype is None else t.to(dtype) for t in ts]


@pytest.mark.parametrize(
    "momentum,dampening,wd,nesterov,first",
    [(0.0, 0.0, 0.0, False, False), (0.9, 0.0, 1e-4, False, True), (0.9, 0.1, 5e-4, False, False),
     (0.9, 0.0, 5e-4, True, False), (0.5, 0.0, 0.0, True, True)],
)
@pytest.mark.parametrize("n_backups", [5, 3])  # 3: only the perturbed prefix is restored
def test_sam_restore_sgd(momentum, dampening, wd, nesterov, first, n_backups):
    params, backups, grads, bufs = _sgd_states(momentum)
    backups = backups[:n_backups]
    lr = torch.tensor(0.05)
    cfg = (lr, momentum, dampening, wd, nesterov, first)
    ours_p, ours_b = _clone(params), _clone(bufs)
    ref_p, ref_b = _clone(params), _clone(bufs)
    o64_p, o64_b = _clone(params, torch.float64), _clone(bufs, torch.float64)
    C.sam_restore_sgd_(ours_p, backups, grads, ours_b, *cfg, None)
    R.sam_restore_sgd_(ref_p, backups, grads, ref_b, *cfg, None)
    R.sam_restore_sgd_(o64_p, _clone(backups, torch.float64), _clone(grads, torch.float64), o64_b,
                       lr.double(), momentum, dampening, wd, nesterov, first, None)
    for i in range(len(params)):
        _assert_within(ours_p[i], ref_p[i], o64_p[i], what=f"param {i}")
        if momentum:
            _assert_within(ours_b[i], ref_b[i], o64_b[i], what=f"buffer {i}")
        else:
            assert torch.equal(ours_b[i], bufs[i])  # untouched
    # found_inf: restore only, buffers untouched; 0 steps normally
    for flag in (torch.tensor(1.0), torch.tensor(float("nan"))):
        p2, b2 = _clone(params), _clone(bufs)
        C.sam_restore_sgd_(p2, backups, grads, b2, *cfg, flag)
        assert all(_bits_equal(a, b) for a, b in zip(p2, backups + params[n_backups:]))
        assert all(_bits_equal(a, b) for a, b in zip(b2, bufs))
    p3, b3 = _clone(params), _clone(bufs)
    C.sam_restore_sgd_(p3, backups, grads, b3, *cfg, torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(p3, ours_p))


@pytest.mark.parametrize("step0,wd,n_backups", [(0.0, 1e-2, 5), (7.0, 0.0, 5), (3.0, 1e-2, 2)])
def test_sam_restore_adamw(step0, wd, n_backups):
    params, backups, grads = _tensors(1), _tensors(2)[:n_backups], _tensors(3, scale=0.1)
    m0 = _tensors(4, scale=0.01)
    v0 = [t.abs() for t in _tensors(5, scale=1e-3)]
    lr = torch.tensor(1e-3)
    hp = (0.9, 0.999, 1e-8, wd)

    def run(fn, dtype=None):
        p, m, v = _clone(params, dtype), _clone(m0, dtype), _clone(v0, dtype)
        steps = [torch.tensor(step0) for _ in params]
        fn(p, _clone(backups, dtype), _clone(grads, dtype), m, v, steps,
           lr if dtype is None else lr.to(dtype), *hp, None)
        return p, m, v, steps

    ours, ref, o64 = run(C.sam_restore_adamw_), run(R.sam_restore_adamw_), run(R.sam_restore_adamw_, torch.float64)
    for i in range(len(params)):
        for k, name in enumerate(("param", "exp_avg", "exp_avg_sq")):
            _assert_within(ours[k][i], ref[k][i], o64[k][i], what=f"{name} {i}")
        assert float(ours[3][i]) == step0 + 1 and ours[3][i].dtype == torch.float32
    # found_inf: restore only, no state change, steps not incremented
    p, m, v = _clone(params), _clone(m0), _clone(v0)
    steps = [torch.tensor(step0) for _ in params]
    C.sam_restore_adamw_(p, backups, grads, m, v, steps, lr, *hp, torch.tensor(1.0))
    assert all(_bits_equal(a, b) for a, b in zip(p, backups + params[n_backups:]))
    assert all(_bits_equal(a, b) for a, b in zip(m, m0)) and all(_bits_equal(a, b) for a, b in zip(v, v0))
    assert all(float(s) == step0 for s in steps)


def test_sam_ops_through_the_public_api():
    params, backups = _tensors(1), [torch.empty_like(t) for t in _tensors(1)]
    grads = _tensors(2)
    ref = _clone(params)
    with sk.use_backend("cpp"):
        sk.sam_perturb_(params, grads, backups, torch.tensor(0.01))
        sk.sam_restore_(params, backups)
    assert all(_bits_equal(a, b) for a, b in zip(params, ref))


# ----------------------------------------------------------------------------------------------
# opcheck: schemas, fakes, mutation annotations, dispatch
# ----------------------------------------------------------------------------------------------
def _opcheck_cases():
    x = _rand((4, 6))
    e = _rand((4, 6), seed=2)
    g = _rand((4, 6), seed=3)
    s, z = torch.tensor([0.1]), torch.tensor([1.0])
    sc, zc = torch.rand(6) + 0.05, torch.zeros(6)
    clip = torch.tensor([1.5])
    ps = [_rand((5,), seed=4), _rand((2, 3), seed=5).half()]
    gs = [_rand((5,), seed=6), _rand((2, 3), seed=7).half()]
    bk = [torch.empty_like(p) for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    steps = [torch.tensor(0.0) for _ in ps]
    lr = torch.tensor(0.01)
    return [
        (C.fake_quantize.default, (x, s, z, 0, 15, None, 1.0, e, torch.tensor(0.1), True)),
        (C.fake_quantize.default, (x, sc, zc, -8, 7, -1, 1.0, None, None, False)),
        (C.fake_quantize_backward.default, (g, x, sc, zc, -8, 7, 1, 0.5, None, None, False)),
        (C.fake_quantize.default, (x, s, z, 0, 15, None, 1.0, None, None, False, True)),
        (C.fake_quantize_backward.default, (g, x, sc, zc, 0, 7, -1, 0.5, None, None, False, True)),
        (C.liq_quantize.default, (x, clip, 4, True, True, e, torch.tensor(0.1), False)),
        (C.liq_quantize_backward.default, (g, x, clip, 4, False, False, None, None, False)),
        (C.grad_sq_norm.default, (gs, ps, [True, False], 0.01)),
        (C.sam_perturb_.default, (ps, gs, bk, torch.tensor(0.05), [False, True])),
        (C.sam_restore_.default, (ps, bk)),
        (C.sam_restore_sgd_.default, (ps, bk[:1], gs, ms, lr, 0.9, 0.0, 1e-4, True, False, None)),
        (C.sam_restore_adamw_.default, (ps, bk, gs, ms, vs, steps, lr, 0.9, 0.999, 1e-8, 0.01,
                                        torch.tensor(0.0))),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_registered_schemas_are_the_documented_ones():
    """OPS.md's "Native schemas" blocks are what the extension registers (one drifts otherwise)."""
    import re

    import saq_kernels

    doc = open(os.path.join(os.path.dirname(saq_kernels.__file__), "OPS.md")).read()
    section = doc.split("## Native schemas")[1]
    documented = {}
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        for line in block.strip().splitlines():
            documented[line.split("(")[0]] = line.strip()
    assert {"fake_quantize", "liq_quantize_backward", "fake_quantize_autograd"} <= set(documented)
    for name, schema in documented.items():
        registered = str(getattr(C, name).default._schema)
        assert registered == "saq_C::" + schema, (registered, schema)


def test_cuda_home_without_headers_falls_back_to_the_toolkit(tmp_path, monkeypatch):
    """torch derives CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin makes it
    /usr/local, which has no CUDA headers: the build must use the toolkit's own folder."""
    import torch.utils.cpp_extension as ce

    from saq_kernels import _build

    wrapper_home, toolkit, empty = tmp_path / "local", tmp_path / "cuda-13.0", tmp_path / "cuda-x"
    (wrapper_home / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "bin").mkdir()
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    (toolkit / "bin" / "nvcc").write_text("")
    empty.mkdir()
    monkeypatch.setattr(ce, "CUDA_HOME", str(wrapper_home))
    monkeypatch.setenv("CUDA_HOME", str(wrapper_home))
    assert _build.resolve_cuda_home([str(empty)]) is None
    assert ce.CUDA_HOME == str(wrapper_home)
    assert _build.resolve_cuda_home([str(empty), str(toolkit)]) == str(toolkit)
    assert ce.CUDA_HOME == str(toolkit) and os.environ["CUDA_HOME"] == str(toolkit)
    assert _build.resolve_cuda_home([]) == str(toolkit)  # a home with headers is kept


def test_nvcc_of_another_cuda_major_version_builds_the_cpu_kernels_only():
    """torch's build fails the whole extension on an nvcc of another CUDA major version; the
    build must notice first, build the C++ kernels and say why the CUDA ones are missing."""
    from saq_kernels import _build

    assert _build.cuda_version_mismatch("13.0", "13.0") is None
    assert _build.cuda_version_mismatch("12.8", "12.4") is None  # minor: torch only warns
    assert _build.cuda_version_mismatch(None, "13.0") is None  # unknown: torch decides
    assert _build.cuda_version_mismatch("12.8", None) is None
    why = _build.cuda_version_mismatch("12.8", "13.0")
    assert "nvcc 13.0" in why and "CUDA 12.8" in why and "CUDA 12.x toolkit" in why
    nvcc = _build._nvcc()
    if nvcc is not None:  # this machine's nvcc reports a release
        assert re.fullmatch(r"\d+\.\d+", _build._nvcc_release(nvcc) or "")
