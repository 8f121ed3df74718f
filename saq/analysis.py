"""Sharpness analysis of a trained (quantized) model.

SAQ trains for a flat loss landscape of the *quantized* model. Two measurements show whether a
checkpoint got one, both on fixed batches and with the model in eval mode (BatchNorm uses its
running statistics, which the analysis never moves; no dropout):

``sharpness`` -- the SAM sharpness at radius rho, ``L(Q(w) + e) - L(Q(w))`` with ``e`` the
    first-order worst-case perturbation of the given case (``e = rho * g / ||g||``, for Case 3
    ``g = dL/dQ(w)`` plus the small parameters' gradients; ``adaptive`` for ASAM's ``g * (|p| +
    eta)``), i.e. exactly the perturbation a training step of ``saq.SAQ`` makes, evaluated
    without its optimizer step (SAQ.md section 2: "restore without step"). On a model without
    quantized layers it is plain SAM's (or ASAM's) sharpness.
``loss_landscape`` -- the loss along one random direction ``d`` in the space of the quantized
    weights, ``L(Q(w) + alpha * d)`` for each alpha, ``d`` filter-normalized (Li et al., 2018:
    each output filter of ``d`` scaled to the norm of the same filter of ``Q(w)``), biases,
    clips and BatchNorm left as they are. Without quantized layers, ``w + alpha * d`` over the
    conv / linear weights.

Both leave the model as they found it, also when interrupted: parameter and buffer values (bit
for bit, from a copy taken first), ``.grad`` references, every module's train/eval mode, and the
quantized layers' SAQ state and first-batch-init flags (so a ``saq.SAQ`` training the same model
between steps is unaffected, and quantizers that have not seen a batch are initialized from the
first analysis batch for the measurement only). Call them between training steps, not inside one.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saq.nn.modules import QuantLayer

__all__ = ["sharpness", "loss_landscape", "landscape_directions", "analyze_checkpoint"]

Batch = Tuple[Tensor, Tensor]
_SAQ_FIELDS = ("_saq_e", "_saq_s", "_saq_before", "_saq_capture")


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    if amp != "bf16":
        raise ValueError(f"saq.analysis: amp={amp!r}; use 'none' (fp32, the default) or 'bf16' "
                         "(fp16 would need a GradScaler for the ascent)")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _device_of(model: nn.Module, device: Optional[torch.device]) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _untouched(model: nn.Module):
    """Eval mode inside; afterwards, also after an exception, the model as it was: every
    parameter and buffer value (a copy is taken: the ascent perturbs parameters in place, and a
    model whose quantizers have not seen a batch yet initializes them from the first analysis
    batch), each module's train/eval mode, every .grad, and the quantized layers' SAQ state and
    first-batch-init flags."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    values = [(t, t.detach().clone()) for t in itertools.chain(params, model.buffers())]
    modes = [(m, m.training) for m in model.modules()]
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    saq_state = [tuple(getattr(m, f) for f in _SAQ_FIELDS) + (m.quant_initialized,) for m in layers]
    probes = [(m._saq_probe, None if m._saq_probe is None else m._saq_probe.grad) for m in layers]
    for p in params:
        p.grad = None
    model.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in values:
                t.copy_(v)
        for m, training in modes:
            m.training = training
        for p, g in zip(params, grads):
            p.grad = g
        for m, st, (probe, pg) in zip(layers, saq_state, probes):
            for f, v in zip(_SAQ_FIELDS, st):
                setattr(m, f, v)
            m.quant_initialized = st[-1]
            m._saq_probe = probe
            if probe is not None:
                probe.grad = pg


def _batches(batches: Iterable[Batch], max_batches: Optional[int]) -> Iterable[Batch]:
    if max_batches is not None:
        if max_batches < 1:
            raise ValueError(f"saq.analysis: max_batches={max_batches!r} must be >= 1 (or None for all)")
        batches = itertools.islice(batches, max_batches)
    return batches


