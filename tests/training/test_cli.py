"""The saq command line, run in-process on the scikit-learn digits (CPU, a few steps)."""
import csv
import json
import os

import pytest

import saq
from saq.cli import main
from saq.train.config import PRESETS
from saq.train.loop import build_config
from saq.train.metrics import EPOCH_FIELDS

RUN_FILES = ("metrics.jsonl", "metrics.csv", "summary.json", "loss.png", "accuracy.png",
             "last.pt", "best.pt", "config.json")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One `saq train --max-steps 3 --epochs 1` run shared by the tests of this file."""
    out = tmp_path_factory.mktemp("run") / "smoke"
    rc = main(["train", "--max-steps", "3", "--epochs", "1", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    return out


def test_train_writes_run_files(smoke_run, capsys):
    for name in RUN_FILES:
        assert (smoke_run / name).is_file(), name
    rows = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert set(EPOCH_FIELDS) <= set(row)
    assert row["epoch"] == 1 and row["steps"] == 3 and row["skipped_steps"] == 0
    assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
    with open(smoke_run / "metrics.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0]) == list(EPOCH_FIELDS) and len(csv_rows) == 1
    assert float(csv_rows[0]["top1"]) == pytest.approx(row["top1"])
    summary = json.loads((smoke_run / "summary.json").read_text())
    for key in ("best_top1", "best_top5", "final_top1", "final_top5", "final_test_loss",
                "time_per_step", "images_per_s", "total_time"):
        assert key in summary, key
    assert summary["final_top1"] == pytest.approx(row["top1"])
    assert summary["method"] == "saq" and summary["wbits"] == 4 and summary["steps"] == 3
    for png in ("loss.png", "accuracy.png"):
        assert (smoke_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(smoke_run) if "tmp" in f]


def test_eval_reproduces_the_final_test_accuracy(smoke_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(smoke_run / "last.pt"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert res["top1"] == pytest.approx(summary["final_top1"])
    assert res["test_loss"] == pytest.approx(summary["final_test_loss"], rel=1e-5)
    assert res["samples"] == 360 and res["global_step"] == 3
    assert main(["eval", "--checkpoint", str(smoke_run / "best.pt")]) == 0
    assert "top-1" in capsys.readouterr().out


def test_presets_listing(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("cifar100-resnet20-w4a4", "cifar100-resnet20-w3a3", "imagenet-resnet18-w4a4"):
        assert name in out
    assert "--rho 0.4" in out and "--milestones 80,120" in out


def test_preset_values_and_explicit_override(tmp_path):
    cfg = build_config({"preset": "cifar100-resnet20-w4a4", "out": str(tmp_path)})
    assert (cfg.dataset, cfg.model, cfg.rho, cfg.lr, cfg.clip_lr) == \
        ("cifar100", "preact_resnet20", 0.4, 0.01, 0.01)
    assert (cfg.batch_size, cfg.epochs, cfg.scheduler, cfg.milestones) == \
        (128, 200, "step", (80, 120))
    cfg = build_config({"preset": "cifar100-resnet20-w3a3", "lr": 0.05, "rho": 0.2,
                        "out": str(tmp_path)})
    assert (cfg.wbits, cfg.abits, cfg.lr, cfg.rho, cfg.clip_lr) == (3, 3, 0.05, 0.2, 0.01)
    cfg = build_config({"preset": "imagenet-resnet18-w4a4", "out": str(tmp_path)})
    assert (cfg.dataset, cfg.model, cfg.rho, cfg.batch_size, cfg.scheduler) == \
        ("imagefolder", "resnet18", 0.3, 512, "cosine")
    assert set(PRESETS) == {"cifar100-resnet20-w4a4", "cifar100-resnet20-w3a3",
                            "imagenet-resnet18-w4a4"}


@pytest.mark.parametrize("argv,msg", [
    (["train", "--per-channel"], "--per-channel needs --quantizer lsq or lsq+"),
    (["train", "--momentum", "-1"], "--momentum must be finite and >= 0"),
    (["train", "--weight-decay", "-0.1"], "--weight-decay must be finite and >= 0"),
    (["train", "--lr", "inf"], "--lr and --clip-lr must be finite and > 0"),
    (["train", "--lr", "nan"], "--lr and --clip-lr must be finite and > 0"),
    (["train", "--rho", "inf"], "--rho must be finite"),
    (["train", "--scheduler", "step", "--gamma", "-1"], "--gamma (step decay factor) must be finite and > 0"),
    (["train", "--adaptive", "--eta", "-1"], "--eta must be finite and >= 0"),
    (["train", "--workers", "-1"], "--workers must be >= 0"),
    (["eval", "--checkpoint", "x.pt", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["eval", "--checkpoint", "x.pt", "--device", "gpu"], "--device must be auto, cpu, cuda"),
])
def test_bad_values_are_one_line_exit_2(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["train", "--out", str(f)]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_step_schedule_never_decays_at_epoch_0(tmp_path):
    def ms(epochs):
        return build_config({"scheduler": "step", "epochs": epochs, "out": str(tmp_path)}).milestones

    assert ms(1) == () and ms(2) == (1, 1) and ms(5) == (2, 3) and ms(200) == (80, 120)


def test_vit_is_built_for_the_data(tmp_path):
    from saq.train.loop import build_model

    cfg = build_config({"model": "vit_tiny", "out": str(tmp_path)})
    m = build_model(cfg, 10, 1, 8)  # digits: 1 x 8 x 8
    assert m.patch_embed.img_size == 8 and m.patch_embed.num_patches == 4
    assert all(layer.signed_activations for _, layer in saq.quantized_layers(m))


def test_default_out_folder_name():
    cfg = build_config({})
    assert os.path.basename(cfg.out).startswith("digits-digits_cnn-saq-w4a4-")
    assert cfg.out.startswith("runs" + os.sep) or cfg.out.startswith("runs/")


def test_unknown_model_is_a_usage_error(capsys):
    assert main(["train", "--model", "no_such_net"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["train", "--method", "adam"]) == 2
    assert main(["frobnicate"]) == 2


def test_missing_cifar_folder_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["train", "--dataset", "cifar100", "--data-root", str(tmp_path / "nowhere"),
               "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saq train: error:") and "cifar-100-python" in err
    assert "\n" not in err and "Traceback" not in err


def test_resume_auto_needs_out(capsys):
    assert main(["train", "--resume", "auto"]) == 2
    assert "--out" in capsys.readouterr().err


def test_resume_refuses_structural_change(smoke_run, capsys):
    rc = main(["train", "--resume", str(smoke_run / "last.pt"), "--wbits", "3",
               "--out", str(smoke_run.parent / "other")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "wbits=4" in err and "wbits=3" in err


def test_fresh_run_into_a_used_out_needs_resume_or_overwrite(smoke_run, capsys):
    before = (smoke_run / "last.pt").read_bytes()
    assert main(["train", "--out", str(smoke_run), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saq train: error: --out") and "--resume auto" in err and "--overwrite" in err
    assert (smoke_run / "last.pt").read_bytes() == before  # nothing touched
    cfg = build_config({"out": str(smoke_run), "overwrite": True})
    assert cfg.out == str(smoke_run) and cfg.resume is None
    # --overwrite is a per-invocation option: a later --resume does not inherit it
    assert build_config({"out": str(smoke_run), "resume": "auto", "overwrite": True}).resume


def test_eval_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert "is a folder; name a file in it" in capsys.readouterr().err


def test_checkpoints_get_the_umask_permissions(smoke_run):
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for name in ("last.pt", "best.pt"):  # mkstemp's 0600 would lock other users out of last.pt
        assert stat.S_IMODE(os.stat(smoke_run / name).st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_damaged_cifar_file_is_one_line_exit_2(tmp_path, capsys, damage):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    payload = pickle.dumps({"data": [1, 2, 3]}) if damage == "truncated" else pickle.dumps(print)
    for f in files:
        (folder / f).write_bytes(payload[: len(payload) // 2] if damage == "truncated" else payload)
    rc = main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path),
               "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and "\n" not in err, err
    assert err.startswith("saq train: error: saq.data cifar: cannot read") and "data_batch_1" in err


def test_errors_under_torchrun_print_once_per_node(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["train", "--lr", "-1"]) == 2
    assert capsys.readouterr().err == ""  # the node's local rank 0 says it
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", "--lr", "-1"]) == 2
    assert "--lr and --clip-lr" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["--method", "qat"],
    ["--method", "qat", "--wbits", "32", "--abits", "32"],
    ["--method", "sam"],
    ["--method", "saq", "--case", "1", "--adaptive"],
    ["--method", "saq", "--ascent-every", "2", "--optimizer", "adamw", "--scheduler", "step"],
    ["--quantizer", "lsq", "--per-channel", "--amp", "bf16"],
    ["--quantizer", "lsq+"],
    ["--model", "vit_tiny"],
], ids=["qat", "float", "sam", "case1-adaptive", "efficient-adamw", "lsq-bf16", "lsqplus", "vit"])
def test_train_variants(tmp_path, extra):
    out = tmp_path / "run"
    assert main(["train", "--max-steps", "2", "--epochs", "1", "--batch-size", "256",
                 "--out", str(out), "--no-progress", *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(tmp_path):
    """torchrun --nproc_per_node 2 on CPU: gloo, DDP, rank-0-only files."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "saq", "train", "--max-steps", "3", "--epochs", "1", "--batch-size", "128",
           "--out", str(out), "--no-progress", "--log-every", "0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("saq train: digits") == 1  # rank 0 prints, rank 1 does not
    assert "x 2 ranks" in r.stdout
    for name in ("metrics.jsonl", "summary.json", "last.pt"):
        assert (out / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3


def test_pretrained_loads_into_the_float_model_before_quantization(tmp_path):
    import torch

    from saq.models import get_model
    from saq.train.checkpoint import CheckpointError
    from saq.train.loop import build_model

    torch.manual_seed(1)
    fp = get_model("digits_cnn", 10)
    path = tmp_path / "fp.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in fp.state_dict().items()}}, path)
    cfg = build_config({"pretrained": str(path), "out": str(tmp_path / "run")})
    model = build_model(cfg, num_classes=10, in_chans=1)
    assert type(model.conv2).__name__ == "QConv2d"
    assert torch.equal(model.conv2.weight, fp.conv2.weight)
    assert torch.equal(model.fc.bias, fp.fc.bias)
    torch.save(get_model("digits_cnn", 10, width=8).state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        build_model(cfg, num_classes=10, in_chans=1)
