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


def test_quantize_model_mlp_first_linear_keeps_a_float_input():
    torch.manual_seed(0)
    mlp = saq.quantize_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                           nn.Linear(8, 3)), 3, 4)
    bits = [(l.bits_weights, l.bits_activations) for _, l in saq.quantized_layers(mlp)]
    assert bits == [(8, 32), (3, 4), (8, 8)]
    x = torch.tensor([[-1.0, -2.0, 0.5, 1.0]])
    mlp(x)  # first-batch init
    f = nn.functional.linear(x, mlp[0].quantize_weight(), mlp[0].bias)
    torch.testing.assert_close(mlp[0](x), f)  # negative inputs reach the layer unclipped
    single = saq.quantize_model(nn.Sequential(nn.Linear(4, 2)), 4, 4)
    assert (single[0].bits_weights, single[0].bits_activations) == (8, 32)


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


@pytest.mark.parametrize("quantizer", ["lsq", "lsq+"])
def test_lsq_scales_act_by_magnitude(quantizer):
    # SAQ's ascent perturbs activation scales by an absolute step, which can push a small LSQ+
    # scale through 0 (a default `saq train --quantizer lsq+` stopped with "'scale' must be > 0"):
    # the layers quantize with |scale|, as LIQ with |clip|; a negative scale gives the same output
    # and the gradient of |scale|, sign-flipped
    torch.manual_seed(0)
    m = saq.quantize_model(small_cnn(), 4, 4, quantizer=quantizer)
    x = torch.randn(4, 3, 8, 8)
    m(x).sum().backward()  # first-batch initialization
    layer = m[3]
    want = m(x)
    gs = torch.autograd.grad(want.sum(), [layer.activation_scale, layer.weight_scale])
    with torch.no_grad():
        layer.activation_scale.neg_()
        layer.weight_scale.neg_()
    got = m(x)
    assert torch.equal(got, want)
    gn = torch.autograd.grad(got.sum(), [layer.activation_scale, layer.weight_scale])
    for a, b in zip(gn, gs):
        assert torch.equal(a, -b)
    # and the SAQ run that used to stop: 5 steps at rho 0.1, lsq+ 4-bit on digits_cnn
    torch.manual_seed(0)
    net = saq.quantize_model(saq.models.get_model("digits_cnn", 10), 4, 4, quantizer=quantizer)
    xs, ys = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    opt = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), rho=0.1)
    for _ in range(5):
        nn.functional.cross_entropy(net(xs), ys).backward()
        opt.ascent_step()
        nn.functional.cross_entropy(net(xs), ys).backward()
        opt.descent_step()
    assert opt.skipped_steps == 0


def test_quantize_model_keeps_sharing_and_fails_without_changes():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 16, 3)
            self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
            self.b.weight = self.a.weight  # tied weights
            self.alias = self.head         # one module under two names

        def forward(self, x):
            return self.alias(self.b(self.a(self.conv(x).mean((2, 3)))))

    m = Net()
    w, bias = m.a.weight, m.a.bias
    saq.quantize_model(m, 4, 4)
    assert isinstance(m.a, saq.nn.QLinear) and isinstance(m.b, saq.nn.QLinear)
    assert m.a.weight is w and m.b.weight is w and m.a.bias is bias  # the same Parameters
    assert m.alias is m.head and isinstance(m.head, saq.nn.QLinear)
    assert m(torch.randn(2, 1, 6, 6)).shape == (2, 4)
    # a refused argument leaves the model untouched: a corrected call converts it as usual
    f = small_cnn()
    with pytest.raises(ValueError, match="bits_weights=9"):
        saq.quantize_model(f, 9, 4)
    assert not saq.quantized_layers(f)
    saq.quantize_model(f, 4, 4)
    bits = [(layer.bits_weights, layer.bits_activations) for _, layer in saq.quantized_layers(f)]
    assert bits[0] == (8, 32) and bits[-1] == (8, 8)


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


def _liq_with_clips(w, a, initialized):
    m = QLinear(6, 4, bits_weights=4, bits_activations=4)
    with torch.no_grad():
        m.weight_clip_value.fill_(w)
        m.activation_clip_value.fill_(a)
    m.quant_initialized = initialized
    return m


def test_loading_an_initialized_state_dict_skips_first_batch_init():
    src = _liq_with_clips(0.123, 0.456, initialized=True)
    dst = QLinear(6, 4, bits_weights=4, bits_activations=4)
    dst.load_state_dict(src.state_dict())
    assert dst.quant_initialized
    dst(torch.randn(3, 6) * 10)
    assert dst.weight_clip_value.item() == pytest.approx(0.123)
    assert dst.activation_clip_value.item() == pytest.approx(0.456)


