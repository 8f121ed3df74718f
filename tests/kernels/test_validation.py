"""Bad input gets a clear error naming the op, the argument and the fix; nothing is modified."""
import pytest
import torch

import saq_kernels as sk


def x4():
    return torch.randn(4, 3)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 31, 33])
def test_liq_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"saq::liq_quantize: bits=.* use 2\.\.8"):
        sk.liq_quantize(x4(), torch.tensor([1.0]), bits, True)


def test_liq_bits_32_passes_through_and_bool_bits_rejected():
    x = x4()
    assert sk.liq_quantize(x, torch.tensor([1.0]), 32, True) is x
    with pytest.raises(TypeError, match="'bits'"):
        sk.liq_quantize(x, torch.tensor([1.0]), True, True)
    # perturbed at 32 bits: x + s*e formed in fp32 and rounded once (OPS.md's order), s gets no
    # gradient, e gets s * grad
    g = torch.Generator().manual_seed(3)
    xh = (torch.randn(4096, generator=g) * 3).half().requires_grad_()
    e = torch.randn(4096, generator=g).half().requires_grad_()
    s = torch.tensor(0.37, requires_grad=True)
    y = sk.liq_quantize(xh, torch.tensor([1.0]), 32, True, False, e, s)
    assert torch.equal(y, (xh.float() + 0.37 * e.float()).half())
    y.sum().backward()
    assert s.grad is None and torch.equal(e.grad, torch.full_like(e, 0.37))
    assert torch.equal(xh.grad, torch.ones_like(xh))


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_non_positive_or_non_finite_scale(bad):
    with pytest.raises(RuntimeError, match=r"saq::fake_quantize: 'scale' must be finite and scale > 0"):
        sk.fake_quantize(x4(), torch.tensor([bad]), torch.zeros(1), -8, 7)


@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_zero_or_nan_clip(bad):
    with pytest.raises(RuntimeError, match=r"saq::liq_quantize: 'clip' must be finite and \|clip\| > 0"):
        sk.liq_quantize(x4(), torch.tensor([bad]), 4, False)


def test_negative_clip_is_allowed_because_liq_uses_abs():
    x = x4()
    assert torch.equal(sk.liq_quantize(x, torch.tensor([-1.0]), 4, True), sk.liq_quantize(x, torch.tensor([1.0]), 4, True))


def test_integer_tensor():
    with pytest.raises(TypeError, match=r"saq::fake_quantize: 'x' has dtype torch.int64.*x.float\(\)"):
        sk.fake_quantize(torch.arange(6), torch.tensor([0.1]), torch.zeros(1), -8, 7)
    with pytest.raises(TypeError, match="saq::liq_quantize: 'x'"):
        sk.liq_quantize(torch.arange(6, dtype=torch.int32), torch.tensor([1.0]), 4, True)


def test_quant_min_greater_than_max():
    with pytest.raises(ValueError, match="quant_min=7 > quant_max=-8"):
        sk.fake_quantize(x4(), torch.tensor([0.1]), torch.zeros(1), 7, -8)


def test_per_channel_scale_wrong_length():
    with pytest.raises(ValueError, match=r"per-channel 'scale' must have shape \[3\] \(x.shape\[1\]\), got \[4\]"):
        sk.fake_quantize(x4(), torch.full((4,), 0.1), torch.zeros(4), -8, 7, axis=1)
    with pytest.raises(ValueError, match="per-tensor 'scale' must have shape"):
        sk.fake_quantize(x4(), torch.full((3,), 0.1), torch.zeros(3), -8, 7)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        sk.fake_quantize(x4(), torch.full((3,), 0.1), torch.zeros(3), -8, 7, axis=2)


