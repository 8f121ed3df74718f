"""use_backend across threads: PyTorch runs the backward pass of CUDA tensors on its own
per-device thread, not the thread that called ``loss.backward()``; a block must reach it (else the
backward ops fall back to the default order: a Triton forward with a CUDA backward). On the
CPU the engine stays on the calling thread, so these tests run the backward from a second thread
while the block is open, which is what the GPU does."""
from __future__ import annotations

import threading

import pytest
import torch

import saq_kernels as sk
from saq_kernels.backends import _explicit, get_backend


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller)
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class _Probe(torch.autograd.Function):
    """Records the backend choice seen inside its backward pass."""
    seen = []

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        _Probe.seen.append(_explicit())
        return g * 2


def _backward_choice():
    _Probe.seen.clear()
    _Probe.apply(torch.ones(2, requires_grad=True)).sum().backward()
    return _Probe.seen[0]


def test_a_backward_pass_without_blocks_follows_the_open_block(monkeypatch):
    monkeypatch.delenv("SAQ_BACKEND", raising=False)
    assert _in_thread(_backward_choice) is None
    with sk.use_backend("reference"):
        assert _in_thread(_backward_choice) == "reference"
        with sk.use_backend("cpp"):
            assert _in_thread(_backward_choice) == "cpp"
        assert _in_thread(_backward_choice) == "reference"
    assert _in_thread(_backward_choice) is None
    monkeypatch.setenv("SAQ_BACKEND", "reference")
    assert _in_thread(_backward_choice) == "reference"


def test_other_threads_keep_their_own_choice(monkeypatch):
    # outside a backward pass, a thread without a block does not follow another thread's block
    # (an evaluation thread must not switch, or be refused, because training opened one)
    monkeypatch.delenv("SAQ_BACKEND", raising=False)
    with sk.use_backend("cpp"):
        assert _in_thread(_explicit) is None
        x = torch.randn(3, 4, dtype=torch.float64)  # cpp refuses float64: a leak would raise
        y = _in_thread(lambda: sk.fake_quantize(x, torch.tensor([0.1], dtype=torch.float64),
                                                torch.zeros(1, dtype=torch.float64), -8, 7))
        assert y.dtype == torch.float64


def test_a_thread_keeps_its_own_block(monkeypatch):
    monkeypatch.delenv("SAQ_BACKEND", raising=False)
    entered, leave = threading.Event(), threading.Event()
    seen = {}

    def other():
        with sk.use_backend("cpp"):
            entered.set()
            leave.wait(30)
            seen["other"] = _explicit()

    t = threading.Thread(target=other)
    with sk.use_backend("reference"):
        t.start()
        assert entered.wait(30)
        # the main thread's own block wins over the one opened later in another thread
        assert _explicit() == "reference"
        leave.set()
        t.join()
    assert seen["other"] == "cpp"
    assert _explicit() is None  # both blocks closed, in either order


@pytest.mark.parametrize("op", ["fake_quantize", "liq_quantize"])
def test_backward_on_another_thread_runs_on_the_blocks_backend(op, monkeypatch):
    monkeypatch.delenv("SAQ_BACKEND", raising=False)
    ref = get_backend("reference").table()
    calls = []
    name = op + "_backward"
    real = ref[name]

    def spy(*args):
        calls.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setitem(ref, name, spy)
    torch.manual_seed(0)
    x = torch.randn(4, 9, requires_grad=True)
    if op == "fake_quantize":
        scale = torch.tensor([0.1], requires_grad=True)
        zp = torch.tensor([0.0], requires_grad=True)
        leaves = (x, scale, zp)

        def fwd():
            return sk.fake_quantize(x, scale, zp, -8, 7)
    else:
        clip = torch.tensor([1.5], requires_grad=True)
        leaves = (x, clip)

        def fwd():
            return sk.liq_quantize(x, clip, 4, True, False)

    with sk.use_backend("reference"):
        y = fwd()
        grads = _in_thread(lambda: torch.autograd.grad(y.square().sum(), leaves))
    assert len(calls) == 1 and calls[0] != threading.main_thread().name
    # and the gradients are the reference's, computed on this thread
    calls.clear()
    with sk.use_backend("reference"):
        expect = torch.autograd.grad(fwd().square().sum(), leaves)
    assert calls == [threading.main_thread().name]
    for a, b in zip(grads, expect):
        assert torch.equal(a, b)