def test_state_dict_saved_before_the_first_batch_keeps_the_init_pending():
    # a snapshot taken before training (placeholders in it) must load as "not initialized yet",
    # so the loaded model runs the same first-batch init the source would have run
    src = _liq_with_clips(0.123, 0.456, initialized=False)
    dst = _liq_with_clips(0.5, 0.5, initialized=True)
    sd = src.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())  # EMA / safetensors code relies on it
    dst.load_state_dict(sd)
    assert not dst.quant_initialized
    x = torch.randn(3, 6) * 10
    dst(x)
    src(x)
    assert dst.quant_initialized
    torch.testing.assert_close(dst.activation_clip_value, x.abs().max().reshape(1) * 0.8)
    torch.testing.assert_close(dst.activation_clip_value, src.activation_clip_value)


def test_state_dict_without_the_init_flag_loads_strictly_as_trained():
    # the reference code's checkpoints (and older saq ones) have clip values but no init flag
    src = _liq_with_clips(0.123, 0.456, initialized=False)
    sd = {k: v for k, v in src.state_dict().items() if k != "quant_initialized"}
    dst = QLinear(6, 4, bits_weights=4, bits_activations=4)
    dst.load_state_dict(sd)  # strict: no missing key
    assert dst.quant_initialized
    dst(torch.randn(3, 6) * 10)
    assert dst.activation_clip_value.item() == pytest.approx(0.456)
    # and a float layer's dict (no quantizer parameters) leaves the init pending
    f = QLinear(6, 4, bits_weights=4, bits_activations=4)
    f.load_state_dict({"weight": src.weight.detach(), "bias": src.bias.detach()}, strict=False)
    assert not f.quant_initialized


def test_bad_init_flag_is_refused():
    dst = QLinear(6, 4, bits_weights=4, bits_activations=4)
    sd = dst.state_dict()
    sd["quant_initialized"] = "yes"
    with pytest.raises(ValueError, match="QLinear.load_state_dict: 'quant_initialized'"):
        dst.load_state_dict(sd)


def test_state_dict_of_other_bits_is_refused_before_it_is_used():
    # same parameter shapes at any bit width: without the saved bits a 4-bit checkpoint loaded
    # into an 8-bit layer silently
    src = _liq_with_clips(0.123, 0.456, initialized=True)
    sd = src.state_dict()
    assert sd["quant_bits"].tolist() == [4, 4]
    for wb, ab, strict in ((8, 4, True), (4, 2, False), (32, 4, True)):
        dst = QLinear(6, 4, bits_weights=wb, bits_activations=ab)
        before = {k: v.clone() for k, v in dst.state_dict().items()}
        with pytest.raises(RuntimeError, match=(
                rf"QLinear.load_state_dict: 'quant_bits': the state dict was saved from a layer with "
                rf"bits_weights=4, bits_activations=4, but this one has bits_weights={wb}, "
                rf"bits_activations={ab}")) as err:
            dst.load_state_dict(sd, strict=strict)  # refused whether strict or not
        assert "Missing key" not in str(err.value) and "Unexpected key" not in str(err.value)
        # nothing of the layer loaded (as torch leaves a tensor of another shape untouched)
        after = dst.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before) and not dst.quant_initialized
    dst = QLinear(6, 4, bits_weights=4, bits_activations=4)
    dst.load_state_dict(sd)  # same bits: strict load, the entry taken out like the init flag
    assert dst.weight_clip_value.item() == pytest.approx(0.123) and dst.quant_initialized
    # whole numbers in floating point (an averaged checkpoint) load too
    QLinear(6, 4, bits_weights=4, bits_activations=4).load_state_dict(dict(sd, quant_bits=torch.tensor([4.0, 4.0])))
    # a dict without it (the reference's, older saq ones) loads with the layer's bits
    dst8 = QLinear(6, 4, bits_weights=8, bits_activations=8)
    dst8.load_state_dict({k: v for k, v in sd.items() if k != "quant_bits"})
    for bad in (torch.tensor([4.5, 4.0]), torch.tensor([4]), "4,4", torch.tensor([[4, 4]]),
                torch.tensor([True, True]), torch.tensor([float("inf"), 4.0])):
        with pytest.raises(RuntimeError, match="'quant_bits' must be the two whole numbers"):
            QLinear(6, 4, bits_weights=4, bits_activations=4).load_state_dict(dict(sd, quant_bits=bad))