def test_mismatched_devices():
    with pytest.raises(ValueError, match=r"'scale' is on meta but the data is on cpu"):
        sk.fake_quantize(x4(), torch.tensor([0.1], device="meta"), torch.zeros(1), -8, 7)
    ps = [torch.zeros(3)]
    with pytest.raises(ValueError, match="'scale' is on meta"):
        sk.sam_perturb_(ps, [torch.ones(3)], [torch.empty(3)], torch.tensor(1.0, device="meta"))
    # found_inf on another device than the parameters: refused by name before anything changes
    # (for CUDA parameters a CPU flag would be a blocking copy per step)
    g, b, lr, bad = [torch.ones(3)], [torch.full((3,), 2.0)], torch.tensor(0.1), torch.zeros((), device="meta")
    with pytest.raises(ValueError, match="'found_inf' is on meta but the data is on cpu"):
        sk.sam_restore_sgd_(ps, b, g, [torch.zeros(3)], lr, found_inf=bad)
    with pytest.raises(ValueError, match="'found_inf' is on meta but the data is on cpu"):
        sk.sam_restore_adamw_(ps, b, g, [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(())], lr,
                              found_inf=bad)
    assert torch.equal(ps[0], torch.zeros(3))


def test_perturbation_arguments():
    x = x4()
    with pytest.raises(ValueError, match="both 'perturbation' and 'perturb_scale'"):
        sk.liq_quantize(x, torch.tensor([1.0]), 4, True, False, torch.zeros_like(x), None)
    with pytest.raises(ValueError, match="'perturbation' has shape"):
        sk.liq_quantize(x, torch.tensor([1.0]), 4, True, False, torch.zeros(2), torch.tensor(1.0))


def test_sam_list_mismatch_leaves_params_untouched():
    ps = [torch.zeros(3), torch.zeros(2)]
    with pytest.raises(ValueError, match="'grads' has 1 tensors but 'params' has 2"):
        sk.sam_perturb_(ps, [torch.ones(3)], [torch.empty(3), torch.empty(2)], torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"'grads\[1\]' has shape \[3\]"):
        sk.sam_perturb_(ps, [torch.ones(3), torch.ones(3)], [torch.empty(3), torch.empty(2)], torch.tensor(1.0))
    assert all(torch.equal(p, torch.zeros_like(p)) for p in ps)
    with pytest.raises(TypeError, match="without .grad"):
        sk.sam_perturb_(ps, [torch.ones(3), None], [torch.empty(3), torch.empty(2)], torch.tensor(1.0))


def test_unknown_and_unavailable_backend():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with sk.use_backend("nope"):
            pass
    reasons = sk.available_backends()
    assert reasons["reference"] is None
    for name, reason in reasons.items():
        if reason is not None:
            with pytest.raises(RuntimeError, match="backend unavailable"):
                with sk.use_backend(name):
                    pass


def test_table_probes_first_and_names_the_reason():
    """get_backend(name).table() as the first call of a process loads what it needs (the
    extension, for cpp); an unavailable backend raises with its reason."""
    import subprocess
    import sys

    code = ("import saq_kernels as sk; t = sk.get_backend('cpp').table(); "
            "print(sorted(t) == sorted(sk.backends.OP_NAMES))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if sk.available_backends()["cpp"] is None:
        assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]
    for name, reason in sk.available_backends().items():
        if reason is not None:
            sk.get_backend(name).reset()
            with pytest.raises(RuntimeError, match=f"backend '{name}' is unavailable here: "):
                sk.get_backend(name).table()


def test_env_backend_that_cannot_serve_input_raises(monkeypatch):
    reasons = sk.available_backends()
    name = next((n for n in ("triton", "cuda") if reasons[n] is not None), None)
    if name is None:
        pytest.skip("every backend is available here")
    monkeypatch.setenv("SAQ_BACKEND", name)
    with pytest.raises(RuntimeError, match=f"backend '{name}' was requested"):
        sk.liq_quantize(x4(), torch.tensor([1.0]), 4, True)


