"""The fast SAQ step: no host sync, same results on every path, AMP, accumulation, compile,
and the efficient mode."""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import saq
import saq_kernels as sk


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5),
    ).to(dtype)
    saq.quantize_model(m, 4, 4)
    x = torch.randn(8, 1, 8, 8, dtype=dtype)
    m(x)  # first-batch clip initialization, eagerly
    return m


def batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g).to(dtype), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def sgd(m):
    clips = [p for n, p in m.named_parameters() if n.endswith("clip_value")]
    rest = [p for n, p in m.named_parameters() if not n.endswith("clip_value")]
    return torch.optim.SGD([{"params": rest}, {"params": clips, "lr": 0.01}], lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)


def train(model, opt, data, forward=None):
    forward = forward or model
    for x, y in data:
        opt.step(lambda: _lb(forward, x, y))


def _lb(f, x, y):
    loss = F.cross_entropy(f(x), y)
    loss.backward()
    return loss


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("host sync inside a SAQ step")

    with monkeypatch.context() as mp:
        for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
            mp.setattr(torch.Tensor, name, boom)
        yield


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_step_makes_no_host_sync(monkeypatch, adaptive, base):
    m = make_model()
    b = sgd(m) if base == "sgd" else torch.optim.AdamW(m.parameters(), lr=1e-3)
    opt = saq.SAQ(m, b, rho=0.1, adaptive=adaptive)
    data = batches(3)
    x, y = data[0]
    with no_host_sync(monkeypatch):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.ascent_step()
            F.cross_entropy(m(x), y).backward()
            opt.descent_step()
    assert opt.skipped_steps == 0 and opt.steps == 3


def _available_cpu_backends():
    return [n for n, r in sk.available_backends().items() if r is None and sk.get_backend(n).supports("liq_quantize", "cpu", torch.float32) is None]


@pytest.mark.parametrize("backend", _available_cpu_backends())
@pytest.mark.parametrize("case,adaptive", [(1, False), (2, False), (3, False), (3, True)])
def test_fused_path_matches_reference_path(backend, case, adaptive):
    data = batches(3)
    a, b = make_model(), make_model()
    oa = saq.SAQ(a, sgd(a), rho=0.2, case=case, adaptive=adaptive, fused=True)
    ob = saq.SAQ(b, sgd(b), rho=0.2, case=case, adaptive=adaptive, fused=False)
    with sk.use_backend(backend):
        train(a, oa, data)
    with sk.use_backend("reference"):
        train(b, ob, data)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_bf16_autocast_step():
    m = make_model()
    ref = copy.deepcopy(m)
    opt = saq.SAQ(m, sgd(m), rho=0.1)
    oref = saq.SAQ(ref, sgd(ref), rho=0.1)
    data = batches(2)
    for x, y in data:
        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert torch.isfinite(loss)
    train(ref, oref, data)
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        assert torch.isfinite(p).all(), n
        # bf16 matmuls: same direction as fp32, within bf16's few-percent relative error
        torch.testing.assert_close(p, q, rtol=0.05, atol=0.02, msg=n)


def test_fp16_grad_scaler_skips_like_grad_scaler():
    m = make_model()
    opt = saq.SAQ(m, sgd(m), rho=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x, y = batches(1)[0]

    def step(poison):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(m(x), y)
        scaler.scale(loss).backward()
        if poison:
            m[3].bias.grad[0] = float("inf")
        opt.ascent_step(grad_scaler=scaler)
        with torch.autocast("cpu", dtype=torch.float16):
            loss2 = F.cross_entropy(m(x), y)
        scaler.scale(loss2).backward()
        opt.descent_step(grad_scaler=scaler)

    p0 = [p.detach().clone() for p in m.parameters()]
    step(poison=True)
    assert scaler.get_scale() == 2.0**9  # lowered, as GradScaler does on inf
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), p0))
    step(poison=False)
    assert scaler.get_scale() == 2.0**9
    assert not all(torch.equal(p, q) for p, q in zip(m.parameters(), p0))
    with pytest.warns(RuntimeWarning):
        assert opt.skipped_steps == 1


def test_gradient_accumulation_matches_hand_written():
    data = batches(2)
    m = make_model(dtype=torch.float64)
    hand = copy.deepcopy(m)
    opt = saq.SAQ(m, torch.optim.SGD(m.parameters(), lr=0.1), rho=0.2)
    for x, y in data:  # each micro-batch: its own ascent, then its descent gradient accumulated
        opt.zero_grad()
        (F.cross_entropy(m(x.double()), y) / 2).backward()
        opt.ascent_step()
        (F.cross_entropy(m(x.double()), y) / 2).backward()
        opt.accumulate()
    opt.descent_step()

    # by hand: a fresh single-batch SAQ step per micro-batch, its descent gradients summed
    total = [torch.zeros_like(p) for p in hand.parameters()]
    for x, y in data:
        h = copy.deepcopy(hand)
        o = saq.SAQ(h, torch.optim.SGD(h.parameters(), lr=0.1), rho=0.2)
        (F.cross_entropy(h(x.double()), y) / 2).backward()
        o.ascent_step()
        (F.cross_entropy(h(x.double()), y) / 2).backward()
        o.restore_step()
        for t, p in zip(total, h.parameters()):
            if p.grad is not None:
                t += p.grad
        # BatchNorm running statistics advance once per micro-batch forward, as in the real run
        hand.load_state_dict({k: v for k, v in h.state_dict().items() if "running" in k or "num_batches" in k}, strict=False)
    with torch.no_grad():
        for p, t in zip(hand.parameters(), total):
            p -= 0.1 * t
    for (n, p), q in zip(m.named_parameters(), hand.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13, msg=n)