def sharpness(
    model: nn.Module,
    batches: Iterable[Batch],
    rho: float = 0.05,
    case: int = 3,
    adaptive: bool = False,
    eta: float = 0.01,
    include_bn: bool = True,
    include_aclip: bool = True,
    include_wclip: bool = False,
    max_batches: Optional[int] = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    device: Optional[torch.device] = None,
    amp: str = "none",
) -> Dict[str, float]:
    """Mean loss, mean perturbed loss and their difference (the sharpness) over ``batches``.

    Per batch (x [B, ...], y [B]): ``L0 = loss_fn(model(x), y)`` (a mean over the batch), its
    backward, the ascent of ``saq.SAQ(model, ..., rho, case, adaptive, eta, include_*)``, then
    ``L1`` at the perturbed point (no backward) and a bit-exact restore. Losses are averaged
    over samples (each batch weighted by B). Returns ``loss``, ``perturbed_loss``,
    ``sharpness = perturbed_loss - loss``, ``rho``, ``case``, ``adaptive``, ``batches``,
    ``samples``. ``rho = 0`` gives a sharpness of exactly 0. A batch whose ascent gradients are
    not finite gets no perturbation (as the ascent skips in training) and is counted in
    ``nonfinite_batches``; its losses stay in the means, so a broken model shows as inf / NaN.
    """
    from saq.optim.saq import SAQ

    dev = _device_of(model, device)
    trained = [p for p in model.parameters() if p.requires_grad]
    if not trained:
        raise ValueError("saq.analysis.sharpness: the model has no parameter that requires grad; "
                         "the perturbation follows the gradient of the trained parameters")
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # L0 * B, L1 * B, B, non-finite
    n_batches = 0
    with _untouched(model):
        # lr 0, never stepped: SAQ is used for its ascent and restore only
        opt = SAQ(model, torch.optim.SGD(trained, lr=0.0), rho=rho, case=case, adaptive=adaptive,
                  eta=eta, include_bn=include_bn, include_aclip=include_aclip,
                  include_wclip=include_wclip, fused=False)
        for x, y in _batches(batches, max_batches):
            x, y = x.to(dev), y.to(dev)
            with _autocast(dev, amp):
                loss0 = loss_fn(model(x), y)
            loss0.float().backward()
            opt.ascent_step()
            found_inf = opt._found_inf  # the ascent's device flag: its perturbation was zeroed
            with torch.no_grad(), _autocast(dev, amp):
                loss1 = loss_fn(model(x), y)
            opt.restore_step()
            opt.zero_grad(set_to_none=True)
            b = float(y.shape[0])
            bad = (found_inf > 0).double() if found_inf is not None else torch.zeros((), dtype=torch.float64, device=dev)
            sums += torch.stack([loss0.detach().double() * b, loss1.double() * b,
                                 torch.tensor(b, dtype=torch.float64, device=dev), bad.to(dev)])
            n_batches += 1
    if n_batches == 0:
        raise ValueError("saq.analysis.sharpness: no batches (an empty loader, or max_batches=0)")
    l0, l1, n, bad = sums.tolist()
    return {"loss": l0 / n, "perturbed_loss": l1 / n, "sharpness": (l1 - l0) / n,
            "rho": float(rho), "case": int(case), "adaptive": bool(adaptive),
            "batches": n_batches, "samples": int(n), "nonfinite_batches": int(bad)}


def _filter_normalized(d: Tensor, w: Tensor) -> Tensor:
    """d with each output filter (dim 0) scaled to the norm of the same filter of w."""
    if w.dim() <= 1:
        return d * (w.norm() / d.norm().clamp_min(1e-12))
    dn = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    wn = w.flatten(1).norm(dim=1)
    return d * (wn / dn).reshape(-1, *([1] * (d.dim() - 1)))


