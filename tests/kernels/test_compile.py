"""torch.compile(fullgraph=True) traces through the saq ops (every op has a fake) and matches eager.

Inductor's on-disk caches are off here: their keys do not cover the ops' Python fakes, so a graph
compiled under an earlier version of a fake would be reused and hide a change to it."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _no_inductor_caches():
    with torch._inductor.config.patch(force_disable_caches=True):
        yield

from saq.nn import QLinear


@pytest.mark.parametrize("quantizer", ["liq", "lsq"])
def test_compiled_quantized_linear_matches_eager(quantizer):
    torch.manual_seed(0)
    lin = QLinear(16, 8, bits_weights=4, bits_activations=4, quantizer=quantizer)
    x = torch.randn(32, 16).abs()
    lin(x)  # first-batch initialization happens eagerly
    ref = [p.detach().clone() for p in lin.parameters()]

    def run(fn):
        for p, r in zip(lin.parameters(), ref):
            p.data.copy_(r)
            p.grad = None
        y = fn(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in lin.parameters()]

    y0, g0 = run(lin)
    y1, g1 = run(torch.compile(lin, fullgraph=True, backend="inductor"))
    torch.testing.assert_close(y1, y0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_functional_op_with_perturbation():
    import saq_kernels as sk

    def f(w, clip, e, s):
        return sk.liq_quantize(w, clip, 4, True, True, e, s, False)

    w, e = torch.randn(8, 3, 3, 3), torch.randn(8, 3, 3, 3)
    clip, s = torch.tensor([1.0]), torch.tensor(0.05)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(w, clip, e, s), f(w, clip, e, s))


def _quantizers(sk, dtype):
    """(name, fn(x, p), params): both quantizers, per tensor; params require grad."""
    scale = torch.tensor([0.1], dtype=dtype, requires_grad=True)
    zp = torch.tensor([0.0], dtype=dtype, requires_grad=True)
    clip = torch.tensor([1.5], dtype=dtype, requires_grad=True)
    return [
        ("fake_quantize", lambda x: sk.fake_quantize(x, scale, zp, -8, 7), (scale, zp)),
        ("liq_quantize", lambda x: sk.liq_quantize(x, clip, 4, True, True), (clip,)),
    ]


def _eager_and_compiled(fn, x, params):
    out = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="inductor")):
        xx = x.detach().clone().requires_grad_()
        for p in params:
            p.grad = None
        y = f(xx)
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        out.append((y.detach(), xx.grad, [p.grad.clone() for p in params]))
    return out


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_compiled_quantizers_on_non_contiguous_inputs(backend, layout):
    # every backend returns contiguous outputs and the fakes say so; a backend that kept the
    # input's layout (the reference did) fails inductor's stride assertion
    import saq_kernels as sk

    if sk.get_backend(backend).available() is not None:
        pytest.skip(f"{backend} unavailable")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.transpose(1, 3)
    with sk.use_backend(backend):
        for name, fn, params in _quantizers(sk, torch.float32):
            (y0, dx0, g0), (y1, dx1, g1) = _eager_and_compiled(fn, x, params)
            assert y0.is_contiguous() and torch.equal(y1, y0), name
            assert torch.equal(dx1, dx0), name
            for a, b in zip(g1, g0):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_fp64_parameter_gradients():
    # fp64 inputs go to the reference, whose scale / clip gradients are fp64: the backward fakes
    # must say fp64 too (they said fp32, and the compiled gradients came out as garbage)
    import saq_kernels as sk

    torch.manual_seed(0)
    x = torch.randn(4, 9, dtype=torch.float64)
    for name, fn, params in _quantizers(sk, torch.float64):
        (y0, dx0, g0), (y1, dx1, g1) = _eager_and_compiled(fn, x, params)
        torch.testing.assert_close(y1, y0)
        torch.testing.assert_close(dx1, dx0)
        for a, b in zip(g1, g0):
            assert a.dtype == b.dtype == torch.float64, name
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_adamw_compiles_again_for_new_betas(dtype):
    # the benchmarks' torch.compile(reference) baseline: a second beta2 recompiles with the float
    # dynamic, and the fp16/bf16 path's fp32 rounding of its scalars must trace then too
    from saq_kernels import reference as R

    compiled = torch.compile(R.sam_restore_adamw_, backend="eager", fullgraph=True)
    for beta2 in (0.999, 0.99, 0.95):
        g = torch.Generator().manual_seed(int(beta2 * 1000))
        p, gr = torch.randn(64, generator=g).to(dtype), torch.randn(64, generator=g).to(dtype)
        want, got = [p.clone()], [p.clone()]
        state = lambda: ([torch.zeros(64, dtype=dtype)], [torch.zeros(64, dtype=dtype)], [torch.tensor(0.0)])  # noqa: E731
        for fn, ps in ((R.sam_restore_adamw_, want), (compiled, got)):
            m, v, steps = state()
            fn(ps, [], [gr], m, v, steps, torch.tensor(1e-3), 0.9, beta2, 1e-8, 0.01, None)
        assert torch.equal(got[0], want[0]), beta2
