"""The training and evaluation loop behind ``saq train`` and ``saq eval``.

One SAQ / SAM step (method "saq" or "sam"):
    pass 1  forward, loss, backward (inside ``ddp.no_sync()`` under DDP), opt.ascent_step()
    pass 2  forward at the perturbed point, backward (all-reduced under DDP), opt.descent_step()
The logged training loss and accuracy are pass 1's (the unperturbed model). Method "qat" is one
forward/backward and a plain optimizer step.

Mixed precision (--amp): bf16 is autocast only. fp16 adds a torch.amp.GradScaler: both passes
backpropagate the scaled loss; SAQ.ascent_step(grad_scaler) unscales pass 1's gradients before
the norm (an inf/NaN there turns the whole step into a skip) and SAQ.descent_step(grad_scaler)
unscales pass 2's, skips or steps exactly as GradScaler.step does, and calls scaler.update().
QAT uses the usual scaler.step / scaler.update. Skipped steps are counted per epoch.

--ascent-every k (our efficient mode, SAQ's ``ascent_every``): a full two-pass step every k steps,
and in between one pass at the last perturbation; the logged loss of those steps is the loss at
the perturbed point.

Exact resume: the data order and augmentation are pure functions of (seed, epoch, batch), the
checkpoint holds model, optimizer (with SAQ's state), LR schedule, GradScaler and every RNG state,
plus the epoch and batch to continue from (and, stopped mid-epoch, that epoch's metric sums; in
the efficient mode, the last perturbation), so 2 epochs straight and 1 + resume + 1 give
bitwise-identical weights and the same metric rows on the same machine (under DDP with k > 1 and
no --sync-ascent the first step after a resume makes a fresh ascent: each replica's last
perturbation is its own). The LR schedule is per step over
``epochs * steps_per_epoch`` and does not depend on --max-steps, so a run cut short by
--max-steps resumes onto the same schedule.
"""
import contextlib
import dataclasses
import filecmp
import math
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import checkpoint as ckpt_mod
from . import distributed as dist_mod
from .config import (STRUCTURAL_FIELDS, ConfigError, TrainConfig, apply_overrides,
                     default_run_name, resolve)
from .allocator import MMAP_THRESHOLD, keep_large_cpu_blocks
from .metrics import MetricsLogger, format_summary, summarize, topk_correct, write_json
from .plots import plot_curves

__all__ = ["build_config", "build_model", "param_groups", "build_optimizer", "build_scheduler",
           "evaluate", "train", "evaluate_checkpoint", "CLIP_SUFFIXES"]

CLIP_SUFFIXES = ("clip_value", "_scale", "_zero_point")
# A run's own files besides its metrics (MetricsLogger): a fresh run removes them from its folder.
RUN_FILES = ("last.pt", "best.pt", "summary.json", "loss.png", "accuracy.png")
# Options of one invocation, reset to their defaults (not taken from the checkpoint) on resume.
RUN_LOCAL_FIELDS = ("max_steps", "progress", "log_every", "device", "workers", "compile",
                    "malloc_keep", "overwrite")


