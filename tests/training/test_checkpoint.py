"""Atomic checkpoint writes, exact resume and clear errors for bad checkpoints (CPU, digits)."""
import json
import os
import random

import numpy as np
import pytest
import torch

from saq.cli import main
from saq.train.checkpoint import (FORMAT_VERSION, CheckpointError, atomic_save,
                                  capture_rng_state, load_checkpoint, restore_rng_state)
from saq.train.loop import evaluate_checkpoint

# batch 512 -> 3 steps per digits epoch (1437 training images)
TINY = ["--batch-size", "512", "--no-progress", "--log-every", "0"]
STEPS_PER_EPOCH = 3


def _train(out, *extra):
    assert main(["train", "--out", str(out), *TINY, *extra]) == 0
    return load_checkpoint(os.path.join(out, "last.pt"))


def _assert_bitwise_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k}"
        elif isinstance(a[k], dict):
            _assert_bitwise_equal(a[k], b[k], f"{what}.{k}")
        else:
            assert a[k] == b[k], f"{what}: {k}"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "run"
    _train(out, "--max-steps", "2", "--epochs", "1")
    return os.path.join(out, "last.pt")


def test_atomic_save_leaves_no_temp_files(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"a": torch.arange(3)}, path)
    atomic_save({"a": torch.arange(4)}, path)
    assert os.listdir(tmp_path) == ["x.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(4))


def test_failing_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        atomic_save({"a": torch.zeros(2), "bad": lambda: None}, path)  # lambdas do not pickle
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.pt"]


def test_rng_state_roundtrip():
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_checkpoint_contents(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt)
    assert ck["format"] == "saq-checkpoint" and ck["format_version"] == FORMAT_VERSION
    assert ck["epoch"] == 0 and ck["batch"] == 2 and ck["global_step"] == 2
    assert set(ck["optimizer"]) == {"base", "saq"}  # SAQ's state incl. the base optimizer's
    assert ck["scheduler"]["last_epoch"] == 2
    assert {"python", "numpy", "torch", "cuda"} <= set(ck["rng"])
    assert ck["config"]["method"] == "saq" and "saq_version" in ck
    assert any(k.endswith("activation_clip_value") for k in ck["model"])


@pytest.mark.slow
def test_resume_is_bitwise_exact(tmp_path):
    """2 epochs straight == 1 epoch + 1 batch, resume, rest; and == 1 epoch, resume, 1."""
    common = ["--epochs", "2", "--method", "saq"]
    straight = _train(tmp_path / "straight", *common)
    # cut mid-epoch (epoch 2, batch 1) and at the epoch boundary
    for name, cut in (("mid", STEPS_PER_EPOCH + 1), ("edge", STEPS_PER_EPOCH)):
        out = tmp_path / name
        part = _train(out, *common, "--max-steps", str(cut))
        assert part["global_step"] == cut
        resumed = _train(out, *common, "--resume", "auto")
        assert resumed["global_step"] == straight["global_step"] == 2 * STEPS_PER_EPOCH
        _assert_bitwise_equal(straight["model"], resumed["model"], "model")
        _assert_bitwise_equal(straight["optimizer"]["base"]["state"],
                              resumed["optimizer"]["base"]["state"], "optimizer")
        assert straight["optimizer"]["saq"] == resumed["optimizer"]["saq"]
        assert straight["scheduler"] == resumed["scheduler"]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]  # the cut epoch's partial row was replaced
        straight_rows = [json.loads(x) for x in
                         (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["top1"] == straight_rows[-1]["top1"]
        assert rows[-1]["test_loss"] == straight_rows[-1]["test_loss"]


def test_resume_exact_smoke(tmp_path):
    """Fast version: 3 steps straight vs 1 + resume + 2 (inside the first epoch)."""
    common = ["--epochs", "1"]
    straight = _train(tmp_path / "a", *common, "--max-steps", "3")
    _train(tmp_path / "b", *common, "--max-steps", "1")
    resumed = _train(tmp_path / "b", *common, "--max-steps", "3", "--resume", "auto")
    _assert_bitwise_equal(straight["model"], resumed["model"], "model")
    _assert_bitwise_equal(straight["optimizer"]["base"]["state"],
                          resumed["optimizer"]["base"]["state"], "optimizer")
    # the resumed epoch's row covers the whole epoch, as the uninterrupted run's does
    (ra,), (rb,) = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                    for d in ("a", "b"))
    assert ra["steps"] == rb["steps"] == 3 and ra["skipped_steps"] == rb["skipped_steps"]
    for k in ("train_loss", "train_acc", "top1", "test_loss"):
        assert rb[k] == pytest.approx(ra[k], rel=1e-12, abs=1e-12), k
    assert rb["images_per_s"] == pytest.approx(1437 / rb["time_per_step"] / 3, rel=1e-6)


def test_resume_exact_in_the_efficient_mode(tmp_path):
    """--ascent-every 2: the step after the cut re-applies the saved perturbation (a resumed run
    used to start with a fresh ascent there)."""
    common = ["--epochs", "1", "--ascent-every", "2"]
    straight = _train(tmp_path / "a", *common, "--max-steps", "3")
    cut = _train(tmp_path / "b", *common, "--max-steps", "1")
    assert cut["optimizer"]["saq"]["last"] is not None
    resumed = _train(tmp_path / "b", *common, "--max-steps", "3", "--resume", "auto")
    _assert_bitwise_equal(straight["model"], resumed["model"], "model")
    _assert_bitwise_equal(straight["optimizer"]["base"]["state"],
                          resumed["optimizer"]["base"]["state"], "optimizer")


def test_resume_refuses_what_would_change_the_data(tiny_ckpt):
    from saq.train.config import ConfigError
    from saq.train.loop import build_config

    # tiny_ckpt stopped mid-epoch (step 2 of 3): its position counts batches of 512
    with pytest.raises(ConfigError, match="batch_size=512.*batch_size=64"):
        build_config({"resume": tiny_ckpt, "batch_size": 64})
    # the seed picks the digits train/test split: another one would train on test images
    with pytest.raises(ConfigError, match="seed=0.*seed=1"):
        build_config({"resume": tiny_ckpt, "seed": 1})
    assert build_config({"resume": tiny_ckpt, "batch_size": 512, "seed": 0}).resume == tiny_ckpt


def test_resume_applies_changed_hyperparameters(tmp_path):
    """--resume with new lr / momentum / weight decay / clip lr / rho / adaptive / ascent_every:
    the run continues with them (the loaded optimizer, scheduler and SAQ state carried the old
    ones and used to win silently), and the schedule continues at the loaded step."""
    common = ["--epochs", "2"]
    _train(tmp_path / "r", *common, "--max-steps", "2")
    new = ["--lr", "0.2", "--momentum", "0.5", "--weight-decay", "0.01", "--clip-lr", "0.003",
           "--rho", "0.3", "--adaptive", "--ascent-every", "2"]
    ck = _train(tmp_path / "r", *common, *new, "--max-steps", "4", "--resume", "auto")
    saq_state, groups = ck["optimizer"]["saq"], ck["optimizer"]["base"]["param_groups"]
    assert (saq_state["rho"], saq_state["adaptive"], saq_state["ascent_every"]) == (0.3, True, 2)
    assert [g["initial_lr"] for g in groups] == [0.2, 0.003]
    assert all(g["momentum"] == 0.5 for g in groups)
    assert groups[0]["weight_decay"] == 0.01
    # cosine over 2 epochs of 3 steps, at the saved step 4
    import math
    assert groups[0]["lr"] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 4 / 6)), rel=1e-12)
    assert ck["config"]["lr"] == 0.2 and ck["config"]["rho"] == 0.3


