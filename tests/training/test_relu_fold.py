"""quantize_model(fold_relu=True): quantized layers absorb the ReLU before them.

The folded model must compute the same numbers as the unfolded one, bit for bit: losses, every
gradient, and the parameters after QAT (SGD) and SAQ (Case 3) steps. BatchNorm channels with zero
weight and bias put exact zeros in front of the quantizers, where a naive fold (closed STE range)
would pass gradients that relu'(0) = 0 stops.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import saq
import saq_kernels as sk
from saq.models import get_model
from saq.nn import QLinear

CASES = {  # model, input shape, classes
    "preact_resnet20": ((8, 3, 32, 32), 10),
    "digits_cnn": ((16, 1, 8, 8), 10),
    "resnet18": ((2, 3, 64, 64), 10),
}


def _pair(name, quantizer="liq", **kw):
    torch.manual_seed(0)
    base = get_model(name, num_classes=CASES[name][1])
    for m in base.modules():  # exact zeros after these BN channels
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight[0] = 0.0
                m.bias[0] = 0.0
    plain = saq.quantize_model(copy.deepcopy(base), 4, 4, quantizer, fold_relu=False, **kw)
    folded = saq.quantize_model(copy.deepcopy(base), 4, 4, quantizer, **kw)
    return plain, folded


def _batch(name, seed=1):
    shape, classes = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randint(0, classes, (shape[0],), generator=gen)


def _folded_names(model):
    return [n for n, layer in saq.quantized_layers(model) if layer.input_relu]


def test_which_layers_fold():
    _, folded = _pair("preact_resnet20")
    names = _folded_names(folded)
    # every conv2, conv1 of the blocks whose ReLU output is not the shortcut, the two
    # downsample convs with their conv1; never layer1.0.conv1 (its ReLU output is the shortcut),
    # the first conv (float input) or fc (after the pool)
    assert len(names) == 19
    assert "layer1.0.conv1" not in names and "conv" not in names and "fc" not in names
    assert {"layer2.0.conv1", "layer2.0.downsample", "layer3.2.conv1"} <= set(names)
    assert _folded_names(_pair("digits_cnn")[1]) == ["conv2", "conv3"]
    assert len(_folded_names(_pair("resnet18")[1])) == 8
    assert "input_relu=True" in repr(folded.get_submodule("layer1.0.conv2"))


def test_fold_only_where_it_is_free():
    assert _folded_names(_pair("preact_resnet20")[0]) == []  # fold_relu=False
    torch.manual_seed(0)
    for quantizer in ("lsq", "lsq+", "pact"):
        m = saq.quantize_model(get_model("preact_resnet20", num_classes=10), 4, 4, quantizer)
        assert len(_folded_names(m)) == 19, quantizer
    m = saq.quantize_model(get_model("preact_resnet20", num_classes=10), 4, 4, "dorefa")
    assert _folded_names(m) == []  # its clamp passes the gradient at 0: a fold would change it
    m = saq.quantize_model(get_model("preact_resnet20", num_classes=10), 4, 32, "liq")
    assert _folded_names(m) == []  # float inputs: the ReLU is all there is
    m = saq.quantize_model(get_model("preact_resnet20", num_classes=10), 4, 4, "liq", signed_activations=True)
    assert _folded_names(m) == []
    m = saq.quantize_model(get_model("mobilenetv2_cifar", num_classes=10), 4, 4, "liq")  # no relu_fed_layers
    assert _folded_names(m) == []


QAT_CASES = [(name, "liq", backend) for name in CASES for backend in (None, "reference")] + [
    ("preact_resnet20", q, backend) for q in ("lsq", "lsq+", "pact") for backend in (None, "reference")
] + [("digits_cnn", "lsq", None), ("resnet18", "lsq", None)]


@pytest.mark.parametrize("name, quantizer, backend", QAT_CASES)
def test_qat_steps_bitwise_equal(name, quantizer, backend):
    plain, folded = _pair(name, quantizer)
    assert _folded_names(folded), "nothing folded: the test would compare a model with itself"
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, folded)]
    x, y = _batch(name)
    ctx = sk.use_backend(backend) if backend else torch.enable_grad()
    with ctx:
        for _ in range(2):
            losses = []
            for m, opt in zip((plain, folded), opts):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                losses.append(loss)
            assert torch.equal(losses[0], losses[1])
            for (n, p), (_, q) in zip(plain.named_parameters(), folded.named_parameters()):
                assert (p.grad is None) == (q.grad is None), n
                if p.grad is not None:
                    assert torch.equal(p.grad, q.grad), f"{name}: grad of {n} differs"
            for opt in opts:
                opt.step()


@pytest.mark.parametrize("quantizer", ["liq", "lsq"])
def test_saq_steps_bitwise_equal(quantizer):
    plain, folded = _pair("preact_resnet20", quantizer)
    x, y = _batch("preact_resnet20")
    opts = [saq.SAQ(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), rho=0.1, case=3)
            for m in (plain, folded)]
    for _ in range(3):
        for m, opt in zip((plain, folded), opts):
            def closure(m=m):
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                return loss
            opt.zero_grad(set_to_none=True)
            opt.step(closure)
    for (n, p), (_, q) in zip(plain.named_parameters(), folded.named_parameters()):
        assert torch.equal(p, q), f"parameter {n} differs after SAQ steps"


def test_first_batch_init_sees_the_relu_output():
    torch.manual_seed(0)
    layer = QLinear(6, 3, bits_weights=4, bits_activations=4, quantizer="liq")
    layer.input_relu = True
    x = torch.tensor([[-50.0, 1.0, 2.0, -3.0, 0.5, 4.0]])
    layer(x)
    # the reference init is 0.8 * max|input| of what the layer quantizes: relu(x), not x
    assert torch.allclose(layer.activation_clip_value, torch.tensor([0.8 * 4.0]))


@pytest.mark.parametrize("quantizer,signed,abits", [
    ("lsq", False, 4), ("lsq", True, 4), ("lsq+", False, 3), ("pact", False, 4), ("dorefa", False, 4),
    ("liq", True, 4), ("liq", False, 32), ("lsq", False, 32), ("liq", False, 4)])
def test_input_relu_is_layer_of_relu_for_every_quantizer(quantizer, signed, abits):
    """input_relu on any layer means layer(relu(x)): folded where foldable, applied otherwise."""
    from saq.nn import QConv2d

    torch.manual_seed(0)
    a = QConv2d(3, 4, 3, padding=1, bits_weights=4, bits_activations=abits, quantizer=quantizer,
                signed_activations=signed)
    b = copy.deepcopy(a)
    b.input_relu = True
    foldable = abits != 32 and (quantizer in ("lsq", "lsq+", "pact") or (quantizer == "liq" and not signed))
    assert b.relu_foldable == foldable
    x0 = torch.randn(2, 3, 6, 6)
    x0[0, 0] = 0.0
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    ya, yb = a(torch.relu(xa)), b(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    pa = [p for p in a.parameters() if p.requires_grad]
    pb = [p for p in b.parameters() if p.requires_grad]
    ga = torch.autograd.grad(ya, [xa] + pa, g, allow_unused=True)
    gb = torch.autograd.grad(yb, [xb] + pb, g, allow_unused=True)
    assert ga[0] is not None
    for u, v in zip(ga, gb):
        assert (u is None) == (v is None) and (u is None or torch.equal(u, v))
