"""torch.compile(fullgraph=True) traces through the saq ops (every op has a fake) and matches eager."""
import pytest
import torch

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
