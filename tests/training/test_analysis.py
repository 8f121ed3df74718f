"""saq.analysis (sharpness, loss landscape) and `saq analyze`, on the CPU."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import saq
from saq import analysis
from saq.cli import main
from saq.models import get_model


def _batches(n=3, b=16, seed=0, shape=(1, 8, 8), classes=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, *shape, generator=g), torch.randint(0, classes, (b,), generator=g))
            for _ in range(n)]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _qmodel():
    torch.manual_seed(0)
    m = saq.quantize_model(get_model("digits_cnn", 10), weight_bits=4, act_bits=4, quantizer="liq")
    m.train()
    m(_batches(1)[0][0])  # the quantizers' first-batch init
    return m


def _hand_sam(model, x, y, rho, adaptive=False, eta=0.01):
    """Plain SAM / ASAM by hand: e = rho * t(g) / ||g * (|p| + eta)|| (adaptive) or rho * g / ||g||,
    t(g) = p^2 * g for weights (the reference code's adaptive form), g for biases."""
    named = dict(model.named_parameters())
    loss0 = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss0, list(named.values()))
    weighted = [g * (p.abs() + eta) if adaptive and not n.endswith("bias") else g
                for (n, p), g in zip(named.items(), grads)]
    norm = torch.sqrt(sum((w.double() ** 2).sum() for w in weighted)).float()
    scale = rho / (norm + 1e-12)
    moved = {n: p.detach() + scale * (p.detach() ** 2 * g if adaptive and not n.endswith("bias") else g)
             for (n, p), g in zip(named.items(), grads)}
    with torch.no_grad():
        loss1 = F.cross_entropy(functional_call(model, moved, (x,)), y)
    return float(loss0.detach()), float(loss1)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sharpness_of_a_float_model_is_plain_sam_written_by_hand(adaptive):
    model = _mlp()
    data = _batches(2)
    res = analysis.sharpness(model, data, rho=0.5, adaptive=adaptive)
    hand = [_hand_sam(model, x, y, 0.5, adaptive) for x, y in data]
    l0 = sum(h[0] for h in hand) / 2  # equal batch sizes
    l1 = sum(h[1] for h in hand) / 2
    assert res["loss"] == pytest.approx(l0, rel=1e-6, abs=1e-7)
    assert res["perturbed_loss"] == pytest.approx(l1, rel=1e-5, abs=1e-6)
    assert res["sharpness"] == pytest.approx(l1 - l0, rel=1e-3, abs=1e-6)
    assert res["sharpness"] > 0  # a first-order ascent at this radius raises the loss
    assert (res["batches"], res["samples"], res["nonfinite_batches"]) == (2, 32, 0)


@pytest.mark.parametrize("case", [1, 2, 3])
def test_sharpness_is_the_loss_of_a_training_step_pass_2(case):
    """The perturbed loss is what pass 2 of a saq.SAQ step sees (same ascent, eval mode)."""
    model = _qmodel()
    x, y = _batches(1, seed=1)[0]
    res = analysis.sharpness(model, [(x, y)], rho=0.3, case=case)
    ref = copy.deepcopy(model).eval()
    opt = saq.SAQ(ref, torch.optim.SGD(ref.parameters(), lr=0.0), rho=0.3, case=case)
    loss0 = F.cross_entropy(ref(x), y)
    loss0.backward()
    opt.ascent_step()
    with torch.no_grad():
        loss1 = F.cross_entropy(ref(x), y)
    assert res["loss"] == float(loss0.detach())
    assert res["perturbed_loss"] == float(loss1)
    assert res["case"] == case and res["sharpness"] != 0.0


def test_rho_zero_gives_zero_sharpness_exactly():
    for model in (_qmodel(), _mlp()):
        res = analysis.sharpness(model, _batches(2), rho=0.0)
        assert res["sharpness"] == 0.0 and res["loss"] == res["perturbed_loss"]


def test_analysis_leaves_a_model_in_training_untouched():
    """A SAQ run with a sharpness and a landscape measurement between two steps ends bit for bit
    where the same run without them ends (parameters, buffers, optimizer state), and the
    analysis restores the mode and the .grad references it found."""
    data = _batches(3, seed=2)
    runs = []
    for analyse in (False, True):
        model = _qmodel()
        opt = saq.SAQ(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), rho=0.2)
        for i, (x, y) in enumerate(data[:2]):
            F.cross_entropy(model(x), y).backward()
            opt.ascent_step()
            F.cross_entropy(model(x), y).backward()
            opt.descent_step()
            if analyse and i == 0:
                p0 = next(model.parameters())
                sentinel = torch.full_like(p0, 7.0)
                p0.grad = sentinel
                before = {k: v.clone() for k, v in model.state_dict().items()}
                r = analysis.sharpness(model, data[2:], rho=0.5)
                c = analysis.loss_landscape(model, data[2:], alphas=[-0.5, 0.5])
                assert r["sharpness"] != 0.0 and len(c["loss"]) == 2
                assert model.training and p0.grad is sentinel
                after = model.state_dict()
                assert all(torch.equal(before[k], after[k]) for k in before)
                p0.grad = None
        runs.append((model.state_dict(), opt.base_optimizer.state_dict()))
    (sd_a, os_a), (sd_b, os_b) = runs
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    for pid, st in os_a["state"].items():
        assert torch.equal(st["momentum_buffer"], os_b["state"][pid]["momentum_buffer"])


