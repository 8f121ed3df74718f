"""Every option of a training run in one dataclass, the per-dataset defaults and the presets.

How a run's configuration is assembled (saq.cli does this; explicit always wins):
    TrainConfig() defaults  <  DATASET_DEFAULTS[dataset]  <  PRESETS[preset]  <  explicit flags
Fields left as None in TrainConfig are "not chosen yet": ``resolve`` fills them from the dataset
defaults (model, epochs, lr, batch size, rho, scheduler...) and derives the rest (clip lr = lr,
the run folder name).

The digits defaults were chosen by measurement on a 2-core CPU so that ``saq train`` with no
arguments finishes in well under a minute (numbers beside DATASET_DEFAULTS); the CIFAR and ImageNet values are the
reference recipes (the SAQ reference code's README; paper: arXiv 2111.12273).
"""
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

__all__ = ["TrainConfig", "ConfigError", "PRESETS", "DATASET_DEFAULTS", "DATASETS", "METHODS",
           "QUANTIZERS", "BIT_CHOICES", "STRUCTURAL_FIELDS", "resolve", "apply_overrides",
           "default_run_name", "preset_table"]

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
METHODS = ("qat", "sam", "saq")
QUANTIZERS = ("liq", "lsq", "lsq+", "pact", "dorefa")
BIT_CHOICES = (2, 3, 4, 5, 6, 7, 8, 32)  # 32 = not quantized (float)


class ConfigError(ValueError):
    """An inconsistent or unusable run configuration; the message names the option and the fix."""


@dataclass
class TrainConfig:
    """All options of ``saq train`` (one field per flag; see ``saq train --help``).

    None means "use the dataset default" (filled in by ``resolve``). ``batch_size`` is the total
    batch over all processes: under torchrun each rank loads batch_size // world_size.
    """

    # data
    dataset: str = "digits"
    data_root: Optional[str] = None
    workers: int = 0
    # model and quantization
    model: Optional[str] = None
    wbits: int = 4
    abits: int = 4
    quantizer: str = "liq"
    per_channel: bool = False
    first_last_bits: int = 8
    pretrained: Optional[str] = None
    # method
    method: str = "saq"
    case: int = 3
    adaptive: bool = False
    rho: Optional[float] = None
    eta: float = 0.01
    ascent_every: int = 1
    sync_ascent: bool = False
    # optimization
    epochs: Optional[int] = None
    lr: Optional[float] = None
    clip_lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: Optional[float] = None
    optimizer: str = "sgd"
    nesterov: bool = True
    scheduler: Optional[str] = None
    milestones: Optional[Tuple[int, ...]] = None
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    batch_size: Optional[int] = None
    # run
    out: Optional[str] = None
    resume: Optional[str] = None
    overwrite: bool = False
    device: str = "auto"
    malloc_keep: str = "auto"
    seed: int = 0
    amp: str = "none"
    compile: bool = False
    deterministic: bool = False
    log_every: int = 50
    progress: bool = True
    max_steps: Optional[int] = None
    preset: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        if d["milestones"] is not None:
            d["milestones"] = list(d["milestones"])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Inverse of to_dict; unknown keys (from a newer saq) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("milestones") is not None:
            kw["milestones"] = tuple(int(m) for m in kw["milestones"])
        return cls(**kw)


# Fields that fix the model, its parameters or the optimizer state layout, and the seed (it also
# picks the digits train/test split and the data order the checkpoint's position refers to): a
# checkpoint can only be resumed with the same values.
STRUCTURAL_FIELDS = ("dataset", "model", "wbits", "abits", "quantizer", "per_channel",
                     "first_last_bits", "method", "case", "optimizer", "seed")