def _landscape_targets(model: nn.Module) -> List[Tuple[nn.Module, Tensor]]:
    """(layer, the weight the loss sees) per perturbed layer: the quantized layers' Q(w), or,
    without any, the conv / linear weights themselves."""
    q = [m for m in model.modules() if isinstance(m, QuantLayer)]
    if q:
        with torch.no_grad():
            return [(m, m.quantize_weight().detach()) for m in q]
    return [(m, m.weight.detach()) for m in model.modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def landscape_directions(model: nn.Module, seed: int = 0) -> List[Tensor]:
    """The random filter-normalized direction of :func:`loss_landscape`, one tensor per
    perturbed layer (in ``model.modules()`` order), drawn from ``torch.Generator().manual_seed
    (seed)`` on the CPU (the same direction on every device)."""
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for _, w in _landscape_targets(model):
        d = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.device, w.dtype)
        out.append(_filter_normalized(d, w))
    return out


def loss_landscape(
    model: nn.Module,
    batches: Iterable[Batch],
    alphas: Sequence[float] = tuple(i / 10 for i in range(-10, 11)),
    seed: int = 0,
    max_batches: Optional[int] = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    device: Optional[torch.device] = None,
    amp: str = "none",
) -> Dict[str, list]:
    """The mean loss at ``Q(w) + alpha * d`` for each alpha (``d``: :func:`landscape_directions`).

    The batches are read once and kept (``max_batches`` of them; all by default), so every alpha
    sees the same data. Quantized layers are moved through their perturbation hook (``Q(w) + s*e``,
    the form of Case 3's pass 2), nothing is written into their weights; a model without them has
    its conv / linear weights moved in place and restored bit for bit. Returns ``alpha`` and
    ``loss`` (lists of floats), ``seed``, ``samples``.
    """
    alphas = [float(a) for a in alphas]
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise ValueError(f"saq.analysis.loss_landscape: alphas must be finite numbers, got {alphas!r}")
    dev = _device_of(model, device)
    data = [(x.to(dev), y.to(dev)) for x, y in _batches(batches, max_batches)]
    if not data:
        raise ValueError("saq.analysis.loss_landscape: no batches (an empty loader, or max_batches=0)")
    losses = []
    with _untouched(model), torch.no_grad():
        targets = _landscape_targets(model)
        dirs = landscape_directions(model, seed)
        quantized = bool(targets) and isinstance(targets[0][0], QuantLayer)
        backups = [] if quantized else [m.weight.detach().clone() for m, _ in targets]
        try:
            for a in alphas:
                for (m, _), d, i in zip(targets, dirs, itertools.count()):
                    if quantized:
                        m.set_perturbation(d, torch.tensor(a, device=d.device), before=False)
                    else:
                        m.weight.copy_(backups[i] + a * d)
                total, n = 0.0, 0
                for x, y in data:
                    with _autocast(dev, amp):
                        loss = loss_fn(model(x), y)
                    total += float(loss) * y.shape[0]
                    n += y.shape[0]
                losses.append(total / n)
        finally:
            for (m, _), i in zip(targets, itertools.count()):
                if quantized:
                    m.set_perturbation(None, None, False)
                else:
                    m.weight.copy_(backups[i])
    return {"alpha": alphas, "loss": losses, "seed": int(seed), "samples": n}