def test_compiled_model_step_matches_eager_without_graph_breaks():
    import torch._dynamo as dynamo

    data = batches(2)
    a, b = make_model(), make_model()
    oa, ob = saq.SAQ(a, sgd(a), rho=0.1), saq.SAQ(b, sgd(b), rho=0.1)
    x, y = data[0]
    explain = dynamo.explain(lambda x: F.cross_entropy(a(x), y))(x)
    assert explain.graph_break_count == 0, [r.reason for r in explain.break_reasons]
    compiled = torch.compile(a, fullgraph=True)
    train(a, oa, data, forward=compiled)
    train(b, ob, data)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_efficient_mode_reuses_the_last_perturbation():
    m = make_model()
    opt = saq.SAQ(m, sgd(m), rho=0.1, ascent_every=3)
    calls = []
    x, y = batches(1)[0]

    def closure():
        calls.append(1)
        return _lb(m, x, y)

    for _ in range(6):
        opt.step(closure)
    assert len(calls) == 2 + 1 + 1 + 2 + 1 + 1  # full ascent on steps 0 and 3 only
    # a reuse step applies exactly the stored perturbation
    opt.zero_grad()
    opt.reuse_perturbation()
    layer, e = opt._last["weights"][0]
    assert layer is m[0] and m[0]._saq_e is e
    opt.restore_step()
    with pytest.raises(ValueError, match="ascent_every"):
        saq.SAQ(m, sgd(m), ascent_every=0)


def _manual_step(m, opt, x, y, poison=False, reuse=False):
    opt.zero_grad()
    if reuse:
        opt.reuse_perturbation()
    else:
        _lb(m, x, y)
        if poison:  # a non-finite pass-1 gradient: the whole step is skipped
            m[3].bias.grad[0] = float("inf")
        opt.ascent_step()
    _lb(m, x, y)
    opt.descent_step()


def test_efficient_mode_keeps_the_last_perturbation_over_a_skipped_ascent(monkeypatch):
    """A skipped ascent (scale 0) must not become what the next k-1 steps re-apply: they keep
    re-applying the previous ascent's perturbation, chosen on the device."""
    m = make_model()
    opt = saq.SAQ(m, sgd(m), rho=0.1, ascent_every=3)
    data = batches(4)
    _manual_step(m, opt, *data[0])  # the full ascent of the first cycle
    for x, y in data[1:3]:
        _manual_step(m, opt, x, y, reuse=True)
    kept = {"scale": opt._last["scale"].clone(),
            "weights": [e.clone() for _, e in opt._last["weights"]],
            "small": [d.clone() for _, d in opt._last["small"]]}
    assert kept["scale"] > 0 and kept["small"]
    p0 = [p.detach().clone() for p in m.parameters()]
    with no_host_sync(monkeypatch):
        _manual_step(m, opt, *data[3], poison=True)  # the second cycle's ascent: skipped
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), p0))
    assert torch.equal(opt._last["scale"], kept["scale"])
    assert all(torch.equal(e, k) for (_, e), k in zip(opt._last["weights"], kept["weights"]))
    assert all(torch.equal(d, k) for (_, d), k in zip(opt._last["small"], kept["small"]))
    # and the next (reuse) step applies it: the weights' perturbation and the small parameters'
    opt.zero_grad()
    opt.reuse_perturbation()
    assert all(torch.equal(layer._saq_e, k) for (layer, _), k in zip(opt._last["weights"], kept["weights"]))
    assert torch.equal(opt._last["weights"][0][0]._saq_s, kept["scale"])
    opt.restore_step()
    with pytest.warns(RuntimeWarning):
        assert opt.skipped_steps == 1


def test_efficient_mode_takes_a_finite_ascent_after_a_kept_one():
    """The choice is per ascent: a finite ascent after a skipped one replaces the perturbation."""
    m = make_model()
    opt = saq.SAQ(m, sgd(m), rho=0.1, ascent_every=2)
    data = batches(4)
    _manual_step(m, opt, *data[0])
    _manual_step(m, opt, *data[1], reuse=True)
    first = opt._last["scale"].clone()
    _manual_step(m, opt, *data[2], poison=True)
    assert torch.equal(opt._last["scale"], first)
    _manual_step(m, opt, *data[3], reuse=True)
    _manual_step(m, opt, *data[0])  # finite: a new perturbation
    assert not torch.equal(opt._last["scale"], first) and opt._last["scale"] > 0