# ----------------------------------------------------------------------------- configuration
def build_config(explicit: Dict[str, Any]) -> TrainConfig:
    """The run's TrainConfig from the options given explicitly (flag name -> value).

    Fresh run: defaults < dataset defaults < preset < explicit; out defaults to
    runs/<dataset>-<model>-<method>-w<wb>a<ab>-<timestamp>.
    Resume (--resume PATH, or --resume auto with an existing <out>/last.pt): the checkpoint's
    config, with explicit options on top (RUN_LOCAL_FIELDS such as --max-steps are not
    inherited); changing an option that fixes the model, the optimizer layout or the data
    (STRUCTURAL_FIELDS; the batch size too for a checkpoint taken mid-epoch) raises ConfigError.
    ``out`` defaults to the checkpoint's folder.
    --resume auto without a last.pt starts a fresh run in --out. A fresh run into a folder that
    holds a run's last.pt raises ConfigError unless ``overwrite`` is set (its checkpoints would be
    replaced an epoch later).
    """
    explicit = dict(explicit)
    resume, out = explicit.get("resume"), explicit.get("out")
    path = None
    if resume == "auto":
        if not out:
            raise ConfigError("--resume auto needs --out DIR (it resumes DIR/last.pt when present)")
        cand = os.path.join(out, "last.pt")
        path = cand if os.path.isfile(cand) else None
    elif resume:
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file")
        path = resume
        # the run continues in --out (default: the checkpoint's folder) and rewrites its last.pt,
        # best.pt and metrics: refuse when that folder's last.pt is another checkpoint (another
        # run, or the same run further on than a best.pt being resumed), as a fresh run is refused
        into = out or os.path.dirname(os.path.abspath(path))
        there = os.path.join(into, "last.pt")
        if not explicit.get("overwrite") and _resume_layout(into, path)[0]:
            raise ConfigError(
                f"--resume {path!r} would continue in {into!r}, which holds another checkpoint "
                f"({there}) that this run would replace; resume that one (--resume auto), name "
                "another --out, or pass --overwrite")
    if path is None:
        if out and not explicit.get("overwrite") and os.path.isfile(os.path.join(out, "last.pt")):
            raise ConfigError(
                f"--out {out!r} already holds a run ({os.path.join(out, 'last.pt')}); continue it "
                "with --resume auto, start over with --overwrite, or name another folder")
        explicit.pop("resume", None)
        cfg = resolve(apply_overrides(TrainConfig(), explicit), explicit)
        if cfg.out is None:
            cfg = dataclasses.replace(cfg, out=default_run_name(cfg))
        return cfg
    ck = ckpt_mod.load_checkpoint(path)
    saved = TrainConfig.from_dict(ck["config"])
    if explicit.get("preset") is not None and explicit["preset"] != saved.preset:
        raise ConfigError(
            f"--resume {path!r}: a preset applies when a run starts (this one started with "
            f"{saved.preset!r}); drop --preset and give the options to change instead")
    epochs = explicit.get("epochs", saved.epochs)
    if epochs < ck["epoch"] or (ck["batch"] and epochs <= ck["epoch"]):
        raise ConfigError(
            f"--epochs {epochs}: the checkpoint {path!r} is at epoch {ck['epoch'] + 1}, batch "
            f"{ck['batch']}; pass --epochs {ck['epoch'] + (1 if ck['batch'] else 0)} or more")
    structural = STRUCTURAL_FIELDS
    if ck.get("batch", 0):  # stopped mid-epoch: its position counts batches of that size
        structural = structural + ("batch_size",)
    changed = [k for k in structural if k in explicit and explicit[k] != getattr(saved, k)]
    if changed:
        raise ConfigError(
            f"--resume {path!r}: the checkpoint was trained with "
            + ", ".join(f"{k}={getattr(saved, k)!r}" for k in changed)
            + " but this command asks for "
            + ", ".join(f"{k}={explicit[k]!r}" for k in changed)
            + "; drop those flags or start a new run without --resume")
    # Per-invocation options are not inherited: a run cut by --max-steps must not stop again.
    local = {k: getattr(TrainConfig(), k) for k in RUN_LOCAL_FIELDS}
    over = {k: v for k, v in explicit.items() if k not in ("resume", "preset")}
    cfg = apply_overrides(saved, {**local, **over})
    cfg = dataclasses.replace(cfg, resume=path, out=out or os.path.dirname(os.path.abspath(path)))
    # The preset was applied when the run started; do not let it override saved values now.
    return dataclasses.replace(resolve(dataclasses.replace(cfg, preset=None)), preset=saved.preset)


def _same_checkpoint(a: str, b: str) -> bool:
    """The same file (through any link) or a byte-identical copy (best.pt after a best last epoch)."""
    return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)


def _resume_layout(out: str, path: str) -> Tuple[bool, bool]:
    """(replaces, belongs) of resuming checkpoint ``path`` into folder ``out``: ``replaces`` when
    the folder's last.pt is another checkpoint, which the resumed run would replace; ``belongs``
    when the checkpoint is that folder's run's (its last.pt through a link or a copy, or a file in
    the folder), whose metric rows before the checkpoint's epoch are kept."""
    there = os.path.join(out, "last.pt")
    same = os.path.isfile(there) and _same_checkpoint(there, path)
    replaces = os.path.isfile(there) and not same
    belongs = same or os.path.dirname(os.path.realpath(path)) == os.path.realpath(out)
    return replaces, belongs