def test_garbage_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match=str(bad).replace("\\", "\\\\")):
        load_checkpoint(bad)
    # torch's advice to retry with weights_only=False (unsafe, and useless here) is not passed on
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert "weights_only" not in str(info.value) and not str(info.value).endswith(":")


def test_truncated_checkpoint_is_a_clear_error(tiny_ckpt, tmp_path):
    data = open(tiny_ckpt, "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(cut)


def test_not_a_saq_checkpoint(tmp_path):
    p = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(2)}, p)
    with pytest.raises(CheckpointError, match="not a saq checkpoint"):
        load_checkpoint(p)


def test_other_format_version(tiny_ckpt, tmp_path):
    ck = torch.load(tiny_ckpt, weights_only=True)
    ck["format_version"] = FORMAT_VERSION + 1
    p = tmp_path / "future.pt"
    torch.save(ck, p)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(p)
    del ck["model"]
    ck["format_version"] = FORMAT_VERSION
    torch.save(ck, p)
    with pytest.raises(CheckpointError, match="lacks key"):
        load_checkpoint(p)


def test_checkpoint_from_before_the_init_flag_loads(tiny_ckpt, tmp_path):
    # saq checkpoints written before state dicts carried "<layer>.quant_initialized"
    ck = torch.load(tiny_ckpt, weights_only=True)
    flags = [k for k in ck["model"] if k.endswith(".quant_initialized")]
    assert flags and all(bool(ck["model"][k]) for k in flags)
    for k in flags:
        del ck["model"][k]
    p = tmp_path / "old.pt"
    torch.save(ck, p)
    assert evaluate_checkpoint(str(p))["top1"] == evaluate_checkpoint(tiny_ckpt)["top1"]