def test_analysis_of_a_qat_model_leaves_no_saq_state_behind():
    """A model trained without saq.SAQ keeps its quantizers' plain path: the analysis's own ascent
    must not leave the Case-3 capture on (every later forward would feed a probe and its
    backward accumulate a gradient nobody reads)."""
    model = _qmodel()
    qlayers = [m for m in model.modules() if isinstance(m, saq.nn.QConv2d) or isinstance(m, saq.nn.QLinear)]
    analysis.sharpness(model, _batches(1), rho=0.2)
    analysis.loss_landscape(model, _batches(1), alphas=[0.5])
    assert not any(m._saq_capture for m in qlayers)
    assert all(m._saq_probe is None and m._saq_e is None for m in qlayers)


def test_fresh_model_frozen_submodule_and_an_interrupt_leave_no_trace():
    """A model whose quantizers never saw a batch keeps its init pending (values and flags); a
    submodule frozen in eval mode inside a training model stays so; an exception between the
    ascent and the restore (here from the loss of the perturbed pass) still restores every
    value."""
    torch.manual_seed(0)
    fresh = saq.quantize_model(get_model("digits_cnn", 10), weight_bits=4, act_bits=4, quantizer="liq")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    analysis.sharpness(fresh, _batches(1), rho=0.2)
    analysis.loss_landscape(fresh, _batches(1), alphas=[0.5])
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert not any(m.quant_initialized for m in fresh.modules() if hasattr(m, "quant_initialized"))

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    model.train()
    model[2].eval()
    analysis.sharpness(model, _batches(1), rho=0.2)
    assert model.training and not model[2].training and model[1].training

    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) == 2:  # the perturbed pass
            raise KeyboardInterrupt
        return F.cross_entropy(out, y)

    with pytest.raises(KeyboardInterrupt):
        analysis.sharpness(model, _batches(1), rho=0.5, loss_fn=loss_fn)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not model[2].training


def test_landscape_origin_is_the_loss_and_directions_are_filter_normalized():
    model = _qmodel()
    data = _batches(2, seed=3)
    curve = analysis.loss_landscape(model, data, alphas=[-1.0, 0.0, 1.0], seed=5)
    with torch.no_grad():
        model.eval()
        plain = sum(float(F.cross_entropy(model(x), y)) * y.numel() for x, y in data) / 32
        model.train()
    assert curve["loss"][1] == pytest.approx(plain, rel=1e-6)
    assert curve["loss"][0] != curve["loss"][1] != curve["loss"][2]
    qlayers = [m for m in model.modules() if isinstance(m, saq.nn.QConv2d) or isinstance(m, saq.nn.QLinear)]
    dirs = analysis.landscape_directions(model, seed=5)
    assert len(dirs) == len(qlayers)
    for m, d in zip(qlayers, dirs):
        w = m.quantize_weight().detach()
        assert d.shape == w.shape
        torch.testing.assert_close(d.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1))
    # deterministic for a seed, different across seeds
    assert all(torch.equal(a, b) for a, b in zip(dirs, analysis.landscape_directions(model, seed=5)))
    assert not torch.equal(dirs[0], analysis.landscape_directions(model, seed=6)[0])
    again = analysis.loss_landscape(model, data, alphas=[-1.0, 0.0, 1.0], seed=5)
    assert again["loss"] == curve["loss"]


def test_landscape_of_a_float_model_moves_the_weights_and_restores_them():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _batches(1)
    curve = analysis.loss_landscape(model, data, alphas=[0.0, 0.5])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    d = analysis.landscape_directions(model)
    moved = {"1.weight": before["1.weight"] + 0.5 * d[0], "3.weight": before["3.weight"] + 0.5 * d[1]}
    with torch.no_grad():
        x, y = data[0]
        expect = float(F.cross_entropy(functional_call(model, moved, (x,)), y))
        plain = float(F.cross_entropy(model(x), y))
    assert curve["loss"][1] == pytest.approx(expect, rel=1e-6)
    assert curve["loss"][0] == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("call, msg", [
    (lambda m: analysis.sharpness(m, []), "no batches"),
    (lambda m: analysis.sharpness(m, _batches(1), max_batches=0), "max_batches=0"),
    (lambda m: analysis.sharpness(m, _batches(1), amp="fp16"), "amp='fp16'"),
    (lambda m: analysis.loss_landscape(m, _batches(1), alphas=[float("nan")]), "alphas must be finite"),
    (lambda m: analysis.loss_landscape(m, [], alphas=[0.0]), "no batches"),
])
def test_bad_arguments_name_the_problem(call, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        call(_mlp())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    assert main(["train", "--max-steps", "3", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    return out


def test_cli_analyze_json_text_and_plot(run, capsys):
    ck = str(run / "last.pt")
    capsys.readouterr()
    assert main(["analyze", "--checkpoint", ck, "--json", "--batches", "2", "--rho", "0.1",
                 "--landscape", "3", "--plot", str(run / "ls.png")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["batches"] == 2 and res["rho"] == 0.1 and res["split"] == "train"
    assert res["sharpness"] == pytest.approx(res["perturbed_loss"] - res["loss"])
    assert res["landscape"]["alpha"] == [-1.0, 0.0, 1.0]
    assert res["landscape"]["loss"][1] == pytest.approx(res["loss"], rel=1e-5)  # same batches
    assert (run / "ls.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["analyze", "--checkpoint", ck, "--split", "test", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "sharpness" in out and "digits test" in out


@pytest.mark.parametrize("argv, msg", [
    (["--landscape", "1"], "--landscape takes the number of points"),
    (["--batches", "0"], "--batches must be >= 1"),
    (["--rho", "-1"], "--rho must be >= 0"),
    (["--span", "0"], "--span must be a positive number"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--plot", "x.png"], "--plot draws the --landscape curve"),
    (["--landscape", "3", "--plot", "."], "is a folder; give a file name"),
])
def test_cli_analyze_bad_values_are_one_line_exit_2(run, argv, msg, capsys):
    assert main(["analyze", "--checkpoint", str(run / "last.pt"), *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