def test_refused_bits_load_nothing_under_the_layer():
    # a weight parametrized after quantize_model lives in a child module, which torch loads after
    # the layer: it must not load either
    from torch.nn.utils.parametrizations import weight_norm

    src = weight_norm(QLinear(6, 4, bits_weights=4, bits_activations=4))
    dst = weight_norm(QLinear(6, 4, bits_weights=8, bits_activations=4))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match="saved from a layer with bits_weights=4"):
        dst.load_state_dict(src.state_dict(), strict=False)
    after = dst.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a load onto the meta device (no values to read) passes both entries
    with torch.device("meta"):
        m = QLinear(6, 4, bits_weights=4, bits_activations=4)
    sd = {k: v.to("meta") for k, v in QLinear(6, 4, bits_weights=4, bits_activations=4).state_dict().items()}
    m.load_state_dict(sd, assign=True)
    assert m.weight.is_meta


def test_bits_entry_names_the_layer_inside_a_model():
    q = saq.quantize_model(small_cnn(), 4, 4)
    other = saq.quantize_model(small_cnn(), 3, 4)
    with pytest.raises(RuntimeError, match=r"'(\w+\.)+quant_bits': the state dict was saved from a layer "
                                           r"with bits_weights=4"):
        other.load_state_dict(q.state_dict())


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


def test_first_forward_in_eval_mode_initializes():
    # quantize, load float weights, evaluate: the LSQ scale's placeholder (1.0) zeroed every weight
    torch.manual_seed(0)
    m = saq.quantize_model(small_cnn(), 4, 4, quantizer="lsq").eval()
    with torch.no_grad():
        m(torch.randn(4, 3, 8, 8))
    conv = m[3]
    assert conv.quant_initialized and conv.weight_scale.item() != 1.0
    assert torch.count_nonzero(conv.quantize_weight()) > 0


@pytest.mark.parametrize("quantizer", ["liq", "pact", "dorefa", "lsq"])
def test_zero_initialized_layers_stay_finite(quantizer):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.zeros_(net[2].weight)  # a zero-initialized middle layer (zero-init residual, LoRA B)
    m = saq.quantize_model(net, 4, 4, quantizer=quantizer)
    x = torch.randn(5, 4)
    y = m(x)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # an all-zero first batch (LIQ linear clips 0.8 max|x| = 0) is floored, not refused
    fresh = saq.quantize_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), 4, 4,
                               quantizer=quantizer)
    assert torch.isfinite(fresh(torch.zeros(2, 4))).all()


def test_transformer_layers_and_reparametrized_weights_are_refused():
    enc = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                        nn.Linear(16, 3))
    with pytest.raises(ValueError, match="1 is an nn.TransformerEncoderLayer.*skip=\\['1.\\*'\\]"):
        saq.quantize_model(enc, 4, 4)
    assert type(enc[0]) is nn.Linear  # refused before anything changed
    q = saq.quantize_model(enc, 4, 4, skip=["1.*"])
    assert isinstance(q[0], QLinear) and type(q[1].linear1) is nn.Linear
    for wrap in (nn.utils.spectral_norm, nn.utils.parametrizations.weight_norm):
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), wrap(nn.Conv2d(4, 4, 3)))
        with pytest.raises(ValueError, match="2's weight is reparametrized"):
            saq.quantize_model(net, 4, 4)


def test_hooks_alias_skips_and_a_second_call():
    net = small_cnn()
    calls = []
    handle = net[3].register_forward_hook(lambda mod, inp, out: calls.append(type(mod).__name__))
    m = saq.quantize_model(net, 4, 4)
    m(torch.randn(2, 3, 8, 8))
    assert calls == ["QConv2d"]  # the hook moved to the quantized layer
    handle.remove()
    m(torch.randn(2, 3, 8, 8))
    assert calls == ["QConv2d"]
    # a module registered twice is skipped when either of its names matches
    s = nn.Module()
    s.a = nn.Linear(4, 4)
    s.b = s.a
    s.c = nn.Linear(4, 2)
    saq.quantize_model(s, 4, 4, skip=["b"])
    assert type(s.a) is nn.Linear and s.a is s.b and isinstance(s.c, QLinear)
    # a second call (after a skip) keeps the first and last layers the first call chose
    half = saq.quantize_model(small_cnn(), 3, 4, skip=["3"])
    saq.quantize_model(half, 3, 4)
    assert (half[3].bits_weights, half[3].bits_activations) == (3, 4)
    with pytest.raises(ValueError, match="quantized already"):
        saq.quantize_model(half, 3, 4)
