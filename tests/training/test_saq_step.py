"""saq.SAQ reproduces the SAQ reference code's Case-3 step (the method description's section 2) to
float64 rounding.

The expected values come from an independent re-derivation written here with plain torch ops, in
the style of the reference code: straight-through rounding, quantized weights kept as tensors
with retain_grad, per-parameter norms, clones and in-place perturbation, a hand-written SGD with
Nesterov momentum and per-group learning rates.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import saq
from saq.nn import QConv2d, QLinear

DT = torch.float64
RHO = 0.3
LR, CLIP_LR, MOM, WD = 0.05, 0.01, 0.9, 1e-4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = QConv2d(2, 4, 3, padding=1, bias=False, bits_weights=4, bits_activations=4, dtype=DT)
        self.bn = nn.BatchNorm2d(4, dtype=DT)
        self.fc = QLinear(4, 3, bias=True, bits_weights=3, bits_activations=4, dtype=DT)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(h.mean((2, 3)))


def make_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        net.conv.weight_clip_value.fill_(1.3)
        net.conv.activation_clip_value.fill_(-1.7)  # negative: the quantizer uses |clip|
        net.fc.weight_clip_value.fill_(0.4)
        net.fc.activation_clip_value.fill_(0.9)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
    net.conv.quant_initialized = net.fc.quant_initialized = True
    return net


def groups(net):
    clips = [p for n, p in net.named_parameters() if n.endswith("clip_value")]
    rest = [p for n, p in net.named_parameters() if not n.endswith("clip_value")]
    return [{"params": rest, "lr": LR}, {"params": clips, "lr": CLIP_LR}]


# ------------------------------------------------------------------------------------------
# independent re-derivation
# ------------------------------------------------------------------------------------------
def ste_round(t):
    return t + (torch.round(t) - t).detach()


def q_act(x, clip, bits):
    c, n = clip.abs(), 2**bits - 1
    t = torch.clamp(x / c, 0, 1)
    return ste_round(t * n) / n * c


def q_weight(w, clip, bits, standardize):
    if standardize:
        w = (w - w.detach().mean()) / w.detach().std()
    c, n = clip.abs(), 2**bits - 1
    t = torch.clamp(w / c, -1, 1)
    u = ste_round((t + 1) / 2 * n) / n
    return (u * 2 - 1) * c


def manual_forward(P, bn_state, x, e_conv=None, e_fc=None):
    xq = q_weight(P["conv.weight"], P["conv.weight_clip_value"], 4, True)
    if e_conv is not None:
        xq = xq + e_conv
    xf = q_weight(P["fc.weight"], P["fc.weight_clip_value"], 3, False)
    if e_fc is not None:
        xf = xf + e_fc
    if e_conv is None:
        xq.retain_grad()
        xf.retain_grad()
    h = F.conv2d(q_act(x, P["conv.activation_clip_value"], 4), xq, None, 1, 1)
    h = F.batch_norm(h, bn_state["mean"], bn_state["var"], P["bn.weight"], P["bn.bias"], True, 0.1, 1e-5)
    h = F.relu(h).mean((2, 3))
    out = F.linear(q_act(h, P["fc.activation_clip_value"], 4), xf, P["fc.bias"])
    return out, xq, xf


def manual_steps(net, batches):
    P = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    bn_state = {"mean": net.bn.running_mean.clone(), "var": net.bn.running_var.clone()}
    bufs = {}
    for x, y in batches:
        # pass 1
        out, xq, xf = manual_forward(P, bn_state, x)
        F.cross_entropy(out, y).backward()
        small = ["fc.bias", "bn.weight", "bn.bias"]
        small += [k for k in ("conv.activation_clip_value", "fc.activation_clip_value")
                  if P[k].grad is not None and bool(P[k].grad.abs().sum() > 0)]
        norms = [xq.grad.norm(), xf.grad.norm()] + [P[k].grad.norm() for k in small]
        scale = RHO / (torch.stack(norms).norm() + 1e-12)
        e_conv, e_fc = (xq.grad * scale).detach(), (xf.grad * scale).detach()
        saved = {}
        with torch.no_grad():
            for k in small:
                saved[k] = P[k].clone()
                P[k].add_(P[k].grad * scale)
        for p in P.values():
            p.grad = None
        # pass 2
        out, _, _ = manual_forward(P, bn_state, x, e_conv, e_fc)
        F.cross_entropy(out, y).backward()
        with torch.no_grad():
            for k, v in saved.items():
                P[k].copy_(v)
            # SGD, momentum, Nesterov, weight decay, per-group lr (clips have their own)
            for k, p in P.items():
                lr = CLIP_LR if k.endswith("clip_value") else LR
                d = p.grad + WD * p
                bufs[k] = d.clone() if k not in bufs else MOM * bufs[k] + d
                p.sub_(lr * (d + MOM * bufs[k]))
        for p in P.values():
            p.grad = None
    return P, bn_state


@pytest.mark.parametrize("fused", [True, False])
def test_case3_steps_match_independent_derivation(fused, backend="reference"):
    import saq_kernels as sk

    torch.manual_seed(1)
    batches = [(torch.randn(5, 2, 6, 6, dtype=DT).abs() * 1.5, torch.randint(0, 3, (5,))) for _ in range(4)]
    net = make_net()
    expected, bn_state = manual_steps(copy.deepcopy(net), batches)

    base = torch.optim.SGD(groups(net), lr=LR, momentum=MOM, nesterov=True, weight_decay=WD)
    opt = saq.SAQ(net, base, rho=RHO, fused=fused)
    with sk.use_backend(backend):
        for x, y in batches:
            opt.step(lambda: _loss_backward(net, x, y))
    got = dict(net.named_parameters())
    for k, v in expected.items():
        # Measured: <= 1.2e-16 after 4 steps. An fp32 slip anywhere in the step (an fp32
        # perturbation scale or clip parameter) shows up as >= 1e-10 after one step.
        torch.testing.assert_close(got[k].detach(), v.detach(), rtol=1e-13, atol=1e-14, msg=k)
    torch.testing.assert_close(net.bn.running_mean, bn_state["mean"], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(net.bn.running_var, bn_state["var"], rtol=1e-12, atol=1e-13)
    # The run must have moved the weights (a test that compares two no-ops proves nothing).
    assert not torch.allclose(got["conv.weight"], make_net().conv.weight)


def _loss_backward(net, x, y):
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss


def test_ascent_descent_api_equals_step_closure():
    torch.manual_seed(2)
    x, y = torch.randn(6, 2, 6, 6, dtype=DT).abs(), torch.randint(0, 3, (6,))
    a, b = make_net(), make_net()
    oa = saq.SAQ(a, torch.optim.SGD(groups(a), lr=LR, momentum=MOM), rho=RHO)
    ob = saq.SAQ(b, torch.optim.SGD(groups(b), lr=LR, momentum=MOM), rho=RHO)
    for _ in range(2):
        oa.step(lambda: _loss_backward(a, x, y))
        ob.zero_grad()
        _loss_backward(b, x, y)
        ob.ascent_step()
        _loss_backward(b, x, y)
        ob.descent_step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_restore_step_is_bit_exact_and_clears_perturbation():
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    opt = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=LR), rho=RHO)
    x, y = torch.randn(4, 2, 6, 6, dtype=DT).abs(), torch.randint(0, 3, (4,))
    _loss_backward(net, x, y)
    opt.ascent_step()
    assert net.conv._saq_e is not None
    assert not torch.equal(net.bn.weight, before["bn.weight"])  # perturbed in place
    opt.restore_step()
    assert net.conv._saq_e is None and net.fc._saq_e is None
    for k, v in before.items():
        assert torch.equal(net.state_dict()[k], v), k


@pytest.mark.parametrize("case", [1, 2])
def test_cases_1_and_2_use_latent_gradients(case):
    net = make_net()
    opt = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=LR), rho=RHO, case=case)
    x, y = torch.randn(4, 2, 6, 6, dtype=DT).abs(), torch.randint(0, 3, (4,))
    _loss_backward(net, x, y)
    g = net.conv.weight.grad.clone()
    opt.ascent_step()
    assert net.conv._saq_before is (case == 2)
    torch.testing.assert_close(net.conv._saq_e, g)
    opt.restore_step()


def test_plain_sam_on_float_model_perturbs_all_parameters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    opt = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05)
    assert len(opt.small) == 4
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 2, (8,))
    w0 = net[0].weight.detach().clone()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    g = [p.grad.clone() for p in net.parameters()]
    opt.ascent_step()
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    torch.testing.assert_close(net[0].weight, w0 + g[0] * 0.05 / (norm + 1e-12))
    opt.restore_step()
    assert torch.equal(net[0].weight, w0)


def _base(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=MOM)
    if kind == "sgd_torch_fused":
        return torch.optim.SGD(params, lr=LR, momentum=MOM, fused=True)
    if kind == "adam_torch_fused":
        return torch.optim.Adam(params, lr=LR, fused=True)
    return torch.optim.RMSprop(params, lr=LR)


@pytest.mark.parametrize("kind,fused", [("sgd", None), ("sgd", False), ("sgd_torch_fused", False),
                                        ("adam_torch_fused", None), ("rmsprop", None)])
@pytest.mark.parametrize("where", ["pass1", "pass2", "both"])
def test_nonfinite_gradient_skips_step_and_counts(kind, fused, where):
    net = make_net()
    opt = saq.SAQ(net, _base(kind, net.parameters()), rho=RHO, fused=fused)
    params0 = {k: v.clone() for k, v in net.named_parameters()}
    x, y = torch.randn(4, 2, 6, 6, dtype=DT).abs(), torch.randint(0, 3, (4,))
    _loss_backward(net, x, y)
    if where in ("pass1", "both"):
        net.bn.weight.grad[0] = float("nan")
    opt.ascent_step()
    if where in ("pass1", "both"):  # no perturbation reaches the weights, no NaN reaches BN statistics
        assert torch.count_nonzero(net.conv._saq_e) == 0
        assert torch.equal(net.bn.weight, params0["bn.weight"])
    _loss_backward(net, x, y)
    if where in ("pass2", "both"):  # both: torch's fused optimizers skip only on a flag of 1.0
        net.fc.weight.grad[0, 0] = float("inf")
    opt.descent_step()
    assert torch.isfinite(net.bn.running_mean).all() and torch.isfinite(net.bn.running_var).all()
    for k, v in net.named_parameters():
        assert torch.equal(v, params0[k]), k
    with pytest.warns(RuntimeWarning, match="1 step\\(s\\) skipped for non-finite"):
        assert opt.skipped_steps == 1
    assert opt.state_dict()["saq"]["skipped_steps"] == 1
    # the next, finite step goes through
    opt.step(lambda: _loss_backward(net, x, y))
    assert not torch.equal(net.fc.weight, params0["fc.weight"])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("poisoned", [0, 1, "both"])
def test_accumulation_skips_on_any_micro_batch_ascent(fused, poisoned):
    # micro-batch 1 is the last one: it ends with descent_step() instead of accumulate()
    net = make_net()
    base = torch.optim.Adam(net.parameters(), lr=LR, fused=True) if fused else torch.optim.SGD(net.parameters(), lr=LR)
    opt = saq.SAQ(net, base, rho=RHO, check_finite=False)
    params0 = {k: v.clone() for k, v in net.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        x, y = torch.randn(4, 2, 6, 6, dtype=DT, generator=g).abs(), torch.randint(0, 3, (4,), generator=g)
        (F.cross_entropy(net(x), y) / 2).backward()
        if poisoned in (i, "both"):
            net.bn.weight.grad[0] = float("nan")
        opt.ascent_step()
        (F.cross_entropy(net(x), y) / 2).backward()
        if i == 0:
            opt.accumulate()
    opt.descent_step()
    for k, v in net.named_parameters():
        assert torch.equal(v, params0[k]), k
    with pytest.warns(RuntimeWarning, match="1 step\\(s\\) skipped"):
        assert opt.skipped_steps == 1


def test_gradscaler_with_a_torch_fused_optimizer_skips_overflow_in_both_passes():
    net = make_net().float()
    opt = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=LR, momentum=MOM, fused=True), rho=RHO, fused=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    params0 = {k: v.clone() for k, v in net.named_parameters()}
    x, y = torch.randn(4, 2, 6, 6).abs(), torch.randint(0, 3, (4,))
    scaler.scale(F.cross_entropy(net(x), y)).backward()
    net.bn.weight.grad[0] = float("inf")
    opt.ascent_step(grad_scaler=scaler)
    scaler.scale(F.cross_entropy(net(x), y)).backward()
    net.fc.weight.grad[0, 0] = float("inf")
    opt.descent_step(grad_scaler=scaler)
    for k, v in net.named_parameters():
        assert torch.equal(v, params0[k]), k
    assert scaler.get_scale() == 2.0**7


def test_fused_sgd_after_a_skipped_first_step_matches_torch_with_dampening():
    x, y = torch.randn(4, 2, 6, 6, dtype=DT).abs(), torch.randint(0, 3, (4,))
    out = {}
    for fused in (True, False):
        net = make_net()
        opt = saq.SAQ(net, torch.optim.SGD(groups(net), lr=LR, momentum=MOM, dampening=0.5), rho=RHO, fused=fused)
        for poison in (True, False, False):
            _loss_backward(net, x, y)
            opt.ascent_step()
            _loss_backward(net, x, y)
            if poison:
                net.fc.weight.grad[0, 0] = float("nan")
            opt.descent_step()
        with pytest.warns(RuntimeWarning):
            assert opt.skipped_steps == 1
        out[fused] = [p.detach().clone() for p in net.parameters()]
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("case", [1, 2])
def test_cases_1_and_2_count_a_shared_weight_once_in_the_norm(case):
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight  # two layers, one weight (each its own bias)
    float_net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), a, nn.ReLU(), b, nn.ReLU(), nn.Linear(4, 3)).double()
    net = saq.quantize_model(float_net, 4, 4)
    assert net[2] is not net[4] and net[2].weight is net[4].weight
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    net(x)  # init
    opt = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=LR), rho=RHO, case=case, include_aclip=False)
    _loss_backward(net, x, y)
    grads = {id(p): p.grad.clone() for p in net.parameters() if p.grad is not None}
    weight_ids = {id(m.weight) for _, m in saq.quantized_layers(net)}
    biases = [m.bias for _, m in saq.quantized_layers(net)]
    norm = torch.sqrt(sum((grads[i] ** 2).sum() for i in weight_ids)
                      + sum((grads[id(b)] ** 2).sum() for b in {id(b): b for b in biases}.values()))
    opt.ascent_step()
    torch.testing.assert_close(net[2]._saq_s, RHO / (norm + 1e-12))
    assert net[4]._saq_e is not None  # both users of the shared weight are perturbed
    opt.restore_step()


def test_zero_gradient_gives_no_nan():
    net = make_net()
    opt = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=LR), rho=RHO)
    x = torch.randn(4, 2, 6, 6, dtype=DT).abs()
    (net(x).sum() * 0).backward()
    opt.ascent_step()
    (net(x).sum() * 0).backward()
    opt.descent_step()
    for n, p in net.named_parameters():
        assert torch.isfinite(p).all(), n


def test_state_dict_roundtrip_and_bad_state():
    net = make_net()
    opt = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9), rho=RHO, adaptive=True)
    x, y = torch.randn(4, 2, 6, 6, dtype=DT).abs(), torch.randint(0, 3, (4,))
    opt.step(lambda: _loss_backward(net, x, y))
    sd = opt.state_dict()
    other = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9))
    other.load_state_dict(sd)
    assert other.adaptive and other.rho == RHO and other.steps == 1
    with pytest.raises(ValueError, match="'base' and 'saq'"):
        other.load_state_dict({"state": {}})
    # the efficient mode's last perturbation travels with the state (by layer position)
    eff = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=LR), rho=RHO, ascent_every=2)
    eff.step(lambda: _loss_backward(net, x, y))
    sd = eff.state_dict()
    assert set(sd["saq"]["last"]["weights"]) == {0, 1}
    twin = make_net()
    back = saq.SAQ(twin, torch.optim.SGD(twin.parameters(), lr=LR), rho=RHO, ascent_every=2)
    back.load_state_dict(sd)
    assert not back.needs_ascent()
    assert all(m is twin.conv or m is twin.fc for m, _ in back._last["weights"])
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(back._last["weights"], eff._last["weights"]))
    # under DDP (without sync_ascent) each replica's perturbation is its own: a full ascent first
    import saq.optim.saq as saq_mod

    ddp = saq.SAQ(twin, torch.optim.SGD(twin.parameters(), lr=LR), rho=RHO, ascent_every=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(saq_mod, "_replicas", lambda: 2)
        ddp.load_state_dict(sd)
        assert ddp.needs_ascent()
        synced = saq.SAQ(twin, torch.optim.SGD(twin.parameters(), lr=LR), rho=RHO, ascent_every=2,
                         sync_ascent=True)
        synced.load_state_dict(sd)
        assert not synced.needs_ascent()
    # a state that does not fit is refused before anything is loaded
    fresh = saq.SAQ(twin, torch.optim.SGD(twin.parameters(), lr=LR), rho=RHO, ascent_every=2)
    bad = {"base": sd["base"], "saq": dict(sd["saq"], last=dict(sd["saq"]["last"]))}
    small0 = next(iter(bad["saq"]["last"]["small"]))
    bad["saq"]["last"]["small"] = {small0: torch.zeros(7)}
    with pytest.raises(ValueError, match="perturbation does not fit this model"):
        fresh.load_state_dict(bad)
    assert fresh.steps == 0 and not fresh.base_optimizer.state
    sd["saq"]["last"]["weights"][5] = sd["saq"]["last"]["weights"][0]
    with pytest.raises(ValueError, match="perturbation does not fit this model"):
        back.load_state_dict(sd)


def test_bad_arguments():
    net = make_net()
    with pytest.raises(TypeError, match="base_optimizer"):
        saq.SAQ(net, torch.optim.SGD, rho=0.1)
    with pytest.raises(ValueError, match="case"):
        saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=0.1), case=4)
    with pytest.raises(RuntimeError, match="closure"):
        saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=0.1)).step()


def test_steps_out_of_order_raise():
    net = make_net()
    opt = saq.SAQ(net, torch.optim.SGD(net.parameters(), lr=LR), rho=RHO)
    x, y = torch.randn(4, 2, 6, 6, dtype=DT).abs(), torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match="descent_step: no ascent"):
        opt.descent_step()
    with pytest.raises(RuntimeError, match="accumulate: no ascent"):
        opt.accumulate()
    _loss_backward(net, x, y)
    opt.ascent_step()
    with pytest.raises(RuntimeError, match="ascent_step: already perturbed"):
        opt.ascent_step()
    _loss_backward(net, x, y)
    opt.descent_step()
    w = net.conv.weight.detach().clone()
    with pytest.raises(RuntimeError, match="descent_step: no ascent"):
        opt.descent_step()  # a second descent would count a step that never happened
    assert opt.steps == 1 and torch.equal(net.conv.weight, w)
    # restore_step ends the step without an update: no descent may follow it
    _loss_backward(net, x, y)
    opt.ascent_step()
    opt.restore_step()
    with pytest.raises(RuntimeError, match="descent_step: no ascent"):
        opt.descent_step()
    # accumulated micro-batches may end with descent_step() and no gradient of their own
    for _ in range(2):
        _loss_backward(net, x, y)
        opt.ascent_step()
        _loss_backward(net, x, y)
        opt.accumulate()
    opt.descent_step()
    assert opt.steps == 2 and not torch.equal(net.conv.weight, w)


@pytest.mark.parametrize("case", [1, 2, 3])
def test_frozen_and_unoptimized_layers_are_not_perturbed(case):
    # SAM perturbs what is trained (the base optimizer's parameters that require grad), as the
    # reference's loop over param_groups: Case 3's dL/dQ(w) capture used to perturb a frozen
    # layer, and any case one left out of the optimizer
    torch.manual_seed(0)
    m = saq.quantize_model(saq.models.get_model("digits_cnn", 10), 4, 4)
    m.conv2.weight.requires_grad_(False)
    trained = [p for n, p in m.named_parameters() if p.requires_grad and not n.startswith("conv1.")]
    opt = saq.SAQ(m, torch.optim.SGD(trained, lr=0.1), rho=0.1, case=case)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    w1, w2 = m.conv1.weight.detach().clone(), m.conv2.weight.detach().clone()
    F.cross_entropy(m(x), y).backward()
    opt.ascent_step()
    assert m.conv1._saq_e is None and m.conv2._saq_e is None
    assert torch.equal(m.conv1.weight, w1) and torch.equal(m.conv2.weight, w2)
    assert m.conv1.bias not in opt._backups and m.conv1.activation_clip_value not in opt._backups
    assert m.fc._saq_e is not None and m.fc.bias in opt._backups  # the trained ones are
    F.cross_entropy(m(x), y).backward()
    opt.descent_step()
    assert torch.equal(m.conv2.weight, w2)