@pytest.mark.parametrize("version, refuses, broken", [
    ("3.6.0", True, True), ("3.7.0", True, False), ("3.6.0", False, False), ("3.10.1", True, False),
])
def test_triton_interpreter_numpy_incompatibility_is_reported(monkeypatch, version, refuses, broken):
    # triton < 3.7's interpreter does int(1-element array), which numpy >= 2.4 refuses: the
    # backend must say so (and how to fix it) instead of failing inside every kernel
    triton = pytest.importorskip("triton")
    np = pytest.importorskip("numpy")
    from saq_kernels.backends import triton_backend as tb

    class _Refusing:
        def __int__(self):
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(tb, "_interpreter_checked", False)
    monkeypatch.setattr(tb, "_interpreter_problem", None)
    monkeypatch.setattr(triton, "__version__", version)
    if refuses:
        monkeypatch.setattr(np, "ones", lambda *a, **k: _Refusing())
    else:
        monkeypatch.setattr(np, "ones", lambda *a, **k: 1)
    reason = tb._check_interpreter()
    if broken:
        assert "triton>=3.7" in reason and "numpy<2.4" in reason and version in reason
    else:
        assert reason is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tb, "_interpreted", True)
    assert tb._supports("fake_quantize", "cpu", torch.float32) == reason
    assert tb._supports("fake_quantize", "cuda", torch.float32) is None  # GPUs are not affected


def test_requested_backend_that_cannot_serve_names_the_ones_that_can():
    if sk.available_backends()["triton"] is not None:
        pytest.skip("triton backend unavailable here")
    x = torch.randn(4, 3, dtype=torch.float64)  # the Triton kernels take fp32 / fp16 / bf16
    with sk.use_backend("triton"):
        with pytest.raises(RuntimeError, match="float64") as info:
            sk.liq_quantize(x, torch.tensor([1.0], dtype=torch.float64), 4, True)
    tail = str(info.value).split("one that can:")[1]
    assert "'reference'" in tail and "'triton'" not in tail


def test_sam_lists_mixing_devices_are_refused():
    # a list that mixes meta tensors with CPU ones dispatches to the ops' fakes (their Meta
    # kernels), not to a kernel that checks: the fakes refuse it by name instead of returning
    # made-up values (the cpp grad_sq_norm returned uninitialized memory)
    ps = [torch.ones(4), torch.ones(3, device="meta")]
    gs = [torch.ones(4), torch.ones(3, device="meta")]
    bs = [torch.empty(4), torch.empty(3, device="meta")]
    lr = torch.tensor(0.1)
    calls = {
        "grad_sq_norm": lambda: sk.grad_sq_norm(gs, ps),
        "sam_perturb_": lambda: sk.sam_perturb_(ps, gs, bs, torch.tensor(1.0)),
        "sam_restore_": lambda: sk.sam_restore_(ps, bs),
        "sam_restore_sgd_": lambda: sk.sam_restore_sgd_(ps, bs, gs, [torch.zeros(4), torch.zeros(3, device="meta")], lr, momentum=0.9),
        "sam_restore_adamw_": lambda: sk.sam_restore_adamw_(
            ps, bs, gs, [torch.zeros(4), torch.zeros(3, device="meta")],
            [torch.zeros(4), torch.zeros(3, device="meta")], [torch.zeros(()), torch.zeros(())], lr),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError, match=rf"saq::{op}: '\w+\[1\]' is on meta but '\w+\[0\]' is on cpu"):
            call()
    assert torch.equal(ps[0], torch.ones(4))
    # a backend serving CPU tensors directly (Triton under the interpreter) says the same
    if sk.available_backends().get("triton") is None:
        with sk.use_backend("triton"):
            for op, call in calls.items():
                with pytest.raises(ValueError, match=rf"saq::{op}: '\w+\[1\]' is on meta but '\w+\[0\]' is on cpu"):
                    call()
        assert torch.equal(ps[0], torch.ones(4))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_sam_perturb_adaptive_length_is_checked_before_writing(backend):
    if sk.available_backends().get(backend) is not None:
        pytest.skip(f"{backend}: {sk.available_backends()[backend]}")
    ps, bs = [torch.ones(3), torch.ones(3)], [torch.zeros(3), torch.zeros(3)]
    with sk.use_backend(backend), pytest.raises(ValueError, match=r"saq::sam_perturb_: 'adaptive' has 1 flags for 2 params"):
        sk.sam_perturb_(ps, [torch.ones(3), torch.ones(3)], bs, torch.tensor(0.5), [True])
    assert all(torch.equal(p, torch.ones(3)) for p in ps)


