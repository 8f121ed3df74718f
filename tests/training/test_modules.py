"""saq.nn quantized layers and saq.quantize_model."""
import pytest
import torch
import torch.nn as nn

import saq
from saq.nn import QConv2d, QLinear


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5),
    )


def test_quantize_model_first_last_handling():
    m = saq.quantize_model(small_cnn(), weight_bits=3, act_bits=4)
    q = saq.quantized_layers(m)
    assert [n for n, _ in q] == ["0", "3", "8", "10"]
    bits = [(l.bits_weights, l.bits_activations) for _, l in q]
    assert bits == [(8, 32), (3, 4), (3, 4), (8, 8)]
    assert q[1][1].groups == 2
    m2 = saq.quantize_model(small_cnn(), 4, 4, first_last_bits=None, skip=["8"])
    assert isinstance(m2[8], nn.Linear) and not isinstance(m2[8], QLinear)
    assert [(l.bits_weights, l.bits_activations) for _, l in saq.quantized_layers(m2)] == [(4, 4)] * 3


def test_conversion_keeps_weights_and_float_equivalence_at_32_bits():
    f = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    f.eval()
    y = f(x)
    q = saq.quantize_model(small_cnn(), 32, 32, first_last_bits=None).eval()
    torch.testing.assert_close(q(x), y)


@pytest.mark.parametrize("quantizer", ["liq", "lsq", "lsq+", "pact", "dorefa"])
def test_every_quantizer_trains_one_step(quantizer):
    m = saq.quantize_model(small_cnn(), 4, 4, quantizer=quantizer)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in m.named_parameters()}
    # The first layer's input is float: its activation quantizer parameter exists (the reference
    # code's checkpoints have it) but gets no gradient.
    assert all(grads[n] is not None for n in grads if n.endswith(("weight", "bias")))
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    if quantizer in ("liq", "pact"):
        assert grads["3.activation_clip_value"].abs().sum() > 0


@pytest.mark.parametrize("quantizer", ["liq", "lsq", "lsq+", "pact", "dorefa"])
def test_eval_under_inference_mode(quantizer):
    # a trained-then-evaluated quantized model under torch.inference_mode() (the native C++
    # autograd path cannot serve it: it must fall back, with the values of no_grad)
    m = saq.quantize_model(small_cnn(), 4, 4, quantizer=quantizer)
    x = torch.randn(4, 3, 8, 8)
    m(x).sum().backward()  # first-batch initialization of the quantizer parameters
    m.eval()
    with torch.no_grad():
        want = m(x)
    with torch.inference_mode():
        got = m(x)
    assert torch.equal(got, want)


def test_per_channel_lsq_and_refusal_for_liq():
    m = saq.quantize_model(small_cnn(), 4, 4, quantizer="lsq", per_channel=True)
    assert m[3].weight_scale.shape == (8,)
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    assert m[3].weight_scale.grad.shape == (8,)
    with pytest.raises(ValueError, match="per_channel=True needs"):
        saq.quantize_model(small_cnn(), 4, 4, quantizer="liq", per_channel=True)


def test_liq_reference_names_and_init():
    lin = QLinear(6, 4, bits_weights=4, bits_activations=4)
    conv = QConv2d(3, 4, 3, bits_weights=4, bits_activations=4)
    assert {"weight", "bias", "weight_clip_value", "activation_clip_value"} <= set(dict(lin.named_parameters()))
    x = torch.randn(5, 6)
    lin(x)
    torch.testing.assert_close(lin.weight_clip_value, lin.weight.abs().max().reshape(1) * 0.8)
    torch.testing.assert_close(lin.activation_clip_value, x.abs().max().reshape(1) * 0.8)
    conv(torch.randn(1, 3, 5, 5))
    assert conv.weight_clip_value.item() == 1.0 and conv.activation_clip_value.item() == 1.0


def test_loading_a_state_dict_skips_first_batch_init():
    src = QLinear(6, 4, bits_weights=4, bits_activations=4)
    with torch.no_grad():
        src.weight_clip_value.fill_(0.123)
        src.activation_clip_value.fill_(0.456)
    dst = QLinear(6, 4, bits_weights=4, bits_activations=4)
    dst.load_state_dict(src.state_dict())
    dst(torch.randn(3, 6) * 10)
    assert dst.weight_clip_value.item() == pytest.approx(0.123)
    assert dst.activation_clip_value.item() == pytest.approx(0.456)


def test_float_checkpoint_loads_into_quantized_model_non_strict():
    f = small_cnn()
    q = saq.quantize_model(small_cnn(), 4, 4)
    missing, unexpected = q.load_state_dict(f.state_dict(), strict=False)
    assert not unexpected and all("clip_value" in k for k in missing)


@pytest.mark.parametrize("bad", [1, 9, 16, "4"])
def test_bad_bits_and_names(bad):
    with pytest.raises(ValueError, match="bits_weights"):
        QLinear(2, 2, bits_weights=bad)
    with pytest.raises(ValueError, match="unknown quantizer 'xyz'"):
        saq.quantize_model(small_cnn(), quantizer="xyz")
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        saq.quantize_model(nn.Sequential(nn.ReLU()))


def test_models_quantize_end_to_end():
    m = saq.quantize_model(saq.models.get_model("preact_resnet20", 10))
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    q = saq.quantized_layers(m)
    assert (q[0][1].bits_weights, q[0][1].bits_activations) == (8, 32)
    assert (q[-1][1].bits_weights, q[-1][1].bits_activations) == (8, 8)
    assert all((l.bits_weights, l.bits_activations) == (4, 4) for _, l in q[1:-1])