def _check_plot_path(plot: str, landscape: int) -> None:
    """Before any work: --plot needs a curve, a file name (not a folder) and a writable folder."""
    import os

    from saq.train.config import ConfigError as error

    if not landscape:
        raise error("--plot draws the --landscape curve; add --landscape N (e.g. 21) or drop --plot")
    if os.path.isdir(plot):
        raise error(f"--plot {plot} is a folder; give a file name, e.g. {os.path.join(plot, 'landscape.png')}")
    folder = os.path.dirname(os.path.abspath(plot))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise error(f"--plot {plot}: cannot create its folder ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK):
        raise error(f"--plot {plot}: the folder {folder} is not writable")


def analyze_checkpoint(
    path: str,
    rho: Optional[float] = None,
    case: int = 3,
    adaptive: bool = False,
    split: str = "train",
    batches: int = 8,
    batch_size: Optional[int] = None,
    landscape: int = 0,
    span: float = 1.0,
    seed: int = 0,
    plot: Optional[str] = None,
    device: str = "auto",
    workers: int = 0,
    amp: str = "none",
) -> Dict[str, object]:
    """``saq analyze``: rebuild a checkpoint's model, then :func:`sharpness` (and, with
    ``landscape >= 2`` points, :func:`loss_landscape` over ``alpha in linspace(-span, span)``,
    drawn to ``plot`` when given) on its dataset.

    The data: the first ``batches`` batches of the ``split`` ("train": the epoch-0 order of the
    run's seed; "test": in order), without augmentation. ``rho`` defaults to the run's own radius
    (its dataset's default when the run was QAT), so that checkpoints of one dataset, SAQ or not,
    are compared at one radius. Returns the sharpness fields plus ``checkpoint``, ``model``,
    ``dataset``, ``split``, ``epoch`` and, with a landscape, ``landscape`` (alpha, loss).
    """
    from saq.data import make_loaders, set_epoch
    from saq.train import checkpoint as ckpt_mod
    from saq.train import distributed as dist_mod
    from saq.train.config import ConfigError, TrainConfig, apply_overrides
    from saq.train.loop import build_model

    if split not in ("train", "test"):
        raise ConfigError(f"--split must be train or test, got {split!r}")
    for name, v, lo in (("--batches", batches, 1), ("--batch-size", batch_size, 1)):
        if v is not None and v < lo:
            raise ConfigError(f"{name} must be >= {lo}, got {v}")
    if landscape == 1 or landscape < 0:
        raise ConfigError(f"--landscape takes the number of points (>= 2; 0 = none), got {landscape}")
    if not (span > 0 and math.isfinite(span)):
        raise ConfigError(f"--span must be a positive number, got {span}")
    if rho is not None and not (rho >= 0 and math.isfinite(rho)):
        raise ConfigError(f"--rho must be >= 0, got {rho}")
    if case not in (1, 2, 3):
        raise ConfigError(f"--case must be 1, 2 or 3, got {case}")
    if amp not in ("none", "bf16"):
        raise ConfigError(f"--amp must be none or bf16 for the analysis, got {amp!r}")
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    if plot:
        _check_plot_path(plot, landscape)
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    ck = ckpt_mod.load_checkpoint(path)
    cfg = TrainConfig.from_dict(ck["config"])
    if batch_size is not None:
        cfg = apply_overrides(cfg, {"batch_size": batch_size})
    if rho is None:
        rho = cfg.rho if cfg.rho is not None else 0.05
    dev = dist_mod.resolve_device(device, dist_mod.DistEnv())
    train_loader, test_loader, info = make_loaders(
        cfg.dataset, cfg.data_root, batch_size=cfg.batch_size, seed=cfg.seed,
        num_workers=workers, augment=False)
    if split == "train":
        set_epoch(train_loader, 0)
    loader = train_loader if split == "train" else test_loader
    model = build_model(cfg, info["num_classes"], info["input_shape"][0], info["input_shape"][1])
    ckpt_mod.load_model_state(model, ck["model"], path)
    model.to(dev)
    res: Dict[str, object] = dict(sharpness(model, loader, rho=rho, case=case, adaptive=adaptive,
                                            eta=cfg.eta, max_batches=batches, device=dev, amp=amp))
    res.update(checkpoint=path, model=cfg.model, dataset=cfg.dataset, split=split,
               epoch=ck["epoch"], method=cfg.method, wbits=cfg.wbits, abits=cfg.abits)
    if landscape:
        alphas = [span * (2 * i / (landscape - 1) - 1) for i in range(landscape)]
        curve = loss_landscape(model, loader, alphas=alphas, seed=seed, max_batches=batches,
                               device=dev, amp=amp)
        res["landscape"] = {"alpha": curve["alpha"], "loss": curve["loss"], "seed": seed}
        if plot:
            from saq.train.plots import plot_landscape

            plot_landscape(curve["alpha"], curve["loss"], plot,
                           title=f"{cfg.model} w{cfg.wbits}a{cfg.abits} {cfg.method}, epoch "
                                 f"{ck['epoch']} ({cfg.dataset} {split}, {res['samples']} images)")
            res["plot"] = plot
    return res