# digits defaults, measured with `saq train` on 2 shared CPU cores (torch 2.13 CPU build, C++
# kernels), test split of 360 images (1 image = 0.28 %), final top-1 over seeds 0/1/2:
#   W4A4 SAQ (LIQ, rho 0.1):  98.89 / 99.72 / 98.61   ~19 ms/step, ~16 s per run (690 steps)
#   W4A4 QAT, same settings:  98.33 / 99.17 / 98.61   ~9 ms/step
#   float (W32A32, qat):      99.17 / 99.17 / 98.61   ~6 ms/step
# 60 epochs (98.89 / 99.44 / 98.61), batch 32 (99.17 / 99.44 / 98.89), rho 0.05-0.4 and lr 0.1
# (one seed each, 98.3-99.2) are all within two test images of these: the task saturates, so the
# default stays short. The same run took 226 s at load average ~200 (other jobs on the cores).
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "digits": dict(model="digits_cnn", epochs=30, lr=0.05, batch_size=64, rho=0.1,
                   scheduler="cosine", weight_decay=1e-4),
    "cifar10": dict(model="preact_resnet20", epochs=200, lr=0.01, batch_size=128, rho=0.4,
                    scheduler="step", milestones=(80, 120), weight_decay=1e-4),
    "cifar100": dict(model="preact_resnet20", epochs=200, lr=0.01, batch_size=128, rho=0.4,
                     scheduler="step", milestones=(80, 120), weight_decay=1e-4),
    "imagefolder": dict(model="resnet18", epochs=90, lr=0.02, batch_size=512, rho=0.3,
                        scheduler="cosine", weight_decay=1e-4),
}

PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar100-resnet20-w4a4": dict(
        dataset="cifar100", model="preact_resnet20", wbits=4, abits=4, quantizer="liq",
        method="saq", case=3, rho=0.4, lr=0.01, clip_lr=0.01, batch_size=128, epochs=200,
        scheduler="step", milestones=(80, 120), gamma=0.1, optimizer="sgd", momentum=0.9,
        weight_decay=1e-4),
    "cifar100-resnet20-w3a3": dict(
        dataset="cifar100", model="preact_resnet20", wbits=3, abits=3, quantizer="liq",
        method="saq", case=3, rho=0.4, lr=0.01, clip_lr=0.01, batch_size=128, epochs=200,
        scheduler="step", milestones=(80, 120), gamma=0.1, optimizer="sgd", momentum=0.9,
        weight_decay=1e-4),
    "imagenet-resnet18-w4a4": dict(
        dataset="imagefolder", model="resnet18", wbits=4, abits=4, quantizer="liq",
        method="saq", case=3, rho=0.3, lr=0.02, batch_size=512, epochs=90, scheduler="cosine",
        optimizer="sgd", momentum=0.9, weight_decay=1e-4),
}
PRESET_NOTES = {
    "cifar100-resnet20-w4a4": "reference recipe, reported 68.7 top-1; start from --pretrained FP",
    "cifar100-resnet20-w3a3": "reference recipe, reported 67.7 top-1; start from --pretrained FP",
    "imagenet-resnet18-w4a4": "reference recipe (batch 512 = 4 x 128), reported 71.3 top-1",
}


def apply_overrides(cfg: TrainConfig, values: Dict[str, Any]) -> TrainConfig:
    """A copy of ``cfg`` with ``values`` set; unknown keys raise ConfigError."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(values) - names)
    if bad:
        raise ConfigError(f"TrainConfig: unknown option(s) {', '.join(bad)}")
    return dataclasses.replace(cfg, **values)


def default_run_name(cfg: TrainConfig, stamp: Optional[str] = None) -> str:
    """runs/<dataset>-<model>-<method>-w<wb>a<ab>-<YYYYmmdd-HHMMSS>."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    return f"runs/{cfg.dataset}-{cfg.model}-{cfg.method}-w{cfg.wbits}a{cfg.abits}-{stamp}"