# ----------------------------------------------------------------------------- model / optim
def _load_pretrained(model: nn.Module, path: str) -> None:
    """Load a full-precision state_dict (raw, under "state_dict"/"model", or a saq checkpoint of a
    float run) into the float model, stripping DDP/compile prefixes. Strict, clear errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pretrained {path!r}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ckpt_mod.CheckpointError(f"--pretrained {path!r} cannot be read as a weights-only "
                                       f"torch file: {ckpt_mod.load_error_reason(e)}") from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ckpt_mod.CheckpointError(f"--pretrained {path!r} holds no state_dict of tensors")
    state = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    ckpt_mod.load_model_state(model, state, path, what="this run's float model (--pretrained)")


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int,
                img_size: Optional[int] = None) -> nn.Module:
    """get_model + optional --pretrained (into the float model) + quantize_model (unless W32A32).
    Float32, CPU, train mode.

    vit_tiny is built for the data's ``img_size`` (16x16 patches from 224 up, else 4x4: CIFAR's
    usual choice, and digits' 8x8 in 4 patches) and quantizes its layer inputs with a signed range
    (a transformer's linear layers read LayerNorm outputs and attention values of both signs)."""
    import saq
    from saq.models import get_model

    kw: Dict[str, Any] = {}
    vit = cfg.model.startswith("vit")
    if vit and img_size:
        kw = dict(img_size=img_size, patch_size=16 if img_size >= 224 and img_size % 16 == 0
                  else 4 if img_size % 4 == 0 else 1)
    model = get_model(cfg.model, num_classes, in_chans=in_chans, **kw)
    if cfg.pretrained:
        _load_pretrained(model, cfg.pretrained)
    if not (cfg.wbits == 32 and cfg.abits == 32):
        saq.quantize_model(model, weight_bits=cfg.wbits, act_bits=cfg.abits,
                           quantizer=cfg.quantizer, per_channel=cfg.per_channel,
                           first_last_bits=cfg.first_last_bits, signed_activations=vit)
    return model


def param_groups(model: nn.Module, lr: float, clip_lr: float, weight_decay: float) -> List[dict]:
    """Two groups as the reference recipe: quantizer clip/scale/zero-point parameters (names
    ending in CLIP_SUFFIXES) at clip_lr, everything else at lr; weight decay on all."""
    clips, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (clips if name.endswith(CLIP_SUFFIXES) else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "weights"}]
    if clips:
        groups.append({"params": clips, "lr": clip_lr, "weight_decay": weight_decay,
                       "name": "clips"})
    return groups