def test_incompatible_checkpoint(tiny_ckpt, tmp_path, capsys):
    ck = torch.load(tiny_ckpt, weights_only=True)
    ck["config"]["quantizer"] = "lsq"  # the weights are LIQ: clip_value keys, no scales
    p = tmp_path / "lsq.pt"
    torch.save(ck, p)
    with pytest.raises(CheckpointError, match="missing keys.*unexpected keys"):
        evaluate_checkpoint(str(p))
    ck["config"]["quantizer"] = "liq"
    ck["model"]["fc.weight"] = torch.zeros(7, 3)
    torch.save(ck, p)
    with pytest.raises(CheckpointError, match="shape mismatch: fc.weight"):
        evaluate_checkpoint(str(p))
    assert main(["eval", "--checkpoint", str(p)]) == 2
    err = capsys.readouterr().err
    assert "lsq.pt" in err and "shape mismatch" in err and "Traceback" not in err
    # a config of other bits: same shapes, told apart by the layers' bits entries
    ck = torch.load(tiny_ckpt, weights_only=True)
    wbits = ck["config"]["wbits"]
    ck["config"]["wbits"] = 3 if wbits != 3 else 5
    torch.save(ck, p)
    with pytest.raises(CheckpointError, match=rf"bits \[weights, activations\] mismatch: \w+: "
                                              rf"checkpoint \[{wbits}, \d+\] vs model \[{ck['config']['wbits']}, "):
        evaluate_checkpoint(str(p))
    assert main(["eval", "--checkpoint", str(p)]) == 2
    err = capsys.readouterr().err
    assert "bits [weights, activations] mismatch" in err and "Traceback" not in err