def resolve(cfg: TrainConfig, explicit: Iterable[str] = ()) -> TrainConfig:
    """Fill every None field from the preset and the dataset defaults and check consistency.

    ``explicit``: names of fields the user set on purpose; they are never replaced by a preset
    value (the preset is applied here when ``cfg.preset`` is set and was not applied before).
    Returns a new TrainConfig; raises ConfigError naming the option at fault.
    """
    explicit = set(explicit)
    if cfg.preset is not None:
        if cfg.preset not in PRESETS:
            raise ConfigError(f"--preset {cfg.preset!r} is unknown; choose from "
                              f"{', '.join(PRESETS)} (saq presets lists them)")
        cfg = apply_overrides(cfg, {k: v for k, v in PRESETS[cfg.preset].items()
                                    if k not in explicit})
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"--dataset {cfg.dataset!r} is unknown; choose from {DATASETS}")
    fill = {k: v for k, v in DATASET_DEFAULTS[cfg.dataset].items()
            if getattr(cfg, k) is None}
    cfg = apply_overrides(cfg, fill)
    if cfg.clip_lr is None:
        cfg = dataclasses.replace(cfg, clip_lr=cfg.lr)
    if cfg.scheduler == "step" and cfg.milestones is None:
        # at 40 % and 60 % of the epochs, never at epoch 0 (a 1- or 2-epoch run decayed from its
        # first step); fewer than 2 epochs: no decay
        e = cfg.epochs
        cfg = dataclasses.replace(cfg, milestones=tuple(m for m in (max(1, int(e * 0.4)), max(1, int(e * 0.6))) if m < e))
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.method in METHODS, f"--method must be one of {METHODS}, got {cfg.method!r}")
    need(cfg.case in (1, 2, 3), f"--case must be 1, 2 or 3, got {cfg.case!r}")
    need(cfg.quantizer in QUANTIZERS, f"--quantizer must be one of {QUANTIZERS}")
    for name in ("wbits", "abits", "first_last_bits"):
        need(getattr(cfg, name) in BIT_CHOICES,
             f"--{name.replace('_', '-')} must be one of {BIT_CHOICES}, got {getattr(cfg, name)}")
    need(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    need(0 < cfg.lr < math.inf and 0 < cfg.clip_lr < math.inf,
         f"--lr and --clip-lr must be finite and > 0, got {cfg.lr} and {cfg.clip_lr}")
    need(0 <= cfg.rho < math.inf, f"--rho must be finite and >= 0, got {cfg.rho}")
    need(0 < cfg.gamma < math.inf, f"--gamma (step decay factor) must be finite and > 0, got {cfg.gamma}")
    need(0 <= cfg.eta < math.inf, f"--eta must be finite and >= 0, got {cfg.eta}")
    need(cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    need(cfg.log_every >= 0, f"--log-every must be >= 0 (0: no step lines), got {cfg.log_every}")
    need(cfg.optimizer in ("sgd", "adamw"), "--optimizer must be sgd or adamw")
    need(cfg.scheduler in ("cosine", "step"), "--scheduler must be cosine or step")
    need(cfg.amp in ("none", "bf16", "fp16"), "--amp must be none, bf16 or fp16")
    need(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
         f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    need(cfg.malloc_keep in ("auto", "on", "off"),
         f"--malloc-keep must be auto, on or off, got {cfg.malloc_keep!r}")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "--max-steps must be >= 1")
    need(cfg.warmup_epochs >= 0, "--warmup-epochs must be >= 0")
    need(cfg.ascent_every >= 1, f"--ascent-every must be >= 1, got {cfg.ascent_every}")
    need(0 <= cfg.momentum < math.inf, f"--momentum must be finite and >= 0, got {cfg.momentum}")
    need(cfg.weight_decay is None or 0 <= cfg.weight_decay < math.inf,
         f"--weight-decay must be finite and >= 0, got {cfg.weight_decay}")
    need(not cfg.per_channel or cfg.quantizer in ("lsq", "lsq+"),
         f"--per-channel needs --quantizer lsq or lsq+ (per-channel weight scales), got {cfg.quantizer!r}")
    need(cfg.out is None or not os.path.exists(cfg.out) or os.path.isdir(cfg.out),
         f"--out {cfg.out!r} is an existing file; name a folder")


def preset_table() -> str:
    """Human-readable listing of the presets (what ``saq presets`` prints)."""
    lines = []
    for name, p in PRESETS.items():
        lines.append(f"{name}: {PRESET_NOTES.get(name, '')}")
        lines.append("    " + " ".join(f"--{k.replace('_', '-')} "
                                       f"{','.join(map(str, v)) if isinstance(v, tuple) else v}"
                                       for k, v in p.items()))
    return "\n".join(lines)