def build_optimizer(cfg: TrainConfig, model: nn.Module):
    """(optimizer used for stepping, base torch optimizer). qat: the base optimizer itself;
    sam: SAQ(case=2) on a quantized model, plain SAM on a float one; saq: SAQ(case=cfg.case)."""
    import saq

    groups = param_groups(model, cfg.lr, cfg.clip_lr, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        base = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    else:
        base = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.method == "qat":
        return base, base
    case = 2 if cfg.method == "sam" else cfg.case
    return saq.SAQ(model, base, rho=cfg.rho, case=case, adaptive=cfg.adaptive, eta=cfg.eta,
                   ascent_every=cfg.ascent_every, sync_ascent=cfg.sync_ascent), base


def _apply_config_hyperparameters(cfg: TrainConfig, opt, base, sched, fresh: List[dict]) -> None:
    """After a resume loaded the checkpoint's optimizer, scheduler and SAQ state (which carry the
    hyperparameters they were built with), put back those of ``cfg`` -- the checkpoint's config
    with the options given again on the command line on top -- so that ``--resume ... --lr 0.01``
    trains at 0.01 (it used to be recorded but not applied). ``fresh``: the param groups' options
    as built from ``cfg``, before loading. The current lr follows the schedule at the loaded step
    from the new base lrs; an unchanged config reproduces the loaded values exactly."""
    for g, f in zip(base.param_groups, fresh):
        for k, v in f.items():
            if k not in ("lr", "initial_lr"):
                g[k] = v
    sched.base_lrs = [f["initial_lr"] for f in fresh]
    for g, b, lam in zip(base.param_groups, sched.base_lrs, sched.lr_lambdas):
        g["initial_lr"] = b
        g["lr"] = b * lam(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in base.param_groups]
    if opt is not base:  # SAQ: its state_dict carries rho, adaptive, eta, ascent_every
        opt.rho, opt.adaptive, opt.eta = float(cfg.rho), bool(cfg.adaptive), float(cfg.eta)
        opt.ascent_every = int(cfg.ascent_every)


def build_scheduler(cfg: TrainConfig, base: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step LambdaLR: optional linear warmup, then cosine to 0 over epochs * steps_per_epoch
    or step decay (x gamma at each milestone epoch)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    bounds = [m * steps_per_epoch for m in (cfg.milestones or ())]

    def factor(step: int) -> float:
        f = min(1.0, (step + 1) / warm) if warm > 0 and step < warm else 1.0
        if cfg.scheduler == "cosine":
            return f * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        return f * cfg.gamma ** sum(step >= b for b in bounds)

    return torch.optim.lr_scheduler.LambdaLR(base, factor)


# ----------------------------------------------------------------------------- evaluation
def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none") -> Dict[str, float]:
    """Test loss, top-1 and top-5 (%) of ``model`` over ``loader``, summed over ranks when a
    process group is active. Puts the model in eval mode and back to its previous mode."""
    was = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            out = model(x)
        out = out.float()
        c1, c5 = topk_correct(out, y)
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(), c1.double(),
                             c5.double(), torch.tensor(float(y.numel()), dtype=torch.float64,
                                                       device=device)])
    dist_mod.all_reduce_sum(sums)
    model.train(was)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"test_loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n,
            "samples": int(n)}


# ----------------------------------------------------------------------------- training
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress_enabled(cfg: TrainConfig, env: dist_mod.DistEnv) -> bool:
    return bool(cfg.progress and env.is_main and sys.stderr.isatty())


class _Stepper:
    """Runs one optimizer step of the configured method on a batch and returns the pass-1 logits
    and loss (detached). No host sync per step, except QAT under fp16, which compares the
    GradScaler's scale to count skipped steps."""

    def __init__(self, cfg, model_fwd, ddp, opt, base, scaler, device):
        self.cfg, self.fwd, self.ddp, self.opt, self.base = cfg, model_fwd, ddp, opt, base
        self.device = device
        self.sharp = cfg.method in ("sam", "saq")
        self.scaler = scaler if cfg.amp == "fp16" else None
        self.qat_skipped = 0

    def _loss(self, x, y):
        with _autocast(self.device, self.cfg.amp):
            out = self.fwd(x)
        return out, F.cross_entropy(out.float(), y)

    def _backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def skipped(self) -> int:
        """Steps skipped so far for non-finite gradients (syncs)."""
        return self.opt.skipped_steps if self.sharp else self.qat_skipped

    def step(self, x, y):
        opt, scaler = self.opt, self.scaler
        if not self.sharp:
            out, loss = self._loss(x, y)
            self._backward(loss)
            if scaler is not None:
                before = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                self.qat_skipped += int(scaler.get_scale() < before)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            return out.detach(), loss.detach()
        if not opt.needs_ascent():  # --ascent-every k: reuse the last perturbation, one pass
            opt.reuse_perturbation()
            out, loss = self._loss(x, y)
            self._backward(loss)
            opt.descent_step(grad_scaler=scaler)
            return out.detach(), loss.detach()
        # pass 1 (ascent): under DDP no gradient all-reduce (the reference code's choice) unless
        # --sync-ascent; SAQ unscales (fp16) before the norm. The forward runs inside no_sync()
        # too: DDP arms its all-reduce for the backward at forward time.
        local = self.ddp is not None and not self.cfg.sync_ascent
        with self.ddp.no_sync() if local else contextlib.nullcontext():
            out, loss = self._loss(x, y)
            self._backward(loss)
        opt.ascent_step(grad_scaler=scaler)
        # pass 2 (descent) at the perturbed point, all-reduced under DDP
        _, loss2 = self._loss(x, y)
        self._backward(loss2)
        opt.descent_step(grad_scaler=scaler)  # restore, unscale, skip-or-step, scaler.update()
        return out.detach(), loss.detach()