def test_atomic_save_on_a_file_system_without_modes(tmp_path, monkeypatch):
    def refuse(fd, mode):
        raise PermissionError("Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refuse)
    path = tmp_path / "x.pt"
    atomic_save({"a": torch.arange(3)}, path)
    assert os.listdir(tmp_path) == ["x.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))


# ----------------------------------------------------------------------------------------------
# what a stop mid-epoch, a changed batch size and another run's folder do to a resume
# ----------------------------------------------------------------------------------------------
def test_a_mid_epoch_stop_does_not_compete_for_best(tmp_path):
    """Only whole epochs update best / best.pt; before the first one, best.pt is the stopped
    run's checkpoint, provisionally, and the checkpoint's best stays empty."""
    first = _train(tmp_path / "a", "--epochs", "1", "--max-steps", "1")
    assert first["best"] == {}
    assert load_checkpoint(os.path.join(tmp_path / "a", "best.pt"))["global_step"] == 1
    common = ["--epochs", "2", "--method", "qat"]
    part = _train(tmp_path / "b", *common, "--max-steps", str(STEPS_PER_EPOCH + 1))
    assert part["best"]["epoch"] == 1
    assert load_checkpoint(os.path.join(tmp_path / "b", "best.pt"))["global_step"] == STEPS_PER_EPOCH
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["best_epoch"] == 1 and summary["last_epoch_partial"] is True
    assert summary["epochs"] == 2  # the partial row is shown (and replaced on resume)
    resumed = _train(tmp_path / "b", *common, "--resume", "auto")
    straight = _train(tmp_path / "c", *common)
    assert resumed["best"] == straight["best"]
    _assert_bitwise_equal(load_checkpoint(os.path.join(tmp_path / "b", "best.pt"))["model"],
                          load_checkpoint(os.path.join(tmp_path / "c", "best.pt"))["model"], "best")
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert "last_epoch_partial" not in summary


def test_a_batch_size_changed_at_an_epoch_boundary_keeps_the_schedule_in_place(tmp_path):
    """The schedule is per step: after a resume at an epoch boundary with another batch size it
    continues from epoch 1's end in the new steps (cosine to 0 at the last step)."""
    out = tmp_path / "bs"
    _train(out, "--epochs", "2", "--method", "qat", "--max-steps", str(STEPS_PER_EPOCH))
    resumed = _train(out, "--epochs", "2", "--resume", "auto", "--batch-size", "256")
    spe = 6  # 1437 images in batches of 256
    assert resumed["scheduler"]["last_epoch"] == 2 * spe
    groups = resumed["optimizer"]["param_groups"]  # qat: the base optimizer's own state
    assert groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_resume_into_another_runs_folder_needs_overwrite(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a, "--epochs", "1", "--max-steps", "1")
    _train(b, "--epochs", "2", "--max-steps", str(STEPS_PER_EPOCH + 1), "--method", "qat")
    before = (b / "last.pt").read_bytes()
    rows_before = (b / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(a / "last.pt"), "--out", str(b), *TINY]) == 2
    err = capsys.readouterr().err
    assert "holds another checkpoint" in err and "--overwrite" in err
    assert (b / "last.pt").read_bytes() == before and (b / "metrics.jsonl").read_text() == rows_before
    # resuming a best.pt in its own folder would replace a newer last.pt the same way
    assert main(["train", "--resume", str(b / "best.pt"), *TINY]) == 2
    assert "holds another checkpoint" in capsys.readouterr().err
    assert (b / "last.pt").read_bytes() == before
    # with --overwrite the folder becomes the resumed run's: none of b's files or rows remain
    assert main(["train", "--resume", str(a / "last.pt"), "--out", str(b), "--overwrite",
                 "--max-steps", "2", *TINY]) == 0
    ck = load_checkpoint(b / "last.pt")
    assert ck["config"]["method"] == "saq" and ck["global_step"] == 2
    assert load_checkpoint(b / "best.pt")["config"]["method"] == "saq"
    rows = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["steps"] == 2  # a's epoch 1 so far


def test_an_interrupted_overwrite_leaves_nothing_of_the_old_run(tmp_path, monkeypatch):
    """--overwrite clears the old run's checkpoints and summary at the start, so an interrupt
    before the first save cannot leave them for --resume auto to continue."""
    import saq.train.loop as loop

    out = tmp_path / "run"
    _train(out, "--epochs", "1", "--max-steps", "1")

    def interrupted(self, x, y):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop._Stepper, "step", interrupted)
    assert main(["train", "--out", str(out), "--overwrite", "--method", "qat", *TINY]) == 130
    for name in ("last.pt", "best.pt", "summary.json", "metrics.jsonl", "loss.png"):
        assert not (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["method"] == "qat"


def test_an_unwritable_out_is_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "--out", str(blocker / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saq train: error: --out") and "cannot create or write the run folder" in err


def test_negative_log_every_is_refused(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--log-every", "-1", *TINY[:2]]) == 2
    assert "--log-every must be >= 0" in capsys.readouterr().err


def test_resume_refuses_a_preset(tiny_ckpt, capsys):
    """A preset sets a run's options when it starts; on a resume it would be ignored."""
    from saq.train.config import PRESETS

    out = os.path.dirname(tiny_ckpt)
    ck = load_checkpoint(tiny_ckpt)
    assert ck["epoch"] == 0 and ck["batch"] == 2
    capsys.readouterr()
    preset = sorted(PRESETS)[0]
    assert main(["train", "--resume", tiny_ckpt, "--preset", preset, *TINY]) == 2
    assert "a preset applies when a run starts" in capsys.readouterr().err
    assert load_checkpoint(os.path.join(out, "last.pt"))["global_step"] == ck["global_step"]


def test_resume_below_the_checkpoints_epoch_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    _train(out, "--epochs", "2", "--max-steps", str(STEPS_PER_EPOCH + 1))  # inside epoch 2
    capsys.readouterr()
    assert main(["train", "--resume", "auto", "--out", str(out), "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--epochs 1" in err and "at epoch 2, batch 1" in err and "--epochs 2 or more" in err


@pytest.mark.parametrize("damage", ["rng", "scheduler"])
def test_a_checkpoint_with_damaged_state_is_one_line(tiny_ckpt, tmp_path, capsys, damage):
    ck = load_checkpoint(tiny_ckpt)
    if damage == "rng":
        ck["rng"] = {"python": ck["rng"]["python"]}  # numpy and torch states gone
    else:
        del ck["scheduler"]
    bad = tmp_path / "bad.pt"
    torch.save(ck, bad)
    capsys.readouterr()
    assert main(["train", "--resume", str(bad), "--out", str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saq train: error: checkpoint") and "bad.pt" in err
    assert ("RNG state is damaged" if damage == "rng" else "no scheduler state") in err


def test_resume_through_a_link_or_an_identical_copy_keeps_the_run(tmp_path):
    """A symlink (or hard link) to the run's last.pt, or a best.pt identical to it, is the same
    run: resumed without --overwrite, its best.pt and earlier rows kept."""
    out = tmp_path / "run"
    common = ["--epochs", "3", "--method", "qat"]
    _train(out, *common, "--max-steps", str(2 * STEPS_PER_EPOCH))
    best_before = (out / "best.pt").read_bytes()
    link = tmp_path / "latest.pt"
    link.symlink_to(out / "last.pt")
    assert main(["train", "--resume", str(link), "--out", str(out), *TINY, *common,
                 "--max-steps", str(2 * STEPS_PER_EPOCH + 1)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert (out / "best.pt").is_file()
    # the best epoch so far is 1 or 2, whose best.pt the partial epoch 3 did not replace
    assert (out / "best.pt").read_bytes() == best_before
    # a copy identical to last.pt (best.pt when the last epoch was the best) resumes too
    copy = tmp_path / "copy.pt"
    copy.write_bytes((out / "last.pt").read_bytes())
    assert main(["train", "--resume", str(copy), "--out", str(out), *TINY, *common,
                 "--max-steps", str(2 * STEPS_PER_EPOCH + 2)]) == 0
    assert load_checkpoint(out / "last.pt")["global_step"] == 2 * STEPS_PER_EPOCH + 2
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_resume_with_nothing_to_run_keeps_the_partial_row(tmp_path):
    out = tmp_path / "run"
    _train(out, "--epochs", "2", "--max-steps", str(STEPS_PER_EPOCH + 1))
    assert main(["train", "--resume", "auto", "--out", str(out), *TINY,
                 "--max-steps", str(STEPS_PER_EPOCH + 1)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["last_epoch_partial"] is True


def test_an_existing_but_unwritable_out_is_one_line(tmp_path, capsys, monkeypatch):
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    (tmp_path / "ro").mkdir()
    assert main(["train", "--out", str(tmp_path / "ro"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "Permission denied" in err
