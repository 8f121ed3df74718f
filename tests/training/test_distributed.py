"""DDP with 2 processes on gloo (CPU): the reference's unsynchronized ascent keeps replicas
bit-identical; the synchronized ascent equals one process on the concatenated batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import saq

pytestmark = [
    pytest.mark.slow,  # two spawned processes: ~15 s
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"),
]

STEPS, B = 3, 6


def _model(bn: bool):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 6, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)]
    m = saq.quantize_model(nn.Sequential(*layers), 4, 4)
    for layer in (l for _, l in saq.quantized_layers(m)):
        with torch.no_grad():  # fixed clips: first-batch init would differ between replicas
            layer.weight_clip_value.fill_(1.0 if isinstance(layer, nn.Conv2d) else 0.5)
            layer.activation_clip_value.fill_(2.0)
        layer.quant_initialized = True
    return m


def _data():
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(2 * B, 1, 6, 6, generator=g), torch.randint(0, 4, (2 * B,), generator=g)) for _ in range(STEPS)]


def _train(model, opt, data, ddp=None, rank=None):
    fwd = ddp or model
    for x, y in data:
        if rank is not None:
            x, y = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
        opt.zero_grad()
        if ddp is not None and not opt.sync_ascent:
            with ddp.no_sync():  # the reference: no all-reduce in the ascent pass
                F.cross_entropy(fwd(x), y).backward()
        else:
            F.cross_entropy(fwd(x), y).backward()
        opt.ascent_step()
        F.cross_entropy(fwd(x), y).backward()
        opt.descent_step()


def _worker(rank, port, sync, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _model(bn=not sync)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = saq.SAQ(ddp, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.3, sync_ascent=sync)
    _train(model, opt, _data(), ddp, rank)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears gloo down while its peer still uses it (else a SIGABRT)
    dist.destroy_process_group()


def _loop_worker(rank, port, out):
    """One step of the training loop's own stepper: the ascent must see local gradients."""
    import types

    from saq.train.loop import _Stepper

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    x, y = _data()[0]
    x, y = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
    local = _model(bn=True)
    F.cross_entropy(local(x), y).backward()
    model = _model(bn=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = saq.SAQ(ddp, base, rho=0.3)
    seen = {}
    ascent = opt.ascent_step

    def spy(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return ascent(*args, **kwargs)

    opt.ascent_step = spy
    cfg = types.SimpleNamespace(method="saq", amp="none", sync_ascent=False)
    _Stepper(cfg, ddp, ddp, opt, base, None, torch.device("cpu")).step(x, y)
    torch.save({"seen": seen, "local": {n: p.grad for n, p in local.named_parameters() if p.grad is not None}},
               os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _run(tmp_path, sync, worker=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if worker is None:
        mp.spawn(_worker, args=(port, sync, str(tmp_path)), nprocs=2, join=True)
    else:
        mp.spawn(worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_training_loop_ascent_uses_local_gradients(tmp_path):
    # DDP arms the all-reduce at forward time: the loop's pass-1 forward must be inside no_sync()
    for r in _run(tmp_path, sync=False, worker=_loop_worker):
        assert set(r["seen"]) == set(r["local"])
        for n, g in r["seen"].items():
            assert torch.equal(g, r["local"][n]), n


def test_default_ascent_keeps_replicas_identical(tmp_path):
    r0, r1 = _run(tmp_path, sync=False)
    start = _model(bn=True).state_dict()
    assert not torch.equal(r0["3.weight"], start["3.weight"])
    params = [k for k in r0 if "running" not in k]
    for k in params:
        assert torch.equal(r0[k], r1[k]), k
    # BatchNorm running statistics come from each replica's last local forward; DDP broadcasts
    # rank 0's at the start of every forward, as it does without SAQ.
    assert not torch.equal(r0["1.running_mean"], r1["1.running_mean"])


def test_synchronized_ascent_equals_single_process(tmp_path):
    r0, r1 = _run(tmp_path, sync=True)
    single = _model(bn=False)
    opt = saq.SAQ(single, torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9), rho=0.3)
    _train(single, opt, _data())
    for k, v in single.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _cli_worker(rank, port, out, argv):
    from saq.cli import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    rc = main(argv)
    with open(os.path.join(out, f"rc{rank}"), "w") as f:
        f.write(str(rc))


def test_an_unwritable_out_stops_every_rank(tmp_path):
    """Under torchrun a --out rank 0 cannot write ends every rank with exit code 2 (the other
    ranks used to go on and wait for rank 0 at the model broadcast)."""
    import time

    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["train", "--out", str(blocker / "run"), "--batch-size", "512", "--no-progress",
            "--log-every", "0", "--max-steps", "1", "--device", "cpu"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_cli_worker, args=(port, str(tmp_path), argv), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("a rank did not finish: it waits for rank 0")
    assert [(tmp_path / f"rc{r}").read_text() for r in range(2)] == ["2", "2"]