@torch.no_grad()
def _init_quantizers_once(model, loader, set_epoch, epoch, device, amp) -> None:
    """Run the quantizers' first-batch initialization before DDP wrapping.

    The data-driven clip/scale init (e.g. LIQ's 0.8 * max|input| for linear layers) would
    otherwise use each rank's own first batch and leave the replicas with different clip values
    forever (DDP syncs gradients, not parameters). Done here on this rank's first batch, then
    DistributedDataParallel's constructor broadcasts rank 0's values. BatchNorm running statistics
    touched by this extra forward are put back.
    """
    if all(getattr(m, "quant_initialized", True) for m in model.modules()):
        return
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m._buffers.items() if v is not None} for m in bn]
    set_epoch(loader, epoch)
    x, _ = next(iter(loader))
    model.train()
    with _autocast(device, amp):
        model(x.to(device))
    for m, buf in zip(bn, saved):
        for k, v in buf.items():
            m._buffers[k].copy_(v)


def _save(cfg, env, model, opt, sched, scaler, epoch, batch, step, best, elapsed, is_best,
          partial=None):
    if not env.is_main:
        return
    extra = {"elapsed": elapsed}
    if partial is not None:  # stopped mid-epoch: the epoch's sums so far, for its row on resume
        extra["partial"] = partial
    ck = ckpt_mod.make_checkpoint(
        model_state=dist_mod.unwrap(model).state_dict(), optimizer_state=opt.state_dict(),
        scheduler_state=sched.state_dict(), scaler_state=scaler.state_dict(),
        config=cfg.to_dict(), epoch=epoch, batch=batch, global_step=step, best=best,
        extra=extra)
    last = os.path.join(cfg.out, "last.pt")
    ckpt_mod.atomic_save(ck, last)
    if is_best:
        tmp = os.path.join(cfg.out, ".best.pt.tmp")
        shutil.copyfile(last, tmp)
        os.replace(tmp, os.path.join(cfg.out, "best.pt"))