# ------------------------------------------------------------------------------------------
# on a GPU (run by benchmarks/gpu_check.sh)
# ------------------------------------------------------------------------------------------
def _gpu_backends():
    if not torch.cuda.is_available():
        return ["cuda-unavailable"]
    return [n for n in ("triton", "cuda") if sk.get_backend(n).supports("liq_quantize", "cuda", torch.float32) is None]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("case,adaptive", [(1, False), (2, False), (3, False), (3, True)])
def test_fused_path_matches_reference_path_on_gpu(backend, case, adaptive):
    data = [(x.cuda(), y.cuda()) for x, y in batches(3)]
    a, b = make_model().cuda(), make_model().cuda()
    oa = saq.SAQ(a, sgd(a), rho=0.2, case=case, adaptive=adaptive, fused=True)
    ob = saq.SAQ(b, sgd(b), rho=0.2, case=case, adaptive=adaptive, fused=False)
    with sk.use_backend(backend):
        train(a, oa, data)
    with sk.use_backend("reference"):
        train(b, ob, data)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["reference"] + [b for b in _gpu_backends() if b != "cuda-unavailable"])
def test_full_saq_step_captures_in_a_cuda_graph(backend):
    # the model is built (and its clips initialized) on the CPU first, outside the block: a
    # requested backend refuses inputs it cannot serve, and triton / cuda serve CUDA tensors only
    x, y = (t.cuda() for t in batches(1)[0])
    m = make_model().cuda()
    with sk.use_backend(backend):
        _capture_and_compare(m, x, y)


def _capture_and_compare(m, x, y):
    twin = copy.deepcopy(m)
    opt, otwin = saq.SAQ(m, sgd(m), rho=0.1), saq.SAQ(twin, sgd(twin), rho=0.1)

    def step(model, o):
        o.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        o.ascent_step()
        F.cross_entropy(model(x), y).backward()
        o.descent_step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: optimizer state, kernel compilation
        for _ in range(3):
            step(m, opt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture: nothing runs, no host sync may happen
        step(m, opt)
    for _ in range(2):
        graph.replay()
    for _ in range(5):
        step(twin, otwin)
    torch.cuda.synchronize()
    for (n, p), q in zip(m.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.slow
def test_compiled_whole_training_step_breaks_only_outside_our_ops():
    import torch._dynamo as dynamo

    x, y = batches(1)[0]
    a, b = make_model(), make_model()
    oa, ob = saq.SAQ(a, sgd(a), rho=0.1), saq.SAQ(b, sgd(b), rho=0.1)

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.ascent_step()
        F.cross_entropy(model(x), y).backward()
        opt.descent_step()
        return loss

    explain = dynamo.explain(step)(b, ob)
    # Dynamo stops at Tensor.backward() and at torch.optim's zero_grad (it skips that file); none
    # of the breaks may come from the saq ops or the quantized layers.
    for r in explain.break_reasons:
        where = " ".join(str(f) for f in r.user_stack)
        assert "saq_kernels" not in where and "saq/nn" not in where, r.reason
    dynamo.reset()
    b2 = make_model()
    ob2 = saq.SAQ(b2, sgd(b2), rho=0.1)
    compiled = torch.compile(step, backend="inductor")
    for _ in range(2):
        compiled(b2, ob2)
        step(a, oa)
    for (n, p), q in zip(a.named_parameters(), b2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_tensor_lr_follows_a_scheduler_without_host_values():
    # SGD with a 0-dim tensor lr (torch.optim's capturable style): the fused step copies it on the
    # device at each step (fill_ from a same-device tensor), so a captured step follows a
    # scheduler's in-place updates; the same parameters as with a float lr. (AdamW with a tensor
    # lr takes torch's own step: fused_kind.)
    def run(tensor_lr):
        m = make_model()
        lr = torch.tensor(0.05) if tensor_lr else 0.05
        b = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
        opt = saq.SAQ(m, b, rho=0.1, fused=True)  # raises if the fused step cannot take it
        sched = torch.optim.lr_scheduler.StepLR(b, step_size=1, gamma=0.5)
        lrs = []
        for x, y in batches(3):
            train(m, opt, [(x, y)])
            sched.step()
            lr_now = b.param_groups[0]["lr"]
            lrs.append(float(lr_now))
            assert isinstance(lr_now, torch.Tensor) == tensor_lr
        return m, lrs

    a, lra = run(True)
    b, lrb = run(False)
    assert lrb == [0.025, 0.0125, 0.00625]
    assert lra == [float(torch.tensor(v)) for v in lrb]  # the same values, as fp32
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