def test_quant_range_values_are_refused_by_name():
    import numpy as np

    x = x4()
    s, z = torch.tensor([0.1]), torch.zeros(1)
    for bad in (float("nan"), float("inf"), 2.5, "3", None, True):
        with pytest.raises(TypeError, match=r"saq::fake_quantize: quant_min must be an integer"):
            sk.fake_quantize(x, s, z, bad, 7)
    with pytest.raises(ValueError, match="needs more than 16 bits"):
        sk.fake_quantize(x, s, z, 0, 65536)      # 65537 levels
    with pytest.raises(ValueError, match="needs more than 16 bits"):
        sk.fake_quantize(x, s, z, 2**63 - 1, 2**63 - 1)
    # the widest accepted ranges, numpy integers, and integral floats
    sk.fake_quantize(x, s, z, 0, 65535)
    sk.fake_quantize(x, s, z, -32768, 32767)
    sk.fake_quantize(x, s, z, np.int64(-8), np.int32(7))
    sk.fake_quantize(x, s, z, -8.0, 7.0)


def test_sam_perturb_scale_shape():
    # a [1] scale is taken as the 0-dim one it holds (the reference used to fail half-way on a
    # 0-dim parameter, after perturbing the earlier ones); a longer one is refused up front
    for backend in ("reference", "cpp"):
        ps = [torch.ones(3), torch.tensor(2.0)]
        bs = [torch.empty(3), torch.empty(())]
        with sk.use_backend(backend):
            sk.sam_perturb_(ps, [torch.ones(3), torch.tensor(1.0)], bs, torch.tensor([0.5]))
        assert torch.equal(ps[0], torch.full((3,), 1.5)) and float(ps[1]) == 2.5
        with pytest.raises(ValueError, match=r"'scale' has shape \[2\]; pass one 0-dim tensor"):
            sk.sam_perturb_(ps, [torch.ones(3), torch.tensor(1.0)], bs, torch.tensor([0.5, 1.0]))
        assert torch.equal(ps[0], torch.full((3,), 1.5))


def test_cuda_float64_fallback_wrapper_runs_the_reference_only_for_that_refusal():
    # the CUDA backend's SAM list ops (csrc/cuda_register.cpp) refuse float64 tensors found past
    # index 0 while checking, before writing; the backend table then runs the reference
    from saq_kernels.backends.native_backend import _fp64_to_reference

    def refuse(msg):
        def native(*args):
            raise RuntimeError(msg)
        return native

    ps, bs = [torch.zeros(3), torch.zeros(2, dtype=torch.float64)], [torch.ones(3), torch.ones(2, dtype=torch.float64)]
    _fp64_to_reference("sam_restore_", refuse(
        "saq_C::sam_restore_: 'params[1]' has dtype Double; the CUDA kernels take float32, float16 "
        "or bfloat16 tensors: convert it"))(ps, bs)
    assert all(torch.equal(p, b) for p, b in zip(ps, bs))
    with pytest.raises(RuntimeError, match="'lr' is on cpu"):
        _fp64_to_reference("sam_restore_", refuse("saq_C::sam_restore_: 'lr' is on cpu"))(ps, bs)


def test_sam_perturb_accepts_the_design_documents_argument_order():
    ps, gs = [torch.ones(3), torch.ones(2)], [torch.full((3,), 2.0), torch.full((2,), 2.0)]
    a, b = [p.clone() for p in ps], [p.clone() for p in ps]
    ba, bb = [torch.empty(3), torch.empty(2)], [torch.empty(3), torch.empty(2)]
    sk.sam_perturb_(a, gs, ba, torch.tensor(0.5))
    sk.sam_perturb_(b, gs, torch.tensor(0.5), bb)  # (params, grads, scale, backups)
    assert all(torch.equal(x, y) for x, y in zip(a + ba, b + bb))
    assert torch.equal(a[0], torch.full((3,), 2.0)) and torch.equal(ba[0], torch.ones(3))