def _load_state(what: str, obj, state, path: str) -> None:
    try:
        obj.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ckpt_mod.CheckpointError(f"checkpoint {path!r}: its {what} state does not fit this "
                                       f"run: {str(e).splitlines()[0]}") from e


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume, when cfg.resume names a checkpoint) a training run; returns the summary.

    Writes into cfg.out (rank 0 only): metrics.jsonl, metrics.csv, summary.json, loss.png,
    accuracy.png, last.pt (every epoch and at --max-steps) and best.pt (best test top-1).
    Raises FileNotFoundError for missing data, ConfigError / CheckpointError (ValueErrors) for a
    bad configuration or checkpoint.
    """
    from saq.data import make_loaders, set_epoch

    t_start = time.perf_counter()
    env = dist_mod.detect()
    device = dist_mod.resolve_device(cfg.device, env)
    dist_mod.setup(device, env)
    try:
        return _train(cfg, env, device, make_loaders, set_epoch, t_start)
    finally:
        dist_mod.cleanup()


def _train(cfg, env, device, make_loaders, set_epoch, t_start):
    log = lambda *a: dist_mod.print0(*a, env=env)  # noqa: E731
    bad_out = None
    if env.is_main:  # before loading data and building the model: a bad --out fails at once
        try:
            os.makedirs(cfg.out, exist_ok=True)
            with tempfile.TemporaryFile(dir=cfg.out):
                pass
        except OSError as e:
            bad_out = ConfigError(f"--out {cfg.out!r}: cannot create or write the run folder "
                                  f"({e.strerror or e}); name a writable folder")
    if env.distributed:  # every rank stops with rank 0 (a lone raise would leave the others
        # waiting for it at the model broadcast)
        flag = torch.tensor([0.0 if bad_out is None else 1.0], device=device)
        if dist_mod.all_reduce_sum(flag).item() > 0 and bad_out is None:
            raise ConfigError(f"--out {cfg.out!r}: rank 0 cannot write the run folder "
                              "(its error says why)")
    if bad_out is not None:
        raise bad_out
    alloc_note = None  # said after the run's headline
    if cfg.malloc_keep == "on" or (cfg.malloc_keep == "auto" and device.type == "cpu"):
        why = keep_large_cpu_blocks()
        if why is None:
            alloc_note = (f"allocator: freed CPU blocks up to {MMAP_THRESHOLD >> 20} MiB are kept "
                          f"for reuse (--malloc-keep off to disable)")
        elif cfg.malloc_keep == "on":
            alloc_note = f"allocator: --malloc-keep on not applied: {why}"
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if cfg.batch_size % env.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the total over {env.world_size} "
                          f"processes and must be divisible by it")
    _seed_everything(cfg.seed)
    train_loader, test_loader, info = make_loaders(
        cfg.dataset, cfg.data_root, batch_size=cfg.batch_size // env.world_size, seed=cfg.seed,
        num_workers=cfg.workers, distributed=env.distributed,
        pin_memory=device.type == "cuda")
    ck = ckpt_mod.load_checkpoint(cfg.resume) if cfg.resume else None
    # resuming: the checkpoint replaces the weights, so --pretrained is not read again
    model = build_model(cfg if ck is None else dataclasses.replace(cfg, pretrained=None),
                        info["num_classes"], info["input_shape"][0], info["input_shape"][1])
    if ck is not None:
        ckpt_mod.load_model_state(model, ck["model"], cfg.resume)
    model.to(device)
    opt, base = build_optimizer(cfg, model)
    spe = train_loader.sampler.num_batches  # full epoch (len() counts from start_batch)
    sched = build_scheduler(cfg, base, spe)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start_epoch, start_batch, step, best, elapsed0 = 0, 0, 0, {}, 0.0
    partial: Dict[str, float] = {}
    if ck is not None:
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
        _load_state("optimizer", opt, ck["optimizer"], cfg.resume)
        if not isinstance(ck.get("scheduler"), dict):
            raise ckpt_mod.CheckpointError(f"checkpoint {cfg.resume!r} holds no scheduler state; "
                                           "it cannot be resumed (evaluate it with saq eval)")
        _load_state("scheduler", sched, ck["scheduler"], cfg.resume)
        # the schedule's position in this run's steps: the same as the loaded one unless the
        # batch size changed at an epoch boundary (the schedule is per step; mid-epoch the batch
        # size is fixed), which would otherwise shift the warmup, decay and milestones
        sched.last_epoch = ck["epoch"] * spe + ck["batch"]
        _apply_config_hyperparameters(cfg, opt, base, sched, fresh)
        if ck.get("scaler"):
            _load_state("GradScaler", scaler, ck["scaler"], cfg.resume)
        try:
            ckpt_mod.restore_rng_state(ck["rng"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise ckpt_mod.CheckpointError(f"checkpoint {cfg.resume!r}: its RNG state is damaged "
                                           f"({type(e).__name__}: {e}); it cannot be resumed "
                                           "exactly") from e
        start_epoch, start_batch, step = ck["epoch"], ck["batch"], ck["global_step"]
        best, elapsed0 = dict(ck.get("best") or {}), float(ck.get("extra", {}).get("elapsed", 0))
        if start_batch:  # the stopped epoch's sums so far: its row covers the whole epoch
            partial = dict(ck.get("extra", {}).get("partial") or {})
        log(f"resumed from {cfg.resume}: epoch {start_epoch + 1}, batch {start_batch}, "
            f"step {step}")
    if env.distributed:
        _init_quantizers_once(model, train_loader, set_epoch, start_epoch, device, cfg.amp)
    ddp = dist_mod.wrap_ddp(model, device, env)  # broadcasts rank 0's parameters and buffers
    fwd = torch.compile(ddp) if cfg.compile else ddp
    stepper = _Stepper(cfg, fwd, ddp if env.distributed else None, opt, base, scaler, device)

    # What of the folder's earlier run outlives the start (build_config refused a replacement
    # without --overwrite). A fresh run, or a resume of another folder's checkpoint, keeps
    # nothing: an interrupted start would leave the old checkpoint for --resume auto to continue,
    # its best.pt beside this run's last.pt, its rows in the metrics. A resume of an earlier
    # checkpoint of the folder's own run that replaces its last.pt removes that, the summary and
    # the plots (best.pt stays until a new best replaces it) and keeps the rows before the
    # checkpoint's epoch.
    if ck is None:
        replaces, keep_rows = True, False
    else:
        replaces, keep_rows = _resume_layout(cfg.out, cfg.resume)
    if not keep_rows:
        stale = RUN_FILES
    else:
        stale = tuple(n for n in RUN_FILES if n != "best.pt") if replaces else ()
    if env.is_main:  # (the folder was made at the start)
        for name in stale:
            p = os.path.join(cfg.out, name)
            if os.path.isfile(p) and not (ck is not None and os.path.samefile(p, cfg.resume)):
                os.remove(p)
        write_json(cfg.to_dict(), os.path.join(cfg.out, "config.json"))
    metrics = MetricsLogger(cfg.out, enabled=env.is_main)
    # a resume with nothing to run (at its last epoch, or at --max-steps) keeps its rows, the
    # stopped epoch's partial one included
    runs = start_epoch < cfg.epochs and (cfg.max_steps is None or step < cfg.max_steps)
    if replaces or not keep_rows or runs:
        metrics.truncate(start_epoch + 1 if keep_rows else 1)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"saq train: {cfg.dataset} ({info['train_size']} train / {info['test_size']} test), "
        f"{cfg.model} {n_params / 1e6:.3f} M params, {cfg.method}"
        f"{f' case {cfg.case}' if cfg.method == 'saq' else ''} w{cfg.wbits}a{cfg.abits} "
        f"{cfg.quantizer}, rho {cfg.rho}, {cfg.optimizer} lr {cfg.lr} ({cfg.scheduler}), "
        f"batch {cfg.batch_size}, {cfg.epochs} epochs x {spe} steps, device {device}"
        f"{f' x {env.world_size} ranks' if env.distributed else ''} -> {cfg.out}")
    if alloc_note:
        log(alloc_note)
    show = _progress_enabled(cfg, env)
    stopped = False
    partial_last = bool(start_batch)  # until an epoch runs: the checkpoint's own position
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        t0 = time.perf_counter()
        b0 = start_batch if epoch == start_epoch else 0
        set_epoch(train_loader, epoch, start_batch=b0)
        model.train()
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # pass-1 loss sum, correct
        skipped0, steps_done, batch, seen = stepper.skipped(), 0, b0, 0
        bar = tqdm(total=spe, initial=b0, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not show, leave=False, dynamic_ncols=True)
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out, loss = stepper.step(x, y)
            sched.step()
            step += 1
            batch += 1
            steps_done += 1
            seen += y.numel()
            stats += torch.stack([loss.double() * y.numel(),
                                  topk_correct(out.float(), y, (1,))[0].double()])
            bar.update(1)
            if cfg.log_every and step % cfg.log_every == 0 and env.is_main:
                if show:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                else:
                    log(f"  step {step}: pass-1 loss {loss.item():.4f}")
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stopped = True
                break
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - t0
        dist_mod.broadcast_buffers(model)
        t_eval = time.perf_counter()
        ev = evaluate(model, test_loader, device, cfg.amp)
        eval_time = time.perf_counter() - t_eval
        totals = torch.cat([stats, torch.tensor([float(seen)], dtype=torch.float64,
                                                device=device)])
        loss_sum, correct, seen = dist_mod.all_reduce_sum(totals).tolist()  # all ranks
        epoch_time = time.perf_counter() - t0
        skipped = stepper.skipped() - skipped0
        # an epoch resumed mid-way adds the sums its first part saved (the same on every rank)
        prior = partial if epoch == start_epoch else {}
        loss_sum += prior.get("loss_sum", 0.0)
        correct += prior.get("correct", 0.0)
        seen += prior.get("seen", 0.0)
        steps_done += int(prior.get("steps", 0))
        train_time += prior.get("train_time", 0.0)
        epoch_time += prior.get("epoch_time", 0.0)
        skipped += int(prior.get("skipped", 0))
        row = {
            "epoch": epoch + 1, "steps": steps_done,
            "train_loss": loss_sum / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1),
            "test_loss": ev["test_loss"], "top1": ev["top1"], "top5": ev["top5"],
            "lr": base.param_groups[0]["lr"], "epoch_time": epoch_time,
            "time_per_step": train_time / max(steps_done, 1),
            "images_per_s": seen / max(train_time, 1e-9),
            "skipped_steps": skipped,
        }
        # (the first part's evaluation is not carried over: the whole epoch is evaluated once)
        sums = dict(loss_sum=loss_sum, correct=correct, seen=seen, steps=steps_done,
                    train_time=train_time, epoch_time=epoch_time - eval_time, skipped=skipped)
        metrics.log(row)
        done_epoch = batch >= spe
        if done_epoch:
            is_best = not best or row["top1"] > best.get("top1", -1.0)
            if is_best:
                best = {"top1": row["top1"], "top5": row["top5"], "epoch": row["epoch"]}
        else:
            # stopped mid-epoch: this evaluation does not compete for best (the resumed run
            # replaces its row), so a resume keeps the best an uninterrupted run would have;
            # until a whole epoch exists, best.pt is this checkpoint, provisionally
            is_best = not best
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.2f}% | test loss {row['test_loss']:.4f} "
            f"top-1 {row['top1']:.2f}% top-5 {row['top5']:.2f}% | lr {row['lr']:.3g} | "
            f"{row['time_per_step'] * 1e3:.1f} ms/step {row['images_per_s']:.0f} img/s "
            f"{epoch_time:.1f} s")
        partial_last = not done_epoch
        elapsed = elapsed0 + time.perf_counter() - t_start
        _save(cfg, env, model, opt, sched, scaler, epoch + 1 if done_epoch else epoch,
              0 if done_epoch else batch, step, best, elapsed, is_best,
              partial=None if done_epoch else sums)
        if stopped:
            log(f"stopped at --max-steps {cfg.max_steps} (step {step})")
            break
    total = elapsed0 + time.perf_counter() - t_start
    summary = {}
    if env.is_main:
        rows = metrics.rows()
        summary = summarize(rows, total, partial_last=partial_last, extra={
            "run": cfg.out, "dataset": cfg.dataset, "model": cfg.model, "method": cfg.method,
            "wbits": cfg.wbits, "abits": cfg.abits, "quantizer": cfg.quantizer, "rho": cfg.rho,
            "params": n_params, "device": str(device), "world_size": env.world_size,
            "torch": torch.__version__, "saq": ckpt_mod.saq_version(),
            "resumed_from": cfg.resume, "steps": step})
        write_json(summary, os.path.join(cfg.out, "summary.json"))
        if rows:
            plot_curves(rows, cfg.out, title=os.path.basename(os.path.normpath(cfg.out)))
        log(format_summary(summary))
        log(f"run folder: {cfg.out}")
    return summary


# ----------------------------------------------------------------------------- saq eval
def evaluate_checkpoint(path: str, dataset: Optional[str] = None, data_root: Optional[str] = None,
                        batch_size: Optional[int] = None, device: str = "auto",
                        workers: int = 0, amp: Optional[str] = None) -> Dict[str, Any]:
    """Rebuild the model from a checkpoint's config, load its weights and evaluate it on the
    test split (dataset/data_root/batch_size default to the checkpoint's). Returns test_loss,
    top1, top5 (%), samples, epoch."""
    from saq.data import make_loaders

    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    ck = ckpt_mod.load_checkpoint(path)
    cfg = TrainConfig.from_dict(ck["config"])
    over = {k: v for k, v in dict(dataset=dataset, data_root=data_root, batch_size=batch_size,
                                  amp=amp).items() if v is not None}
    cfg = apply_overrides(cfg, over)
    cfg = dataclasses.replace(cfg, pretrained=None)
    env = dist_mod.DistEnv()
    dev = dist_mod.resolve_device(device, env)
    _, test_loader, info = make_loaders(cfg.dataset, cfg.data_root, batch_size=cfg.batch_size,
                                        seed=cfg.seed, num_workers=workers)
    model = build_model(cfg, info["num_classes"], info["input_shape"][0], info["input_shape"][1])
    ckpt_mod.load_model_state(model, ck["model"], path)
    model.to(dev)
    res = evaluate(model, test_loader, dev, cfg.amp)
    res.update(epoch=ck["epoch"], global_step=ck["global_step"], dataset=cfg.dataset,
               model=cfg.model)
    return res
